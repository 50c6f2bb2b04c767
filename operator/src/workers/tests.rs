//! Unit tests of the worker folding, reports and launch specs.

use super::fold::{AttemptId, AttemptSeen, Folded, RankSeen, RankState, fold};
use super::launch::{MASTER_PORT_SPAN, WorkerLaunchArgs, launch_specs, port_offset, replica_specs};
use super::report::{attempt_report, stale_attempts};
use super::{FAILED_TO_START_CODE, ReplicaLaunch};
use crate::agents::{GpuHealth, NodeRecord, WorkerPhase, WorkerReport};
use crate::agents::{GpuRecord, RunningWorkerRecord};
use crate::crd::training_job::{TrainingJobSpec, TrainingJobStatus, WorkerCommand};
use crate::crd::{Attempt, JobPhase, Placement, WorkerPlacement};
use crate::crd::{Progress, TrainingJob};
use crate::lifecycle::WorkerExit;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

fn args() -> WorkerLaunchArgs {
    WorkerLaunchArgs {
        worker_binary: "/opt/flotilla-worker".into(),
        checkpoint_root: "/ckpt".into(),
        master_port_base: 30000,
        worker_master_addr: None,
        worker_stop_grace_seconds: 5,
    }
}

fn gpu(index: u32, health: GpuHealth) -> GpuRecord {
    GpuRecord {
        index,
        uuid: format!("GPU-{index}"),
        model: "sim".into(),
        memory_bytes: 1,
        pci_bus_id: String::new(),
        nvlink_peers: vec![],
        topology_domain: String::new(),
        health,
        reason: "Xid79".into(),
        message: String::new(),
        last_xid: if health == GpuHealth::Failed { 79 } else { 0 },
        temperature_c: None,
        memory_used_bytes: None,
    }
}

fn node(name: &str, gpus: Vec<GpuRecord>, silent_for: Duration) -> (String, NodeRecord) {
    let rec = NodeRecord {
        node: name.into(),
        agent_version: "0".into(),
        instance_id: "i".into(),
        process_id: "p".into(),
        backend: "simulated".into(),
        gpus,
        applied_seq: 0,
        connected: true,
        lost: false,
        last_heard: Instant::now() - silent_for,
        last_fault: None,
        workers: Vec::new(),
        session: 1,
        address: None,
    };
    (name.into(), rec)
}

fn report(rank: u32, phase: WorkerPhase, code: Option<i32>) -> WorkerReport {
    WorkerReport {
        node: "a".into(),
        job_uid: "u".into(),
        attempt: 1,
        rank,
        phase,
        exit_code: code,
        signal: None,
        message: String::new(),
        progress: None,
        pace: None,
    }
}

fn progress(rank: u32, step: i64, loss: f64, checkpoint: Option<i64>) -> WorkerReport {
    WorkerReport {
        progress: Some(Progress {
            step,
            total_steps: Some(100),
            loss: Some(loss),
            tokens_per_second: Some(1000.0 + step as f64),
            last_checkpoint_step: checkpoint,
            ..Default::default()
        }),
        ..report(rank, WorkerPhase::Progress, None)
    }
}

const FENCE: Duration = Duration::from_secs(30);

/// No node fenced.
fn none() -> HashSet<String> {
    HashSet::new()
}

