//! End to end, serving through GPU failures: a TrainingJob trains the tiny preset and
//! checkpoints; an InferenceService with 3 replicas serves that checkpoint through real
//! `flotilla-worker serve` processes launched by three agents; a client streams completion
//! requests through the endpoints listed in the EndpointSlices while an XID 79 takes one
//! replica's GPU, and then while a rolling update moves every replica to a second checkpoint.
//! A second service's replicas are two-worker expert-parallel groups, one of which loses a
//! GPU. Prints the client's figures: requests sent, succeeded, failed (and why), time to
//! replace the replica, rollout duration.

use flotilla_operator::controller::inference_service::PROGRESSING;
use flotilla_operator::crd::inference_service::ReplicaState;
use flotilla_operator::crd::{InferenceService, JobPhase, TrainingJob};
use flotilla_operator::endpoints::{SERVICE_NAME_LABEL, dial_addr};
use flotilla_tests::serving::{Client, Window, ready_endpoints};
use flotilla_tests::{
    ServingRig, WAIT, eventually, inference_service, install_crds, tiny_engine_job,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::time::{Duration, Instant};

const NAME: &str = "chat";
/// Concurrent request loops of the test client.
const STREAMS: usize = 2;

fn service(checkpoint: &str, port: u16) -> InferenceService {
    inference_service(NAME, checkpoint, port).replicas(3).drain_seconds(3).build()
}

/// The service serves `want` replicas of its current spec, all listed ready in the slices.
async fn settled(
    services: &Api<InferenceService>,
    slices: &Api<EndpointSlice>,
    want: usize,
) -> Option<InferenceService> {
    settled_named(services, slices, NAME, want).await
}

/// [`settled`] for the service `name`.
async fn settled_named(
    services: &Api<InferenceService>,
    slices: &Api<EndpointSlice>,
    name: &str,
    want: usize,
) -> Option<InferenceService> {
    let svc = services.get(name).await.ok()?;
    let status = svc.status.as_ref()?;
    let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING)?;
    let done = status.observed_generation == svc.metadata.generation
        && progressing.reason == "RolloutComplete"
        && status.ready_replicas as usize == want
        && status.updated_replicas as usize == want
        && status.replicas.len() == want;
    let listed = ready_endpoints(slices, name).await?;
    (done && listed.len() == want).then_some(svc)
}

