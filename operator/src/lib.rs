//! The Flotilla operator.
