//! End to end, GPU loans: `hold` runs on one agent's 4 GPUs for as long as it likes; `big` (2 × 4
//! GPUs, first in line) needs both agents, so the other agent's 4 GPUs are held for it and would
//! idle. `small` (1 × 4, behind `big`, same priority) borrows them and trains. When `hold` goes,
//! `big` takes the loan back: `small` checkpoints on SIGTERM and requeues without spending its
//! budget, `big` runs to success on both agents, then `small` resumes from its checkpoint and
//! succeeds. The three never share a GPU.

use flotilla_operator::crd::training_job::PlacementStrategy;
use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Rig, WAIT, eventually, install_crds, training_job};
use kube::api::{Api, DeleteParams, PostParams};
use std::time::Duration;

fn one_node_job(name: &str, steps: u64, workers: i32) -> TrainingJob {
    training_job(name)
        .workers(workers)
        .gpus_per_worker(4)
        .tiny_engine(steps, 20)
        .placement(PlacementStrategy::Spread)
        .build()
}

#[tokio::test]
async fn reserved_gpus_are_lent_to_a_later_job_and_taken_back_when_the_first_can_start() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "loan").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let status = |name: &'static str| {
        let jobs = jobs.clone();
        async move { jobs.get(name).await.ok()?.status }
    };

    // 1. `hold`: one agent's GPUs, far more steps than the test waits for.
    jobs.create(&PostParams::default(), &one_node_job("hold", 1_000_000, 1))
        .await
        .expect("create hold");
    eventually(WAIT, "hold Running", || async {
        (status("hold").await?.phase == JobPhase::Running).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));

    // 2. `big` waits for both agents; then `small`, later in line (creation times are whole
    // seconds, so a second apart).
    jobs.create(&PostParams::default(), &one_node_job("big", 40, 2)).await.expect("create big");
    eventually(WAIT, "big holds the free agent's GPUs", || async {
        let s = status("big").await?;
        let scheduled = s.conditions.iter().find(|c| c.type_ == "Scheduled")?;
        scheduled.message.contains("first in line; GPUs reserved").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    jobs.create(&PostParams::default(), &one_node_job("small", 3_000, 1))
        .await
        .expect("create small");
    let loan = rig.running_with_checkpoint(&jobs, "small").await;
    assert!(loan.on_loan, "small runs on loan: {loan:?}");
    let hold_nodes = status("hold").await.and_then(|s| s.attempt).expect("hold attempt");
    assert_ne!(
        loan.placement.nodes(),
        hold_nodes.placement.nodes(),
        "small borrowed the other agent, not hold's"
    );
    // `kubectl describe tj big` says where its GPUs are meanwhile.
    eventually(WAIT, "big's reason names the loan", || async {
        let s = status("big").await?;
        let scheduled = s.conditions.iter().find(|c| c.type_ == "Scheduled")?;
        scheduled.message.contains("4 of them lent to jobs behind it").then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            rig.logs()
        )
    });

    // 3. `hold` goes; `big` can start with the loan and takes it back.
    jobs.delete("hold", &DeleteParams::default()).await.expect("delete hold");
    let taken = eventually(WAIT, "small's loan taken back", || async {
        let s = status("small").await?;
        let r = s.restart_history.last()?;
        (r.cause == RestartCause::Preempted).then_some(r.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(taken.attempt, 1);
    assert!(taken.reason.contains(&format!("borrowed were held for {ns}/big")), "{}", taken.reason);

    let big_done = rig.finished(&jobs, "big").await;
    assert_eq!(big_done.phase, JobPhase::Succeeded, "{:?}\n{}", big_done.message, rig.logs());
    let big_attempt = big_done.attempt.as_ref().expect("attempt");
    assert_eq!(big_attempt.placement.nodes().len(), 2, "big on both agents");
    assert!(!big_attempt.on_loan);
    // Placed only once small's workers had stopped: never two jobs on one GPU.
    let placed = big_attempt.scheduled_time.clone().expect("placed");
    assert!(placed.0 >= taken.time.0, "big placed at {placed:?}, before small stopped");

    let small_done = rig.finished(&jobs, "small").await;
    assert_eq!(small_done.phase, JobPhase::Succeeded, "{:?}\n{}", small_done.message, rig.logs());
    assert_eq!((small_done.restarts, small_done.hardware_restarts), (0, 1), "budget unspent");
    let second = small_done.attempt.expect("attempt");
    assert_eq!(second.number, 2);
    assert!(!second.on_loan, "nothing is reserved any more: an ordinary placement");
    assert!(second.resumed_from_step.is_some_and(|s| s > 0), "{second:?}");
    assert!(rig.resumed_from_checkpoint(2), "small's attempt 2 resumed\n{}", rig.logs());
    println!(
        "loan: small borrowed {:?}; taken back at {}; big placed at {}; small resumed from step {:?}",
        loan.placement.nodes(),
        taken.time.0,
        placed.0,
        second.resumed_from_step
    );
}