#[tokio::test]
async fn shapes_out_of_range_are_rejected_at_admission_naming_the_field() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "serve-bad").await.expect("namespace");
    let services: Api<InferenceService> = Api::namespaced(client.clone(), &ns);
    let mut too_wide = service("/ckpt/a", 8000);
    too_wide.spec.workers_per_replica = 65;
    let mut no_room = service("/ckpt/a", 8000);
    no_room.spec.rollout.max_surge = 0;
    no_room.spec.rollout.max_unavailable = 0;
    for (svc, field) in [(too_wide, "spec.workersPerReplica"), (no_room, "spec.rollout")] {
        let err = services.create(&PostParams::default(), &svc).await.expect_err("refused");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[tokio::test]
async fn replicas_keep_serving_through_an_xid_79_and_a_rolling_update() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "serve").await.expect("namespace");
    let rig = ServingRig::start(&cp, &ns, &client, 3).await;

    // 1. Train the tiny preset and checkpoint at steps 10 and 20.
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let trained =
        jobs.create(&PostParams::default(), &tiny_engine_job("train", 20, 10)).await.expect("job");
    let done = eventually(Duration::from_secs(240), "train finished", || async {
        let s = jobs.get("train").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    let checkpoints = rig
        .dir
        .path()
        .join("checkpoints")
        .join(&ns)
        .join(format!("train-{}", trained.metadata.uid.clone().expect("uid")));
    assert!(checkpoints.join("latest").exists(), "no checkpoint in {}", checkpoints.display());
    let checkpoint = checkpoints.display().to_string();

    // 2. Serve it with 3 replicas.
    let services: Api<InferenceService> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let base_port = flotilla_tests::serving_port_base();
    services
        .create(&PostParams::default(), &service(&checkpoint, base_port))
        .await
        .expect("create the InferenceService");
    let started = Instant::now();
    let svc = match eventually(WAIT, "3 replicas serve", || settled(&services, &slices, 3)).await {
        Ok(svc) => svc,
        Err(e) => fail(e, &services, &rig).await,
    };
    let startup = started.elapsed();
    let status = svc.status.clone().expect("status");
    let nodes: std::collections::BTreeSet<_> =
        status.replicas.iter().map(|r| r.placement.workers[0].node.clone()).collect();
    assert_eq!(nodes.len(), 3, "one replica per node: {:?}", status.replicas);
    let k8s_service: Api<Service> = Api::namespaced(client.clone(), &ns);
    let owned = k8s_service.get(NAME).await.expect("the Service exists");
    assert!(owned.spec.as_ref().and_then(|s| s.selector.as_ref()).is_none(), "selector-less");
    assert_eq!(
        owned.metadata.owner_references.expect("owner")[0].uid,
        svc.metadata.uid.clone().unwrap()
    );
    let labelled = slices
        .list(&kube::api::ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={NAME}")))
        .await
        .expect("slices");
    assert!(!labelled.items.is_empty());

    // 3. A steady stream of requests through the EndpointSlices.
    let stream = Client::start(slices.clone(), NAME, STREAMS).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 4. XID 79 on replica 0's GPU.
    let victim = status.replicas.iter().find(|r| r.index == 0).expect("replica 0").clone();
    let seat = victim.placement.workers[0].clone();
    let others_before: Vec<_> =
        status.replicas.iter().filter(|r| r.index != 0).map(|r| r.attempt).collect();
    let victim_addr = dial_addr(victim.endpoint.as_deref().unwrap()).unwrap();
    stream.enter(Window::Fault);
    let fault_at = Instant::now();
    rig.inject_xid(&seat.node, seat.gpus[0], 79);
    eventually(WAIT, "the failed replica out of the ready endpoints", || async {
        let eps = ready_endpoints(&slices, NAME).await?;
        (!eps.contains(&victim_addr)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let removed = fault_at.elapsed();
    let again = eventually(WAIT, "3 replicas serve again", || async {
        let svc = settled(&services, &slices, 3).await?;
        let replaced = !svc.status.as_ref()?.replicas.iter().any(|r| r.attempt == victim.attempt);
        replaced.then_some(svc)
    })
    .await;
    let svc = match again {
        Ok(svc) => svc,
        Err(e) => fail(e, &services, &rig).await,
    };
    let replaced = fault_at.elapsed();
    stream.enter(Window::Between);
    let status = svc.status.clone().unwrap();
    assert!(
        status.replicas.iter().all(|r| !(r.placement.workers[0].node == seat.node
            && r.placement.workers[0].gpus.contains(&seat.gpus[0]))),
        "a replica was placed on the failed GPU: {:?}",
        status.replicas
    );
    let untouched: Vec<_> =
        status.replicas.iter().filter(|r| r.index != 0).map(|r| r.attempt).collect();
    assert_eq!(untouched, others_before, "only the failed replica was replaced");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 5. Roll every replica to the step-10 checkpoint.
    stream.enter(Window::Rollout);
    let rollout_at = Instant::now();
    services
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"model": {"step": 10}}})),
        )
        .await
        .expect("patch the model step");
    let rolled =
        eventually(Duration::from_secs(240), "the rollout to step 10 complete", || async {
            let svc = settled(&services, &slices, 3).await?;
            let on_new = svc.status.as_ref()?.replicas.iter().all(|r| {
                r.checkpoint.as_deref().is_some_and(|c| c.ends_with("/step-00000010"))
                    && r.state == ReplicaState::Ready
            });
            on_new.then_some(svc)
        })
        .await;
    if let Err(e) = rolled {
        fail(e, &services, &rig).await
    }
    let rollout = rollout_at.elapsed();

    // 6. A checkpoint that does not exist: the new replica fails to load, the rollout stops
    //    with ModelLoadFailed, and the replicas of step 10 keep serving.
    stream.enter(Window::BadModel);
    services
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"model": {"step": 999}}})),
        )
        .await
        .expect("patch the model step");
    let stopped = eventually(WAIT, "Progressing=False ModelLoadFailed", || async {
        let svc = services.get(NAME).await.ok()?;
        let status = svc.status?;
        let c = status.conditions.iter().find(|c| c.type_ == PROGRESSING)?.clone();
        (status.observed_generation == svc.metadata.generation
            && c.status == "False"
            && c.reason == "ModelLoadFailed")
            .then_some((c.message, status))
    })
    .await;
    let (message, refused) = match stopped {
        Ok(v) => v,
        Err(e) => fail(e, &services, &rig).await,
    };
    assert!(message.contains("step-00000999"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let svc = services.get(NAME).await.expect("service");
    let after = svc.status.clone().expect("status");
    let serving: Vec<_> = after
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Ready)
        .map(|r| (r.index, r.attempt, r.checkpoint.clone()))
        .collect();
    assert_eq!(serving.len(), 3, "old replicas keep serving: {:?}", after.replicas);
    assert!(
        serving.iter().all(|(_, _, c)| c.as_deref().is_some_and(|c| c.ends_with("/step-00000010")))
    );
    assert_eq!(after.launches, refused.launches, "the failed revision is not retried");
    assert_eq!(ready_endpoints(&slices, NAME).await.map(|e| e.len()), Some(3));

    // 6b. While the rollout stays refused, an XID 79 on a serving replica: its slot is refilled
    //     with the last good revision (step 10), not left empty and not given the bad one.
    let second = after.replicas.iter().find(|r| r.state == ReplicaState::Ready).unwrap().clone();
    let second_seat = second.placement.workers[0].clone();
    let second_addr = dial_addr(second.endpoint.as_deref().unwrap()).unwrap();
    stream.enter(Window::BadModelFault);
    let second_at = Instant::now();
    rig.inject_xid(&second_seat.node, second_seat.gpus[0], 79);
    let refilled = eventually(WAIT, "3 replicas of step 10 serve again", || async {
        // Not `settled`: the rollout is still refused, so it never reads RolloutComplete.
        let status = services.get(NAME).await.ok()?.status?;
        let gone = !status.replicas.iter().any(|r| r.attempt == second.attempt);
        let good = status.replicas.iter().all(|r| {
            r.state == ReplicaState::Ready
                && r.checkpoint.as_deref().is_some_and(|c| c.ends_with("/step-00000010"))
        });
        let listed = ready_endpoints(&slices, NAME).await?.len();
        (gone && good && status.replicas.len() == 3 && listed == 3).then_some(status)
    })
    .await;
    let refilled = match refilled {
        Ok(s) => s,
        Err(e) => fail(e, &services, &rig).await,
    };
    let refill_time = second_at.elapsed();
    let still = refilled.conditions.iter().find(|c| c.type_ == PROGRESSING).expect("Progressing");
    assert_eq!(still.reason, "ModelLoadFailed", "the bad rollout stays stopped: {still:?}");
    assert_eq!(refilled.failed_revision.as_deref(), Some(refilled.revision.as_str()));
    stream.enter(Window::BadModel);

    // 7. Back to step 10 and down to 2 replicas, then up to 3 again.
    stream.enter(Window::Scale);
    for (replicas, step) in [(2, 10), (3, 10)] {
        services
            .patch(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"replicas": replicas, "model": {"step": step}}}),
                ),
            )
            .await
            .expect("scale");
        let scaled = eventually(WAIT, &format!("{replicas} replicas serve"), || {
            settled(&services, &slices, replicas)
        })
        .await;
        if let Err(e) = scaled {
            fail(e, &services, &rig).await
        }
    }
    stream.enter(Window::After);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = stream.finish().await;
    let status = svc.status.unwrap();

    // 8. Replicas of two workers each: expert-parallel groups spread over two nodes.
    let ep = expert_parallel_replicas(&rig, &services, &slices, &checkpoint).await;

    // 9. The figures.
    let total =
        |f: &dyn Fn(&flotilla_tests::serving::Counts) -> u64| counts.values().map(f).sum::<u64>();
    println!(
        "=== serving through an XID 79 and a rolling update (3 replicas, 3 agents × 4 GPUs) ==="
    );
    println!("startup to 3 ready: {:.1}s", startup.as_secs_f64());
    println!(
        "requests: sent {}, succeeded {}, failed {}, retried once on another endpoint {}",
        total(&|c| c.sent),
        total(&|c| c.succeeded),
        total(&|c| c.failures.len() as u64),
        total(&|c| c.retried)
    );
    for (w, c) in &counts {
        println!(
            "  {w:?}: sent {}, succeeded {}, failed {}, retried {}{}",
            c.sent,
            c.succeeded,
            c.failures.len(),
            c.retried,
            if c.failures.is_empty() { String::new() } else { format!(" — {:?}", c.failures) }
        );
    }
    println!(
        "fault → endpoint out of the slices: {:.2}s; fault → 3 ready again: {:.1}s",
        removed.as_secs_f64(),
        replaced.as_secs_f64()
    );
    println!("rolling update to a second checkpoint: {:.1}s", rollout.as_secs_f64());
    println!("missing checkpoint refused: {message}");
    println!(
        "XID 79 while that rollout is refused → slot refilled with the last good revision, 3 \
         ready again: {:.1}s",
        refill_time.as_secs_f64()
    );
    println!(
        "expert-parallel service (2 replicas × 2 workers): startup to 2 ready {:.1}s; XID 79 on \
         rank 1's GPU → whole replica replaced and 2 ready again {:.1}s",
        ep.startup.as_secs_f64(),
        ep.replaced.as_secs_f64()
    );

    // 10. What must hold.
    for w in [
        Window::Steady,
        Window::Fault,
        Window::Rollout,
        Window::BadModel,
        Window::BadModelFault,
        Window::Scale,
    ] {
        let mut c = counts.get(&w).cloned().unwrap_or_default();
        assert!(c.sent > 0, "no request was sent in {w:?}");
        let failed_replica = match w {
            Window::Fault => Some(&victim_addr),
            Window::BadModelFault => Some(&second_addr),
            _ => None,
        };
        if let Some(addr) = failed_replica {
            // The aim: during the GPU failure only requests in flight on the failed
            // replica may fail — at most one per client stream, all to the victim's address.
            let (lost, others): (Vec<String>, Vec<String>) =
                c.failures.iter().cloned().partition(|f| f.contains(addr));
            assert!(lost.len() <= STREAMS, "more than one per stream failed: {lost:?}");
            c.failures = others;
        }
        assert!(
            c.failures.is_empty(),
            "{} of {} requests failed in {w:?}: {:?}\n{}",
            c.failures.len(),
            c.sent,
            c.failures,
            rig.logs()
        );
    }
    assert_eq!(status.ready_replicas, 3);
    assert!(status.endpoints.len() == 3);
    let victim_again = status.replicas.iter().any(|r| {
        r.placement.workers[0].node == seat.node
            && r.placement.workers[0].gpus.contains(&seat.gpus[0])
    });
    assert!(!victim_again, "the failed GPU was used again by the rollout");
}