#[test]
fn reports_fold_into_running_then_exits_and_an_exit_is_final() {
    let mut attempts = HashMap::new();
    let fold = |a: &mut HashMap<AttemptId, AttemptSeen>, r: &WorkerReport| {
        fold(a, r, Instant::now()) == Folded::State
    };
    assert!(fold(&mut attempts, &report(0, WorkerPhase::Started, None)));
    assert!(
        !fold(&mut attempts, &report(0, WorkerPhase::Progress, None)),
        "progress alone is no change"
    );
    assert!(fold(&mut attempts, &report(1, WorkerPhase::Progress, None)));
    let nodes = HashMap::from([node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO)]);
    let seen = &attempts[&("u".to_string(), 1)];
    let r = attempt_report(&seen.ranks, true, &nodes, &none(), FENCE);
    assert_eq!((r.running, r.all_stopped), (2, false));
    fold(&mut attempts, &report(0, WorkerPhase::Exited, Some(0)));
    assert!(
        !fold(&mut attempts, &report(0, WorkerPhase::Started, None)),
        "late, out of order: ignored"
    );
    fold(&mut attempts, &report(1, WorkerPhase::FailedToStart, None));
    let seen = &attempts[&("u".to_string(), 1)];
    let r = attempt_report(&seen.ranks, true, &nodes, &none(), FENCE);
    assert_eq!(r.running, 0);
    assert_eq!(
        r.exits,
        vec![
            WorkerExit { rank: 0, code: Some(0), signal: None },
            WorkerExit { rank: 1, code: Some(FAILED_TO_START_CODE), signal: None },
        ]
    );
    assert!(r.all_stopped);
    // Not knowing every worker (a restarted operator inside the fence timeout) is not stopped.
    assert!(!attempt_report(&seen.ranks, false, &nodes, &none(), FENCE).all_stopped);
    assert!(!attempt_report(&BTreeMap::new(), false, &nodes, &none(), FENCE).all_stopped);
    assert!(attempt_report(&BTreeMap::new(), true, &nodes, &none(), FENCE).all_stopped);
}

#[test]
fn progress_folds_to_the_highest_step_with_its_loss_a_growing_checkpoint_and_an_eta() {
    let mut attempts = HashMap::new();
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(fold(&mut attempts, &report(0, WorkerPhase::Started, None), at(0)), Folded::State);
    assert_eq!(fold(&mut attempts, &progress(0, 10, 2.5, None), at(0)), Folded::Progress);
    let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
    assert_eq!(
        (p.step, p.loss, p.last_checkpoint_step, p.eta_seconds),
        (10, Some(2.5), None, None)
    );
    // 20 steps in 10 s: 70 left take 35 s.
    assert_eq!(fold(&mut attempts, &progress(0, 30, 2.0, Some(20)), at(10)), Folded::Progress);
    // A rank behind does not move the step back, nor the checkpoint.
    assert_eq!(fold(&mut attempts, &report(1, WorkerPhase::Started, None), at(10)), Folded::State);
    assert_eq!(fold(&mut attempts, &progress(1, 25, 9.0, Some(10)), at(10)), Folded::Nothing);
    let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
    assert_eq!(
        (p.step, p.total_steps, p.loss, p.tokens_per_second),
        (30, Some(100), Some(2.0), Some(1030.0))
    );
    assert_eq!((p.last_checkpoint_step, p.eta_seconds), (Some(20), Some(35)));
    // Progress of a running rank is no change of its state.
    assert_eq!(fold(&mut attempts, &progress(1, 31, 1.9, Some(20)), at(11)), Folded::Progress);
    assert_eq!(attempts[&("u".to_string(), 1)].ranks[&1].state, RankState::Running);
    // The last step finishes the ETA; a late line after the exit still counts.
    fold(&mut attempts, &report(0, WorkerPhase::Exited, Some(0)), at(12));
    assert_eq!(fold(&mut attempts, &progress(0, 100, 1.0, Some(100)), at(12)), Folded::Progress);
    let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
    assert_eq!((p.step, p.eta_seconds, p.last_checkpoint_step), (100, Some(0), Some(100)));
    // Another attempt has its own progress.
    let other = WorkerReport { attempt: 2, ..progress(0, 5, 3.0, None) };
    fold(&mut attempts, &other, at(13));
    assert_eq!(attempts[&("u".to_string(), 2)].progress.as_ref().map(|p| p.step), Some(5));
}

