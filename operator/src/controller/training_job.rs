//! The `TrainingJob` controller: runs the state machine and executes its effects.

use super::preemption::{preemption_request, request_preemption};
use super::{Context, apply_status, reconcile_object, with_finalizer};
use crate::crd::{GpuNode, JobPhase, Placement, TrainingJob};
use crate::error::{Error, Result};
use crate::ids::{HolderId, WorkloadKey, WorkloadKind, object_key};
use crate::lifecycle::{AttemptReport, Effect, JobFacts, Transition};
use crate::placement;
use crate::validate;
use crate::workers::{Launch, ProgressPolicy};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Finalizer that stops a deleted job's workers before the object goes.
pub const FINALIZER: &str = "flotilla.dev/stop-workers";
const KIND: &str = WorkloadKind::TrainingJob.as_str();

/// Reconcile one `TrainingJob`. A malformed object is reported and left alone.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let ctx = &*ctx;
    reconcile_object(ctx, KIND, &guard, |job| async move {
        let ns = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
        let apply_api = &api;
        with_finalizer(
            &api,
            FINALIZER,
            job,
            |job| async move { apply(&job, apply_api, ctx).await },
            |job| async move { cleanup(&job, ctx).await },
        )
        .await
    })
    .await
}

/// What to do with a failed reconciliation.
pub fn error_policy(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    super::error_policy(&ctx, KIND, &guard, error)
}

fn workload_key(job: &TrainingJob) -> Result<WorkloadKey> {
    Ok(WorkloadKey::job(
        job.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        job.name_any(),
        job.uid().ok_or(Error::MissingField("metadata.uid"))?,
    ))
}

async fn apply(job: &TrainingJob, api: &Api<TrainingJob>, ctx: &Context) -> Result<Action> {
    let key = workload_key(job)?;
    // One placement at a time, so two jobs never take the same GPUs from a stale cache.
    let mut booked = ctx.booked.lock().await;
    let guards = ctx.jobs.state();
    let others: Vec<&TrainingJob> = guards
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|o| o.metadata.uid != job.metadata.uid)
        .collect();
    let node_guards = ctx.nodes.state();
    let nodes: Vec<&GpuNode> = node_guards.iter().filter_map(|g| g.0.as_ref().ok()).collect();
    // What only a scheduling pass reads, gathered only for a job that may get one: every
    // reconciliation of a running job would otherwise copy the whole fleet's bookings.
    let (held, replicas) = if may_be_placed(job) {
        ctx.prune_bookings(&mut booked);
        (ctx.held_by_services(&booked), ctx.waiting_replicas())
    } else {
        (BTreeMap::new(), Vec::new())
    };
    let report = match job.status.as_ref().and_then(|s| s.attempt.as_ref()) {
        Some(a) => {
            let mut report = ctx.workers.report(&key, a.number);
            let policy = ProgressPolicy::of(&job.spec);
            ctx.workers.judge_progress(&key, a.number, &policy, &mut report);
            report
        }
        None => AttemptReport { all_stopped: true, ..Default::default() },
    };
    let around = Surroundings {
        others: &others,
        waiting_replicas: &replicas,
        nodes: &nodes,
        booked: &held,
        policy: &ctx.policy,
    };
    let t = plan(job, &around, report, Timestamp::now());

    let old = job.status.clone().unwrap_or_default();
    let mut t = t;
    // Book (or release) the GPUs before writing, then let go of the lock: the next job's pass
    // sees this placement at once, and status writes of many jobs overlap.
    let holder = key.holder.clone();
    let before = match (&t.status.attempt, t.status.phase.holds_gpus()) {
        (Some(a), true) => booked.insert(holder.clone(), a.placement.clone()),
        _ => booked.remove(&holder),
    };
    drop(booked);
    if job.status.as_ref() != Some(&t.status) {
        let uid = key.holder.owner();
        match ctx.status_writes.progress_wait(uid, &old, &t.status, std::time::Instant::now()) {
            // Progress alone, too soon after the last write: written at the next look.
            Some(wait) => {
                let wait = SignedDuration::try_from(wait).unwrap_or(SignedDuration::ZERO);
                t.requeue_after = Some(t.requeue_after.map_or(wait, |r| r.min(wait)));
            }
            None => {
                if let Err(e) = apply_status(api, &job.name_any(), &t.status).await {
                    // Not written: the booking goes back to what the cache will keep showing.
                    let mut booked = ctx.booked.lock().await;
                    match before {
                        Some(placement) => booked.insert(holder, placement),
                        None => booked.remove(&holder),
                    };
                    return Err(e);
                }
            }
        }
    }
    if !t.preempt.is_empty() {
        request_preemption(job, &object_key(job), &t.preempt, &others, ctx).await?;
    }
    for phase in &t.entered {
        ctx.metrics.phase_transitions.with_label_values(&[KIND, phase.as_str()]).inc();
    }
    if old.phase != t.status.phase {
        tracing::info!(job = %key.name, from = %old.phase, to = %t.status.phase, "phase change");
    }
    if let Some(ev) = &t.event {
        ctx.publish(job, ev.warning, ev.reason, ev.note.clone()).await;
    }
    for effect in &t.effects {
        match effect {
            Effect::Launch { attempt } => {
                // The launch reads the placement from the status just written.
                let written = TrainingJob { status: Some(t.status.clone()), ..job.clone() };
                let launch = Launch::Job(&written);
                ctx.workers.launch(&key, *attempt, launch).await.map_err(Error::Workers)?
            }
            Effect::Stop { attempt, reason } => {
                ctx.workers.stop(&key, *attempt, reason).await.map_err(Error::Workers)?
            }
            Effect::SuspectGpu { node, gpu_uuid, evidence } => {
                // Best effort: the next look sends it again while its agent does not show it.
                if let Err(e) = ctx.workers.suspect_gpu(node, gpu_uuid, evidence).await {
                    tracing::warn!(job = %key.name, %node, gpu = %gpu_uuid, error = %e, "marking a straggler's GPU failed");
                }
            }
            Effect::Delete => {
                ctx.publish(
                    job,
                    false,
                    "TtlExpired",
                    "spec.ttlSecondsAfterFinished passed; deleting".into(),
                )
                .await;
                api.delete(&job.name_any(), &DeleteParams::background()).await?;
            }
        }
    }
    Ok(next_action(&t))
}

