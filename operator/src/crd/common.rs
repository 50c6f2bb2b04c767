//! Status types shared by the Flotilla kinds: phases, attempts, placements, progress, restarts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Flotilla kind.
pub const GROUP: &str = "flotilla.dev";
/// The API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// How many restart records a status keeps; older ones are dropped first.
pub const RESTART_HISTORY_LIMIT: usize = 20;

/// Where a job is in its life. Terminal phases are `Succeeded` and `Failed`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Accepted by the API server, not yet checked by the operator.
    #[default]
    Pending,
    /// Valid and waiting for a gang placement on healthy GPUs.
    Queued,
    /// A placement is written to status; workers are being launched.
    Scheduled,
    /// Every worker of the current attempt has started.
    Running,
    /// The attempt ended; waiting for its workers to be confirmed dead and the backoff to pass.
    Restarting,
    /// Stopped by the user (`spec.suspend`); no workers run.
    Suspended,
    /// Finished: every worker exited 0.
    Succeeded,
    /// Finished without success: invalid spec, budget spent, deadline passed or a fatal exit code.
    Failed,
}

impl JobPhase {
    /// True for `Succeeded` and `Failed`: nothing more happens except TTL cleanup.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }

    /// True while workers of the current attempt may run (`Scheduled`, `Running`).
    pub fn has_live_attempt(self) -> bool {
        matches!(self, JobPhase::Scheduled | JobPhase::Running)
    }

    /// True while the job holds its GPUs: its attempt may run, or it is restarting on them
    /// (the old workers stop before the GPUs are given up).
    pub fn holds_gpus(self) -> bool {
        self.has_live_attempt() || self == JobPhase::Restarting
    }

    /// The phase as written in status and printer columns.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Queued => "Queued",
            JobPhase::Scheduled => "Scheduled",
            JobPhase::Running => "Running",
            JobPhase::Restarting => "Restarting",
            JobPhase::Suspended => "Suspended",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One worker's seat in a gang placement.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPlacement {
    /// The worker's rank, 0-based and dense within the attempt.
    #[schemars(range(min = 0))]
    pub rank: i32,
    /// The `GpuNode` the worker runs on.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The GPU indices on that node given to the worker.
    #[schemars(length(max = 16))]
    pub gpus: Vec<i32>,
}

/// Where every worker of one attempt runs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// One entry per worker, ordered by rank.
    #[schemars(length(max = 1024))]
    pub workers: Vec<WorkerPlacement>,
}

impl Placement {
    /// The distinct nodes in rank order.
    pub fn nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = Vec::new();
        for w in &self.workers {
            if !nodes.contains(&w.node.as_str()) {
                nodes.push(&w.node);
            }
        }
        nodes
    }
}

/// One run of the job's gang. Every command to an agent carries the attempt number, so agents
/// refuse commands meant for an older attempt.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// The attempt number, 1 for the first run, increasing by one on every restart.
    #[schemars(range(min = 1))]
    pub number: i32,
    /// Where the attempt's workers run; written before any worker is launched.
    pub placement: Placement,
    /// When the placement was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Time>,
    /// When every worker of the attempt had started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// The checkpoint step the attempt resumed from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<i64>,
    /// Started on loan: on GPUs held for a job ahead of it in line, which would otherwise idle.
    /// When that job can start, the loan is taken back: the attempt is stopped (its workers
    /// checkpoint) and the job requeues without spending its restart budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_loan: bool,
}

/// Training progress as reported by rank 0.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// The last completed optimiser step.
    pub step: i64,
    /// The step the job ends at, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// `step / totalSteps` as a whole percentage, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
    /// The training loss at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Throughput over the last reporting window, in tokens per second across the gang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// The step of the newest complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_step: Option<i64>,
    /// Estimated seconds until `totalSteps` at the current throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// A one-line summary for `kubectl get`, such as `1200/5000 (24%)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