#[test]
fn a_failed_gpu_under_a_worker_is_a_fault_and_a_silent_node_is_lost_after_the_fence() {
    let ranks = BTreeMap::from([
        (
            0,
            RankSeen {
                node: "a".into(),
                gpu_uuids: vec!["GPU-1".into()],
                state: RankState::Running,
                process: "p".into(),
                pace: None,
            },
        ),
        (
            1,
            RankSeen {
                node: "b".into(),
                gpu_uuids: vec!["GPU-0".into()],
                state: RankState::Running,
                process: "p".into(),
                pace: None,
            },
        ),
    ]);
    let nodes = HashMap::from([
        node("a", vec![gpu(0, GpuHealth::Failed), gpu(1, GpuHealth::Healthy)], Duration::ZERO),
        node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
    ]);
    let r = attempt_report(&ranks, true, &nodes, &none(), FENCE);
    assert_eq!(r.fault, None, "GPU 0 of node a fails but no worker uses it");
    let nodes = HashMap::from([
        node("a", vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Failed)], Duration::ZERO),
        node("b", vec![gpu(0, GpuHealth::Healthy)], FENCE + Duration::from_secs(1)),
    ]);
    let r = attempt_report(&ranks, true, &nodes, &HashSet::from(["b".to_string()]), FENCE);
    let fault = r.fault.expect("fault");
    assert_eq!((fault.node.as_str(), fault.gpu, fault.xid), ("a", Some(1), Some(79)));
    assert_eq!(r.node_lost.map(|l| l.node).as_deref(), Some("b"));
    assert!(!r.all_stopped, "rank 0 on node a still runs");
}

#[test]
fn a_restarted_agent_that_does_not_list_a_worker_means_it_is_gone_and_a_closed_stream_is_doubt() {
    let rank = |node: &str, uuid: &str| RankSeen {
        node: node.into(),
        gpu_uuids: vec![uuid.into()],
        state: RankState::Running,
        process: "p".into(),
        pace: None,
    };
    let ranks = BTreeMap::from([(0, rank("a", "GPU-0")), (1, rank("b", "GPU-0"))]);
    let (name, mut restarted) = node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO);
    // A new agent process that kept its event stream (its state file): the workers still died.
    restarted.process_id = "q".into();
    let mut nodes = HashMap::from([
        (name, restarted),
        node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
    ]);
    let r = attempt_report(&ranks, true, &nodes, &none(), FENCE);
    let lost = r.node_lost.expect("rank 0's agent restarted without it");
    assert_eq!(lost.node, "a");
    assert!(lost.message.contains("restarted"), "{}", lost.message);
    assert!(!r.all_stopped, "rank 1 on node b still runs");

    // The same worker listed by the new agent (adopted across its restart) is not lost.
    nodes.get_mut("a").unwrap().workers.push(RunningWorkerRecord {
        job_uid: "job".into(),
        attempt: 1,
        rank: 0,
        pid: 7,
        gpu_uuids: vec!["GPU-0".into()],
    });
    assert_eq!(attempt_report(&ranks, true, &nodes, &none(), FENCE).node_lost, None);

    // A closed stream (same instance): the worker's fate is unknown until the fence.
    let nodes = HashMap::from([
        node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
        node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
    ]);
    let mut nodes = nodes;
    nodes.get_mut("b").unwrap().connected = false;
    let r = attempt_report(&ranks, true, &nodes, &none(), FENCE);
    assert_eq!((r.node_lost, r.node_unreachable.as_deref()), (None, Some("b")));
    assert!(!r.all_stopped, "an unreachable node's worker is not confirmed stopped");
}