fn next_action(t: &Transition) -> Action {
    match t.requeue_after {
        Some(d) => Action::requeue(Duration::from_millis(
            d.as_millis().clamp(0, i128::from(u32::MAX)) as u64,
        )),
        None if t.status.phase.is_terminal() => Action::await_change(),
        // Live jobs are looked at regularly in case an agent report was missed.
        None => Action::requeue(Duration::from_secs(30)),
    }
}

async fn cleanup(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    let key = workload_key(job)?;
    ctx.booked.lock().await.remove(&key.holder);
    if let Some(status) = &job.status
        && let Some(attempt) = &status.attempt
        && !status.phase.is_terminal()
    {
        ctx.workers
            .stop(&key, attempt.number, "the TrainingJob was deleted")
            .await
            .map_err(Error::Workers)?;
    }
    Ok(Action::await_change())
}

/// Whether this look at `job` may place it (a valid spec is also needed): only then does the
/// controller gather what a scheduling pass reads.
fn may_be_placed(job: &TrainingJob) -> bool {
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    !job.spec.suspend && matches!(phase, JobPhase::Pending | JobPhase::Queued)
}

/// What a job's plan reads besides the job: the fleet and the other workloads.
#[derive(Clone, Copy, Debug)]
pub struct Surroundings<'a> {
    /// The other cached jobs.
    pub others: &'a [&'a TrainingJob],
    /// Service replicas waiting for a placement.
    pub waiting_replicas: &'a [flotilla_scheduler::JobRequest],
    /// The cached `GpuNode`s.
    pub nodes: &'a [&'a GpuNode],
    /// This process's bookings and the service replicas' placements.
    pub booked: &'a BTreeMap<HolderId, Placement>,
    /// The scheduler's policy.
    pub policy: &'a flotilla_scheduler::Policy,
}

