//! End to end, hangs: a rank that stops making progress while staying alive — computing forever,
//! or stuck in the all-reduce without sending its data — is found by its progress lease, the
//! gang is stopped and restarted from its checkpoint with cause `Hang`, and the rank blamed is
//! the one that stopped, not the peers that waited for it. A GPU that is merely slow is no hang.
//!
//! The hangs are the simulated GPU misbehaviours of the agent (`inject --fault hang`,
//! `hang_collective`, `slow=PERCENT`), which real `flotilla-worker` processes act out.

use flotilla_operator::crd::training_job::{
    CheckpointSpec, HangDetection, PlacementStrategy, RestartPolicy,
};
use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Fault, Rig, WAIT, assert_no_overlap, eventually, install_crds, training_job};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use std::time::{Duration, Instant};

const STEPS: i64 = 400;

/// The least time allowed between two steps in these tests (the default is 120 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// `workers` × 1 GPU spread over the agents, the tiny engine checkpointing every 20 steps, a
/// restart budget of 2 and a progress lease of [`STEP_TIMEOUT`].
fn job(rig: &Rig, ns: &str, name: &str, workers: i32) -> TrainingJob {
    let path = rig.dir.path().join("checkpoints").join(ns).join(format!("{name}-ckpt"));
    training_job(name)
        .workers(workers)
        .gpus_per_worker(1)
        .tiny_engine(STEPS as u64, 20)
        .placement(PlacementStrategy::Spread)
        .restart_policy(RestartPolicy {
            max_restarts: 2,
            backoff_seconds: 1,
            max_backoff_seconds: 1,
            ..Default::default()
        })
        .checkpoint(CheckpointSpec {
            path: path.display().to_string(),
            interval_seconds: Some(60),
            keep: 3,
        })
        .hang_detection(HangDetection {
            step_timeout_seconds: STEP_TIMEOUT.as_secs() as i32,
            ..Default::default()
        })
        .build()
}

#[tokio::test]
async fn a_hung_single_worker_job_is_restarted_from_its_checkpoint() {
    hung_rank_is_found_and_blamed("hang-one", 1, 0, Fault::Hang).await;
}

#[tokio::test]
async fn a_rank_stuck_in_the_all_reduce_is_blamed_not_the_peers_that_wait_for_it() {
    hung_rank_is_found_and_blamed("hang-three", 3, 1, Fault::HangCollective).await;
}

/// A job of `workers` runs past its first checkpoint; `fault` hits the GPU of rank `victim`.
async fn hung_rank_is_found_and_blamed(name: &str, workers: i32, victim: u32, fault: Fault) {
    let cp = flotilla_tests::control_plane_for(&format!("{}::{name}", module_path!())).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, name).await.expect("namespace");
    // One agent per worker: the gang spreads one worker per node.
    let rig = Rig::start_with(&cp, &ns, &client, workers.max(2) as usize, &[]).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &job(&rig, &ns, name, workers)).await.expect("create job");
    let first = eventually(WAIT, &format!("{name} Running past its first checkpoint"), || async {
        let s = jobs.get(name).await.ok()?.status?;
        let checkpointed = s.progress.as_ref().and_then(|p| p.last_checkpoint_step).is_some();
        (s.phase == JobPhase::Running && checkpointed).then_some(s.attempt?)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let worker = first
        .placement
        .workers
        .iter()
        .find(|w| w.rank == victim as i32)
        .expect("the victim's placement")
        .clone();
    let gpu = worker.gpus[0];
    let injected = Instant::now();
    rig.inject(&worker.node, u32::try_from(gpu).expect("GPU index"), fault);

    let record =
        eventually(Duration::from_secs(120), &format!("{name}: a Hang restart"), || async {
            let s = jobs.get(name).await.ok()?.status?;
            s.restart_history.into_iter().find(|r| r.cause == RestartCause::Hang)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let detected = injected.elapsed();
    // The GPU is well again, so that the next attempt may use it.
    rig.inject(&worker.node, u32::try_from(gpu).expect("GPU index"), Fault::Recover);
    println!(
        "{name}: {fault:?} on rank {victim} found after {:.1}s (step timeout {}s): {}",
        detected.as_secs_f64(),
        STEP_TIMEOUT.as_secs(),
        record.reason
    );
    assert_eq!(
        (record.rank, record.node.as_deref(), record.gpu, record.attempt),
        (Some(victim as i32), Some(worker.node.as_str()), Some(gpu), 1),
        "the rank that stopped is blamed: {record:?}"
    );
    assert!(
        record
            .reason
            .starts_with(&format!("rank {victim} on {} stopped making progress", worker.node)),
        "{record:?}"
    );
    if workers > 1 {
        assert!(record.reason.contains("waited for it in the all-reduce"), "{record:?}");
    }

    let done = rig.finished(&jobs, name).await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!(
        (done.restarts, done.hardware_restarts),
        (1, 0),
        "a hang spends one restart: {:?}",
        done.restart_history
    );
    let hangs = done.restart_history.iter().filter(|r| r.cause == RestartCause::Hang).count();
    assert_eq!(hangs, 1, "{:?}", done.restart_history);
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    assert!(rig.resumed_from_checkpoint(2), "attempt 2 resumed from a checkpoint\n{}", rig.logs());
    // Workers of attempt 1 end either way: cleanly (the GPU recovered during the stop grace and
    // the rank checkpointed on SIGTERM; a peer whose collective gave up) or SIGKILLed after the
    // grace (no end line). Either way attempt 2 started after the last of them ended.
    let ledger = rig.ledger(name);
    let unended: Vec<(u64, u32)> = (0..workers as u32)
        .filter(|r| !ledger.iter().any(|l| l.attempt == 1 && l.rank == *r && !l.start))
        .map(|r| (1, r))
        .collect();
    let attempts = assert_no_overlap(&ledger, &unended);
    let all: Vec<u32> = (0..workers as u32).collect();
    assert_eq!(attempts, vec![(1, all.clone()), (2, all)]);
    // Its log says where it was when it was told to stop.
    assert!(
        rig.logs().contains(&format!("signal received while rank {victim} after step")),
        "no whereabouts dump in the workers' logs\n{}",
        rig.logs()
    );

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some("Hang"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes.iter().any(|n| n.contains(&format!("rank {victim} on {}", worker.node))),
        "no Hang event naming rank {victim}: {notes:?}"
    );
}

#[tokio::test]
async fn a_slow_gpu_is_not_taken_for_a_hang() {
    let name = "slow-gpu";
    let cp = flotilla_tests::control_plane_for(&format!("{}::{name}", module_path!())).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, name).await.expect("namespace");
    let rig = Rig::start_with(&cp, &ns, &client, 3, &[]).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    // Every GPU of the first agent computes 4× slower from the start: its ranks lag every step,
    // their peers wait for them every step, and checkpoints pause the gang — none of it a hang.
    let node = rig.node_names()[0].clone();
    for gpu in 0..4 {
        rig.inject(&node, gpu, Fault::Slow(400));
    }
    let mut spec = job(&rig, &ns, name, 3);
    spec.spec.hang_detection.step_timeout_seconds = 2;
    jobs.create(&PostParams::default(), &spec).await.expect("create job");
    let done = rig.finished(&jobs, name).await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!(
        (done.restarts, done.hardware_restarts),
        (0, 0),
        "no restart: {:?}\n{}",
        done.restart_history,
        rig.logs()
    );
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS));
    let placed_on_slow =
        done.attempt.iter().flat_map(|a| &a.placement.workers).any(|w| w.node == node);
    assert!(placed_on_slow, "a rank ran on the slow node: {:?}", done.attempt);
}