/// Why an attempt ended and the job restarted.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum RestartCause {
    /// A worker exited with a retryable code; spends the user's restart budget.
    WorkerExit,
    /// A GPU or node fault; does not spend the user's budget.
    HardwareFault,
    /// The agent running a worker stopped reporting for longer than the fence timeout.
    NodeLost,
    /// An operator or admin action (drain, preemption); does not spend the user's budget.
    Preempted,
    /// A rank made no step within its progress lease (`spec.hangDetection`); `rank` names the
    /// one that stopped first. Spends the user's budget unless that rank's GPU was Degraded.
    Hang,
    /// Moved off a straggler's GPU (`spec.stragglers.moveOff`); does not spend the budget.
    Straggler,
}

/// One restart, kept in a bounded history in the job's status.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartRecord {
    /// When the attempt was seen to end.
    pub time: Time,
    /// The attempt that ended.
    pub attempt: i32,
    /// The class of cause.
    pub cause: RestartCause,
    /// A human-readable reason, such as `worker 3 exited with code 1`.
    #[schemars(length(max = 1024))]
    pub reason: String,
    /// The worker's exit code, for `WorkerExit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The rank blamed: the worker that exited, or the one that stopped first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<i32>,
    /// The node involved, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The GPU index involved, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<i32>,
    /// The NVIDIA XID code, for GPU faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<i32>,
    /// Optimiser steps lost: steps done since the last complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_lost: Option<i64>,
}

/// Condition types used on every kind.
pub mod condition_types {
    /// The spec passed the operator's checks (those the API server cannot do).
    pub const VALID: &str = "Valid";
    /// A gang placement exists for the current attempt.
    pub const SCHEDULED: &str = "Scheduled";
    /// The workload is doing its work (training or serving).
    pub const READY: &str = "Ready";
    /// The job has finished, successfully or not.
    pub const COMPLETE: &str = "Complete";
}

/// Set a condition, keeping `lastTransitionTime` when the status did not change.
/// Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = existing.status != new.status;
            let changed = transition
                || existing.reason != new.reason
                || existing.message != new.message
                || existing.observed_generation != new.observed_generation;
            if changed {
                let keep_time = existing.last_transition_time.clone();
                *existing = new;
                if !transition {
                    existing.last_transition_time = keep_time;
                }
            }
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Append a restart record, dropping the oldest beyond [`RESTART_HISTORY_LIMIT`].
pub fn push_restart(history: &mut Vec<RestartRecord>, record: RestartRecord) {
    history.push(record);
    if history.len() > RESTART_HISTORY_LIMIT {
        let excess = history.len() - RESTART_HISTORY_LIMIT;
        history.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn cond(status: &str, reason: &str, secs: i64) -> Condition {
        Condition {
            type_: condition_types::VALID.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(secs).unwrap()),
        }
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut conds = vec![cond("True", "A", 10)];
        assert!(set_condition(&mut conds, cond("True", "B", 20)));
        assert_eq!(conds[0].reason, "B");
        assert_eq!(conds[0].last_transition_time.0.as_second(), 10);
        assert!(set_condition(&mut conds, cond("False", "B", 30)));
        assert_eq!(conds[0].last_transition_time.0.as_second(), 30);
        assert!(!set_condition(&mut conds, cond("False", "B", 40)));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn restart_history_is_bounded_and_keeps_newest() {
        let mut history = Vec::new();
        for attempt in 1..=30 {
            push_restart(
                &mut history,
                RestartRecord {
                    time: Time(Timestamp::from_second(attempt as i64).unwrap()),
                    attempt,
                    cause: RestartCause::WorkerExit,
                    reason: String::new(),
                    exit_code: Some(1),
                    rank: None,
                    node: None,
                    gpu: None,
                    xid: None,
                    steps_lost: None,
                },
            );
        }
        assert_eq!(history.len(), RESTART_HISTORY_LIMIT);
        assert_eq!(history.first().unwrap().attempt, 11);
        assert_eq!(history.last().unwrap().attempt, 30);
    }
}
