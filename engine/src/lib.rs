//! The Flotilla MoE engine: a DeepSeek-V3-style Mixture-of-Experts decoder that trains with data
//! parallelism and serves an OpenAI-compatible API.
//!
//! Without the default `runtime` feature only [`config`] is built (serde + schemars), which is
//! what the operator embeds in its custom resources.

pub mod config;

/// Exit codes of `flotilla-worker` that the operator tells apart (the others: 0 success, 1 a
/// runtime failure, 143 stopped by a signal after checkpointing).
pub mod exit {
    /// The configuration or usage is invalid.
    pub const INVALID_CONFIG: u8 = 2;
    /// `serve` could not bind its port: a placement problem (the port is taken), not a model
    /// that fails to load, so the replica is tried again rather than the rollout stopped.
    pub const PORT_UNAVAILABLE: u8 = 3;
}

#[cfg(feature = "runtime")]
pub mod checkpoint;
#[cfg(feature = "runtime")]
pub mod collective;
#[cfg(feature = "runtime")]
pub mod data;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod model;
#[cfg(feature = "runtime")]
pub mod optim;
#[cfg(feature = "runtime")]
pub mod progress;
#[cfg(feature = "runtime")]
pub mod rng;
#[cfg(feature = "runtime")]
pub mod serve;
#[cfg(feature = "runtime")]
pub mod sim;
#[cfg(feature = "runtime")]
pub mod train;
#[cfg(feature = "runtime")]
pub mod whereabouts;
