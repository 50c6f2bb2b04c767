//! The `flotilla.agent.v1` gRPC API between the operator and the node agents.
//!
//! The contract is `proto/flotilla/agent/v1/agent.proto`; this crate only compiles it (see
//! `build.rs`, which runs on every build, so there is no generated file to keep in sync).

/// Generated types, client and server for package `flotilla.agent.v1`.
pub mod agent {
    /// Version 1 of the agent API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("flotilla.agent.v1");
    }
}

pub use agent::v1;

/// Largest message either side accepts on the agent stream, in bytes. A registration of a node
/// with 16 GPUs and a few hundred workers is far below it; anything larger is refused.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Current time as Unix epoch nanoseconds, the unit of every timestamp in the API.
pub fn now_unix_nanos() -> i64 {
    let since =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
}
