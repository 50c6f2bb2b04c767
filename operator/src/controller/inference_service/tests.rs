//! Unit tests of the `InferenceService` plan.

use super::*;
use crate::crd::common::condition_types as ct;
use crate::crd::gpu_node::{GpuHealth, GpuNodeSpec, GpuNodeStatus, GpuState};
use crate::crd::inference_service::{InferenceServiceSpec, ModelSource};
use crate::crd::inference_service::{ReplicaState, ServicePhase};
use crate::crd::{GpuNode, Placement};
use crate::endpoints::Probe;
use crate::lifecycle::{HardwareFault, WorkerExit};
use crate::placement::Holding;
use k8s_openapi::jiff::SignedDuration;

fn node(name: &str, gpus: i32) -> GpuNode {
    let mut n = GpuNode::new(name, GpuNodeSpec::default());
    n.status = Some(GpuNodeStatus {
        gpus: (0..gpus)
            .map(|index| GpuState { index, health: GpuHealth::Healthy, ..Default::default() })
            .collect(),
        ..Default::default()
    });
    n
}

fn service(replicas: i32) -> InferenceService {
    let mut s = InferenceService::new(
        "chat",
        InferenceServiceSpec {
            replicas,
            workers_per_replica: 1,
            gpus_per_worker: 1,
            model: ModelSource { checkpoint_path: "/ckpt/a".into(), ..Default::default() },
            serving: Default::default(),
            priority: 0,
            scheduling: Default::default(),
            rollout: Default::default(),
        },
    );
    s.metadata.generation = Some(1);
    s.metadata.uid = Some("u".into());
    s.metadata.namespace = Some("ns".into());
    s
}

/// What the agents and readiness checks say, per replica id.
#[derive(Default)]
struct World {
    nodes: Vec<GpuNode>,
    reports: BTreeMap<String, AttemptReport>,
    probes: BTreeMap<String, Probe>,
    now: Option<Timestamp>,
}

impl World {
    fn new(nodes: &[(&str, i32)]) -> Self {
        World { nodes: nodes.iter().map(|(n, g)| node(n, *g)).collect(), ..Default::default() }
    }

    fn step(&mut self, svc: &mut InferenceService) -> ServicePlan {
        let hosts: BTreeMap<String, String> =
            self.nodes.iter().map(|n| (n.name_any(), "10.0.0.1".to_string())).collect();
        let now = self.now.unwrap_or_else(Timestamp::now);
        let obs = Observed {
            reports: &self.reports,
            probes: &self.probes,
            nodes: &self.nodes,
            holdings: &[],
            hosts: &hosts,
            ports_in_use: &BTreeMap::new(),
            policy: &flotilla_scheduler::Policy::default(),
            now,
        };
        let p = plan(svc, &obs);
        svc.status = Some(p.status.clone());
        // Launched replicas run until told otherwise.
        for e in &p.effects {
            match e {
                ReplicaEffect::Launch { index, attempt, .. } => {
                    self.reports.insert(
                        replica_id("u", *index, *attempt),
                        AttemptReport { running: 1, ..Default::default() },
                    );
                }
                ReplicaEffect::Stop { index, attempt, .. } => {
                    self.reports.insert(
                        replica_id("u", *index, *attempt),
                        AttemptReport { all_stopped: true, ..Default::default() },
                    );
                    self.probes.remove(&replica_id("u", *index, *attempt));
                }
            }
        }
        p
    }

    /// Every live replica's check passes.
    fn all_answer(&mut self, svc: &InferenceService) {
        for r in &svc.status.as_ref().unwrap().replicas {
            if live(r) {
                let mut p = Probe::default();
                p.record(Ok(()));
                self.probes.insert(replica_id("u", r.index, r.attempt), p);
            }
        }
    }

    fn later(&mut self, secs: i64) {
        let base = self.now.unwrap_or_else(Timestamp::now);
        self.now = Some(base + SignedDuration::from_secs(secs));
    }
}

