//! Unit tests of the placement adapter.

use super::*;
use crate::crd::Attempt;
use crate::crd::gpu_node::GpuHealth;
use crate::crd::gpu_node::{GpuNodeSpec, GpuNodeStatus, GpuState};
use crate::crd::training_job::{TrainingJobSpec, TrainingJobStatus, WorkerCommand};
use crate::crd::{JobPhase, TrainingJob, WorkerPlacement};
use crate::ids::HolderId;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::BTreeMap;

fn node(name: &str, gpus: i32, labels: &[(&str, &str)]) -> GpuNode {
    let mut n = GpuNode::new(name, GpuNodeSpec::default());
    n.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    n.status = Some(GpuNodeStatus {
        gpus: (0..gpus)
            .map(|index| GpuState { index, health: GpuHealth::Healthy, ..Default::default() })
            .collect(),
        ..Default::default()
    });
    n
}

fn job(name: &str, workers: i32, gpus: i32, priority: i32) -> TrainingJob {
    let mut j = TrainingJob::new(
        name,
        TrainingJobSpec {
            workers,
            gpus_per_worker: gpus,
            engine: None,
            command: Some(WorkerCommand {
                command: vec!["/bin/true".into()],
                ..Default::default()
            }),
            checkpoint: None,
            restart_policy: Default::default(),
            hang_detection: Default::default(),
            stragglers: Default::default(),
            priority,
            scheduling: Default::default(),
            suspend: false,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        },
    );
    j.metadata.namespace = Some("ns".into());
    j.metadata.uid = Some(format!("uid-{name}"));
    j.status = Some(TrainingJobStatus { phase: JobPhase::Queued, ..Default::default() });
    j
}

fn running(mut j: TrainingJob, seats: &[(&str, &[i32])]) -> TrainingJob {
    let workers = seats
        .iter()
        .enumerate()
        .map(|(rank, (node, gpus))| WorkerPlacement {
            rank: rank as i32,
            node: node.to_string(),
            gpus: gpus.to_vec(),
        })
        .collect();
    j.status = Some(TrainingJobStatus {
        phase: JobPhase::Running,
        attempt: Some(Attempt {
            number: 1,
            placement: Placement { workers },
            ..Default::default()
        }),
        ..Default::default()
    });
    j
}

fn place_alone(
    me: &TrainingJob,
    others: &[&TrainingJob],
    nodes: &[GpuNode],
) -> Result<Placement, Unschedulable> {
    let holdings = holdings(others, &BTreeMap::new(), &me.uid().unwrap());
    let waiting = waiting_jobs(others, &holdings);
    let nodes: Vec<&GpuNode> = nodes.iter().collect();
    place(&job_request(me), &waiting, &nodes, &holdings, &sched::Policy::default(), 100)
}

fn seats(p: &Placement) -> Vec<(&str, Vec<i32>)> {
    p.workers.iter().map(|w| (w.node.as_str(), w.gpus.clone())).collect()
}

#[test]
fn a_gang_stays_in_one_zone_and_skips_failed_and_cordoned_gpus() {
    let mut a = node("a", 4, &[(ZONE_LABEL, "z1"), (RACK_LABEL, "r1")]);
    a.status.as_mut().unwrap().gpus[0].health = GpuHealth::Failed;
    a.spec.cordoned_gpus = vec![1];
    let c = node("c", 2, &[(ZONE_LABEL, "z1"), (RACK_LABEL, "r2")]);
    let mut b = node("b", 4, &[(ZONE_LABEL, "z2"), (RACK_LABEL, "r1")]);
    b.status.as_mut().unwrap().gpus[3].health = GpuHealth::Unknown;
    // No node has two workers' worth of usable GPUs; zone z1 has one worker's on a and one
    // on c, zone z2 only one on b.
    let p = place_alone(&job("j", 2, 2, 0), &[], &[a.clone(), b.clone(), c.clone()]).unwrap();
    assert_eq!(seats(&p), vec![("a", vec![2, 3]), ("c", vec![0, 1])]);
    // With node a cordoned the zone is only preferred: the gang spans both zones.
    a.spec.cordoned = true;
    let p = place_alone(&job("j", 2, 2, 0), &[], &[a, b, c]).unwrap();
    let mut nodes = p.nodes();
    nodes.sort_unstable();
    assert_eq!(nodes, vec!["b", "c"]);
}

