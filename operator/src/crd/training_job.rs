//! `TrainingJob`: a gang of workers training a model, restarted from checkpoints on faults.

use super::common::{Attempt, JobPhase, Progress, RestartRecord};
use super::engine::EngineConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most GPUs one node can hold; a worker kept on one node cannot ask for more.
pub const MAX_GPUS_PER_NODE: i32 = 16;
/// The most GPUs one job may ask for (workers × GPUs per worker).
pub const MAX_GPUS_PER_JOB: i64 = 8192;

/// A distributed training job: `workers` processes with `gpusPerWorker` GPUs each, run as one
/// gang. The operator places the gang on healthy GPUs, launches it through the node agents, and
/// restarts it from its last checkpoint when a worker or a GPU fails.
#[derive(CustomResource, KubeSchema, Clone, Debug, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "flotilla.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    namespaced,
    shortname = "tj",
    category = "flotilla",
    status = "TrainingJobStatus",
    derive = "PartialEq",
    doc = "A distributed training job run as a gang of GPU workers, restarted from checkpoints on faults.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".spec.workers"),
    printcolumn(name = "GPUs/Worker", type_ = "integer", json_path = ".spec.gpusPerWorker"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.summary"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt.number", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name: must be at most 63 characters, because it becomes a label value on workers and events")
)]
#[x_kube(
    validation = Rule::new("has(self.engine) != has(self.command)")
        .message("spec.engine and spec.command: exactly one must be set (engine for the built-in MoE engine, command for any other worker program)")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.restartPolicy.maxRestarts == 0 || (has(self.checkpoint) && has(self.checkpoint.intervalSeconds))")
        .message("spec.checkpoint.intervalSeconds: required when spec.restartPolicy.maxRestarts > 0, so that a restart resumes from a checkpoint")
        .field_path(".checkpoint")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.workers * self.gpusPerWorker <= 8192")
        .message("spec.workers × spec.gpusPerWorker: a job may use at most 8192 GPUs")
        .field_path(".workers"),
    validation = Rule::new("!self.scheduling.workerOnOneNode || self.gpusPerWorker <= 16")
        .message("must be at most 16 (the largest node) when spec.scheduling.workerOnOneNode is true")
        .field_path(".gpusPerWorker"),
    validation = Rule::new("self.workers == oldSelf.workers")
        .message("immutable; delete and recreate the job to change the gang size")
        .field_path(".workers"),
    validation = Rule::new("self.gpusPerWorker == oldSelf.gpusPerWorker")
        .message("immutable; delete and recreate the job to change it")
        .field_path(".gpusPerWorker"),
    validation = Rule::new("has(self.engine) == has(oldSelf.engine) && has(self.command) == has(oldSelf.command)")
        .message("spec.engine and spec.command: a job cannot switch between the built-in engine and a custom command"),
    validation = Rule::new("!has(oldSelf.checkpoint) || (has(self.checkpoint) && self.checkpoint.path == oldSelf.checkpoint.path)")
        .message("spec.checkpoint.path: immutable once set, because restarts resume from it")
        .field_path(".checkpoint")
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobSpec {
    /// Number of worker processes in the gang (torchrun's nnodes × nproc). Immutable.
    #[schemars(range(min = 1, max = 1024))]
    pub workers: i32,

    /// GPUs given to each worker. Immutable. At most 16 when `scheduling.workerOnOneNode`.
    #[schemars(range(min = 1, max = 64))]
    pub gpus_per_worker: i32,

    /// Configuration of the built-in MoE engine (`flotilla-worker train`). Exactly one of
    /// `engine` and `command` is set. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("immutable; delete and recreate the job to change the engine configuration"))]
    pub engine: Option<EngineConfig>,

    /// A custom worker program run instead of the built-in engine. The agent sets the
    /// torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) either
    /// way. Exactly one of `engine` and `command` is set. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("immutable; delete and recreate the job to change the worker program"))]
    pub command: Option<WorkerCommand>,

    /// Where and how often checkpoints are written. Required when restarts are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointSpec>,

    /// How failed attempts are restarted: the user's budget, backoff and exit-code classes.
    /// Hardware faults (GPU XIDs, lost nodes) restart the job without spending the budget.
    #[serde(default)]
    pub restart_policy: RestartPolicy,

    /// When a job that stopped making progress is taken for hung and restarted from its
    /// checkpoint. On by default for every worker program that reports progress (the built-in
    /// engine does); a program that never reports is never judged.
    #[serde(default)]
    pub hang_detection: HangDetection,

    /// What to do about a rank persistently slower than the rest of its gang: its GPU is
    /// always marked `Degraded` (`SlowSteps`, validated before it gets work again); the job is
    /// moved off it only when `moveOff` allows and the move saves more than twice its cost.
    #[serde(default)]
    pub stragglers: StragglerPolicy,

    /// Scheduling priority; higher runs first and may preempt lower. Default 0.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Constraints on where the gang is placed.
    #[serde(default)]
    pub scheduling: SchedulingSpec,

    /// Stop the job's workers and hold it in `Suspended`; set back to false to queue it again
    /// (it resumes from its last checkpoint).
    #[serde(default)]
    pub suspend: bool,

    /// Seconds the job may be active, counted from when its first attempt was placed (suspended
    /// time included), before the operator stops it and marks it `Failed` (`DeadlineExceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the job finishes (`Succeeded` or `Failed`) before the operator deletes it.
    /// Unset keeps it forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31536000))]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// A custom worker program and its environment.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCommand {
    /// The program and its leading arguments, as a container's `command`. The first item is an
    /// absolute path or a name found on the node's PATH.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 4096)))]
    pub command: Vec<String>,

    /// Further arguments appended after `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub args: Vec<String>,

    /// Extra environment variables for every worker. Names set by the agent (RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT) may not be overridden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<EnvVar>,
}

