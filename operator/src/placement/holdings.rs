//! The GPUs workloads hold now, from the cache and this process's bookings, as the scheduler's
//! running jobs.

use super::requests::arrival;
use super::unix;
use crate::crd::{Placement, TrainingJob};
use crate::ids::{HolderId, object_key};
use flotilla_scheduler as sched;
use kube::ResourceExt;
use std::collections::{BTreeMap, HashSet};

/// Priority given to GPUs held by workloads that are not `TrainingJob`s (service replicas), so
/// no job is ever told that preempting them would help.
const UNPREEMPTIBLE: i32 = i32::MAX;

/// GPUs a workload holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    /// The job, or the service replica launch.
    pub id: HolderId,
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

/// The GPUs held by everyone but the object with UID `me` (a job, or every replica of a
/// service): live attempts of `jobs` from the cache, then `held` (this process's bookings,
/// newer than the cache, and service replicas), which replaces a cached job's placement.
pub fn holdings(
    jobs: &[&TrainingJob],
    held: &BTreeMap<HolderId, Placement>,
    me: &str,
) -> Vec<Holding> {
    let by_uid: BTreeMap<String, &TrainingJob> =
        jobs.iter().filter_map(|j| Some((j.uid()?, *j))).collect();
    let mut out: BTreeMap<HolderId, Holding> = BTreeMap::new();
    for (uid, job) in &by_uid {
        let Some(status) = &job.status else { continue };
        let Some(attempt) = &status.attempt else { continue };
        if status.phase.holds_gpus() && uid != me {
            let started = attempt.scheduled_time.as_ref().map(|t| unix(t.0));
            let id = HolderId::Job(uid.clone());
            out.insert(id, job_holding(uid, job, attempt.placement.clone(), started));
        }
    }
    for (key, placement) in held {
        if key.owner() == me {
            continue;
        }
        let job = match key {
            HolderId::Job(uid) => by_uid.get(uid),
            HolderId::Replica(_) => None,
        };
        let holding = match (out.remove(key), job) {
            (Some(h), _) => Holding { placement: placement.clone(), ..h },
            (None, Some(job)) => job_holding(key.owner(), job, placement.clone(), None),
            (None, None) => Holding {
                id: key.clone(),
                name: key.scheduler_id(),
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

pub(super) fn job_holding(
    uid: &str,
    job: &TrainingJob,
    placement: Placement,
    started_at: Option<sched::Seconds>,
) -> Holding {
    let deadline = job.spec.active_deadline_seconds.and_then(|s| u64::try_from(s).ok());
    Holding {
        id: HolderId::Job(uid.to_string()),
        name: object_key(job),
        namespace: job.namespace().unwrap_or_default(),
        priority: job.spec.priority,
        placement,
        started_at,
        expected_end: started_at.zip(deadline).map(|(s, d)| s.saturating_add(d)),
        on_loan: job.status.as_ref().and_then(|s| s.attempt.as_ref()).is_some_and(|a| a.on_loan),
        arrival: arrival(job),
    }
}

/// The holdings as the scheduler's running jobs, keeping only GPUs the fleet has and each GPU
/// for its first holder, so stale or conflicting status never makes the scheduler refuse the
/// whole fleet (a GPU held twice stays held either way).
pub(super) fn running(fleet: &sched::Fleet, holdings: &[Holding]) -> Vec<sched::RunningJob> {
    let mut unclaimed: HashSet<(&str, u32)> = fleet
        .nodes
        .iter()
        .flat_map(|n| n.gpus.iter().map(move |g| (n.name.as_str(), g.index)))
        .collect();
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for h in holdings {
        if !ids.insert(&h.id) {
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
        let mut job = sched::RunningJob::new(h.id.scheduler_id(), workers)
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
