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
//! controller asks each victim to stop (annotation [`crate::lifecycle::PREEMPTED_BY`]) and the
//! waiting job is placed in a later pass, once the victims' workers have stopped and their
//! GPUs are free — never onto GPUs whose workers may still run.
//!
//! Loans: GPUs held for the job first in line would idle until it can start; a job behind it
//! that checkpoints (the engine, or `spec.checkpoint` set) may start on them *on loan*
//! ([`crate::crd::Attempt::on_loan`]). When the first job can start with them, the loans are
//! taken back through the same stop-and-requeue path as preemption, whatever the priorities, so
//! a loan never delays the job it was lent from. [`set_lending`] configures it at start-up.
use std::sync::OnceLock;

use crate::crd::gpu_node::{GpuHealth, GpuNode};
use crate::crd::training_job::PlacementStrategy;
use crate::crd::{JobPhase, Placement, TrainingJob, WorkerPlacement};
use crate::lifecycle::{self, Unschedulable};
use flotilla_scheduler as sched;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The zone label of a `GpuNode` (the widest topology domain a gang prefers to stay in).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The rack label of a `GpuNode`, unique within its zone.
pub const RACK_LABEL: &str = "flotilla.dev/rack";
/// How many NVLink domains of equal size a node's GPUs form, in index order (default 1).
pub const NVLINK_DOMAINS_LABEL: &str = "flotilla.dev/nvlink-domains";

/// How reserved GPUs are lent, for the whole process (set once at start-up; default on, 15
/// minutes minimum).
static LENDING: OnceLock<(bool, sched::Seconds)> = OnceLock::new();

/// Sets whether GPUs held for the job first in line are lent to jobs behind it, and the least
/// time until its expected start for a loan to be made. Later calls are ignored.
pub fn set_lending(enabled: bool, min_loan: sched::Seconds) {
    let _ = LENDING.set((enabled, min_loan));
}

/// The scheduler policy of this process.
fn policy(preemption: bool) -> sched::Policy {
    let (lending, min_loan) =
        LENDING.get().copied().unwrap_or((true, flotilla_scheduler::DEFAULT_MIN_LOAN));
    sched::Policy { preemption, lending, min_loan, ..sched::Policy::default() }
}

/// Priority given to GPUs held by workloads that are not `TrainingJob`s (service replicas), so
/// no job is ever told that preempting them would help.
const UNPREEMPTIBLE: i32 = i32::MAX;

/// GPUs a workload holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    /// The scheduler's id: a job's UID, or `uid#replica` for a service replica.
    pub id: String,
    /// `namespace/name`, for reasons.
    pub name: String,
    /// The namespace it is charged to.
    pub namespace: String,
    /// Its priority.
    pub priority: i32,
    /// Where its workers run.
    pub placement: Placement,
    /// When the placement was written (Unix seconds).
    pub started_at: Option<sched::Seconds>,
    /// When it must end at the latest (`spec.activeDeadlineSeconds` after its start).
    pub expected_end: Option<sched::Seconds>,
    /// Running on loan (see [`crate::crd::Attempt::on_loan`]).
    pub on_loan: bool,
    /// When it entered the queue (its place in line, for loans).
    pub arrival: sched::Seconds,
}

