//! End to end, an operator crash in the middle of a restart: XID 79 under a running job, and the
//! operator SIGKILLed the moment the job's status shows the restart begun. A new operator with
//! the same settings finishes the restart exactly once: one history record, one hardware
//! restart, attempt 2 on healthy GPUs, never overlapping attempt 1, exactly the requested steps.

use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, install_crds, tiny_engine_job};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use std::time::Duration;

#[tokio::test]
async fn an_operator_killed_mid_restart_is_replaced_and_the_restart_completes_once() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "opkillrs").await.expect("namespace");
    let mut rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &tiny_engine_job("opkillrs-e2e", 600, 20))
        .await
        .expect("create job");
    let first = rig.running_with_checkpoint(&jobs, "opkillrs-e2e").await.placement;
    let victim = &first.workers[0];
    let gpu = victim.gpus[0];
    rig.inject_xid(&victim.node, gpu, 79);

    // Kill the operator the moment a status write shows the restart begun (a watch sees it
    // within milliseconds; polling would miss it: fault to new gang takes about 0.3 s here).
    let watch = WatchParams::default().fields("metadata.name=opkillrs-e2e");
    let mut events = jobs.watch(&watch, "0").await.expect("watch").boxed();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = events.try_next().await.expect("watch event") {
            if let WatchEvent::Modified(job) = event
                && let Some(s) = job.status
                && !s.restart_history.is_empty()
            {
                return s;
            }
        }
        panic!("the watch ended before the restart showed");
    })
    .await
    .unwrap_or_else(|_| panic!("no restart within 60 s\n{}", rig.logs()));
    rig.kill_operator();
    let at_kill = jobs.get("opkillrs-e2e").await.expect("job").status.expect("status");
    let attempt_at_kill = at_kill.attempt.as_ref().map_or(0, |a| a.number);
    println!(
        "operator killed when the job showed {:?} (attempt {}); after the kill: {:?}, attempt \
         {attempt_at_kill}",
        seen.phase,
        seen.attempt.as_ref().map_or(0, |a| a.number),
        at_kill.phase
    );
    // The point of the test: the restart was still in flight (attempt 2 not yet running).
    assert!(
        seen.phase == JobPhase::Restarting || seen.phase == JobPhase::Queued,
        "the kill came after the restart: {:?}",
        seen.phase
    );
    rig.restart_operator();

    let done = rig.finished(&jobs, "opkillrs-e2e").await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!(
        (done.restarts, done.hardware_restarts, done.restart_history.len()),
        (0, 1, 1),
        "one restart, recorded once: {:?}\n{}",
        done.restart_history,
        rig.logs()
    );
    let record = &done.restart_history[0];
    assert_eq!((record.cause, record.xid), (RestartCause::HardwareFault, Some(79)));
    let second = done.attempt.expect("attempt");
    assert_eq!(second.number, 2, "exactly one new attempt");
    // The old gang was stopped, not left to train to the end beside a restart in limbo.
    let resumed = second.resumed_from_step.unwrap_or(0);
    assert!(resumed < 600, "attempt 2 resumed from step {resumed}: attempt 1 was never stopped");
    assert!(
        !second.placement.workers.iter().any(|w| w.node == victim.node && w.gpus.contains(&gpu)),
        "the failed GPU was placed again: {:?}",
        second.placement
    );
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(600), "exactly the requested steps");
    let attempts = rig.assert_ledger("opkillrs-e2e", &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);
}
