//! End to end, a lost node: the agent running one worker of a job is SIGKILLed. Its worker dies
//! with it (workers are started with a parent-death signal), the other worker loses its peer
//! and exits, and the operator, which can no longer hear from the node, charges nothing until the
//! fence timeout has passed (DESIGN.md safety rule 1); then the job restarts on the surviving
//! nodes (three agents; the job spreads one worker per node) from its checkpoint as a `NodeLost` hardware restart and finishes with exactly the
//! requested number of steps.

use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, assert_no_overlap, eventually, install_crds, tiny_engine_job, walk};
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};

/// Shortened from the defaults (20 s, 30 s) so the test waits seconds, not minutes.
const HEARTBEAT_TIMEOUT_S: &str = "3";
const FENCE_TIMEOUT_S: u64 = 8;

#[tokio::test]
async fn a_killed_agent_takes_its_workers_with_it_and_the_job_restarts_elsewhere_after_the_fence() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "agentkill").await.expect("namespace");
    let fence = FENCE_TIMEOUT_S.to_string();
    let env = [
        ("FLOTILLA_AGENT_HEARTBEAT_SECONDS", "1"),
        ("FLOTILLA_AGENT_HEARTBEAT_TIMEOUT_SECONDS", HEARTBEAT_TIMEOUT_S),
        ("FLOTILLA_FENCE_TIMEOUT_SECONDS", fence.as_str()),
    ];
    let mut rig = Rig::start_with(&cp, &ns, &client, 3, &env).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &tiny_engine_job("agentkill-e2e", 600, 20))
        .await
        .expect("create job");
    let first = rig.running_with_checkpoint(&jobs, "agentkill-e2e").await.placement;

    let victim = first.workers.iter().find(|w| w.rank == 0).expect("rank 0").node.clone();
    let pids = rig.worker_pids("agentkill-e2e", 0);
    assert_eq!(pids.len(), 1, "one rank-0 worker: {pids:?}\n{}", rig.logs());

    let killed_at = Instant::now();
    let killed_wall = k8s_openapi::jiff::Timestamp::now();
    rig.kill_agent(&victim);
    // The worker dies with its agent, long before the fence timeout lets anything restart.
    eventually(Duration::from_secs(5), "the killed agent's worker gone", || async {
        rig.worker_pids("agentkill-e2e", 0).is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: pids {pids:?} still run\n{}", rig.logs()));
    let worker_gone_after = killed_at.elapsed();

    let done = rig.finished(&jobs, "agentkill-e2e").await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    // The surviving worker's exit (its peer vanished) was not charged to the job.
    assert_eq!(
        (done.restarts, done.hardware_restarts),
        (0, 1),
        "{:?}\n{}",
        done.restart_history,
        rig.logs()
    );
    let record = done.restart_history.last().expect("a restart record");
    assert_eq!(record.cause, RestartCause::NodeLost, "{record:?}");
    assert_eq!(record.node.as_deref(), Some(victim.as_str()));
    let second = done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert!(
        second.placement.workers.iter().all(|w| w.node != victim),
        "attempt 2 placed on the lost node: {:?}",
        second.placement
    );
    // Safety rule 1: the node was declared lost (and attempt 2 placed) only once the fence
    // timeout had passed since the kill (status times have whole seconds, hence the 1 s slack).
    let placed = second.scheduled_time.expect("scheduled time").0;
    let lost_at = record.time.0;
    let earliest =
        killed_wall + k8s_openapi::jiff::SignedDuration::from_secs(FENCE_TIMEOUT_S as i64 - 1);
    assert!(lost_at >= earliest, "declared lost at {lost_at}, killed at {killed_wall}");
    assert!(placed >= lost_at, "placed at {placed} before the restart record at {lost_at}");
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(600), "exactly the requested steps");
    let resumed = walk(rig.dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/attempt-2/"))
        .any(|p| {
            std::fs::read_to_string(p).unwrap_or_default().contains("resumed from checkpoint")
        });
    assert!(resumed, "attempt 2 resumed from a checkpoint\n{}", rig.logs());
    // Rank 0 of attempt 1 was SIGKILLed and wrote no end line; it was gone (checked above)
    // before the fence timeout, and so before attempt 2 could start.
    let attempts = assert_no_overlap(&rig.ledger("agentkill-e2e"), &[(1, 0)]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);
    println!(
        "agent SIGKILLed at {killed_wall}: its worker gone after {worker_gone_after:?}; \
         node declared lost at {lost_at}; attempt 2 placed at {placed} (fence timeout \
         {FENCE_TIMEOUT_S} s)"
    );
}