/// The GPUs held by everyone but `me` (a UID; its `uid#replica` keys are also skipped): live
/// attempts of `jobs` from the cache, then `held` (this process's bookings, newer than the
/// cache, and service replicas), which replaces a cached job's placement of the same id.
pub fn holdings(
    jobs: &[&TrainingJob],
    held: &BTreeMap<String, Placement>,
    me: &str,
) -> Vec<Holding> {
    let mine =
        |key: &str| key == me || key.strip_prefix(me).is_some_and(|rest| rest.starts_with('#'));
    let by_uid: BTreeMap<String, &TrainingJob> =
        jobs.iter().filter_map(|j| Some((j.uid()?, *j))).collect();
    let mut out: BTreeMap<String, Holding> = BTreeMap::new();
    for (uid, job) in &by_uid {
        let Some(status) = &job.status else { continue };
        let Some(attempt) = &status.attempt else { continue };
        let live =
            lifecycle::has_live_attempt(status.phase) || status.phase == JobPhase::Restarting;
        if live && !mine(uid) {
            let started = attempt.scheduled_time.as_ref().map(|t| unix(t.0));
            out.insert(uid.clone(), job_holding(uid, job, attempt.placement.clone(), started));
        }
    }
    for (key, placement) in held {
        if mine(key) {
            continue;
        }
        let holding = match (out.remove(key), by_uid.get(key)) {
            (Some(h), _) => Holding { placement: placement.clone(), ..h },
            (None, Some(job)) => job_holding(key, job, placement.clone(), None),
            (None, None) => Holding {
                id: key.clone(),
                name: key.clone(),
                namespace: String::new(),
                priority: UNPREEMPTIBLE,
                placement: placement.clone(),
                started_at: None,
                expected_end: None,
                on_loan: false,
                arrival: 0,
            },
        };
        out.insert(key.clone(), holding);
    }
    out.into_values().collect()
}

fn job_holding(
    uid: &str,
    job: &TrainingJob,
    placement: Placement,
    started_at: Option<sched::Seconds>,
) -> Holding {
    let deadline = job.spec.active_deadline_seconds.and_then(|s| u64::try_from(s).ok());
    Holding {
        id: uid.to_string(),
        name: crate::controller::object_key(job),
        namespace: job.namespace().unwrap_or_default(),
        priority: job.spec.priority,
        placement,
        started_at,
        expected_end: started_at.zip(deadline).map(|(s, d)| s.saturating_add(d)),
        on_loan: job.status.as_ref().and_then(|s| s.attempt.as_ref()).is_some_and(|a| a.on_loan),
        arrival: arrival(job),
    }
}

/// A job's place in line: its creation time.
fn arrival(job: &TrainingJob) -> sched::Seconds {
    job.metadata.creation_timestamp.as_ref().map_or(0, |t| unix(t.0))
}

/// What `job` asks of the scheduler. Its id is the UID.
pub fn job_request(job: &TrainingJob) -> sched::JobRequest {
    let spec = &job.spec;
    let mut req = sched::JobRequest::new(
        job.uid().unwrap_or_default(),
        u32::try_from(spec.workers).unwrap_or(0),
        u32::try_from(spec.gpus_per_worker).unwrap_or(0),
    )
    .namespace(job.namespace().unwrap_or_default())
    .priority(spec.priority)
    .arrival(arrival(job))
    .spread(spread(spec.scheduling.strategy))
    // Only work that resumes from checkpoints is started on loan, as a loan is taken back: the
    // engine checkpoints (and does on SIGTERM); a custom command says so with spec.checkpoint.
    .may_borrow(spec.engine.is_some() || spec.checkpoint.is_some());
    req.node_selector = spec.scheduling.node_selector.clone();
    req.expected_duration = spec.active_deadline_seconds.and_then(|s| u64::try_from(s).ok());
    req
}

/// The scheduler's form of a placement strategy.
pub fn spread(strategy: PlacementStrategy) -> sched::Spread {
    match strategy {
        PlacementStrategy::Pack => sched::Spread::Pack,
        PlacementStrategy::Spread => sched::Spread::Spread,
    }
}

/// The queue around `me`: other valid-looking `Queued`, unsuspended jobs not already holding
/// GPUs. The scheduler orders it (priority, fair share, arrival).
pub fn waiting_jobs(others: &[&TrainingJob], holdings: &[Holding]) -> Vec<sched::JobRequest> {
    let holding: HashSet<&str> = holdings.iter().map(|h| h.id.as_str()).collect();
    others
        .iter()
        .filter(|j| j.status.as_ref().is_some_and(|s| s.phase == JobPhase::Queued))
        .filter(|j| !j.spec.suspend && j.uid().is_some_and(|u| !holding.contains(u.as_str())))
        .map(|j| job_request(j))
        .collect()
}

