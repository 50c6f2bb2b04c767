//! What training jobs and service replicas ask of the scheduler: one request type for both,
//! built here and nowhere else.

use super::{Holding, unix};
use crate::crd::inference_service::{InferenceService, ReplicaState, ServicePhase};
use crate::crd::training_job::PlacementStrategy;
use crate::crd::{JobPhase, TrainingJob};
use crate::ids::{HolderId, ReplicaId};
use flotilla_scheduler as sched;
use kube::ResourceExt;
use std::collections::HashSet;

/// A job's place in line: its creation time.
pub(super) fn arrival(job: &TrainingJob) -> sched::Seconds {
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
    let holding: HashSet<&HolderId> = holdings.iter().map(|h| &h.id).collect();
    others
        .iter()
        .filter(|j| j.status.as_ref().is_some_and(|s| s.phase == JobPhase::Queued))
        .filter(|j| {
            !j.spec.suspend && j.uid().is_some_and(|u| !holding.contains(&HolderId::Job(u)))
        })
        .map(|j| job_request(j))
        .collect()
}

/// What replica slot `index` of `svc` (UID `uid`) asks of the scheduler.
pub fn replica_request(svc: &InferenceService, uid: &str, index: i32) -> sched::JobRequest {
    let spec = &svc.spec;
    let mut req = sched::JobRequest::new(
        ReplicaId::slot_request_id(uid, index),
        u32::try_from(spec.workers_per_replica).unwrap_or(0),
        u32::try_from(spec.gpus_per_worker).unwrap_or(0),
    )
    .namespace(svc.namespace().unwrap_or_default())
    .priority(spec.priority)
    .spread(spread(spec.scheduling.strategy))
    // A replica serves; it is never started on GPUs that may be taken back.
    .may_borrow(false);
    req.node_selector = spec.scheduling.node_selector.clone();
    req
}

/// The replicas `svc` wants and has no live replica for, as waiting requests for the scheduler:
/// training jobs placed meanwhile queue behind them by priority, so a job preempted for a
/// replica cannot take the freed GPUs back before the replica is placed. None for a failed
/// (invalid or blocked) service.
pub fn waiting_replicas(svc: &InferenceService) -> Vec<sched::JobRequest> {
    let Some(uid) = svc.uid() else { return Vec::new() };
    let status = svc.status.as_ref();
    if svc.metadata.deletion_timestamp.is_some()
        || status.is_some_and(|s| s.phase == ServicePhase::Failed)
    {
        return Vec::new();
    }
    let replicas = status.map_or(&[][..], |s| s.replicas.as_slice());
    let arrival = svc.metadata.creation_timestamp.as_ref().map_or(0, |t| unix(t.0));
    let live = |state: ReplicaState| {
        matches!(state, ReplicaState::Starting | ReplicaState::Ready | ReplicaState::Unready)
    };
    (0..svc.spec.replicas)
        .filter(|slot| !replicas.iter().any(|r| r.index == *slot && live(r.state)))
        .map(|slot| replica_request(svc, &uid, slot).arrival(arrival))
        .collect()
}