#[test]
fn a_job_that_can_never_fit_says_how_much_it_needs_and_the_largest_block() {
    let nodes = [node("a", 4, &[]), node("b", 4, &[])];
    let err = place_alone(&job("huge", 8, 4, 0), &[], &nodes).unwrap_err();
    assert_eq!(
        err.message,
        "can never fit this fleet: needs 32 GPUs (8 workers × 4); largest free block is 8"
    );
    let err = place_alone(&job("wide", 1, 8, 0), &[], &nodes).unwrap_err();
    assert!(err.message.contains("needs 8 GPUs per worker"), "{}", err.message);
}

#[test]
fn gpus_of_running_jobs_are_not_reused_and_a_higher_priority_queued_job_goes_first() {
    let nodes = [node("a", 4, &[])];
    let busy = running(job("busy", 1, 2, 5), &[("a", &[0, 1])]);
    let p = place_alone(&job("me", 1, 2, 0), &[&busy], &nodes).unwrap();
    assert_eq!(seats(&p), vec![("a", vec![2, 3])]);
    let first = job("first", 1, 2, 9);
    let err = place_alone(&job("me", 1, 2, 0), &[&busy, &first], &nodes).unwrap_err();
    assert_eq!(err.message, "first in line; GPUs reserved, starts when jobs of unknown length end");
}

fn schedule_alone(me: &TrainingJob, others: &[&TrainingJob], nodes: &[GpuNode]) -> Scheduling {
    let holdings = holdings(others, &BTreeMap::new(), &me.uid().unwrap());
    let waiting = waiting_jobs(others, &holdings);
    let nodes: Vec<&GpuNode> = nodes.iter().collect();
    schedule(&job_request(me), &waiting, &nodes, &holdings, &sched::Policy::default(), 100)
}

#[test]
fn preemption_names_the_victims_and_the_job_waits_for_them_to_stop() {
    let nodes = [node("a", 4, &[])];
    let low = running(job("low", 1, 4, 0), &[("a", &[0, 1, 2, 3])]);
    let s = schedule_alone(&job("high", 1, 4, 10), &[&low], &nodes);
    assert_eq!(s.preempt, vec!["uid-low".to_string()]);
    let err = s.placement.unwrap_err();
    assert!(
        err.message.ends_with("; preempting ns/low (lower priority) to make room"),
        "{}",
        err.message
    );
    // Equal priority never preempts.
    let s = schedule_alone(&job("same", 1, 4, 0), &[&low], &nodes);
    assert!(s.preempt.is_empty());
}

#[test]
fn a_job_that_would_not_fit_even_after_preemption_preempts_no_one() {
    let nodes = [node("a", 4, &[])];
    let low = running(job("low", 1, 4, 0), &[("a", &[0, 1, 2, 3])]);
    let s = schedule_alone(&job("huge", 2, 4, 10), &[&low], &nodes);
    assert!(s.preempt.is_empty(), "nothing to gain: {:?}", s.preempt);
    assert!(s.placement.is_err());
}

#[test]
fn a_waiting_job_names_the_lower_priority_jobs_preemption_would_stop() {
    let nodes = [node("a", 4, &[])];
    let low = running(job("low", 1, 4, 0), &[("a", &[0, 1, 2, 3])]);
    let err = place_alone(&job("high", 1, 4, 10), &[&low], &nodes).unwrap_err();
    assert!(
        err.message
            .ends_with("; preempting ns/low would make room, but preemption is not allowed here"),
        "{}",
        err.message
    );
    let err = place_alone(&job("same", 1, 4, 0), &[&low], &nodes).unwrap_err();
    assert!(!err.message.contains("preempting"), "{}", err.message);
}