#[test]
fn workers_of_other_attempts_listed_at_registration_are_stale() {
    let worker = |uid: &str, attempt| crate::agents::RunningWorkerRecord {
        job_uid: uid.into(),
        attempt,
        rank: 0,
        pid: 1,
        gpu_uuids: vec![],
    };
    let (a, mut ra) = node("a", vec![], Duration::ZERO);
    ra.workers = vec![worker("u", 1), worker("u", 3), worker("other", 1)];
    let (b, mut rb) = node("b", vec![], Duration::ZERO);
    rb.workers = vec![worker("u", 2), worker("u", 1)];
    let nodes = HashMap::from([(a, ra), (b, rb)]);
    assert_eq!(stale_attempts("u", 3, &nodes), vec![1, 2]);
    assert_eq!(stale_attempts("u", 1, &nodes), vec![2, 3]);
    assert!(stale_attempts("none", 1, &nodes).is_empty());
}

fn job(engine: bool) -> TrainingJob {
    let spec = TrainingJobSpec {
        workers: 3,
        gpus_per_worker: 2,
        engine: engine.then(|| crate::crd::engine::EngineConfig::preset("tiny").unwrap()),
        command: (!engine).then(|| WorkerCommand {
            command: vec!["/usr/bin/python3".into(), "train.py".into()],
            args: vec!["--fast".into()],
            env: vec![crate::crd::training_job::EnvVar { name: "A".into(), value: "b".into() }],
        }),
        checkpoint: None,
        restart_policy: Default::default(),
        hang_detection: Default::default(),
        stragglers: Default::default(),
        priority: 0,
        scheduling: Default::default(),
        suspend: false,
        active_deadline_seconds: None,
        ttl_seconds_after_finished: None,
    };
    let mut j = TrainingJob::new("j", spec);
    j.metadata.namespace = Some("ns".into());
    j.metadata.uid = Some("uid-1".into());
    let seat = |rank, node: &str, gpus: Vec<i32>| WorkerPlacement { rank, node: node.into(), gpus };
    j.status = Some(TrainingJobStatus {
        phase: JobPhase::Scheduled,
        attempt: Some(Attempt {
            number: 2,
            placement: Placement {
                workers: vec![
                    seat(1, "a", vec![2, 3]),
                    seat(0, "a", vec![0, 1]),
                    seat(2, "b", vec![0, 1]),
                ],
            },
            ..Default::default()
        }),
        ..Default::default()
    });
    j
}

#[test]
fn launch_specs_give_ranks_local_ranks_gpu_uuids_and_the_custom_command() {
    let uuid = |node: &str, i: i32| (i < 4).then(|| format!("{node}-{i}"));
    let specs = launch_specs(&job(false), 2, &uuid, "10.0.0.1", &args()).unwrap();
    let seats: Vec<(&str, u32, u32, Vec<String>)> = specs
        .iter()
        .map(|(n, s)| (n.as_str(), s.rank, s.local_rank, s.gpu_uuids.clone()))
        .collect();
    assert_eq!(
        seats,
        vec![
            ("a", 0, 0, vec!["a-0".into(), "a-1".into()]),
            ("a", 1, 1, vec!["a-2".into(), "a-3".into()]),
            ("b", 2, 0, vec!["b-0".into(), "b-1".into()]),
        ]
    );
    let s = &specs[0].1;
    assert_eq!((s.world_size, s.attempt, s.job_uid.as_str()), (3, 2, "uid-1"));
    assert_eq!(
        (s.command.as_str(), s.args.clone()),
        ("/usr/bin/python3", vec!["train.py".to_string(), "--fast".into()])
    );
    assert_eq!(s.env.get("A").map(String::as_str), Some("b"));
    assert_eq!(s.checkpoint_dir, "/ckpt/ns/j-uid-1");
    assert_eq!(s.master_addr, "10.0.0.1");
    assert!((30000..31000).contains(&s.master_port));
    assert!(specs.iter().all(|(_, x)| x.master_port == s.master_port));
    let missing = |_: &str, _: i32| None;
    let err = launch_specs(&job(false), 2, &missing, "x", &args()).unwrap_err();
    assert!(err.contains("has no registered GPU"), "{err}");
}

