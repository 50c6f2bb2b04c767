//! The `TrainingJob` controller: runs the state machine and executes its effects.

use super::{Context, apply_status, object_key};
use crate::crd::training_job::TrainingJobStatus;
use crate::crd::{GpuNode, JobPhase, Placement, TrainingJob};
use crate::error::{Error, Result};
use crate::fleet::WorkloadKey;
use crate::lifecycle::{self, AttemptReport, Effect, JobFacts, Transition};
use crate::scheduling;
use crate::validate;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Finalizer that stops a deleted job's workers before the object goes.
pub const FINALIZER: &str = "flotilla.dev/stop-workers";
const KIND: &str = "TrainingJob";

/// Reconcile one `TrainingJob`. A malformed object is reported and left alone.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let job = match &guard.0 {
        Ok(job) => job,
        Err(invalid) => return Err(ctx.malformed(KIND, invalid).await),
    };
    let _timer = ctx.metrics.reconcile_seconds.with_label_values(&[KIND]).start_timer();
    ctx.metrics.reconciles.with_label_values(&[KIND]).inc();
    let ns = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer(&api, FINALIZER, Arc::new(job.clone()), |event| async {
        match event {
            Finalizer::Apply(job) => apply(&job, &api, &ctx).await,
            Finalizer::Cleanup(job) => cleanup(&job, &ctx).await,
        }
    })
    .await;
    let action = super::finalized(action)?;
    ctx.succeeded(&object_key(job));
    Ok(action)
}

