//! End to end, a GPU fault: XID 79 (or a GPU falling off the bus) on a GPU of a running job stops
//! the gang, the job is placed again without that GPU and resumes from its checkpoint, without
//! spending its restart budget. The same scenario runs on the simulated backend and on the NVML
//! backend, whose agents load the stand-in `libnvidia-ml.so.1` and see the fault as NVML reports
//! it (a critical XID event from the event set, `GPU_IS_LOST` from every call).

use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Backend, Fault, Rig, assert_no_overlap, install_crds, tiny_engine_job};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};

#[tokio::test]
async fn an_xid_79_under_the_job_restarts_it_on_healthy_gpus_from_its_checkpoint() {
    restarts_without_the_faulty_gpu(Backend::Simulated, Fault::Xid(79)).await;
}

#[tokio::test]
async fn an_xid_79_through_nvml_restarts_the_job_on_healthy_gpus_from_its_checkpoint() {
    restarts_without_the_faulty_gpu(Backend::Nvml, Fault::Xid(79)).await;
}

#[tokio::test]
async fn a_gpu_lost_through_nvml_restarts_the_job_on_healthy_gpus_from_its_checkpoint() {
    restarts_without_the_faulty_gpu(Backend::Nvml, Fault::Lost).await;
}

/// What the agent says of `fault` (the GPU's message, which the operator quotes).
fn agent_message(fault: Fault) -> String {
    match fault {
        Fault::Xid(xid) => format!("XID {xid} is a fatal hardware error"),
        Fault::Lost => "GPU lost: it no longer answers NVML".to_owned(),
        other => panic!("{other:?} does not fail a GPU under a job in this scenario"),
    }
}

/// A two-node job on agents of `backend`; `fault` hits a GPU of rank 0's worker mid-run.
async fn restarts_without_the_faulty_gpu(backend: Backend, fault: Fault) {
    // A control plane per test: `GpuNode`s are cluster-scoped, and the scheduler of one test's
    // operator would place its job on the nodes another test's rig left behind.
    let scope = format!("{}::{backend:?}::{fault:?}", module_path!());
    let cp = flotilla_tests::control_plane_for(&scope).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "xid").await.expect("namespace");
    let rig = Rig::start_on(&cp, &ns, &client, &[backend; 2], &[]).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    // Long enough that the fault lands mid-run; no restart budget: hardware restarts are free.
    jobs.create(&PostParams::default(), &tiny_engine_job("xid-e2e", 600, 20))
        .await
        .expect("create job");
    let first = rig.running_with_checkpoint(&jobs, "xid-e2e").await.placement;
    let victim = &first.workers[0];
    let gpu = victim.gpus[0];
    rig.inject(&victim.node, u32::try_from(gpu).expect("GPU index"), fault);

    let done = rig.finished(&jobs, "xid-e2e").await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 1));
    let record = done.restart_history.last().expect("a restart record");
    assert_eq!(record.cause, RestartCause::HardwareFault);
    let xid = match fault {
        Fault::Xid(xid) => Some(i32::try_from(xid).expect("XID")),
        _ => None,
    };
    assert_eq!(
        (record.node.as_deref(), record.gpu, record.xid),
        (Some(victim.node.as_str()), Some(gpu), xid)
    );
    let second = done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert!(
        !second.placement.workers.iter().any(|w| w.node == victim.node && w.gpus.contains(&gpu)),
        "the failed GPU was placed again: {:?}",
        second.placement
    );
    assert!(rig.resumed_from_checkpoint(2), "attempt 2 resumed from a checkpoint\n{}", rig.logs());
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(600), "exactly the requested steps");
    // The stopped gang wrote its end lines before the new one started.
    let attempts = assert_no_overlap(&rig.ledger("xid-e2e"), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);

    // `kubectl describe` names the GPU and what its agent made of the fault.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("xid-e2e"))
        .filter(|e| e.reason.as_deref() == Some("HardwareFault"))
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect();
    let said = format!("GPU {gpu} on {}: {}", victim.node, agent_message(fault));
    assert!(
        notes.iter().any(|n| n.contains(&said)),
        "no HardwareFault event saying {said:?}: {notes:?}"
    );
}
