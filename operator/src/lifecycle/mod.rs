//! The `TrainingJob` state machine: observed facts in, the next status and the effects out.
//!
//! Pure: no client, no clock, no I/O. The controller gathers [`JobFacts`], calls [`decide`],
//! writes [`Transition::status`] to the API server, and only then executes
//! [`Transition::effects`] — so a placement is always persisted before any worker is launched.

mod machine;
#[cfg(test)]
mod tests;

pub use machine::decide;

use crate::crd::training_job::{RestartPolicy, TrainingJobSpec, TrainingJobStatus};
use crate::crd::{JobPhase, Placement, Progress};
pub use crate::placement::Unschedulable;
pub use crate::validate::InvalidSpec;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Everything the state machine needs to know, gathered by the controller.
#[derive(Clone, Debug)]
pub struct JobFacts<'a> {
    /// The clock reading to use for every time decision.
    pub now: Timestamp,
    /// `metadata.generation` of the object being reconciled.
    pub generation: i64,
    /// The desired state.
    pub spec: &'a TrainingJobSpec,
    /// The status as last written.
    pub status: &'a TrainingJobStatus,
    /// The operator's own checks of the spec (those the API server cannot do).
    pub validity: Result<(), InvalidSpec>,
    /// A placement for the next attempt, computed when the job is waiting for one.
    pub candidate: Option<Result<Placement, Unschedulable>>,
    /// The candidate placement is on loan (see [`crate::crd::Attempt::on_loan`]).
    pub on_loan: bool,
    /// What the agents reported about the current attempt's workers.
    pub report: AttemptReport,
    /// The higher-priority job (`namespace/name`) that asked to preempt the current attempt,
    /// when it did (see [`PREEMPTED_BY`]).
    pub preempted_by: Option<String>,
}

/// Annotation a waiting job puts on a lower-priority running job to preempt it:
/// `<attempt>/<namespace>/<name>` — the victim's attempt number and the preemptor. Naming the
/// attempt makes the request idempotent and harmless once that attempt is over.
pub const PREEMPTED_BY: &str = "flotilla.dev/preempted-by";

/// The preemptor named by a [`PREEMPTED_BY`] value when it targets `attempt`.
pub fn preempted_by(value: &str, attempt: i32) -> Option<&str> {
    let (n, by) = value.split_once('/')?;
    (n.parse::<i32>().ok()? == attempt && !by.is_empty()).then_some(by)
}

/// How one worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerExit {
    /// The worker's rank.
    pub rank: i32,
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
}

/// A fault on hardware the attempt uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HardwareFault {
    /// The node.
    pub node: String,
    /// The GPU index, when one GPU is at fault.
    pub gpu: Option<i32>,
    /// The NVIDIA XID code, when the fault was an XID.
    pub xid: Option<i32>,
    /// What happened.
    pub message: String,
}

/// A rank that made no progress within its lease (`spec.hangDetection`), found by
/// [`crate::workers::hang`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HungRank {
    /// The rank that stopped first.
    pub rank: i32,
    /// Its node.
    pub node: String,
    /// Its (first) GPU's index, when known.
    pub gpu: Option<i32>,
    /// The evidence, for the restart record, the condition and the Event.
    pub message: String,
    /// A GPU of the rank is Degraded: the hang is charged to the hardware, not the budget.
    pub gpu_degraded: bool,
}

/// A rank persistently slower than its gang (found by [`crate::workers::straggler`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SlowRank {
    /// The rank.
    pub rank: i32,
    /// Its node.
    pub node: String,
    /// Its (first) GPU's index and UUID, when known.
    pub gpu: Option<(i32, String)>,
    /// The evidence, for the GPU's health message and the Event.
    pub evidence: String,
    /// Its GPU is already marked `Degraded` (`SlowSteps`) by its agent.
    pub suspected: bool,
    /// The cost/benefit rule's verdict on moving the job now, in words, and whether to.
    pub move_rule: String,
    /// Moving the job off it now saves more than twice what it costs.
    pub worth_moving: bool,
}

