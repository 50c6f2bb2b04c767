//! Workers: what the controllers ask of the agents and learn from them.
//!
//! [`Workers`] is the controllers' whole view of the agents: launch the workers of an attempt,
//! stop them, and read an [`AttemptReport`] folded from the agents' events. [`AgentWorkers`]
//! implements it over the agents' gRPC server ([`crate::agents`]):
//!
//! - [`launch`] builds each worker's command line and environment (pure);
//! - [`fold`] folds worker events into what is known of each attempt (pure);
//! - [`report`] turns that and the nodes' health into the lifecycle's summary (pure);
//! - [`hang`] judges the attempt's progress lease, [`straggler`] its ranks' pace (pure);
//! - [`agent_workers`] sends the commands and keeps the state.

pub mod agent_workers;
pub mod fold;
pub mod hang;
pub mod launch;
pub mod pace;
pub mod report;
pub mod straggler;
#[cfg(test)]
mod tests;

pub use agent_workers::AgentWorkers;
pub use launch::{FAILED_TO_START_CODE, WorkerLaunchArgs};

use crate::crd::{Placement, TrainingJob};
use crate::ids::WorkloadKey;
use crate::lifecycle::AttemptReport;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// What one service replica runs, as written to the service's status before the launch.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaLaunch {
    /// Where its workers run.
    pub placement: Placement,
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

/// What a job asks of its workers' progress (`spec.hangDetection`, `spec.stragglers`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProgressPolicy {
    /// The progress lease; `None` when hang detection is off.
    pub hang: Option<hang::HangPolicy>,
    /// The straggler threshold; `None` when straggler detection is off.
    pub straggler_threshold: Option<f64>,
}

impl ProgressPolicy {
    /// The policy of a job.
    pub fn of(spec: &crate::crd::training_job::TrainingJobSpec) -> Self {
        let t = spec.stragglers.threshold;
        ProgressPolicy {
            hang: hang::HangPolicy::of(&spec.hang_detection),
            straggler_threshold: (t > 0.0 && t <= 1.0).then_some(t),
        }
    }
}

/// What a launch runs: an attempt of a training job (its placement in its status, written
/// before the launch), or one launch of a service replica.
#[derive(Clone, Copy, Debug)]
pub enum Launch<'a> {
    /// The job, with the status just written (it holds the attempt's placement).
    Job(&'a TrainingJob),
    /// A service replica.
    Replica(&'a ReplicaLaunch),
}

/// What the controllers need from the agents.
pub trait Workers: Send + Sync {
    /// The latest summary of an attempt's workers.
    fn report(&self, key: &WorkloadKey, attempt: i32) -> AttemptReport;
    /// Judges the attempt's progress under `policy`: fills `report.hang` when a rank stopped
    /// making progress, `report.lease_ends_in` while every lease holds, and `report.straggler`
    /// when a rank is persistently slower than its gang. Workers that know nothing of progress
    /// leave the report as it is.
    fn judge_progress(
        &self,
        _key: &WorkloadKey,
        _attempt: i32,
        _policy: &ProgressPolicy,
        _report: &mut AttemptReport,
    ) {
    }
    /// Marks a GPU `Degraded` (`SlowSteps`) on its agent, with `evidence`.
    fn suspect_gpu<'a>(
        &'a self,
        _node: &'a str,
        _gpu_uuid: &'a str,
        _evidence: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// Launch every worker of `attempt`.
    fn launch<'a>(
        &'a self,
        key: &'a WorkloadKey,
        attempt: i32,
        launch: Launch<'a>,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Stop every worker of `attempt`.
    fn stop(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Workloads whose report changed, so the controllers look at them at once; `None` when
    /// the workers never announce changes (or the stream was already taken).
    fn changes(&self) -> Option<BoxStream<'static, WorkloadKey>> {
        None
    }
}