#[test]
fn a_job_that_checkpoints_borrows_reserved_gpus_and_gives_them_back() {
    use crate::crd::training_job::CheckpointSpec;
    let nodes = [node("a", 4, &[]), node("b", 4, &[])];
    let busy = running(job("busy", 1, 4, 0), &[("a", &[0, 1, 2, 3])]);
    // `big` needs both nodes and was first; b's GPUs are held for it.
    let mut big = job("big", 2, 4, 0);
    big.metadata.creation_timestamp = Some(Time(Timestamp::from_second(10).unwrap()));
    let mut small = job("small", 1, 4, 0);
    small.metadata.creation_timestamp = Some(Time(Timestamp::from_second(20).unwrap()));
    // Without checkpoints it may not borrow: taking the loan back would lose its work.
    let s = schedule_alone(&small, &[&busy, &big], &nodes);
    assert!(s.placement.is_err() && !s.on_loan, "{s:?}");
    small.spec.checkpoint =
        Some(CheckpointSpec { path: "/ckpt/small".into(), interval_seconds: Some(60), keep: 3 });
    let s = schedule_alone(&small, &[&busy, &big], &nodes);
    assert!(s.on_loan, "{s:?}");
    let p = s.placement.expect("placed on loan");
    assert_eq!(seats(&p), vec![("b", vec![0, 1, 2, 3])]);
    // While `busy` runs, `big` waits and the loan stands.
    let mut lent = running(small.clone(), &[("b", &[0, 1, 2, 3])]);
    lent.status.as_mut().unwrap().attempt.as_mut().unwrap().on_loan = true;
    let s = schedule_alone(&big, &[&busy, &lent], &nodes);
    assert!(s.preempt.is_empty(), "{s:?}");
    let msg = s.placement.unwrap_err().message;
    assert!(msg.ends_with("4 of them lent to jobs behind it until then"), "{msg}");
    // Once `busy` is gone, `big` takes the loan back (equal priority) and waits for it.
    let s = schedule_alone(&big, &[&lent], &nodes);
    assert_eq!(s.preempt, vec!["uid-small".to_string()]);
    let msg = s.placement.unwrap_err().message;
    assert_eq!(
        msg,
        "first in line; taking back the GPUs lent to ns/small (they checkpoint and requeue)"
    );
}

#[test]
fn bookings_replace_stale_cache_and_unknown_gpus_are_ignored() {
    let nodes = [node("a", 4, &[])];
    // The cache still shows `stale` queued, but this process booked GPUs 0–1 for it, and a
    // service replica holds GPU 2 plus a GPU on a node that no longer exists.
    let stale = job("stale", 1, 2, 0);
    let held = BTreeMap::from([
        (
            HolderId::Job("uid-stale".into()),
            running(stale.clone(), &[("a", &[0, 1])]).status.unwrap().attempt.unwrap().placement,
        ),
        (
            HolderId::Replica(crate::ids::ReplicaId {
                service: "uid-svc".into(),
                index: 0,
                attempt: 1,
            }),
            Placement {
                workers: vec![
                    WorkerPlacement { rank: 0, node: "a".into(), gpus: vec![2] },
                    WorkerPlacement { rank: 1, node: "gone".into(), gpus: vec![0] },
                ],
            },
        ),
    ]);
    let me = job("me", 1, 1, 0);
    let holdings = holdings(&[&stale], &held, "uid-me");
    assert_eq!(holdings.len(), 2);
    let waiting = waiting_jobs(&[&stale], &holdings);
    assert!(waiting.is_empty(), "a job holding GPUs is not queued again");
    let policy = sched::Policy::default();
    let p = place(&job_request(&me), &waiting, &[&nodes[0]], &holdings, &policy, 100).unwrap();
    assert_eq!(seats(&p), vec![("a", vec![3])]);
}