/// Place `me` in one scheduling pass over `waiting` and `me`: its placement if the pass starts
/// it, else why it waits.
pub fn place(
    me: &sched::JobRequest,
    waiting: &[sched::JobRequest],
    nodes: &[&GpuNode],
    holdings: &[Holding],
    now: sched::Seconds,
) -> Result<Placement, Unschedulable> {
    schedule(me, waiting, nodes, holdings, false, now).placement
}

/// The outcome of one scheduling pass for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    /// Its placement, or why it waits.
    pub placement: Result<Placement, Unschedulable>,
    /// Holding ids (job UIDs) to preempt so it fits; empty unless it waits and preemption
    /// would make it fit.
    pub preempt: Vec<String>,
    /// The placement is on loan.
    pub on_loan: bool,
}

/// Like [`place`]; when `preemption` is allowed and stopping lower-priority running jobs would
/// let `me` start, it still waits (their workers must stop first) and `preempt` names them.
/// Loans behind `me` that it can start with are taken back the same way, preemption allowed
/// or not (while it is not, `me` only waits: victims already asked are still stopping).
pub fn schedule(
    me: &sched::JobRequest,
    waiting: &[sched::JobRequest],
    nodes: &[&GpuNode],
    holdings: &[Holding],
    preemption: bool,
    now: sched::Seconds,
) -> Scheduling {
    let _timer = crate::metrics::SCHEDULING_DECISION_SECONDS.start_timer();
    let fleet = fleet(nodes);
    let running = running(&fleet, holdings);
    let mut queue = waiting.to_vec();
    queue.push(me.clone());
    let pass = |preemption: bool| {
        sched::schedule(&fleet, &running, &queue, &policy(preemption), now).map_err(|e| {
            Unschedulable { message: format!("the scheduler refused the fleet's state: {e}") }
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
                    .find(|h| h.id == id)
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

/// The scheduler's fleet: every named `GpuNode` once, its GPUs from status with health and
/// cordons, its zone, rack and NVLink domains from labels. Failed, validating and unknown GPUs
/// count as failed; degraded ones drain.
pub fn fleet(nodes: &[&GpuNode]) -> sched::Fleet {
    let mut names = HashSet::new();
    let nodes = nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            if !names.insert(name.clone()) {
                return None;
            }
            let labels = n.metadata.labels.clone().unwrap_or_default();
            let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
            let mut node = sched::Node::new(name, 0).in_rack(label(ZONE_LABEL), label(RACK_LABEL));
            node.cordoned = n.spec.cordoned;
            let mut seen = BTreeSet::new();
            let mut gpus: Vec<sched::Gpu> = n
                .status
                .iter()
                .flat_map(|s| &s.gpus)
                .filter_map(|g| {
                    let index = u32::try_from(g.index).ok().filter(|i| seen.insert(*i))?;
                    Some(sched::Gpu {
                        index,
                        nvlink_domain: 0,
                        state: match g.health {
                            GpuHealth::Healthy => sched::GpuState::Healthy,
                            GpuHealth::Degraded => sched::GpuState::Degraded,
                            GpuHealth::Failed | GpuHealth::Validating | GpuHealth::Unknown => {
                                sched::GpuState::Failed
                            }
                        },
                        cordoned: n.spec.cordoned_gpus.contains(&g.index),
                    })
                })
                .collect();
            gpus.sort_by_key(|g| g.index);
            node.gpus = gpus;
            if let Some(domains) = labels.get(NVLINK_DOMAINS_LABEL).and_then(|v| v.parse().ok()) {
                node = node.nvlink_domains(domains);
            }
            node.labels = labels;
            Some(node)
        })
        .collect();
    sched::Fleet::new(nodes)
}

/// The holdings as the scheduler's running jobs, keeping only GPUs the fleet has and each GPU
/// for its first holder, so stale or conflicting status never makes the scheduler refuse the
/// whole fleet (a GPU held twice stays held either way).
fn running(fleet: &sched::Fleet, holdings: &[Holding]) -> Vec<sched::RunningJob> {
    let mut unclaimed: HashSet<(&str, u32)> = fleet
        .nodes
        .iter()
        .flat_map(|n| n.gpus.iter().map(move |g| (n.name.as_str(), g.index)))
        .collect();
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for h in holdings {
        if !ids.insert(h.id.as_str()) {
            continue;
        }
        let workers: Vec<sched::WorkerPlacement> = h
            .placement
            .workers
            .iter()
            .filter_map(|w| {
                let mut gpus: Vec<u32> = w
                    .gpus
                    .iter()
                    .filter_map(|&g| u32::try_from(g).ok())
                    .filter(|&g| unclaimed.remove(&(w.node.as_str(), g)))
                    .collect();
                gpus.sort_unstable();
                (!gpus.is_empty()).then(|| sched::WorkerPlacement { node: w.node.clone(), gpus })
            })
            .collect();
        if workers.is_empty() {
            continue;
        }
        let mut job = sched::RunningJob::new(h.id.clone(), workers)
            .namespace(h.namespace.clone())
            .priority(h.priority)
            .started_at(h.started_at.unwrap_or(0));
        job.expected_end = h.expected_end;
        if h.on_loan {
            job = job.on_loan(h.arrival);
        }
        out.push(job);
    }
    out
}

fn placement(p: &sched::Placement) -> Placement {
    Placement {
        workers: p
            .workers
            .iter()
            .enumerate()
            .map(|(rank, w)| WorkerPlacement {
                rank: rank as i32,
                node: w.node.clone(),
                gpus: w.gpus.iter().map(|&g| g as i32).collect(),
            })
            .collect(),
    }
}

/// A timestamp on the scheduler's clock (Unix seconds; 0 before 1970).
pub fn unix(t: k8s_openapi::jiff::Timestamp) -> sched::Seconds {
    u64::try_from(t.as_second()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Attempt;
    use crate::crd::gpu_node::{GpuNodeSpec, GpuNodeStatus, GpuState};
    use crate::crd::training_job::{TrainingJobSpec, TrainingJobStatus, WorkerCommand};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn node(name: &str, gpus: i32, labels: &[(&str, &str)]) -> GpuNode {
        let mut n = GpuNode::new(name, GpuNodeSpec::default());
        n.metadata.labels =
            Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
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
        place(&job_request(me), &waiting, &nodes, &holdings, 100)
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
        assert_eq!(
            err.message,
            "first in line; GPUs reserved, starts when jobs of unknown length end"
        );
    }

    fn schedule_alone(me: &TrainingJob, others: &[&TrainingJob], nodes: &[GpuNode]) -> Scheduling {
        let holdings = holdings(others, &BTreeMap::new(), &me.uid().unwrap());
        let waiting = waiting_jobs(others, &holdings);
        let nodes: Vec<&GpuNode> = nodes.iter().collect();
        schedule(&job_request(me), &waiting, &nodes, &holdings, true, 100)
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
            err.message.ends_with(
                "; preempting ns/low would make room, but preemption is not allowed here"
            ),
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
        small.spec.checkpoint = Some(CheckpointSpec {
            path: "/ckpt/small".into(),
            interval_seconds: Some(60),
            keep: 3,
        });
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
                "uid-stale".to_string(),
                running(stale.clone(), &[("a", &[0, 1])])
                    .status
                    .unwrap()
                    .attempt
                    .unwrap()
                    .placement,
            ),
            (
                "uid-svc#0".to_string(),
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
        let p = place(&job_request(&me), &waiting, &[&nodes[0]], &holdings, 100).unwrap();
        assert_eq!(seats(&p), vec![("a", vec![3])]);
    }
}
