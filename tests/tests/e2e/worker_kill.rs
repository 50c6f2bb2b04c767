//! End to end, a worker crash: a worker SIGKILLed under a running job ends its attempt; the job
//! restarts per its restart policy (spending one restart of its budget), resumes from its
//! checkpoint and finishes with exactly the requested number of steps, its attempts never
//! overlapping.

use flotilla_operator::crd::training_job::{CheckpointSpec, PlacementStrategy, RestartPolicy};
use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, WAIT, assert_no_overlap, eventually, install_crds, training_job, walk};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use std::time::Duration;

const STEPS: i64 = 600;

#[tokio::test]
async fn a_sigkilled_worker_restarts_the_job_from_its_checkpoint_spending_one_restart() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "wkill").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    // A restart budget needs a checkpoint spec; the directory stays under the rig's.
    let path = rig.dir.path().join("checkpoints").join(&ns).join("wkill-e2e-ckpt");
    let spec = training_job("wkill-e2e")
        .workers(2)
        .gpus_per_worker(2)
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
        .build();
    jobs.create(&PostParams::default(), &spec).await.expect("create job");
    eventually(WAIT, "wkill-e2e Running past its first checkpoint", || async {
        let s = jobs.get("wkill-e2e").await.ok()?.status?;
        let checkpointed = s.progress.and_then(|p| p.last_checkpoint_step).is_some();
        (s.phase == JobPhase::Running && checkpointed).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));

    let pids = rig.worker_pids("wkill-e2e", 1);
    assert_eq!(pids.len(), 1, "one rank-1 worker, found {pids:?}\n{}", rig.logs());
    let out = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "kill: {}", String::from_utf8_lossy(&out.stderr));

    let done = eventually(Duration::from_secs(300), "wkill-e2e Succeeded or Failed", || async {
        let s = jobs.get("wkill-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!(
        (done.restarts, done.hardware_restarts),
        (1, 0),
        "a crash spends the budget: {:?}\n{}",
        done.restart_history,
        rig.logs()
    );
    assert_eq!(done.restart_history.len(), 1, "{:?}", done.restart_history);
    let record = &done.restart_history[0];
    assert_eq!((record.cause, record.attempt), (RestartCause::WorkerExit, 1));
    assert!(record.reason.contains("worker 1 was killed by signal 9"), "{record:?}");
    assert_eq!(done.attempt.as_ref().map(|a| a.number), Some(2));
    let resumed = done.attempt.as_ref().and_then(|a| a.resumed_from_step).unwrap_or_default();
    assert!(resumed > 0, "attempt 2 resumes from a checkpoint: {:?}", done.attempt);
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    let resumed_log = walk(rig.dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/attempt-2/"))
        .any(|p| {
            std::fs::read_to_string(p).unwrap_or_default().contains("resumed from checkpoint")
        });
    assert!(resumed_log, "attempt 2 logged its resume\n{}", rig.logs());
    // The killed worker wrote no end line; its peer did, before attempt 2 started.
    let attempts = assert_no_overlap(&rig.ledger("wkill-e2e"), &[(1, 1)]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("wkill-e2e"))
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Restarting"), "no Restarting event in {reasons:?}");
}
