//! `InferenceService`: replicas of a trained checkpoint served over an OpenAI-compatible API.

use super::common::Placement;
use super::training_job::SchedulingSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Serves a model checkpoint with `replicas` independent copies; each replica is a gang of
/// `workersPerReplica` workers with `gpusPerWorker` GPUs each.
#[derive(CustomResource, KubeSchema, Clone, Debug, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "flotilla.dev",
    version = "v1alpha1",
    kind = "InferenceService",
    namespaced,
    shortname = "infsvc",
    category = "flotilla",
    status = "InferenceServiceStatus",
    derive = "PartialEq",
    // `kubectl scale` and a HorizontalPodAutoscaler drive `spec.replicas` through this.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.currentReplicas",
        label_selector_path = ".status.selector"
    ),
    doc = "Serves a model checkpoint over an OpenAI-compatible HTTP API with a number of GPU replicas.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.updatedReplicas"),
    printcolumn(name = "GPUs/Replica", type_ = "integer", json_path = ".status.gpusPerReplica"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.checkpointPath", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name: must be at most 63 characters, because it becomes a label value on workers and events")
)]
#[x_kube(
    validation = Rule::new("!self.scheduling.workerOnOneNode || self.gpusPerWorker <= 16")
        .message("must be at most 16 (the largest node) when spec.scheduling.workerOnOneNode is true")
        .field_path(".gpusPerWorker"),
    validation = Rule::new("self.workersPerReplica == oldSelf.workersPerReplica")
        .message("immutable; create a new service to change the replica shape")
        .field_path(".workersPerReplica"),
    validation = Rule::new("self.gpusPerWorker == oldSelf.gpusPerWorker")
        .message("immutable; create a new service to change the replica shape")
        .field_path(".gpusPerWorker")
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceSpec {
    /// Number of independent serving replicas. 0 keeps the service defined but stops serving.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 256))]
    pub replicas: i32,

    /// Workers (`flotilla-worker serve` processes) in each replica, placed as one gang. With more
    /// than one, a replica is an expert-parallel group: each worker holds an equal share of every
    /// MoE layer's routed experts, rank 0 serves the HTTP API, and the failure of any worker
    /// replaces the whole replica. At most the model's number of routed experts (a replica with
    /// more workers fails to load). Immutable.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 64))]
    pub workers_per_replica: i32,

    /// GPUs given to each worker. Immutable.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 64))]
    pub gpus_per_worker: i32,

    /// The trained model to serve.
    pub model: ModelSource,

    /// HTTP serving options.
    #[serde(default)]
    pub serving: ServingOptions,

    /// Scheduling priority; higher is placed first. Default 0.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Constraints on where replicas are placed.
    #[serde(default)]
    pub scheduling: SchedulingSpec,

    /// How replicas are replaced when the model or serving options change.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// How a change of `spec.model` or `spec.serving` rolls through the replicas, one replica slot
/// at a time, as a Deployment's rolling update does.
#[derive(Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[x_kube(validation = Rule::new("self.maxSurge > 0 || self.maxUnavailable > 0")
    .message("maxSurge and maxUnavailable cannot both be 0: the rollout could never start a new replica"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Replicas started above `spec.replicas` during a rollout (each needs free GPUs). Default
    /// 1: a new replica is started and ready before an old one leaves, so capacity never drops.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 256))]
    pub max_surge: i32,

    /// Replicas that may be not serving during a rollout. Default 0. Raise it when there are
    /// no spare GPUs for a surge replica.
    #[serde(default)]
    #[schemars(range(min = 0, max = 256))]
    pub max_unavailable: i32,

    /// Seconds a replica may take from launch to its first answered readiness check (one
    /// generated token); a replica of a new revision that takes longer, or exits before it,
    /// counts as a model that fails to load and stops the rollout. Default 300.
    #[serde(default = "default_startup")]
    #[schemars(range(min = 5, max = 86400))]
    pub startup_timeout_seconds: i32,

    /// Seconds a leaving replica stays out of the endpoints but running, so clients that read
    /// the endpoints just before finish their requests, before it is stopped. Default 5.
    #[serde(default = "default_drain")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,
}

fn default_startup() -> i32 {
    300
}
fn default_drain() -> i32 {
    5
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            max_surge: 1,
            max_unavailable: 0,
            startup_timeout_seconds: default_startup(),
            drain_seconds: default_drain(),
        }
    }
}

fn default_one() -> i32 {
    1
}

/// A checkpoint to serve.
#[derive(Clone, Debug, Default, Deserialize, Serialize, KubeSchema, PartialEq)]
#[x_kube(validation = Rule::new("!self.checkpointPath.contains('/../') && !self.checkpointPath.endsWith('/..') && !self.checkpointPath.contains('//')")
    .message("must be a normalised absolute path (no '..' or '//' segments)")
    .field_path(".checkpointPath"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Checkpoint directory (as written by a `TrainingJob`), an absolute path every node sees.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/[A-Za-z0-9._/-]+$"))]
    pub checkpoint_path: String,

    /// The checkpoint step to load; unset loads the newest complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub step: Option<i64>,

    /// The model name reported by `/v1/models` and expected in requests. Defaults to the
    /// service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub served_name: Option<String>,
}

