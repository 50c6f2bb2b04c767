//! End to end, inference priority: a low-priority TrainingJob holds every GPU of two agents; an
//! InferenceService of higher priority arrives and would otherwise have no replica, so the
//! scheduler preempts the job (it checkpoints on SIGTERM and waits, its budget unspent); the
//! replica serves the job's own checkpoint and becomes ready. Scaled to zero, the service gives
//! the GPUs back and the job resumes from its checkpoint and finishes with exactly its steps.

use flotilla_operator::crd::training_job::PlacementStrategy;
use flotilla_operator::crd::{InferenceService, JobPhase, RestartCause, TrainingJob};
use flotilla_tests::serving::ready_endpoints;
use flotilla_tests::{
    ServingRig, WAIT, eventually, inference_service, install_crds, training_job, walk,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::time::Duration;

const STEPS: i64 = 1200;

#[tokio::test]
async fn a_service_below_its_replicas_preempts_lower_priority_training_which_resumes_after() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "svc-preempt").await.expect("namespace");
    let rig = ServingRig::start(&cp, &ns, &client, 2).await;

    // 1. The low-priority job takes all 8 GPUs (one 4-GPU worker per node).
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let low = training_job("low")
        .workers(2)
        .gpus_per_worker(4)
        .tiny_engine(STEPS as u64, 20)
        .placement(PlacementStrategy::Spread)
        .build();
    let low = jobs.create(&PostParams::default(), &low).await.expect("create the job");
    let checkpoints = rig
        .dir
        .path()
        .join("checkpoints")
        .join(&ns)
        .join(format!("low-{}", low.metadata.uid.clone().expect("uid")));
    eventually(WAIT, "the job running with a checkpoint", || async {
        let s = jobs.get("low").await.ok()?.status?;
        (s.phase == JobPhase::Running && checkpoints.join("latest").exists()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));

    // 2. A priority-10 service of one 1-GPU replica serving that checkpoint.
    let services: Api<InferenceService> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let port = flotilla_tests::serving_port_base();
    let svc = inference_service("urgent", &checkpoints.display().to_string(), port)
        .max_batch_size(4)
        .priority(10)
        .drain_seconds(1)
        .build();
    services.create(&PostParams::default(), &svc).await.expect("create the service");
    let served = eventually(WAIT, "the replica ready and listed", || async {
        let s = services.get("urgent").await.ok()?.status?;
        let listed = ready_endpoints(&slices, "urgent").await?;
        (s.ready_replicas == 1 && listed.len() == 1).then_some(listed)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let waiting = jobs.get("low").await.expect("job").status.expect("status");
    assert_eq!(waiting.phase, JobPhase::Queued, "the job waits for its 8 GPUs");
    assert_eq!((waiting.restarts, waiting.hardware_restarts), (0, 1), "the budget is not spent");
    let record = waiting.restart_history.last().expect("a restart record");
    assert_eq!(record.cause, RestartCause::Preempted, "{record:?}");
    assert!(record.reason.contains("urgent"), "the record names the preemptor: {record:?}");
    println!(
        "service ready at {served:?} after preempting the job ({:?} steps lost)",
        record.steps_lost
    );

    // 3. Scaled to zero, the service frees its GPU; the job resumes and finishes.
    let patch = serde_json::json!({ "spec": { "replicas": 0 } });
    services
        .patch("urgent", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("scale to zero");
    let done = eventually(Duration::from_secs(300), "the job Succeeded or Failed", || async {
        let s = jobs.get("low").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 1));
    let second = done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert!(second.resumed_from_step.unwrap_or(0) > 0, "resumed from a checkpoint: {second:?}");
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    let ledger = walk(&checkpoints)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|f| f == "attempts.ledger"))
        .expect("the attempt ledger");
    let lines: Vec<flotilla_tests::LedgerLine> = std::fs::read_to_string(ledger)
        .expect("ledger")
        .lines()
        .map(|l| flotilla_tests::parse_ledger_line(l).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let attempts = flotilla_tests::assert_no_overlap(&lines, &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);
}