/// The agents' reports about one attempt, summarised.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttemptReport {
    /// Workers confirmed running.
    pub running: i32,
    /// Workers that exited, at most one entry per rank.
    pub exits: Vec<WorkerExit>,
    /// A hardware fault under the attempt, if any.
    pub fault: Option<HardwareFault>,
    /// A node of the attempt whose workers are gone with it: its agent has not been heard from
    /// for longer than the fence timeout, or it restarted (workers die with their agent).
    pub node_lost: Option<HardwareFault>,
    /// A node of the attempt whose agent's stream is closed or silent past the heartbeat
    /// timeout, but not yet for the fence timeout: its workers' fate is unknown, so exits of
    /// the other workers (who lose their peer) are not charged to the job yet.
    pub node_unreachable: Option<String>,
    /// Every worker of the attempt is confirmed dead (or the fence timeout passed), so another
    /// attempt may start. True when the attempt never launched anything.
    pub all_stopped: bool,
    /// Latest training progress (the highest step any rank reported).
    pub progress: Option<Progress>,
    /// A hung rank, when a progress lease ran out.
    pub hang: Option<HungRank>,
    /// When the earliest progress lease runs out, if one is running: the job is looked at again
    /// then even if nothing is reported.
    pub lease_ends_in: Option<std::time::Duration>,
    /// A straggler in the gang.
    pub straggler: Option<SlowRank>,
}

/// The state machine's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The status to write.
    pub status: TrainingJobStatus,
    /// What to do after the status is written, in order.
    pub effects: Vec<Effect>,
    /// The event to publish when the phase changed.
    pub event: Option<PhaseEvent>,
    /// When to look again even if nothing is reported (backoff, deadline, TTL).
    pub requeue_after: Option<SignedDuration>,
    /// UIDs of lower-priority running jobs to preempt so this one can be placed (the
    /// controller annotates them; each stops itself, and this job is placed once they have).
    pub preempt: Vec<String>,
    /// Every phase entered in this step, in order: a job placed as soon as it is queued enters
    /// `Queued` and `Scheduled` (counted in the phase-transition metric) in one status write.
    pub entered: Vec<JobPhase>,
}

/// An effect the controller executes after writing the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Launch every worker of this attempt on its placement (already written to status).
    Launch {
        /// The attempt number the agents must tag the workers with.
        attempt: i32,
    },
    /// Stop every worker of this attempt.
    Stop {
        /// The attempt to stop.
        attempt: i32,
        /// Why, for the agents' logs.
        reason: String,
    },
    /// Delete the job: its TTL after finishing has passed.
    Delete,
    /// Mark a GPU `Degraded` (`SlowSteps`) on its agent: it slows its gang.
    SuspectGpu {
        /// The node.
        node: String,
        /// The GPU.
        gpu_uuid: String,
        /// Why, for its health message.
        evidence: String,
    },
}

/// An Event for a phase change, with a reason a human understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseEvent {
    /// True for Warning events (failures, restarts), false for Normal.
    pub warning: bool,
    /// A PascalCase reason, such as `Scheduled` or `RestartBudgetSpent`.
    pub reason: &'static str,
    /// A sentence for `kubectl describe`.
    pub note: String,
}

/// What an exit code means under the job's restart policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitClass {
    /// Exit code 0.
    Success,
    /// Restart the job (spends the budget).
    Retryable,
    /// Fail the job now.
    Fatal,
}

/// Classify one worker's end under `policy`: 0 succeeds; a code in `fatalExitCodes`, or outside
/// a non-empty `retryableExitCodes`, is fatal; anything else, including death by signal, retries.
pub fn classify_exit(policy: &RestartPolicy, exit: &WorkerExit) -> ExitClass {
    match exit.code {
        Some(0) => ExitClass::Success,
        Some(code) if policy.fatal_exit_codes.contains(&code) => ExitClass::Fatal,
        Some(code)
            if !policy.retryable_exit_codes.is_empty()
                && !policy.retryable_exit_codes.contains(&code) =>
        {
            ExitClass::Fatal
        }
        _ => ExitClass::Retryable,
    }
}

/// The wait before restart number `restarts` (1-based): `backoffSeconds` doubled per earlier
/// restart, capped at `maxBackoffSeconds`.
pub fn backoff(policy: &RestartPolicy, restarts: i32) -> SignedDuration {
    let doublings = (restarts.max(1) - 1).min(30) as u32;
    let secs = i64::from(policy.backoff_seconds).saturating_mul(1i64 << doublings);
    SignedDuration::from_secs(secs.min(i64::from(policy.max_backoff_seconds)))
}

/// The next attempt number given the status.
pub fn next_attempt_number(status: &TrainingJobStatus) -> i32 {
    status.attempt.as_ref().map_or(1, |a| a.number + 1)
}