/// One environment variable.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[x_kube(validation = Rule::new("!(self.name in ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'])")
    .message("RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set by the agent and cannot be overridden")
    .field_path(".name"))]
pub struct EnvVar {
    /// The variable's name: letters, digits and underscores, not starting with a digit.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// The variable's value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Where and how often checkpoints are written.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[x_kube(validation = Rule::new("!self.path.contains('/../') && !self.path.endsWith('/..') && !self.path.contains('//')")
    .message("must be a normalised absolute path (no '..' or '//' segments)")
    .field_path(".path"))]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Directory for checkpoints: an absolute path that every node sees at the same place (a
    /// shared filesystem). Each checkpoint is written to a temporary name and renamed when
    /// complete; a restart resumes from the newest complete one. Immutable once set.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/[A-Za-z0-9._/-]+$"))]
    pub path: String,

    /// Seconds between checkpoints. Required when restarts are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub interval_seconds: Option<i32>,

    /// How many complete checkpoints to keep; older ones are deleted. Default 3.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 100))]
    pub keep: i32,
}

fn default_keep() -> i32 {
    3
}

/// How failed attempts are restarted. Hardware faults (GPU XIDs, lost nodes) and preemption
/// restart the job without spending `maxRestarts`.
#[derive(Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[x_kube(
    validation = Rule::new("self.maxBackoffSeconds >= self.backoffSeconds")
        .message("must be at least spec.restartPolicy.backoffSeconds")
        .field_path(".maxBackoffSeconds"),
    validation = Rule::new("!self.retryableExitCodes.exists(c, c in self.fatalExitCodes)")
        .message("must not share codes with fatalExitCodes")
        .field_path(".retryableExitCodes")
)]
#[serde(rename_all = "camelCase")]
pub struct RestartPolicy {
    /// Restarts the user's budget allows after worker failures. 0 fails the job on the first
    /// failure. Default 3.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: i32,

    /// Seconds to wait before the first restart; doubles on each further restart. Default 10.
    #[serde(default = "default_backoff")]
    #[schemars(range(min = 0, max = 3600))]
    pub backoff_seconds: i32,

    /// Upper bound of the doubling backoff, in seconds. Default 300.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_backoff_seconds: i32,

    /// Exit codes that restart the job. Empty means every non-zero code not listed in
    /// `fatalExitCodes` is retryable.
    #[serde(default)]
    #[schemars(length(max = 64), inner(range(min = 1, max = 255)), extend("x-kubernetes-list-type" = "set"))]
    pub retryable_exit_codes: Vec<i32>,

    /// Exit codes that fail the job at once, without a restart.
    #[serde(default)]
    #[schemars(length(max = 64), inner(range(min = 1, max = 255)), extend("x-kubernetes-list-type" = "set"))]
    pub fatal_exit_codes: Vec<i32>,
}