/// The pure middle of the pipeline: validate, place, decide.
pub fn plan(
    job: &TrainingJob,
    around: &Surroundings<'_>,
    report: AttemptReport,
    now: Timestamp,
) -> Transition {
    let Surroundings { others, waiting_replicas, nodes, booked, policy } = *around;
    let status = job.status.clone().unwrap_or_default();
    let validity = validate::training_job(job, others);
    let wants_placement = validity.is_ok() && may_be_placed(job);
    let me_key = object_key(job);
    // Victims already asked to stop for this job: wait for them rather than pick more.
    let stopping: Vec<String> = others
        .iter()
        .filter(|o| preemption_request(o).is_some_and(|by| by == me_key))
        .filter(|o| o.status.as_ref().is_some_and(|s| s.phase.holds_gpus()))
        .map(|o| object_key(*o))
        .collect();
    let mut preempt = Vec::new();
    let mut on_loan = false;
    let candidate = wants_placement.then(|| {
        let holdings = placement::holdings(others, booked, &job.uid().unwrap_or_default());
        let mut waiting = placement::waiting_jobs(others, &holdings);
        waiting.extend(waiting_replicas.iter().cloned());
        let me = placement::job_request(job);
        let now = placement::unix(now);
        // While victims it asked are still stopping, the job waits for them, asking no more.
        let policy =
            flotilla_scheduler::Policy { preemption: stopping.is_empty(), ..policy.clone() };
        let s = placement::schedule(&me, &waiting, nodes, &holdings, &policy, now);
        preempt = s.preempt;
        on_loan = s.on_loan;
        s.placement.map_err(|mut u| {
            if !stopping.is_empty() {
                u.message = format!(
                    "waiting for preempted {} to stop (its workers checkpoint first)",
                    stopping.join(", ")
                );
            }
            u
        })
    });
    let mut t = crate::lifecycle::decide(&JobFacts {
        now,
        generation: job.meta().generation.unwrap_or_default(),
        spec: &job.spec,
        status: &status,
        validity,
        candidate,
        report,
        preempted_by: preemption_request(job),
        on_loan,
    });
    if t.status.phase == JobPhase::Queued {
        t.preempt = preempt;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gpu_node::{GpuHealth, GpuNodeSpec, GpuNodeStatus, GpuState};
    use crate::crd::training_job::{TrainingJobSpec, TrainingJobStatus, WorkerCommand};

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

    fn job(name: &str, workers: i32, phase: JobPhase) -> TrainingJob {
        let mut j = TrainingJob::new(
            name,
            TrainingJobSpec {
                workers,
                gpus_per_worker: 2,
                engine: None,
                command: Some(WorkerCommand {
                    command: vec!["/bin/true".into()],
                    ..Default::default()
                }),
                checkpoint: None,
                restart_policy: crate::crd::training_job::RestartPolicy {
                    max_restarts: 0,
                    ..Default::default()
                },
                hang_detection: Default::default(),
                stragglers: Default::default(),
                priority: 0,
                scheduling: Default::default(),
                suspend: false,
                active_deadline_seconds: None,
                ttl_seconds_after_finished: None,
            },
        );
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some(format!("uid-{name}"));
        j.metadata.generation = Some(1);
        j.status = Some(TrainingJobStatus { phase, ..Default::default() });
        j
    }

    /// Plan `job` with nothing reported running, now, under the default policy.
    fn plan_in(
        job: &TrainingJob,
        others: &[&TrainingJob],
        waiting_replicas: &[flotilla_scheduler::JobRequest],
        nodes: &[&GpuNode],
        booked: &BTreeMap<HolderId, Placement>,
    ) -> Transition {
        let policy = flotilla_scheduler::Policy::default();
        let around = Surroundings { others, waiting_replicas, nodes, booked, policy: &policy };
        plan(job, &around, stopped(), Timestamp::now())
    }

    fn stopped() -> AttemptReport {
        AttemptReport { all_stopped: true, ..Default::default() }
    }

    #[test]
    fn queued_job_is_placed_on_free_gpus_and_launched() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let t = plan_in(&job("a", 2, JobPhase::Queued), &[], &[], &nodes, &BTreeMap::new());
        assert_eq!(t.status.phase, JobPhase::Scheduled);
        assert_eq!(t.effects, vec![Effect::Launch { attempt: 1 }]);
        assert_eq!(t.status.attempt.unwrap().placement.workers.len(), 2);
    }

    #[test]
    fn gpus_held_by_a_running_job_or_a_booking_are_not_reused() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let first = plan_in(&job("a", 2, JobPhase::Queued), &[], &[], &nodes, &BTreeMap::new());
        let mut running = job("a", 2, JobPhase::Running);
        running.status = Some(first.status.clone());
        let b = job("b", 1, JobPhase::Queued);
        let t = plan_in(&b, &[&running], &[], &nodes, &BTreeMap::new());
        assert_eq!(t.status.phase, JobPhase::Queued, "all 4 GPUs are taken by job a");
        // The same when the cache has not caught up but this process booked the GPUs.
        let booked = BTreeMap::from([(
            HolderId::Job("uid-a".into()),
            first.status.attempt.unwrap().placement,
        )]);
        let stale = job("a", 2, JobPhase::Queued);
        let t = plan_in(&b, &[&stale], &[], &nodes, &booked);
        assert_eq!(t.status.phase, JobPhase::Queued);
    }

    #[test]
    fn a_waiting_replica_of_higher_priority_goes_first_and_the_job_waits() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let replica =
            flotilla_scheduler::JobRequest::new("svc-uid#0".to_string(), 1, 1).priority(10);
        let t = plan_in(
            &job("a", 2, JobPhase::Queued),
            &[],
            std::slice::from_ref(&replica),
            &nodes,
            &BTreeMap::new(),
        );
        assert_eq!(t.status.phase, JobPhase::Queued, "the replica takes one of the 4 GPUs first");
        assert!(!t.effects.iter().any(|e| matches!(e, Effect::Launch { .. })));
        // Without it, the job is placed.
        let t = plan_in(&job("a", 2, JobPhase::Queued), &[], &[], &nodes, &BTreeMap::new());
        assert_eq!(t.status.phase, JobPhase::Scheduled);
    }
}
