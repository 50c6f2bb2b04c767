//! End to end: the operator serving two real agents (4 simulated GPUs each, workers run as real
//! processes) runs a TrainingJob of 2 workers × 2 GPUs, one per agent, with `flotilla-worker
//! train` (the tiny preset) through Running to Succeeded, its progress shown live in status.

use flotilla_operator::crd::{JobPhase, TrainingJob};
use flotilla_tests::{
    Rig, WAIT, assert_no_overlap, eventually, install_crds, tiny_engine_job, walk,
};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};

#[tokio::test]
async fn a_two_node_engine_job_runs_real_workers_to_success() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "e2e").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let logs = || rig.logs();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    const STEPS: i64 = 300;
    jobs.create(&PostParams::default(), &tiny_engine_job("tiny-e2e", STEPS as u64, 100))
        .await
        .expect("create job");
    // Rank 0's progress reaches status while the job runs.
    let live = eventually(WAIT, "tiny-e2e Running with progress", || async {
        let s = jobs.get("tiny-e2e").await.ok()?.status?;
        let p = s.progress.filter(|p| p.step > 0)?;
        (s.phase == JobPhase::Running || s.phase.is_terminal()).then_some((s.phase, p))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(live.0, JobPhase::Running, "progress seen only after the end: {live:?}");
    let p = live.1;
    assert!(p.step < STEPS, "{p:?}");
    assert_eq!(p.total_steps, Some(STEPS));
    assert_eq!(p.percent, Some((p.step * 100 / STEPS) as i32));
    assert!(p.loss.is_some_and(|l| l.is_finite() && l > 0.0), "{p:?}");
    assert!(p.tokens_per_second.is_some_and(|t| t > 0.0), "{p:?}");
    assert!(p.summary.as_deref().is_some_and(|s| s.starts_with(&format!("{}/{STEPS}", p.step))));
    let done = eventually(WAIT, "tiny-e2e Succeeded or Failed", || async {
        let s = jobs.get("tiny-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, logs());
    let p = done.progress.clone().expect("progress at the end");
    assert_eq!((p.step, p.percent, p.last_checkpoint_step), (STEPS, Some(100), Some(STEPS)));
    assert_eq!(p.eta_seconds, Some(0));
    let attempts = assert_no_overlap(&rig.ledger("tiny-e2e"), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1])]);
    let attempt = done.attempt.expect("attempt");
    assert_eq!(attempt.number, 1);
    assert!(attempt.start_time.is_some(), "every worker was seen running before the end");
    let mut placed = attempt.placement.nodes();
    placed.sort_unstable();
    assert_eq!(placed, rig.node_names());

    // Both phases were announced, in `kubectl describe` terms.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("tiny-e2e"))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Scheduled", "Running", "Succeeded"] {
        assert!(reasons.iter().any(|r| r == reason), "no {reason} event in {reasons:?}");
    }
    // Each rank wrote its log through the agent's supervisor.
    let rank_logs = walk(rig.dir.path()).into_iter().filter(|p| p.ends_with("rank-0.log")).count();
    assert_eq!(rank_logs, 1, "one rank-0 log\n{}", logs());
}
