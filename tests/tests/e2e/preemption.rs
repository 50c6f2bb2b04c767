//! End to end, preemption: a low-priority job holds every GPU; a high-priority job arrives. The
//! low one is stopped (its workers checkpoint on SIGTERM), requeued without spending its restart
//! budget, the high one runs to success on the freed GPUs, and the low one then resumes from its
//! checkpoint and succeeds.

use flotilla_operator::crd::training_job::PlacementStrategy;
use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, WAIT, eventually, install_crds, training_job};
use kube::api::{Api, PostParams};

#[tokio::test]
async fn a_higher_priority_job_preempts_a_lower_one_which_resumes_from_its_checkpoint() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "preempt").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);

    // 2 workers × 4 GPUs: every GPU of both agents.
    let low = training_job("low")
        .workers(2)
        .gpus_per_worker(4)
        .tiny_engine(600, 20)
        .placement(PlacementStrategy::Spread)
        .priority(0)
        .build();
    jobs.create(&PostParams::default(), &low).await.expect("create low");
    rig.running_with_checkpoint(&jobs, "low").await;

    // 1 worker × 4 GPUs at priority 10: fits only if low stops.
    let high = training_job("high")
        .workers(1)
        .gpus_per_worker(4)
        .tiny_engine(40, 20)
        .placement(PlacementStrategy::Spread)
        .priority(10)
        .build();
    jobs.create(&PostParams::default(), &high).await.expect("create high");

    let preempted = eventually(WAIT, "low preempted", || async {
        let s = jobs.get("low").await.ok()?.status?;
        let r = s.restart_history.last()?;
        (r.cause == RestartCause::Preempted).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let record = preempted.restart_history.last().expect("record").clone();
    assert!(record.reason.contains(&format!("{ns}/high")), "{}", record.reason);
    assert_eq!(record.attempt, 1);

    let high_done = rig.finished(&jobs, "high").await;
    assert_eq!(high_done.phase, JobPhase::Succeeded, "{:?}\n{}", high_done.message, rig.logs());
    // The high job was placed only after the low job's workers had stopped.
    let placed = high_done.attempt.as_ref().and_then(|a| a.scheduled_time.clone()).expect("placed");
    assert!(placed.0 >= record.time.0, "high placed at {placed:?}, before low stopped");

    let low_done = rig.finished(&jobs, "low").await;
    assert_eq!(low_done.phase, JobPhase::Succeeded, "{:?}\n{}", low_done.message, rig.logs());
    assert_eq!(
        (low_done.restarts, low_done.hardware_restarts),
        (0, 1),
        "preemption does not spend the budget"
    );
    let second = low_done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert_eq!(high_done.restarts + high_done.hardware_restarts, 0, "high was never restarted");
    assert!(rig.resumed_from_checkpoint(2), "low's attempt 2 resumed\n{}", rig.logs());
}