fn launches(p: &ServicePlan) -> Vec<(i32, i32)> {
    p.effects
        .iter()
        .filter_map(|e| match e {
            ReplicaEffect::Launch { index, attempt, .. } => Some((*index, *attempt)),
            _ => None,
        })
        .collect()
}

fn stops(p: &ServicePlan) -> Vec<(i32, i32)> {
    p.effects
        .iter()
        .filter_map(|e| match e {
            ReplicaEffect::Stop { index, attempt, .. } => Some((*index, *attempt)),
            _ => None,
        })
        .collect()
}

fn condition<'a>(p: &'a ServicePlan, type_: &str) -> (&'a str, &'a str) {
    let c = p.status.conditions.iter().find(|c| c.type_ == type_).expect(type_);
    (c.status.as_str(), c.reason.as_str())
}

fn ready_service(world: &mut World, n: i32) -> InferenceService {
    let mut svc = service(n);
    world.step(&mut svc);
    world.all_answer(&svc);
    let p = world.step(&mut svc);
    assert_eq!(p.status.ready_replicas, n);
    svc
}

#[test]
fn replicas_spread_over_nodes_get_their_own_ports_and_serve_after_their_check() {
    let mut world = World::new(&[("a", 4), ("b", 4), ("c", 4)]);
    let mut svc = service(3);
    let p = world.step(&mut svc);
    assert_eq!(launches(&p), vec![(0, 1), (1, 2), (2, 3)]);
    let nodes: BTreeSet<_> =
        p.status.replicas.iter().map(|r| r.placement.workers[0].node.clone()).collect();
    assert_eq!(nodes.len(), 3, "one replica per node: {nodes:?}");
    let endpoints: Vec<_> = p.status.replicas.iter().filter_map(|r| r.endpoint.clone()).collect();
    assert_eq!(
        endpoints,
        vec!["http://10.0.0.1:8000", "http://10.0.0.1:8001", "http://10.0.0.1:8002"]
    );
    assert_eq!((p.status.phase, p.status.ready_replicas), (ServicePhase::Starting, 0));
    assert!(p.status.endpoints.is_empty(), "nothing serves before its check passes");
    assert_eq!(condition(&p, PROGRESSING), ("True", "ReplicasStarting"));
    match &p.effects[0] {
        ReplicaEffect::Launch { launch, .. } => {
            assert_eq!(
                (launch.checkpoint.as_str(), launch.served_name.as_str()),
                ("/ckpt/a", "chat")
            );
            assert_eq!(launch.port, 8000);
        }
        other => panic!("{other:?}"),
    }
    world.all_answer(&svc);
    let p = world.step(&mut svc);
    assert_eq!(
        (p.status.phase, p.status.ready_replicas, p.status.updated_replicas),
        (ServicePhase::Ready, 3, 3)
    );
    assert_eq!(p.status.endpoints.len(), 3);
    assert_eq!(condition(&p, ct::READY), ("True", "Ready"));
    assert_eq!(condition(&p, PROGRESSING), ("True", "RolloutComplete"));
    assert_eq!(condition(&p, DEGRADED), ("False", "AllReplicasServe"));
    assert!(p.effects.is_empty());
}

