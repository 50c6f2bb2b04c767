//! `GpuNode`: one per node agent; status mirrors the agent's GPU inventory and health.

// clippy reads repeated `type_ = ...` inside kube's `printcolumn(...)` lists as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A GPU node as its agent reports it. Created and updated by the operator; an admin edits only
/// `spec` to cordon the node or single GPUs.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "flotilla.dev",
    version = "v1alpha1",
    kind = "GpuNode",
    shortname = "gpunode",
    category = "flotilla",
    status = "GpuNodeStatus",
    derive = "PartialEq",
    doc = "A GPU node reported by its Flotilla agent: inventory, health and faults; spec cordons the node or single GPUs.",
    printcolumn(name = "Healthy", type_ = "integer", json_path = ".status.healthyGpus"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.totalGpus"),
    printcolumn(name = "Cordoned", type_ = "boolean", json_path = ".spec.cordoned"),
    printcolumn(name = "MaxTemp", type_ = "integer", json_path = ".status.maxTemperatureCelsius"),
    printcolumn(name = "LastFault", type_ = "string", json_path = ".status.lastFault.summary"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.gpuModel", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!self.cordoned || has(self.cordonReason)")
    .message("spec.cordonReason: required when spec.cordoned is true, so others know why")
    .field_path(".cordoned")
    .reason(Reason::FieldValueRequired))]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// Keep new work off the whole node; running work is not stopped.
    #[serde(default)]
    pub cordoned: bool,

    /// GPU indices kept free of new work.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(range(min = 0, max = 63)), extend("x-kubernetes-list-type" = "set"))]
    pub cordoned_gpus: Vec<i32>,

    /// Why the node or GPUs are cordoned (shown in events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub cordon_reason: Option<String>,
}

/// A GPU's health as the fleet sees it.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum GpuHealth {
    /// Usable.
    Healthy,
    /// Works but showed warning signs (single-bit ECC rate, page retirement); drained after its
    /// current job.
    Degraded,
    /// Not schedulable until validated or cleared by an admin.
    Failed,
    /// Being checked after a fault.
    Validating,
    /// Not heard from.
    #[default]
    Unknown,
}

/// One GPU on the node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuState {
    /// Index on the node, as NVML numbers it.
    #[schemars(range(min = 0, max = 63))]
    pub index: i32,
    /// The GPU's UUID.
    #[serde(default)]
    pub uuid: String,
    /// Health classification.
    #[serde(default)]
    pub health: GpuHealth,
    /// Framebuffer size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<i64>,
    /// Current temperature in °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<i32>,
    /// The job (`namespace/name`) whose worker uses the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
}

/// A GPU fault as classified by the agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuFault {
    /// When the agent saw the fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// The GPU index.
    pub gpu: i32,
    /// The NVIDIA XID code, if the fault was an XID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<i32>,
    /// What happened, such as `XID 79: GPU fell off the bus`.
    #[serde(default)]
    pub message: String,
    /// A short text for `kubectl get`, such as `gpu3 XID79 4m`.
    #[serde(default)]
    pub summary: String,
}

/// What the agent last reported for this node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// GPUs on the node.
    #[serde(default)]
    pub total_gpus: i32,
    /// GPUs that are healthy and not cordoned.
    #[serde(default)]
    pub healthy_gpus: i32,
    /// The GPU model name, such as `NVIDIA H100 80GB HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// The hottest GPU's temperature in °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_temperature_celsius: Option<i32>,
    /// Per-GPU state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub gpus: Vec<GpuState>,
    /// The most recent fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fault: Option<GpuFault>,
    /// When the agent was last heard from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// The agent's address for worker rendezvous (MASTER_ADDR), as the agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Base URL of the agent's admin HTTP server (worker logs, fault injection), as the agent
    /// reports it at registration, e.g. `http://10.0.0.7:9400`; `kubectl flotilla` uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_url: Option<String>,
    /// The latest observations: Ready (agent connected).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl GpuNodeStatus {
    /// Recompute the summary fields (`totalGpus`, `healthyGpus`, `maxTemperatureCelsius`) from
    /// the per-GPU state and the spec's cordons.
    pub fn count_gpus(&mut self, spec: &GpuNodeSpec) {
        self.total_gpus = self.gpus.len() as i32;
        self.healthy_gpus = if spec.cordoned {
            0
        } else {
            self.gpus
                .iter()
                .filter(|g| {
                    g.health == GpuHealth::Healthy && !spec.cordoned_gpus.contains(&g.index)
                })
                .count() as i32
        };
        self.max_temperature_celsius = self.gpus.iter().filter_map(|g| g.temperature_celsius).max();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: i32, health: GpuHealth, temp: Option<i32>) -> GpuState {
        GpuState { index, health, temperature_celsius: temp, ..Default::default() }
    }

    #[test]
    fn summary_counts_healthy_uncordoned_gpus_and_max_temperature() {
        let mut status = GpuNodeStatus {
            gpus: vec![
                gpu(0, GpuHealth::Healthy, Some(40)),
                gpu(1, GpuHealth::Failed, Some(71)),
                gpu(2, GpuHealth::Healthy, None),
                gpu(3, GpuHealth::Degraded, Some(55)),
            ],
            ..Default::default()
        };
        let spec = GpuNodeSpec { cordoned_gpus: vec![2], ..Default::default() };
        status.count_gpus(&spec);
        assert_eq!((status.total_gpus, status.healthy_gpus), (4, 1));
        assert_eq!(status.max_temperature_celsius, Some(71));

        let cordoned = GpuNodeSpec {
            cordoned: true,
            cordon_reason: Some("maintenance".into()),
            ..Default::default()
        };
        status.count_gpus(&cordoned);
        assert_eq!(status.healthy_gpus, 0);
    }
}
