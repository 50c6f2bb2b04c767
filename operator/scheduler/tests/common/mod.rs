//! Small builders shared by the scheduler's integration tests.

#![allow(dead_code)]

use flotilla_scheduler::{
    Decision, Fleet, JobRequest, Node, Policy, RunningJob, WorkerPlacement, schedule,
};

/// The time every hand-made test schedules at.
pub const NOW: u64 = 1_000;

/// One worker's GPUs on a node.
pub fn worker(node: &str, gpus: &[u32]) -> WorkerPlacement {
    WorkerPlacement { node: node.to_owned(), gpus: gpus.to_vec() }
}

/// A running job on the given workers.
pub fn running(id: &str, workers: &[(&str, &[u32])]) -> RunningJob {
    RunningJob::new(id, workers.iter().map(|(node, gpus)| worker(node, gpus)).collect())
}

/// `count` nodes of `gpus` GPUs named `{prefix}0..`, in one rack of one zone.
pub fn rack(zone: &str, rack: &str, prefix: &str, count: u32, gpus: u32) -> Vec<Node> {
    (0..count).map(|i| Node::new(format!("{prefix}{i}"), gpus).in_rack(zone, rack)).collect()
}

/// One pass with the default policy at [`NOW`].
pub fn decide(fleet: &Fleet, running: &[RunningJob], queue: &[JobRequest]) -> Decision {
    decide_with(fleet, running, queue, &Policy::default())
}

/// One pass with a policy at [`NOW`].
pub fn decide_with(
    fleet: &Fleet,
    running: &[RunningJob],
    queue: &[JobRequest],
    policy: &Policy,
) -> Decision {
    schedule(fleet, running, queue, policy, NOW).expect("valid input")
}

/// The ids of the placed jobs, in decision order.
pub fn placed(decision: &Decision) -> Vec<&str> {
    decision.placements.iter().map(|p| p.job.as_str()).collect()
}

/// The ids of the preempted jobs.
pub fn preempted(decision: &Decision) -> Vec<&str> {
    decision.preemptions.iter().map(|p| p.victim.as_str()).collect()
}

/// The reason a job waits, as the user reads it.
pub fn reason(decision: &Decision, job: &str) -> String {
    decision
        .waiting
        .iter()
        .find(|w| w.job.as_str() == job)
        .map(|w| w.reason.to_string())
        .unwrap_or_else(|| panic!("{job} is not waiting: {decision:?}"))
}

/// The workers a job was placed on.
pub fn workers_of<'d>(decision: &'d Decision, job: &str) -> &'d [WorkerPlacement] {
    &decision
        .placements
        .iter()
        .find(|p| p.job.as_str() == job)
        .unwrap_or_else(|| panic!("{job} was not placed: {decision:?}"))
        .workers
}