#[test]
fn a_gpu_fault_replaces_only_that_replica_and_it_leaves_the_endpoints_at_once() {
    let mut world = World::new(&[("a", 2), ("b", 2)]);
    let mut svc = ready_service(&mut world, 3);
    let victim = svc.status.as_ref().unwrap().replicas[1].clone();
    let id = replica_id("u", 1, victim.attempt);
    let gpu = victim.placement.workers[0].gpus[0];
    world.reports.insert(
        id.clone(),
        AttemptReport {
            running: 1,
            fault: Some(HardwareFault {
                node: victim.placement.workers[0].node.clone(),
                gpu: Some(gpu),
                xid: Some(79),
                message: "XID 79".into(),
            }),
            ..Default::default()
        },
    );
    // The fault marks the GPU failed.
    let n =
        world.nodes.iter_mut().find(|n| n.name_any() == victim.placement.workers[0].node).unwrap();
    n.status.as_mut().unwrap().gpus[gpu as usize].health = GpuHealth::Failed;
    let p = world.step(&mut svc);
    assert_eq!(stops(&p), vec![(1, victim.attempt)]);
    assert_eq!(launches(&p), vec![(1, 4)], "replaced at once, same slot, new launch");
    let replacement = p.status.replicas.iter().find(|r| r.attempt == 4).unwrap();
    assert!(
        !(replacement.placement.workers[0].node == victim.placement.workers[0].node
            && replacement.placement.workers[0].gpus.contains(&gpu)),
        "not on the failed GPU"
    );
    assert_ne!(replacement.endpoint, victim.endpoint, "the old one may still hold its port");
    assert_eq!(p.status.ready_replicas, 2);
    assert!(!p.status.endpoints.contains(victim.endpoint.as_ref().unwrap()));
    let slices = endpoints::endpoint_slices(&svc, &p.status.replicas);
    let listed_ready: Vec<_> = slices
        .iter()
        .flat_map(|s| {
            s.endpoints
                .iter()
                .flatten()
                .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
                .map(move |_| s.ports.clone())
        })
        .collect();
    assert_eq!(listed_ready.len(), 2, "only the two healthy replicas are ready in the slices");
    assert_eq!((p.status.phase, condition(&p, DEGRADED).0), (ServicePhase::Degraded, "True"));
    assert_eq!(p.events.iter().filter(|e| e.1 == "ReplicaFailed").count(), 1);
    // The failed one is confirmed stopped and dropped; the replacement serves.
    world.all_answer(&svc);
    let p = world.step(&mut svc);
    assert_eq!(p.status.replicas.len(), 3);
    assert_eq!((p.status.phase, p.status.ready_replicas), (ServicePhase::Ready, 3));
}

#[test]
fn a_crash_of_a_serving_replica_is_replaced_not_taken_for_a_bad_model() {
    let mut world = World::new(&[("a", 4)]);
    let mut svc = ready_service(&mut world, 2);
    let r0 = svc.status.as_ref().unwrap().replicas[0].clone();
    world.reports.insert(
        replica_id("u", 0, r0.attempt),
        AttemptReport {
            exits: vec![WorkerExit { rank: 0, code: Some(1), signal: None }],
            all_stopped: true,
            ..Default::default()
        },
    );
    let p = world.step(&mut svc);
    assert_eq!(launches(&p), vec![(0, 3)]);
    assert_eq!(p.status.failed_revision, None);
}

#[test]
fn a_spec_change_rolls_one_slot_at_a_time_never_below_the_replica_count() {
    let mut world = World::new(&[("a", 4), ("b", 4)]);
    let mut svc = ready_service(&mut world, 3);
    svc.spec.model.checkpoint_path = "/ckpt/b".into();
    svc.metadata.generation = Some(2);
    let mut rolled = 0;
    for _ in 0..40 {
        let p = world.step(&mut svc);
        assert!(p.status.ready_replicas >= 3, "capacity dropped: {:?}", p.status.replicas);
        let live_or_draining = p
            .status
            .replicas
            .iter()
            .filter(|r| live(r) || r.state == ReplicaState::Draining)
            .count();
        assert!(live_or_draining <= 4, "more than maxSurge above: {:?}", p.status.replicas);
        assert!(launches(&p).len() <= 1);
        if condition(&p, PROGRESSING) == ("True", "RolloutComplete") {
            rolled = p.status.replicas.len();
            assert!(p.status.replicas.iter().all(|r| r.checkpoint.as_deref() == Some("/ckpt/b")));
            break;
        }
        assert_eq!(condition(&p, PROGRESSING).1, "RollingUpdate");
        world.all_answer(&svc);
        world.later(6); // past the drain
    }
    assert_eq!(rolled, 3, "the rollout completed");
}

