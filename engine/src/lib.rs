//! The Flotilla MoE engine: a DeepSeek-V3-style Mixture-of-Experts decoder that trains with data
//! parallelism and serves an OpenAI-compatible API.
//!
//! Without the default `runtime` feature only [`config`] is built (serde + schemars), which is
//! what the operator embeds in its custom resources.

pub mod config;

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
pub mod train;
