//! The Flotilla node agent.