#[test]
fn with_max_unavailable_and_no_surge_a_slot_is_drained_before_its_new_replica_starts() {
    let mut world = World::new(&[("a", 3)]);
    let mut svc = ready_service(&mut world, 3);
    svc.spec.rollout.max_surge = 0;
    svc.spec.rollout.max_unavailable = 1;
    svc.spec.serving.max_batch_size = 4;
    let p = world.step(&mut svc);
    assert!(launches(&p).is_empty(), "no free GPU and no surge allowed");
    let draining: Vec<_> = p
        .status
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Draining)
        .map(|r| r.index)
        .collect();
    assert_eq!(draining, vec![0]);
    assert_eq!(p.status.ready_replicas, 2);
    world.later(6);
    let p = world.step(&mut svc);
    assert_eq!(stops(&p).len(), 1);
    let p = world.step(&mut svc);
    assert_eq!(launches(&p).len(), 1, "the drained slot gets its new replica");
}

/// Changes `svc` to a checkpoint that does not exist and lets its first new replica exit 1
/// before it answers; returns the plan that sees the exit.
fn roll_to_a_missing_checkpoint(world: &mut World, svc: &mut InferenceService) -> ServicePlan {
    svc.spec.model.checkpoint_path = "/ckpt/missing".into();
    let p = world.step(svc);
    let [(slot, attempt)] = launches(&p)[..] else { panic!("{:?}", p.effects) };
    world.reports.insert(
        replica_id("u", slot, attempt),
        AttemptReport {
            exits: vec![WorkerExit { rank: 0, code: Some(1), signal: None }],
            all_stopped: true,
            ..Default::default()
        },
    );
    world.step(svc)
}

#[test]
fn a_model_that_fails_to_load_stops_the_rollout_and_old_replicas_keep_serving() {
    let mut world = World::new(&[("a", 4), ("b", 4)]);
    let mut svc = ready_service(&mut world, 3);
    let p = roll_to_a_missing_checkpoint(&mut world, &mut svc);
    assert_eq!(condition(&p, PROGRESSING), ("False", "ModelLoadFailed"));
    let message = &p.status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap().message;
    assert!(message.contains("/ckpt/missing") && message.contains("exit code 1"), "{message}");
    assert!(launches(&p).is_empty());
    assert!(p.events.iter().any(|e| e.1 == "ModelLoadFailed"));
    for _ in 0..3 {
        world.later(10);
        let p = world.step(&mut svc);
        assert!(launches(&p).is_empty(), "no retry of the failed revision");
        assert!(stops(&p).is_empty(), "healthy old replicas are not replaced");
        assert_eq!((p.status.ready_replicas, p.status.phase), (3, ServicePhase::Ready));
        assert_eq!(condition(&p, PROGRESSING).1, "ModelLoadFailed");
        let again = &p.status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap().message;
        assert_eq!(again, message, "the reason stays as first written");
    }
    // A fixed spec rolls again.
    svc.spec.model.checkpoint_path = "/ckpt/b".into();
    let p = world.step(&mut svc);
    assert_eq!(launches(&p).len(), 1);
    assert_eq!(p.status.failed_revision, None);
}

