//! The facts several Flotilla processes share, in one home (STYLE.md habit 13).
//!
//! The operator, the agent and the engine (`flotilla-worker`) are separate processes that must
//! agree on a few tables and formats: what an NVIDIA XID says about a GPU ([`xid`]), the progress
//! line a training worker sends its agent ([`progress`]), and the environment variables the agent
//! sets for every worker ([`worker_env`]), the node Lease's names and annotations
//! ([`node_lease`]), and the fault names of the agents' injection API ([`inject`]). Each is
//! defined here once, and each side uses it from
//! here. The crate depends on nothing in the workspace, so any crate can depend on it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fnv;
pub mod inject;
pub mod node_lease;
pub mod progress;
pub mod worker_env;
pub mod xid;