#[test]
fn engine_jobs_run_the_worker_binary_with_their_configuration() {
    let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
    let specs = launch_specs(&job(true), 2, &uuid, "h", &args()).unwrap();
    let s = &specs[0].1;
    assert_eq!(
        (s.command.as_str(), s.args.as_slice()),
        ("/opt/flotilla-worker", &["train".to_string()][..])
    );
    let config: crate::crd::engine::EngineConfig =
        serde_json::from_str(&s.env["FLOTILLA_ENGINE_CONFIG"]).unwrap();
    assert_eq!(Some(config), job(true).spec.engine);
}

#[test]
fn a_replica_runs_the_worker_binary_serving_its_checkpoint_on_its_port() {
    let replica = ReplicaLaunch {
        placement: Placement {
            workers: vec![WorkerPlacement { rank: 0, node: "b".into(), gpus: vec![2] }],
        },
        checkpoint: "/ckpt/m/step-00000010".into(),
        served_name: "chat".into(),
        port: 8001,
        max_batch_size: 4,
        default_max_tokens: 16,
    };
    let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
    let specs = replica_specs("u/replica-0.3", 3, &replica, &uuid, "127.0.0.1", &args()).unwrap();
    let (node, s) = &specs[0];
    assert_eq!((node.as_str(), s.job_uid.as_str(), s.attempt), ("b", "u/replica-0.3", 3));
    assert_eq!((s.world_size, s.gpu_uuids.clone()), (1, vec!["b-2".to_string()]));
    assert_eq!(s.command, "/opt/flotilla-worker");
    assert_eq!(
        s.args.join(" "),
        "serve --checkpoint /ckpt/m/step-00000010 --host 0.0.0.0 --port 8001 --model-name chat --max-batch-size 4 --default-max-tokens 16"
    );
}

#[test]
fn a_multi_worker_replica_is_one_expert_parallel_group_led_by_rank_0() {
    let replica = ReplicaLaunch {
        placement: Placement {
            workers: vec![
                WorkerPlacement { rank: 1, node: "a".into(), gpus: vec![0, 1] },
                WorkerPlacement { rank: 0, node: "b".into(), gpus: vec![2, 3] },
                WorkerPlacement { rank: 2, node: "a".into(), gpus: vec![4, 5] },
            ],
        },
        checkpoint: "/ckpt/m".into(),
        served_name: "chat".into(),
        port: 8001,
        max_batch_size: 4,
        default_max_tokens: 16,
    };
    let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
    let specs = replica_specs("u/replica-1.4", 4, &replica, &uuid, "10.0.0.2", &args()).unwrap();
    let seen: Vec<(&str, u32, u32, u32)> =
        specs.iter().map(|(node, s)| (node.as_str(), s.rank, s.local_rank, s.world_size)).collect();
    assert_eq!(seen, [("b", 0, 0, 3), ("a", 1, 0, 3), ("a", 2, 1, 3)]);
    assert_eq!(specs[2].1.gpu_uuids, ["a-4", "a-5"]);
    let port = specs[0].1.master_port;
    assert!((30000..31000).contains(&port), "{port}");
    assert_ne!(port, 8001, "the rendezvous port is not the API port");
    for (_, s) in &specs {
        assert_eq!((s.master_addr.as_str(), s.master_port), ("10.0.0.2", port));
        assert!(s.args.join(" ").contains("--port 8001"), "{:?}", s.args);
    }
    let mut lost = replica.clone();
    lost.placement.workers[2].gpus = vec![9];
    let none = |node: &str, i: i32| (i < 8).then(|| format!("{node}-{i}"));
    let err = replica_specs("u", 1, &lost, &none, "10.0.0.2", &args()).unwrap_err();
    assert!(err.contains("rank 2: node a has no registered GPU 9"), "{err}");
}

#[test]
fn a_new_attempt_gets_a_different_port() {
    assert_ne!(port_offset("uid-1", 1), port_offset("uid-1", 2));
    assert!(port_offset("uid-1", i32::MAX) < MASTER_PORT_SPAN);
}
