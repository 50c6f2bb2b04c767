//! Two operator replicas: only the lease holder acts; when it dies the standby takes the lease
//! and continues without repeating what was done; a leader that loses its lease stops.

use flotilla_operator::crd::gpu_node::{GpuHealth, GpuNodeStatus, GpuState};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use flotilla_tests::{Operator, eventually, install_crds, training_job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt("flotilla-operator").await.ok()??.spec?.holder_identity
}

async fn scheduled_events(client: &kube::Client, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some("Scheduled")
        })
        .collect()
}

#[tokio::test]
async fn standby_takes_over_without_double_action_and_a_deposed_leader_stops() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "failover").await.expect("namespace");
    let logs = tempfile::tempdir().expect("tempdir");
    let nodes: Api<GpuNode> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &GpuNode::new("failover-node", Default::default()))
        .await
        .expect("node");
    let status = GpuNodeStatus {
        gpus: (0..4)
            .map(|index| GpuState { index, health: GpuHealth::Healthy, ..Default::default() })
            .collect(),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let patch = json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "GpuNode", "status": status});
    nodes
        .patch_status("failover-node", &PatchParams::apply("test-agent"), &Patch::Apply(&patch))
        .await
        .expect("status");

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    // SIGTERM drains: the leader exits 0 and hands the lease back instead of letting it expire.
    let mut first = Operator::start(&cp, "op-0", &ns, logs.path()).expect("op-0 starts");
    eventually(WAIT, "op-0 leads", || async { (holder(&leases).await? == "op-0").then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}\nop-0:\n{}", first.log()));
    let pid = first.child.id().to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    let status = first.child.wait().expect("op-0 exits");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}\n{}", first.log());
    assert_eq!(holder(&leases).await, None, "the lease was released on SIGTERM");

    let mut a = Operator::start(&cp, "op-a", &ns, logs.path()).expect("a starts");
    eventually(WAIT, "op-a leads", || async { (holder(&leases).await? == "op-a").then_some(()) })
        .await
        .expect("a leads");
    let mut b = Operator::start(&cp, "op-b", &ns, logs.path()).expect("b starts");

    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &training_job("first").build()).await.expect("first");
    let first = eventually(WAIT, "first Scheduled", || async {
        let s = jobs.get("first").await.ok()?.status?;
        (s.phase == JobPhase::Scheduled).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nop-a:\n{}", a.log()));
    assert!(b.child.try_wait().expect("b status").is_none(), "the standby keeps running");
    assert_eq!(
        holder(&leases).await.as_deref(),
        Some("op-a"),
        "the standby did not take a held lease"
    );

    a.kill();
    eventually(WAIT, "op-b leads", || async { (holder(&leases).await? == "op-b").then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}\nop-b:\n{}", b.log()));
    jobs.create(&PostParams::default(), &training_job("second").build()).await.expect("second");
    let second = eventually(WAIT, "second Scheduled by op-b", || async {
        let s = jobs.get("second").await.ok()?.status?;
        (s.phase == JobPhase::Scheduled).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nop-b:\n{}", b.log()));
    // No double action: the new leader kept attempt 1 of the first job where it was.
    let first_now = jobs.get("first").await.unwrap().status.unwrap();
    assert_eq!(first_now.attempt, first.attempt, "the first job was not placed again");
    let events = scheduled_events(&client, &ns, "first").await;
    assert_eq!(events.len(), 1, "one Scheduled event for the first job: {events:?}");
    assert_eq!(events[0].reporting_instance.as_deref(), Some("op-a"));
    let events = scheduled_events(&client, &ns, "second").await;
    assert_eq!(
        events.iter().map(|e| e.reporting_instance.as_deref()).collect::<Vec<_>>(),
        vec![Some("op-b")]
    );
    let (pa, pb) = (first_now.attempt.unwrap().placement, second.attempt.unwrap().placement);
    assert_ne!(pa.workers[0].gpus, pb.workers[0].gpus, "the new leader knew which GPUs were taken");

    // Another replica takes the lease from under op-b: op-b must stop acting and exit.
    let mut lease = leases.get("flotilla-operator").await.expect("lease");
    let spec = lease.spec.as_mut().expect("spec");
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    spec.lease_duration_seconds = Some(3600);
    leases.replace("flotilla-operator", &PostParams::default(), &lease).await.expect("steal lease");
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(status) = b.child.try_wait().expect("op-b status") {
            break status;
        }
        assert!(started.elapsed() < WAIT, "op-b kept running without the lease:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!exit.success(), "a deposed leader exits with an error");
    assert!(b.log().contains("lost the leader lease"), "{}", b.log());
}
