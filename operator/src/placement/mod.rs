//! The operator's side of the gang scheduler (`flotilla-scheduler`): it builds the scheduler's
//! fleet from `GpuNode`s, the GPUs already held from placements in status, and the queue from
//! waiting `TrainingJob`s, then turns the decision for one workload into a [`Placement`] or a
//! reason a human reads in `kubectl describe`.
//!
//! Topology comes from `GpuNode` labels: [`ZONE_LABEL`], [`RACK_LABEL`] and
//! [`NVLINK_DOMAINS_LABEL`]. A node without them sits in one unnamed zone and rack with all its
//! GPUs in one NVLink domain.
//!
//! Preemption: a job that does not fit without it, but would after stopping running jobs of
//! lower priority, gets the scheduler's cheapest victims ([`Scheduling::preempt`]); the
//! controller asks each victim to stop (annotation `flotilla.dev/preempted-by`) and the
//! waiting job is placed in a later pass, once the victims' workers have stopped and their
//! GPUs are free — never onto GPUs whose workers may still run.
//!
//! Loans: GPUs held for the job first in line would idle until it can start; a job behind it
//! that checkpoints (the engine, or `spec.checkpoint` set) may start on them *on loan*
//! ([`crate::crd::Attempt::on_loan`]). When the first job can start with them, the loans are
//! taken back through the same stop-and-requeue path as preemption, whatever the priorities, so
//! a loan never delays the job it was lent from. The operator's `--lend-reserved-gpus` and
//! `--min-loan-seconds` set it in the [`sched::Policy`] every pass is given.

mod holdings;
mod nodes;
mod requests;
#[cfg(test)]
mod tests;

pub use holdings::{Holding, holdings};
pub use nodes::scheduler_fleet;
pub use requests::{job_request, replica_request, spread, waiting_jobs, waiting_replicas};

use crate::crd::Placement;
use crate::crd::gpu_node::GpuNode;
use flotilla_scheduler as sched;
use holdings::running;
use nodes::placement;

/// The zone label of a `GpuNode` (the widest topology domain a gang prefers to stay in).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The rack label of a `GpuNode`, unique within its zone.
pub const RACK_LABEL: &str = "flotilla.dev/rack";
/// How many NVLink domains of equal size a node's GPUs form, in index order (default 1).
pub const NVLINK_DOMAINS_LABEL: &str = "flotilla.dev/nvlink-domains";

/// Why no placement exists right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// A human-readable reason, such as `needs 4 nodes with 8 healthy GPUs, 2 have`.
    pub message: String,
}

/// Place `me` in one scheduling pass over `waiting` and `me`: its placement if the pass starts
/// it, else why it waits.
pub fn place(
    me: &sched::JobRequest,
    waiting: &[sched::JobRequest],
    nodes: &[&GpuNode],
    holdings: &[Holding],
    policy: &sched::Policy,
    now: sched::Seconds,
) -> Result<Placement, Unschedulable> {
    let policy = sched::Policy { preemption: false, ..policy.clone() };
    schedule(me, waiting, nodes, holdings, &policy, now).placement
}

/// The outcome of one scheduling pass for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    /// Its placement, or why it waits.
    pub placement: Result<Placement, Unschedulable>,
    /// UIDs of the jobs to preempt so it fits (only jobs are ever preempted); empty unless it
    /// waits and preemption would make it fit.
    pub preempt: Vec<String>,
    /// The placement is on loan.
    pub on_loan: bool,
}

/// Like [`place`]; when `policy.preemption` allows it and stopping lower-priority running jobs would
/// let `me` start, it still waits (their workers must stop first) and `preempt` names them.
/// Loans behind `me` that it can start with are taken back the same way, preemption allowed
/// or not (while it is not, `me` only waits: victims already asked are still stopping).
pub fn schedule(
    me: &sched::JobRequest,
    waiting: &[sched::JobRequest],
    nodes: &[&GpuNode],
    holdings: &[Holding],
    policy: &sched::Policy,
    now: sched::Seconds,
) -> Scheduling {
    let _timer = crate::metrics::SCHEDULING_DECISION_SECONDS.start_timer();
    let preemption = policy.preemption;
    let fleet = scheduler_fleet(nodes);
    let running = running(&fleet, holdings);
    let mut queue = waiting.to_vec();
    queue.push(me.clone());
    let pass = |preemption: bool| {
        let policy = sched::Policy { preemption, ..policy.clone() };
        sched::schedule(&fleet, &running, &queue, &policy, now).map_err(|e| Unschedulable {
            message: format!("the scheduler refused the fleet's state: {e}"),
        })
    };
    // (id, name) of the jobs `me` would stop; few, so their names are looked up one by one.
    let victims_of = |d: &sched::Decision| -> Vec<(String, &str)> {
        d.preemptions
            .iter()
            .filter(|p| p.for_job == me.id)
            .map(|p| {
                let id = p.victim.to_string();
                let name = holdings
                    .iter()
                    .find(|h| h.id.scheduler_id() == id)
                    .map_or("a running job", |h| h.name.as_str());
                (id, name)
            })
            .collect()
    };
    let waits = |message: String, preempt: Vec<String>| Scheduling {
        placement: Err(Unschedulable { message }),
        preempt,
        on_loan: false,
    };
    let decision = match pass(false) {
        Ok(d) => d,
        Err(e) => return Scheduling { placement: Err(e), preempt: Vec::new(), on_loan: false },
    };
    if let Some(p) = decision.placements.iter().find(|p| p.job == me.id) {
        let victims = victims_of(&decision);
        if victims.is_empty() {
            return Scheduling {
                placement: Ok(placement(p)),
                preempt: Vec::new(),
                on_loan: p.on_loan,
            };
        }
        // It starts only once the loans it takes back have stopped.
        let list: Vec<&str> = victims.iter().map(|v| v.1).collect();
        let message = format!(
            "first in line; taking back the GPUs lent to {} (they checkpoint and requeue)",
            list.join(", ")
        );
        let preempt =
            if preemption { victims.into_iter().map(|v| v.0).collect() } else { Vec::new() };
        return waits(message, preempt);
    }
    let message = decision
        .waiting
        .iter()
        .find(|w| w.job == me.id)
        .map_or_else(|| "not placed in this scheduling pass".to_string(), |w| w.reason.to_string());
    if !running.iter().any(|r| r.priority < me.priority) {
        return waits(message, Vec::new());
    }
    let Ok(with_preemption) = pass(true) else { return waits(message, Vec::new()) };
    if !with_preemption.placements.iter().any(|p| p.job == me.id) {
        return waits(message, Vec::new());
    }
    let victims = victims_of(&with_preemption);
    if victims.is_empty() {
        return waits(message, Vec::new());
    }
    let list: Vec<&str> = victims.iter().map(|v| v.1).collect();
    if preemption {
        let message =
            format!("{message}; preempting {} (lower priority) to make room", list.join(", "));
        waits(message, victims.into_iter().map(|v| v.0).collect())
    } else {
        let message = format!(
            "{message}; preempting {} would make room, but preemption is not allowed here",
            list.join(", ")
        );
        waits(message, Vec::new())
    }
}

/// A timestamp on the scheduler's clock (Unix seconds; 0 before 1970).
pub fn unix(t: k8s_openapi::jiff::Timestamp) -> sched::Seconds {
    u64::try_from(t.as_second()).unwrap_or(0)
}