/// The progress lease: every rank must complete a step within `max(stepTimeoutSeconds,
/// stepTimeFactor × p99 step time)` of its last one, with separate budgets while it starts
/// (until its first step of the attempt, resume included) and while it writes a checkpoint.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HangDetection {
    /// Judge the job at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// The least time allowed between two steps of a rank, seconds. Default 120.
    #[serde(default = "default_step_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub step_timeout_seconds: i32,

    /// The bound between two steps is at least this many times the job's p99 step time (over
    /// its last 256 reported steps). Default 10.
    #[serde(default = "default_step_factor")]
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub step_time_factor: f64,

    /// Time from a worker's start to its first step (loading, resuming, meeting its peers),
    /// seconds. Default 900.
    #[serde(default = "default_startup")]
    #[schemars(range(min = 1, max = 86400))]
    pub startup_seconds: i32,

    /// Time a checkpoint write may take, seconds. Default 600.
    #[serde(default = "default_checkpoint_budget")]
    #[schemars(range(min = 1, max = 86400))]
    pub checkpoint_seconds: i32,
}

/// Straggler detection: see `spec.stragglers`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StragglerPolicy {
    /// A rank whose speed (the fastest rank's median compute time per step over its own, over
    /// the last 30 reports) is below this is a straggler. 0 turns detection off. Default 0.7.
    #[serde(default = "default_straggler_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: f64,

    /// Restart the job off a straggler's GPU (without spending the restart budget) when the
    /// time saved over the remaining steps is more than twice what the restart costs. Default
    /// false: the GPU is marked, the job stays.
    #[serde(default)]
    pub move_off: bool,
}

fn default_straggler_threshold() -> f64 {
    0.7
}

impl Default for StragglerPolicy {
    fn default() -> Self {
        StragglerPolicy { threshold: default_straggler_threshold(), move_off: false }
    }
}

fn default_step_timeout() -> i32 {
    120
}
fn default_step_factor() -> f64 {
    10.0
}
fn default_startup() -> i32 {
    900
}
fn default_checkpoint_budget() -> i32 {
    600
}

impl Default for HangDetection {
    fn default() -> Self {
        HangDetection {
            enabled: true,
            step_timeout_seconds: default_step_timeout(),
            step_time_factor: default_step_factor(),
            startup_seconds: default_startup(),
            checkpoint_seconds: default_checkpoint_budget(),
        }
    }
}

fn default_max_restarts() -> i32 {
    3
}
fn default_backoff() -> i32 {
    10
}
fn default_max_backoff() -> i32 {
    300
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: default_max_restarts(),
            backoff_seconds: default_backoff(),
            max_backoff_seconds: default_max_backoff(),
            retryable_exit_codes: Vec::new(),
            fatal_exit_codes: Vec::new(),
        }
    }
}

/// How the gang's workers spread over nodes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PlacementStrategy {
    /// Fill as few nodes as possible (fast collectives, leaves whole nodes free).
    #[default]
    Pack,
    /// At most one worker per node (smaller blast radius per node fault); a gang that cannot
    /// spread that far waits.
    Spread,
}

/// Constraints on where the gang is placed.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Keep all GPUs of one worker on a single node. Default true.
    #[serde(default = "default_true")]
    pub worker_on_one_node: bool,

    /// Pack the gang onto few nodes or spread it over many. Default Pack.
    #[serde(default)]
    pub strategy: PlacementStrategy,

    /// Only nodes whose `GpuNode` labels match all of these are used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

impl Default for SchedulingSpec {
    fn default() -> Self {
        SchedulingSpec {
            worker_on_one_node: true,
            strategy: PlacementStrategy::Pack,
            node_selector: BTreeMap::new(),
        }
    }
}

/// What the operator observed and decided about a `TrainingJob`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Where the job is in its life.
    #[serde(default)]
    pub phase: JobPhase,

    /// A one-line, human-readable reason for the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When the job entered its current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_transition_time: Option<Time>,

    /// The latest observations: Valid, Scheduled, Ready, Complete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The current (or last) attempt and its placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,

    /// Restarts that spent the user's budget (`spec.restartPolicy.maxRestarts`).
    #[serde(default)]
    pub restarts: i32,

    /// Restarts caused by hardware faults or preemption; they do not spend the budget.
    #[serde(default)]
    pub hardware_restarts: i32,

    /// The most recent restarts, newest last, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub restart_history: Vec<RestartRecord>,

    /// Training progress from rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job reached `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
