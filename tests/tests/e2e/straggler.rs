//! End to end, a straggler: one GPU of a 3-worker gang computes 4× slower (the simulated GPU's
//! `slow=400`, acted out by its real `flotilla-worker`). The operator scores each rank's compute
//! time against the gang's, marks that GPU `Degraded` (`SlowSteps`, the evidence in the
//! `GpuNode`'s last fault and a `Straggler` Event), and — the job opting in with
//! `spec.stragglers.moveOff` — restarts it off that GPU from its checkpoint without spending the
//! restart budget. Once the GPU is well again, validation returns it to `Healthy`.

use flotilla_operator::crd::gpu_node::GpuHealth;
use flotilla_operator::crd::training_job::{
    CheckpointSpec, PlacementStrategy, RestartPolicy, StragglerPolicy,
};
use flotilla_operator::crd::{GpuNode, JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Fault, Rig, WAIT, assert_no_overlap, eventually, install_crds, training_job};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use std::time::{Duration, Instant};

const STEPS: i64 = 1200;

#[tokio::test]
async fn a_slow_gpu_is_marked_and_the_job_moves_off_it() {
    let name = "straggler";
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, name).await.expect("namespace");
    // One agent per worker: the gang spreads one worker per node.
    let rig = Rig::start_with(&cp, &ns, &client, 3, &[]).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let path = rig.dir.path().join("checkpoints").join(&ns).join(format!("{name}-ckpt"));
    let spec = training_job(name)
        .workers(3)
        .gpus_per_worker(1)
        .tiny_engine(STEPS as u64, 20)
        .placement(PlacementStrategy::Spread)
        .restart_policy(RestartPolicy { max_restarts: 0, ..Default::default() })
        .checkpoint(CheckpointSpec {
            path: path.display().to_string(),
            interval_seconds: Some(60),
            keep: 3,
        })
        .stragglers(StragglerPolicy { threshold: 0.7, move_off: true })
        .build();
    jobs.create(&PostParams::default(), &spec).await.expect("create job");
    let first = eventually(WAIT, &format!("{name} Running past its first checkpoint"), || async {
        let s = jobs.get(name).await.ok()?.status?;
        let checkpointed = s.progress.as_ref().and_then(|p| p.last_checkpoint_step).is_some();
        (s.phase == JobPhase::Running && checkpointed).then_some(s.attempt?)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let slow = first.placement.workers.iter().find(|w| w.rank == 1).expect("rank 1").clone();
    let gpu = slow.gpus[0];
    let injected = Instant::now();
    rig.inject(&slow.node, u32::try_from(gpu).expect("GPU index"), Fault::Slow(400));

    let record = eventually(Duration::from_secs(180), "a Straggler restart", || async {
        let s = jobs.get(name).await.ok()?.status?;
        s.restart_history.into_iter().find(|r| r.cause == RestartCause::Straggler)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    println!(
        "{name}: rank 1 on a 4×-slow GPU moved off after {:.1}s: {}",
        injected.elapsed().as_secs_f64(),
        record.reason
    );
    assert_eq!(
        (record.rank, record.node.as_deref(), record.gpu),
        (Some(1), Some(slow.node.as_str()), Some(gpu)),
        "{record:?}"
    );
    assert!(record.reason.contains("worth it"), "the move rule is stated: {record:?}");

    // The GPU is marked, with the evidence, on its GpuNode.
    let nodes: Api<GpuNode> = Api::all(client.clone());
    let status = nodes.get(&slow.node).await.expect("GpuNode").status.expect("status");
    let state = status.gpus.iter().find(|g| g.index == gpu).expect("the GPU");
    assert_eq!(state.health, GpuHealth::Degraded, "{status:?}");
    let fault = status.last_fault.expect("last fault");
    assert_eq!(fault.gpu, gpu);
    assert!(fault.message.contains("rank 1 on"), "the evidence: {fault:?}");

    // Longer than `Rig::finished`: three workers share this machine's cores.
    let done =
        eventually(Duration::from_secs(600), &format!("{name} Succeeded or Failed"), || async {
            let s = jobs.get(name).await.ok()?.status?;
            s.phase.is_terminal().then_some(s)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 1), "{:?}", done.restart_history);
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    let second = done.attempt.expect("attempt");
    assert!(
        !second.placement.workers.iter().any(|w| w.node == slow.node && w.gpus.contains(&gpu)),
        "the slow GPU was placed again: {:?}",
        second.placement
    );
    let attempts = assert_no_overlap(&rig.ledger(name), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1, 2]), (2, vec![0, 1, 2])]);

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Straggler"), "no Straggler event in {reasons:?}");

    // Well again: validation returns it to Healthy.
    rig.inject(&slow.node, u32::try_from(gpu).expect("GPU index"), Fault::Recover);
    eventually(Duration::from_secs(90), "the GPU validated and Healthy", || async {
        let s = nodes.get(&slow.node).await.ok()?.status?;
        let g = s.gpus.into_iter().find(|g| g.index == gpu)?;
        (g.health == GpuHealth::Healthy).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
}
