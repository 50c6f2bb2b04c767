//! The gang scheduler wired into the operator, against the real control plane: a job that can
//! never fit waits with a reason a human reads, and does not hold up a job that fits.

use flotilla_operator::crd::gpu_node::{GpuHealth, GpuNodeStatus, GpuState};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use flotilla_tests::{Operator, eventually, install_crds, kubectl};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Create a demo-pool GpuNode with `gpus` healthy GPUs and a fresh heartbeat.
async fn add_node(client: &kube::Client, name: &str, gpus: i32) {
    let api: Api<GpuNode> = Api::all(client.clone());
    let mut node = GpuNode::new(name, Default::default());
    node.metadata.labels = Some([("flotilla.dev/pool".to_string(), "demo".to_string())].into());
    api.create(&PostParams::default(), &node).await.expect("create GpuNode");
    let status = GpuNodeStatus {
        gpus: (0..gpus)
            .map(|index| GpuState {
                index,
                uuid: format!("GPU-{name}-{index}"),
                health: GpuHealth::Healthy,
                ..Default::default()
            })
            .collect(),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let patch = json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "GpuNode", "status": status});
    api.patch_status(name, &PatchParams::apply("test-agent"), &Patch::Apply(&patch))
        .await
        .expect("GpuNode status");
}

#[tokio::test]
async fn a_job_that_cannot_fit_says_why_and_does_not_block_one_that_fits() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "too-big").await.expect("namespace");
    let logs = tempfile::tempdir().expect("tempdir");
    add_node(&client, "fit-node-0", 4).await;
    add_node(&client, "fit-node-1", 4).await;
    let operator = Operator::start(&cp, "op-sched", &ns, logs.path()).expect("operator starts");

    let examples = flotilla_tests::workspace().join("deploy/examples");
    for file in ["trainingjob-too-big.yaml", "trainingjob-command.yaml"] {
        let path = examples.join(file);
        let out = kubectl(&cp, &["apply", "-n", &ns, "-f", path.to_str().expect("utf-8")], None);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let scheduled = eventually(WAIT, "too-big Scheduled=False", || async {
        let s = jobs.get("too-big").await.ok()?.status?;
        s.conditions.into_iter().find(|c| c.type_ == "Scheduled" && c.status == "False")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    assert_eq!(scheduled.reason, "Unschedulable");
    for part in ["needs 64 GPUs (16 workers × 4)", "largest free block is 8"] {
        assert!(scheduled.message.contains(part), "{:?} lacks {part:?}", scheduled.message);
    }

    // The small job is placed although the big one arrived first.
    let small = eventually(WAIT, "custom-script Scheduled", || async {
        let s = jobs.get("custom-script").await.ok()?.status?;
        (s.phase == JobPhase::Scheduled).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    assert_eq!(small.attempt.expect("attempt").placement.workers[0].gpus.len(), 2);

    let big = jobs.get("too-big").await.expect("too-big").status.expect("status");
    assert_eq!(big.phase, JobPhase::Queued);
    assert!(big.attempt.is_none(), "no placement is written for a job that waits");
    assert_eq!(big.message.as_deref(), Some(scheduled.message.as_str()));

    // `kubectl describe` shows the reason too, as an Event on the job.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(WAIT, "an Unschedulable event naming the shortfall", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("too-big")
                && e.reason.as_deref() == Some("Unschedulable")
                && e.note.as_deref().is_some_and(|n| n.contains("needs 64 GPUs"))
        })
    })
    .await
    .expect("event");
}
