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
    doc = "Serves a model checkpoint over an OpenAI-compatible HTTP API with a number of GPU replicas.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
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

    /// Workers in each replica (tensor/expert parallel degree across processes). Immutable.
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
    /// TCP port of the OpenAI-compatible HTTP API on each replica's rank-0 worker. Default 8000.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Most requests batched into one forward pass. Default 16.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: i32,

    /// Most tokens generated for one request. Default 512.
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

/// One replica's placement.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The replica's index, 0-based.
    pub index: i32,
    /// The replica's attempt number; increases each time it is placed again.
    pub attempt: i32,
    /// Where its workers run.
    pub placement: Placement,
    /// Whether its HTTP endpoint answers health checks.
    #[serde(default)]
    pub ready: bool,
    /// The replica's HTTP endpoint, `http://host:port`, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
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

    /// The latest observations: Valid, Scheduled, Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Replicas whose endpoint answers.
    #[serde(default)]
    pub ready_replicas: i32,

    /// GPUs one replica uses (workersPerReplica × gpusPerWorker).
    #[serde(default)]
    pub gpus_per_replica: i32,

    /// Endpoints of the ready replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub endpoints: Vec<String>,

    /// Each placed replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub replicas: Vec<ReplicaStatus>,
}
