//! End to end, an operator crash: the operator SIGKILLed while a job runs; a new operator with
//! the same settings adopts the running workers (the same attempt, no restart) and the job
//! finishes with exactly the requested number of steps.

use flotilla_operator::crd::{JobPhase, TrainingJob};
use flotilla_tests::{Rig, WAIT, assert_no_overlap, eventually, install_crds, tiny_engine_job};
use kube::api::{Api, PostParams};
use std::time::Duration;

// Long enough (about a minute here) that the job still runs when the new operator starts.
const STEPS: i64 = 1500;

#[tokio::test]
async fn a_restarted_operator_adopts_the_running_workers_and_the_job_succeeds() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "opkill").await.expect("namespace");
    let mut rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &tiny_engine_job("opkill-e2e", STEPS as u64, 50))
        .await
        .expect("create job");
    let before = eventually(WAIT, "opkill-e2e Running with progress", || async {
        let s = jobs.get("opkill-e2e").await.ok()?.status?;
        let step = s.progress.as_ref().map_or(0, |p| p.step);
        (s.phase == JobPhase::Running && step > 0).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let pids = [rig.worker_pids("opkill-e2e", 0), rig.worker_pids("opkill-e2e", 1)];
    assert!(pids.iter().all(|p| p.len() == 1), "one process per rank: {pids:?}\n{}", rig.logs());

    rig.kill_operator();
    rig.restart_operator();
    // The workers outlived the operator: the same processes run on.
    assert_eq!(
        [rig.worker_pids("opkill-e2e", 0), rig.worker_pids("opkill-e2e", 1)],
        pids,
        "the same worker processes run on\n{}",
        rig.logs()
    );
    // The workers trained on while no operator ran, and the new one shows their progress.
    let step_then = before.progress.as_ref().map_or(0, |p| p.step);
    eventually(WAIT, "progress from the adopted workers", || async {
        let s = jobs.get("opkill-e2e").await.ok()?.status?;
        let step = s.progress.as_ref().map_or(0, |p| p.step);
        (step > step_then || s.phase.is_terminal()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));

    let done = eventually(Duration::from_secs(300), "opkill-e2e Succeeded or Failed", || async {
        let s = jobs.get("opkill-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 0), "adoption is no restart");
    assert!(done.restart_history.is_empty(), "{:?}", done.restart_history);
    assert_eq!(done.attempt.as_ref().map(|a| a.number), Some(1), "the same attempt");
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    let attempts = assert_no_overlap(&rig.ledger("opkill-e2e"), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1])]);
}
