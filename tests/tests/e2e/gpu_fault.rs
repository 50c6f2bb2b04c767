//! End to end, a GPU fault: XID 79 on a GPU of a running job stops the gang, the job is placed
//! again without that GPU and resumes from its checkpoint, without spending its restart budget.

use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, assert_no_overlap, install_crds, tiny_engine_job, walk};
use kube::api::{Api, PostParams};

#[tokio::test]
async fn an_xid_79_under_the_job_restarts_it_on_healthy_gpus_from_its_checkpoint() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "xid").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    // Long enough that the fault lands mid-run; no restart budget: hardware restarts are free.
    jobs.create(&PostParams::default(), &tiny_engine_job("xid-e2e", 600, 20))
        .await
        .expect("create job");
    let first = rig.running_with_checkpoint(&jobs, "xid-e2e").await.placement;
    let victim = &first.workers[0];
    let gpu = victim.gpus[0];
    rig.inject_xid(&victim.node, gpu, 79);

    let done = rig.finished(&jobs, "xid-e2e").await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 1));
    let record = done.restart_history.last().expect("a restart record");
    assert_eq!(record.cause, RestartCause::HardwareFault);
    assert_eq!(
        (record.node.as_deref(), record.gpu, record.xid),
        (Some(victim.node.as_str()), Some(gpu), Some(79))
    );
    let second = done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert!(
        !second.placement.workers.iter().any(|w| w.node == victim.node && w.gpus.contains(&gpu)),
        "the failed GPU was placed again: {:?}",
        second.placement
    );
    let resumed = walk(rig.dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/attempt-2/"))
        .any(|p| {
            std::fs::read_to_string(p).unwrap_or_default().contains("resumed from checkpoint")
        });
    assert!(resumed, "attempt 2 resumed from a checkpoint\n{}", rig.logs());
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(600), "exactly the requested steps");
    // The stopped gang wrote its end lines before the new one started.
    let attempts = assert_no_overlap(&rig.ledger("xid-e2e"), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);
}
