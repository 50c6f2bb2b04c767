//! The Flotilla MoE engine.