/// What to do with a failed reconciliation.
pub fn error_policy(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = match &guard.0 {
        Ok(job) => object_key(job),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    ctx.error_policy(KIND, &key, error)
}

fn workload_key(job: &TrainingJob) -> Result<WorkloadKey> {
    Ok(WorkloadKey {
        kind: KIND,
        namespace: job.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        name: job.name_any(),
        uid: job.uid().ok_or(Error::MissingField("metadata.uid"))?,
        replica: None,
    })
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
        Some(a) => ctx.fleet.report(&key, a.number),
        None => AttemptReport { all_stopped: true, ..Default::default() },
    };
    let t = plan(job, &others, &replicas, &nodes, &held, report, Timestamp::now());

    let old = job.status.clone().unwrap_or_default();
    let mut t = t;
    // Book (or release) the GPUs before writing, then let go of the lock: the next job's pass
    // sees this placement at once, and status writes of many jobs overlap.
    let keeps_gpus =
        lifecycle::has_live_attempt(t.status.phase) || t.status.phase == JobPhase::Restarting;
    let before = match (&t.status.attempt, keeps_gpus) {
        (Some(a), true) => booked.insert(key.uid.clone(), a.placement.clone()),
        _ => booked.remove(&key.uid),
    };
    drop(booked);
    if job.status.as_ref() != Some(&t.status) {
        match progress_write_wait(&key.uid, &old, &t.status, std::time::Instant::now()) {
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
                        Some(placement) => booked.insert(key.uid.clone(), placement),
                        None => booked.remove(&key.uid),
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
                ctx.fleet.launch(&key, *attempt).await.map_err(Error::Fleet)?
            }
            Effect::Stop { attempt, reason } => {
                ctx.fleet.stop(&key, *attempt, reason).await.map_err(Error::Fleet)?
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

/// Status writes caused by progress alone happen at most this often per job (every write wakes
/// the controller again through its watch).
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(2);

/// When each job's status was last written, by UID (this process's writes only).
static LAST_WRITE: std::sync::LazyLock<std::sync::Mutex<HashMap<String, std::time::Instant>>> =
    std::sync::LazyLock::new(Default::default);

/// `None` to write `new` now (and note the write); otherwise how long to wait first, because
/// `new` differs from `old` only in `progress` and the job's last write was too recent.
fn progress_write_wait(
    uid: &str,
    old: &TrainingJobStatus,
    new: &TrainingJobStatus,
    now: std::time::Instant,
) -> Option<Duration> {
    let mut writes = LAST_WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let progress_only = TrainingJobStatus { progress: old.progress.clone(), ..new.clone() } == *old;
    if progress_only
        && let Some(last) = writes.get(uid)
        && let Some(wait) = PROGRESS_WRITE_INTERVAL.checked_sub(now.duration_since(*last))
        && !wait.is_zero()
    {
        return Some(wait);
    }
    writes.insert(uid.to_string(), now);
    // Forget jobs not written for a long time, so the map stays small.
    writes.retain(|_, t| now.duration_since(*t) < Duration::from_secs(3600));
    None
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
    ctx.booked.lock().await.remove(&key.uid);
    if let Some(status) = &job.status
        && let Some(attempt) = &status.attempt
        && !status.phase.is_terminal()
    {
        ctx.fleet
            .stop(&key, attempt.number, "the TrainingJob was deleted")
            .await
            .map_err(Error::Fleet)?;
    }
    Ok(Action::await_change())
}

/// Whether this look at `job` may place it (a valid spec is also needed): only then does the
/// controller gather what a scheduling pass reads.
fn may_be_placed(job: &TrainingJob) -> bool {
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    !job.spec.suspend && matches!(phase, JobPhase::Pending | JobPhase::Queued)
}

/// The pure middle of the pipeline: validate, place, decide.
pub fn plan(
    job: &TrainingJob,
    others: &[&TrainingJob],
    waiting_replicas: &[flotilla_scheduler::JobRequest],
    nodes: &[&GpuNode],
    booked: &BTreeMap<String, Placement>,
    report: AttemptReport,
    now: Timestamp,
) -> Transition {
    let status = job.status.clone().unwrap_or_default();
    let validity = validate::training_job(job, others);
    let wants_placement = validity.is_ok() && may_be_placed(job);
    let me_key = object_key(job);
    // Victims already asked to stop for this job: wait for them rather than pick more.
    let stopping: Vec<String> = others
        .iter()
        .filter(|o| preemption_request(o).is_some_and(|by| by == me_key))
        .filter(|o| {
            o.status.as_ref().is_some_and(|s| {
                lifecycle::has_live_attempt(s.phase) || s.phase == JobPhase::Restarting
            })
        })
        .map(|o| object_key(*o))
        .collect();
    let mut preempt = Vec::new();
    let mut on_loan = false;
    let candidate = wants_placement.then(|| {
        let holdings = scheduling::holdings(others, booked, &job.uid().unwrap_or_default());
        let mut waiting = scheduling::waiting_jobs(others, &holdings);
        waiting.extend(waiting_replicas.iter().cloned());
        let me = scheduling::job_request(job);
        let now = scheduling::unix(now);
        let s = scheduling::schedule(&me, &waiting, nodes, &holdings, stopping.is_empty(), now);
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
    let mut t = lifecycle::decide(&JobFacts {
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

/// The job that asked to preempt `job`'s current attempt, if one did.
fn preemption_request(job: &TrainingJob) -> Option<String> {
    let attempt = job.status.as_ref()?.attempt.as_ref()?.number;
    let value = job.annotations().get(lifecycle::PREEMPTED_BY)?;
    lifecycle::preempted_by(value, attempt).map(str::to_string)
}

/// The `victims` to ask now on behalf of preemptor `me`: none while a job it already asked is
/// still stopping (its GPUs come free soon; asking more would stop work for nothing).
pub(crate) fn victims_to_ask(me: &str, victims: &[String], jobs: &[&TrainingJob]) -> Vec<String> {
    let stopping = jobs.iter().any(|o| {
        preemption_request(o).is_some_and(|by| by == me)
            && o.status.as_ref().is_some_and(|s| {
                lifecycle::has_live_attempt(s.phase) || s.phase == JobPhase::Restarting
            })
    });
    if stopping { Vec::new() } else { victims.to_vec() }
}

/// Ask each job of `victims` (UIDs among `others`) to stop its current attempt for `preemptor`,
/// named `me` in the request.
pub(crate) async fn request_preemption<K: Resource<DynamicType = ()>>(
    preemptor: &K,
    me: &str,
    victims: &[String],
    others: &[&TrainingJob],
    ctx: &Context,
) -> Result<()> {
    for uid in victims {
        let Some(victim) = others.iter().find(|o| o.uid().as_deref() == Some(uid.as_str())) else {
            continue;
        };
        let Some(attempt) = victim.status.as_ref().and_then(|s| s.attempt.as_ref()) else {
            continue;
        };
        let ns = victim.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
        let value = format!("{}/{me}", attempt.number);
        let patch = serde_json::json!({
            "metadata": {"annotations": {lifecycle::PREEMPTED_BY: value}}
        });
        api.patch(&victim.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let note = if attempt.on_loan {
            format!(
                "taking back the GPUs lent to {} (attempt {}); it checkpoints and requeues",
                object_key(*victim),
                attempt.number
            )
        } else {
            format!(
                "preempting {} (priority {}, attempt {}) to make room; it checkpoints and requeues",
                object_key(*victim),
                victim.spec.priority,
                attempt.number
            )
        };
        tracing::info!(preemptor = %me, victim = %object_key(*victim), "preemption requested");
        ctx.publish(preemptor, false, "Preempting", note).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gpu_node::{GpuHealth, GpuNodeSpec, GpuNodeStatus, GpuState};
    use crate::crd::training_job::{TrainingJobSpec, WorkerCommand};

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

    fn stopped() -> AttemptReport {
        AttemptReport { all_stopped: true, ..Default::default() }
    }

    #[test]
    fn queued_job_is_placed_on_free_gpus_and_launched() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let t = plan(
            &job("a", 2, JobPhase::Queued),
            &[],
            &[],
            &nodes,
            &BTreeMap::new(),
            stopped(),
            Timestamp::now(),
        );
        assert_eq!(t.status.phase, JobPhase::Scheduled);
        assert_eq!(t.effects, vec![Effect::Launch { attempt: 1 }]);
        assert_eq!(t.status.attempt.unwrap().placement.workers.len(), 2);
    }

    #[test]
    fn gpus_held_by_a_running_job_or_a_booking_are_not_reused() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let first = plan(
            &job("a", 2, JobPhase::Queued),
            &[],
            &[],
            &nodes,
            &BTreeMap::new(),
            stopped(),
            Timestamp::now(),
        );
        let mut running = job("a", 2, JobPhase::Running);
        running.status = Some(first.status.clone());
        let b = job("b", 1, JobPhase::Queued);
        let t = plan(&b, &[&running], &[], &nodes, &BTreeMap::new(), stopped(), Timestamp::now());
        assert_eq!(t.status.phase, JobPhase::Queued, "all 4 GPUs are taken by job a");
        // The same when the cache has not caught up but this process booked the GPUs.
        let booked =
            BTreeMap::from([("uid-a".to_string(), first.status.attempt.unwrap().placement)]);
        let stale = job("a", 2, JobPhase::Queued);
        let t = plan(&b, &[&stale], &[], &nodes, &booked, stopped(), Timestamp::now());
        assert_eq!(t.status.phase, JobPhase::Queued);
    }

    #[test]
    fn a_waiting_replica_of_higher_priority_goes_first_and_the_job_waits() {
        let n1 = node("n1", 4);
        let nodes = [&n1];
        let replica =
            flotilla_scheduler::JobRequest::new("svc-uid#0".to_string(), 1, 1).priority(10);
        let t = plan(
            &job("a", 2, JobPhase::Queued),
            &[],
            std::slice::from_ref(&replica),
            &nodes,
            &BTreeMap::new(),
            stopped(),
            Timestamp::now(),
        );
        assert_eq!(t.status.phase, JobPhase::Queued, "the replica takes one of the 4 GPUs first");
        assert!(!t.effects.iter().any(|e| matches!(e, Effect::Launch { .. })));
        // Without it, the job is placed.
        let t = plan(
            &job("a", 2, JobPhase::Queued),
            &[],
            &[],
            &nodes,
            &BTreeMap::new(),
            stopped(),
            Timestamp::now(),
        );
        assert_eq!(t.status.phase, JobPhase::Scheduled);
    }

    #[test]
    fn progress_alone_is_written_at_most_every_two_seconds_other_changes_at_once() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let old = TrainingJobStatus { phase: JobPhase::Running, ..Default::default() };
        let step = |n: i64| TrainingJobStatus {
            progress: Some(crate::crd::Progress { step: n, ..Default::default() }),
            ..old.clone()
        };
        assert_eq!(progress_write_wait("uid-p", &old, &step(1), at(0)), None, "first write");
        let wait = progress_write_wait("uid-p", &step(1), &step(2), at(500));
        assert_eq!(wait, Some(Duration::from_millis(1500)));
        let phase = TrainingJobStatus { phase: JobPhase::Succeeded, ..step(3) };
        assert_eq!(progress_write_wait("uid-p", &step(1), &phase, at(600)), None, "phase: now");
        assert!(progress_write_wait("uid-p", &step(1), &step(4), at(2000)).is_some());
        assert_eq!(progress_write_wait("uid-p", &step(1), &step(4), at(2600)), None);
        assert_eq!(progress_write_wait("uid-q", &step(1), &step(4), at(2600)), None, "per job");
    }
}