/// How the expert-parallel service fared.
struct ExpertParallelFigures {
    startup: Duration,
    replaced: Duration,
}

/// A second service, `ep`, whose 2 replicas are 2-worker expert-parallel groups (one worker per
/// node): both serve through their rank 0; an XID 79 on rank 1's GPU of replica 0 replaces that
/// whole replica (both workers, new launch) and leaves replica 1 alone.
async fn expert_parallel_replicas(
    rig: &ServingRig,
    services: &Api<InferenceService>,
    slices: &Api<EndpointSlice>,
    checkpoint: &str,
) -> ExpertParallelFigures {
    const EP: &str = "ep";
    let mut svc = service(checkpoint, flotilla_tests::serving_port_base() + 100);
    svc.metadata.name = Some(EP.into());
    svc.spec.replicas = 2;
    svc.spec.workers_per_replica = 2;
    svc.spec.scheduling.strategy = flotilla_operator::crd::training_job::PlacementStrategy::Spread;
    services.create(&PostParams::default(), &svc).await.expect("create the ep service");
    let started = Instant::now();
    let fail_ep = |e: anyhow::Error| async move {
        let status = services.get(EP).await.ok().and_then(|s| s.status);
        panic!("{e}\nstatus: {status:#?}\n{}", rig.logs())
    };
    let svc = match eventually(WAIT, "2 expert-parallel replicas serve", || {
        settled_named(services, slices, EP, 2)
    })
    .await
    {
        Ok(svc) => svc,
        Err(e) => fail_ep(e).await,
    };
    let startup = started.elapsed();
    let status = svc.status.clone().expect("status");
    for r in &status.replicas {
        let nodes: std::collections::BTreeSet<_> =
            r.placement.workers.iter().map(|w| w.node.as_str()).collect();
        assert_eq!((r.placement.workers.len(), nodes.len()), (2, 2), "{r:?}");
        let addr = dial_addr(r.endpoint.as_deref().expect("endpoint")).expect("address");
        let text =
            flotilla_operator::endpoints::complete(&addr, "The fleet", 6, Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| {
                    panic!("replica {} does not answer: {e}\n{}", r.index, rig.logs())
                });
        assert!(!text.is_empty(), "replica {} answered nothing", r.index);
    }

    let victim = status.replicas.iter().find(|r| r.index == 0).expect("replica 0").clone();
    let other = status.replicas.iter().find(|r| r.index == 1).expect("replica 1").attempt;
    let seat = victim.placement.workers.iter().find(|w| w.rank == 1).expect("rank 1").clone();
    let fault_at = Instant::now();
    rig.inject_xid(&seat.node, seat.gpus[0], 79);
    let again = eventually(WAIT, "replica 0 replaced, 2 serve again", || async {
        let svc = settled_named(services, slices, EP, 2).await?;
        let rs = &svc.status.as_ref()?.replicas;
        rs.iter().all(|r| r.attempt != victim.attempt).then_some(svc)
    })
    .await;
    let svc = match again {
        Ok(svc) => svc,
        Err(e) => fail_ep(e).await,
    };
    let replaced = fault_at.elapsed();
    let status = svc.status.expect("status");
    let attempts: Vec<_> = status.replicas.iter().map(|r| (r.index, r.attempt)).collect();
    assert!(attempts.contains(&(1, other)), "replica 1 was left alone: {attempts:?}");
    let fresh = status.replicas.iter().find(|r| r.index == 0).expect("replica 0");
    assert!(
        fresh
            .placement
            .workers
            .iter()
            .all(|w| !(w.node == seat.node && w.gpus.contains(&seat.gpus[0]))),
        "the new replica 0 uses the failed GPU: {:?}",
        fresh.placement
    );
    let addr = dial_addr(fresh.endpoint.as_deref().expect("endpoint")).expect("address");
    flotilla_operator::endpoints::complete(&addr, "The fleet", 6, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the new replica 0 does not answer: {e}\n{}", rig.logs()));
    ExpertParallelFigures { startup, replaced }
}

/// Fail with the service's status and every log.
async fn fail(what: anyhow::Error, services: &Api<InferenceService>, rig: &ServingRig) -> ! {
    let status = services.get(NAME).await.ok().and_then(|s| s.status);
    panic!(
        "{what}
status: {status:#?}
{}",
        rig.logs()
    )
}