#[test]
fn while_a_bad_rollout_is_stopped_a_gpu_fault_is_refilled_with_the_last_good_revision() {
    let mut world = World::new(&[("a", 4), ("b", 4)]);
    let mut svc = ready_service(&mut world, 3);
    let good = svc.status.as_ref().unwrap().stable.clone().expect("the rollout completed");
    assert_eq!(good.revision, svc.status.as_ref().unwrap().revision);
    let good_checkpoint = checkpoint(&svc.spec);
    let p = roll_to_a_missing_checkpoint(&mut world, &mut svc);
    assert_eq!(condition(&p, PROGRESSING), ("False", "ModelLoadFailed"));
    // An XID 79 takes out an old, serving replica.
    let victim = svc.status.as_ref().unwrap().replicas.iter().find(|r| r.ready).unwrap().clone();
    let gpu = victim.placement.workers[0].gpus[0];
    world.reports.insert(
        replica_id("u", victim.index, victim.attempt),
        AttemptReport {
            running: 1,
            fault: Some(HardwareFault {
                node: victim.placement.workers[0].node.clone(),
                gpu: Some(gpu),
                xid: Some(79),
                message: "XID 79".into(),
            }),
            ..Default::default()
        },
    );
    let p = world.step(&mut svc);
    assert_eq!(stops(&p), vec![(victim.index, victim.attempt)]);
    let [(refill, _)] = launches(&p)[..] else { panic!("refilled at once: {:?}", p.effects) };
    assert_eq!(refill, victim.index);
    let r =
        p.status.replicas.iter().filter(|r| r.index == refill).max_by_key(|r| r.attempt).unwrap();
    assert_eq!(r.revision, good.revision, "the last good revision, not the one that fails");
    assert_eq!(r.checkpoint.as_deref(), Some(good_checkpoint.as_str()));
    assert_eq!(condition(&p, PROGRESSING).1, "ModelLoadFailed", "the rollout stays stopped");
    // The refill serves and stays; the service is whole again.
    world.all_answer(&svc);
    let p = world.step(&mut svc);
    assert_eq!((p.status.phase, p.status.ready_replicas), (ServicePhase::Ready, 3));
    assert!(stops(&p).is_empty() && launches(&p).is_empty(), "{:?}", p.effects);
    // A fixed spec rolls every slot again, the refill included.
    svc.spec.model.checkpoint_path = "/ckpt/b".into();
    let p = world.step(&mut svc);
    assert_eq!(launches(&p).len(), 1);
}

#[test]
fn a_replica_whose_port_is_taken_is_launched_again_and_does_not_stop_the_rollout() {
    let mut world = World::new(&[("a", 4), ("b", 4)]);
    let mut svc = ready_service(&mut world, 3);
    svc.spec.model.checkpoint_path = "/ckpt/b".into();
    let p = world.step(&mut svc);
    let [(slot, attempt)] = launches(&p)[..] else { panic!("{:?}", p.effects) };
    let taken = i32::from(flotilla_engine::exit::PORT_UNAVAILABLE);
    world.reports.insert(
        replica_id("u", slot, attempt),
        AttemptReport {
            exits: vec![WorkerExit { rank: 0, code: Some(taken), signal: None }],
            all_stopped: true,
            ..Default::default()
        },
    );
    let p = world.step(&mut svc);
    assert_ne!(condition(&p, PROGRESSING).1, "ModelLoadFailed");
    assert_eq!(p.status.failed_revision, None);
    assert!(!p.events.iter().any(|e| e.1 == "ModelLoadFailed"), "{:?}", p.events);
    let relaunch: Vec<_> = p
        .status
        .replicas
        .iter()
        .filter(|r| {
            r.index == slot && r.attempt > attempt && r.checkpoint.as_deref() == Some("/ckpt/b")
        })
        .map(|r| r.state)
        .collect();
    assert_eq!(relaunch, vec![ReplicaState::Starting], "slot {slot} launched again (a new port)");
}

#[test]
fn a_replica_that_never_answers_counts_as_a_load_failure_after_the_startup_timeout() {
    let mut world = World::new(&[("a", 1)]);
    let mut svc = service(1);
    world.step(&mut svc);
    world.later(301);
    let p = world.step(&mut svc);
    assert_eq!(stops(&p).len(), 1);
    assert_eq!(condition(&p, PROGRESSING), ("False", "ModelLoadFailed"));
    assert_eq!(p.status.phase, ServicePhase::Failed);
}

