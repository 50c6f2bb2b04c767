//! The operator's view of the agents: what the controllers ask of them and learn from them.
//!
//! The agent gRPC server (`crate::agents`) implements [`Fleet`]. Until it is wired in,
//! [`NoAgents`] stands in: it launches nothing and reports nothing, so jobs stop at `Scheduled`.

use crate::lifecycle::AttemptReport;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// Identifies one workload's workers on the agents.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// `TrainingJob` or `InferenceService`.
    pub kind: &'static str,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object's UID (a recreated object is a different workload).
    pub uid: String,
    /// The replica index for an `InferenceService`; `None` for a `TrainingJob`.
    pub replica: Option<i32>,
}

/// What one service replica runs, as written to the service's status before the launch.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaLaunch {
    /// Where its workers run.
    pub placement: crate::crd::Placement,
    /// The checkpoint directory (with `latest`) or one `step-…` directory to serve.
    pub checkpoint: String,
    /// The model name it serves under.
    pub served_name: String,
    /// The port its HTTP API listens on, on every address of its node.
    pub port: u16,
    /// Most requests decoded together.
    pub max_batch_size: u32,
    /// `max_tokens` of a request that names none.
    pub default_max_tokens: u32,
}

/// What the controllers need from the agents.
pub trait Fleet: Send + Sync {
    /// The latest summary of an attempt's workers.
    fn report(&self, key: &WorkloadKey, attempt: i32) -> AttemptReport;
    /// Launch every worker of `attempt` on the placement already written to status.
    fn launch(&self, key: &WorkloadKey, attempt: i32) -> BoxFuture<'_, Result<(), String>>;
    /// Stop every worker of `attempt`.
    fn stop(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Launch the workers of one launch (`attempt`) of a service replica.
    fn launch_replica(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        replica: &ReplicaLaunch,
    ) -> BoxFuture<'_, Result<(), String>> {
        let _ = replica;
        self.launch(key, attempt)
    }
    /// Workloads whose report changed, so the controllers look at them at once; `None` when
    /// the fleet never announces changes (or the stream was already taken).
    fn changes(&self) -> Option<BoxStream<'static, WorkloadKey>> {
        None
    }
}

/// STAND-IN for the agent link: no agents are connected. Launches are logged and dropped; the
/// report says nothing runs, so every attempt counts as stopped.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoAgents;

impl Fleet for NoAgents {
    fn report(&self, _: &WorkloadKey, _: i32) -> AttemptReport {
        AttemptReport { all_stopped: true, ..Default::default() }
    }

    fn launch(&self, key: &WorkloadKey, attempt: i32) -> BoxFuture<'_, Result<(), String>> {
        tracing::warn!(?key, attempt, "no agent link: workers not launched");
        Box::pin(async { Ok(()) })
    }

    fn stop(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), String>> {
        tracing::info!(?key, attempt, reason, "no agent link: nothing to stop");
        Box::pin(async { Ok(()) })
    }
}