/// HTTP serving options for every replica.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingOptions {
    /// Port of the `Service` named after the InferenceService, and the first port tried for each
    /// replica: a replica listens on the lowest port from this one up that no other replica
    /// uses on the same node address (see `status.replicas[].endpoint`). Default 8000.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Most requests batched into one forward pass. Default 16.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: i32,

    /// Tokens generated for a request that names no `max_tokens`. Default 512.
    #[serde(default = "default_new_tokens")]
    #[schemars(range(min = 1, max = 131072))]
    pub max_new_tokens: i32,
}

fn default_port() -> i32 {
    8000
}
fn default_batch() -> i32 {
    16
}
fn default_new_tokens() -> i32 {
    512
}

impl Default for ServingOptions {
    fn default() -> Self {
        ServingOptions {
            port: default_port(),
            max_batch_size: default_batch(),
            max_new_tokens: default_new_tokens(),
        }
    }
}

/// Where an `InferenceService` is in its life.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ServicePhase {
    /// Not yet checked by the operator.
    #[default]
    Pending,
    /// Valid; waiting for GPUs for at least one replica.
    Queued,
    /// Replicas are placed and starting.
    Starting,
    /// Every desired replica serves.
    Ready,
    /// Some, not all, desired replicas serve.
    Degraded,
    /// The spec cannot be served (see the Valid condition).
    Failed,
}

/// Where one replica is in its life.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ReplicaState {
    /// Launched; its readiness check has not passed yet.
    #[default]
    Starting,
    /// Its readiness check passes; listed as ready in the endpoints.
    Ready,
    /// It passed its readiness check before but fails it now.
    Unready,
    /// Leaving (rollout or scale-down): out of the ready endpoints, finishing its requests.
    Draining,
    /// Failed, or drained: being stopped; its GPUs stay held until its workers are gone.
    Stopping,
}

/// One replica: a slot of the service served by one launch of its workers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The replica's slot, 0-based (below `spec.replicas`). A replacement, or the new revision
    /// during a rollout, takes the slot of the replica it replaces, so a slot may briefly
    /// list two replicas.
    pub index: i32,
    /// The launch number, unique within the service (from `status.launches`); the workers run
    /// on the agents as `<uid>/replica-<index>.<attempt>`.
    pub attempt: i32,
    /// Where its workers run.
    pub placement: Placement,
    /// Where it is in its life.
    #[serde(default)]
    pub state: ReplicaState,
    /// Whether it serves: its readiness check (one generated token through
    /// `/v1/completions`) passes.
    #[serde(default)]
    pub ready: bool,
    /// Its HTTP endpoint, `http://<node address>:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The spec revision it runs (see `status.revision`).
    #[serde(default)]
    pub revision: String,
    /// The checkpoint it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// When it was launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<Time>,
    /// When it last changed state (readiness, draining, stopping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_time: Option<Time>,
    /// Why it is in its state, when that is not plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the operator observed and decided about an `InferenceService`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    /// Where the service is in its life.
    #[serde(default)]
    pub phase: ServicePhase,

    /// A one-line, human-readable reason for the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When the service entered its current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_transition_time: Option<Time>,

    /// The latest observations: Valid, Scheduled, Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Replicas whose readiness check passes (draining ones excluded).
    #[serde(default)]
    pub ready_replicas: i32,

    /// Replicas launched and not leaving (starting, ready or unready, of any revision): what
    /// the `scale` subresource reports as its `status.replicas`.
    #[serde(default)]
    pub current_replicas: i32,

    /// The label selector of the service's EndpointSlices, which list its replicas: the
    /// `scale` subresource's `status.selector`, which a HorizontalPodAutoscaler requires.
    /// Replicas are worker processes, not Pods, so an autoscaler scales on Object or External
    /// metrics (such as the replicas' `vllm:num_requests_waiting`), not on Pod resources.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,

    /// GPUs one replica uses (workersPerReplica × gpusPerWorker).
    #[serde(default)]
    pub gpus_per_replica: i32,

    /// Endpoints of the ready replicas (those the EndpointSlices list as ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub endpoints: Vec<String>,

    /// Each launched replica, ready or not, in slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub replicas: Vec<ReplicaStatus>,

    /// The current revision: a hash of `spec.model` and `spec.serving`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,

    /// Replicas that run the current revision and serve.
    #[serde(default)]
    pub updated_replicas: i32,

    /// A revision whose model failed to load; no replica of it is started again until the
    /// spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,

    /// Replica launches so far; the next launch gets this plus one as its attempt number.
    #[serde(default)]
    pub launches: i32,

    /// The last revision that completed a rollout, with its model and serving options: while
    /// a newer revision's rollout is stopped by a model that fails to load, a slot emptied by a
    /// GPU failure or crash is refilled with this one, so the service does not stay short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<StableRevision>,
}

/// A revision known to serve (see [`InferenceServiceStatus::stable`]).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StableRevision {
    /// The revision hash.
    pub revision: String,
    /// Its `spec.model`.
    pub model: ModelSource,
    /// Its `spec.serving`.
    pub serving: ServingOptions,
}
