//! The `GpuNode` controller: keeps the summary fields and conditions true to the per-GPU state,
//! the admin's cordons and the agent's heartbeat.

use super::{Context, reconcile_object};
use crate::crd::common::set_condition;
use crate::crd::gpu_node::{GpuNode, GpuNodeStatus};
use crate::error::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

const KIND: &str = "GpuNode";

/// The status fields this controller owns (the agent link owns the rest).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// GPUs on the node.
    pub total_gpus: i32,
    /// Healthy, uncordoned GPUs.
    pub healthy_gpus: i32,
    /// The hottest GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_temperature_celsius: Option<i32>,
    /// Ready (agent heard from) and Schedulable (not cordoned).
    pub conditions: Vec<Condition>,
    /// The generation summarised.
    pub observed_generation: Option<i64>,
}

/// The pure middle: summarise a node at `now`, given how long an agent may be silent.
pub fn node_summary(node: &GpuNode, now: Timestamp, fence_timeout: SignedDuration) -> Summary {
    let mut status: GpuNodeStatus = node.status.clone().unwrap_or_default();
    status.count_gpus(&node.spec);
    let generation = node.meta().generation;
    let mut conditions = status.conditions.clone();
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        set_condition(
            &mut conditions,
            Condition {
                type_: type_.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: Time(now),
            },
        );
    };
    match status.last_heartbeat_time.as_ref() {
        Some(t) if now.duration_since(t.0) <= fence_timeout => set(
            "Ready",
            true,
            "AgentReporting",
            "the agent reports within the fence timeout".into(),
        ),
        Some(t) => set(
            "Ready",
            false,
            "AgentSilent",
            format!(
                "no heartbeat for {}s (fence timeout {}s)",
                now.duration_since(t.0).as_secs(),
                fence_timeout.as_secs()
            ),
        ),
        None => set("Ready", false, "NeverReported", "the agent has not reported yet".into()),
    }
    if node.spec.cordoned {
        let why = node.spec.cordon_reason.clone().unwrap_or_default();
        set("Schedulable", false, "Cordoned", format!("node cordoned: {why}"));
    } else if !node.spec.cordoned_gpus.is_empty() {
        set(
            "Schedulable",
            true,
            "GpusCordoned",
            format!("GPUs {:?} cordoned", node.spec.cordoned_gpus),
        );
    } else {
        set("Schedulable", true, "Uncordoned", "new work may be placed here".into());
    }
    Summary {
        total_gpus: status.total_gpus,
        healthy_gpus: status.healthy_gpus,
        max_temperature_celsius: status.max_temperature_celsius,
        conditions,
        observed_generation: generation,
    }
}

fn current(node: &GpuNode) -> Option<Summary> {
    let s = node.status.as_ref()?;
    Some(Summary {
        total_gpus: s.total_gpus,
        healthy_gpus: s.healthy_gpus,
        max_temperature_celsius: s.max_temperature_celsius,
        conditions: s.conditions.clone(),
        observed_generation: s.observed_generation,
    })
}

/// Reconcile one `GpuNode`.
pub async fn reconcile(guard: Arc<DeserializeGuard<GpuNode>>, ctx: Arc<Context>) -> Result<Action> {
    let ctx = &*ctx;
    reconcile_object(ctx, KIND, &guard, |node| write_summary(node, ctx)).await
}

async fn write_summary(node: &GpuNode, ctx: &Context) -> Result<Action> {
    let fence = ctx.fence_timeout;
    let summary = node_summary(node, Timestamp::now(), fence);
    if current(node).as_ref() != Some(&summary) {
        let api: Api<GpuNode> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": KIND, "status": summary});
        api.patch_status(
            &node.name_any(),
            &PatchParams::apply(super::MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        let old = node.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        for c in &summary.conditions {
            let before = old.iter().find(|o| o.type_ == c.type_);
            if before.is_none_or(|b| b.status != c.status || b.reason != c.reason) {
                ctx.publish(node, c.status == "False", &c.reason, c.message.clone()).await;
            }
        }
    }
    let fence_std = Duration::from_secs(fence.as_secs().max(1) as u64);
    Ok(Action::requeue(fence_std))
}

/// What to do with a failed reconciliation.
pub fn error_policy(
    guard: Arc<DeserializeGuard<GpuNode>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    super::error_policy(&ctx, KIND, &guard, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gpu_node::{GpuHealth, GpuNodeSpec, GpuState};

    fn node(heartbeat: Option<i64>, cordoned: bool) -> GpuNode {
        let mut n = GpuNode::new(
            "n",
            GpuNodeSpec {
                cordoned,
                cordon_reason: cordoned.then(|| "repair".into()),
                ..Default::default()
            },
        );
        n.status = Some(GpuNodeStatus {
            gpus: vec![GpuState { index: 0, health: GpuHealth::Healthy, ..Default::default() }],
            last_heartbeat_time: heartbeat.map(|s| Time(Timestamp::from_second(s).unwrap())),
            ..Default::default()
        });
        n
    }

    fn cond<'a>(s: &'a Summary, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_follows_the_heartbeat_and_schedulable_the_cordon() {
        let now = Timestamp::from_second(1000).unwrap();
        let fence = SignedDuration::from_secs(30);
        let s = node_summary(&node(Some(990), false), now, fence);
        assert_eq!(cond(&s, "Ready"), ("True", "AgentReporting"));
        assert_eq!(cond(&s, "Schedulable"), ("True", "Uncordoned"));
        assert_eq!((s.total_gpus, s.healthy_gpus), (1, 1));
        let s = node_summary(&node(Some(900), true), now, fence);
        assert_eq!(cond(&s, "Ready"), ("False", "AgentSilent"));
        assert_eq!(cond(&s, "Schedulable"), ("False", "Cordoned"));
        assert_eq!(s.healthy_gpus, 0);
        let s = node_summary(&node(None, false), now, fence);
        assert_eq!(cond(&s, "Ready"), ("False", "NeverReported"));
    }
}