#[test]
fn scaling_down_drains_the_highest_slots_then_stops_them() {
    let mut world = World::new(&[("a", 4)]);
    let mut svc = ready_service(&mut world, 3);
    svc.spec.replicas = 1;
    let p = world.step(&mut svc);
    // The scale subresource's view: leaving replicas no longer count.
    assert_eq!(p.status.current_replicas, 1);
    assert_eq!(
        p.status.selector,
        "kubernetes.io/service-name=chat,endpointslice.kubernetes.io/managed-by=flotilla-operator.flotilla.dev"
    );
    let draining: Vec<_> = p
        .status
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Draining)
        .map(|r| r.index)
        .collect();
    assert_eq!(draining, vec![1, 2]);
    assert_eq!(p.status.endpoints.len(), 1);
    world.later(6);
    let p = world.step(&mut svc);
    assert_eq!(stops(&p).len(), 2);
    let p = world.step(&mut svc);
    assert_eq!(p.status.replicas.len(), 1);
    svc.spec.replicas = 2;
    let p = world.step(&mut svc);
    assert_eq!(launches(&p).len(), 1, "scaling up launches again");
    assert_eq!(p.status.current_replicas, 2, "a starting replica counts");
}

#[test]
fn an_invalid_selector_fails_the_service_naming_the_field() {
    let mut world = World::new(&[("a", 2)]);
    let mut svc = service(1);
    world.step(&mut svc);
    svc.spec.scheduling.node_selector.insert("bad key".into(), "x".into());
    let p = world.step(&mut svc);
    assert_eq!(p.status.phase, ServicePhase::Failed);
    assert_eq!(stops(&p).len(), 1);
    let valid = p.status.conditions.iter().find(|c| c.type_ == "Valid").unwrap();
    assert!(valid.message.starts_with("spec.scheduling.nodeSelector"), "{}", valid.message);
}

#[test]
fn without_free_gpus_the_service_is_queued_and_unschedulable() {
    let mut world = World::new(&[("a", 1)]);
    let mut svc = service(1);
    svc.spec.gpus_per_worker = 2;
    let p = world.step(&mut svc);
    assert_eq!(p.status.phase, ServicePhase::Queued);
    assert_eq!(condition(&p, ct::SCHEDULED), ("False", "Unschedulable"));
    assert_eq!(condition(&p, PROGRESSING), ("False", "Unschedulable"));
    assert!(p.effects.is_empty());
}

#[test]
fn the_revision_follows_model_and_serving_only() {
    let a = service(1);
    let mut b = service(5);
    b.spec.rollout.max_surge = 3;
    assert_eq!(revision(&a.spec), revision(&b.spec));
    b.spec.serving.max_new_tokens = 7;
    assert_ne!(revision(&a.spec), revision(&b.spec));
    b.spec.model.step = Some(20);
    assert_eq!(checkpoint(&b.spec), "/ckpt/a/step-00000020");
}

#[test]
fn a_replica_below_the_count_preempts_lower_priority_training_but_not_equal_priority() {
    let nodes = [node("a", 2)];
    let training = |priority: i32| Holding {
        id: crate::ids::HolderId::Job("job-uid".into()),
        name: "ns/train".into(),
        namespace: "ns".into(),
        priority,
        placement: Placement {
            workers: vec![crate::crd::WorkerPlacement {
                rank: 0,
                node: "a".into(),
                gpus: vec![0, 1],
            }],
        },
        started_at: Some(1),
        expected_end: None,
        on_loan: false,
        arrival: 0,
    };
    let hosts = BTreeMap::from([("a".to_string(), "10.0.0.1".to_string())]);
    let plan_with = |svc: &InferenceService, held: &[Holding]| {
        plan(
            svc,
            &Observed {
                reports: &BTreeMap::new(),
                probes: &BTreeMap::new(),
                nodes: &nodes,
                holdings: held,
                hosts: &hosts,
                ports_in_use: &BTreeMap::new(),
                policy: &flotilla_scheduler::Policy::default(),
                now: Timestamp::now(),
            },
        )
    };
    let mut svc = service(1);
    svc.spec.gpus_per_worker = 2;
    svc.spec.priority = 10;
    let p = plan_with(&svc, &[training(0)]);
    assert!(launches(&p).is_empty(), "the GPUs are still held");
    assert_eq!(p.preempt, vec!["job-uid".to_string()]);
    let p = plan_with(&svc, &[training(10)]);
    assert!(p.preempt.is_empty(), "equal priority is never preempted");
}
