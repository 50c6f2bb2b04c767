//! What every reconciliation shares: the client, the Event recorder, the workers on the agents,
//! the caches, this process's GPU bookings and the controllers' settings.

use crate::crd::training_job::TrainingJobStatus;
use crate::crd::{GpuNode, InferenceService, Placement, TrainingJob};
use crate::error::Error;
use crate::ids::{HolderId, ReplicaId};
use crate::metrics::Metrics;
use crate::placement;
use crate::workers::Workers;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes `events.k8s.io` Events.
    pub recorder: Recorder,
    /// The workers on the agents.
    pub workers: Arc<dyn Workers>,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Cached `GpuNode`s.
    pub nodes: Store<DeserializeGuard<GpuNode>>,
    /// Cached `TrainingJob`s (for conflicts and GPUs in use).
    pub jobs: Store<DeserializeGuard<TrainingJob>>,
    /// Cached `InferenceService`s (for GPUs in use).
    pub services: Store<DeserializeGuard<InferenceService>>,
    /// Placements this process wrote, by holder; held while placing so two workloads never
    /// take the same GPUs from a cache that has not caught up.
    pub booked: tokio::sync::Mutex<BTreeMap<HolderId, Placement>>,
    /// The scheduler's policy (lending; preemption is decided per pass).
    pub policy: flotilla_scheduler::Policy,
    /// How long an agent may be silent before its node counts as lost.
    pub fence_timeout: k8s_openapi::jiff::SignedDuration,
    /// When each job's status was last written by this process (progress writes are spaced).
    pub status_writes: StatusWrites,
    /// Consecutive transient failures per object and when the last one was, for backoff.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

/// What the controllers are configured with, besides the API and the agents.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The scheduler's policy.
    pub policy: flotilla_scheduler::Policy,
    /// How long an agent may be silent before its node counts as lost.
    pub fence_timeout: k8s_openapi::jiff::SignedDuration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: flotilla_scheduler::Policy::default(),
            fence_timeout: k8s_openapi::jiff::SignedDuration::from_secs(30),
        }
    }
}

/// The reflector caches the controllers read.
#[derive(Clone)]
pub struct Caches {
    /// Cached `GpuNode`s.
    pub nodes: Store<DeserializeGuard<GpuNode>>,
    /// Cached `TrainingJob`s.
    pub jobs: Store<DeserializeGuard<TrainingJob>>,
    /// Cached `InferenceService`s.
    pub services: Store<DeserializeGuard<InferenceService>>,
}

impl Context {
    /// Build a context.
    pub fn new(
        client: Client,
        reporter: Reporter,
        workers: Arc<dyn Workers>,
        metrics: Metrics,
        caches: Caches,
        settings: Settings,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        let Caches { nodes, jobs, services } = caches;
        Context {
            client,
            recorder,
            workers,
            metrics,
            nodes,
            jobs,
            services,
            booked: Default::default(),
            policy: settings.policy,
            fence_timeout: settings.fence_timeout,
            status_writes: StatusWrites::default(),
            failures: Mutex::default(),
        }
    }

    /// Publish an Event about `obj`. A failure to publish is logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing event failed");
        }
    }

    /// Report an object that cannot be read as its kind: a Warning Event on it naming the
    /// field, and the error for the error policy (which waits for the object to change).
    pub async fn malformed(
        &self,
        kind: &'static str,
        invalid: &kube::core::error_boundary::InvalidObject,
    ) -> Error {
        let meta = &invalid.metadata;
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(format!(
                "{}/{}",
                crate::crd::common::GROUP,
                crate::crd::common::VERSION
            )),
            kind: Some(kind.into()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "Malformed".into(),
            note: Some(format!("the object cannot be read as a {kind}: {}", invalid.error)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "publishing event failed");
        }
        let name = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        );
        Error::Malformed { kind, name, message: invalid.error.clone() }
    }

    /// The valid cached `GpuNode`s.
    pub fn gpu_nodes(&self) -> Vec<GpuNode> {
        self.nodes.state().iter().filter_map(|n| n.0.as_ref().ok().cloned()).collect()
    }

    /// Drop bookings of objects no longer in either cache (deleted without a finalizer).
    pub fn prune_bookings(&self, booked: &mut BTreeMap<HolderId, Placement>) {
        let (jobs, services) = (self.jobs.state(), self.services.state());
        let mut live: HashSet<&str> = HashSet::new();
        live.extend(jobs.iter().filter_map(|g| g.0.as_ref().ok()?.metadata.uid.as_deref()));
        live.extend(services.iter().filter_map(|g| g.0.as_ref().ok()?.metadata.uid.as_deref()));
        booked.retain(|key, _| live.contains(key.owner()));
    }

    /// `booked` plus the cached service replicas' placements.
    pub fn held_by_services(
        &self,
        booked: &BTreeMap<HolderId, Placement>,
    ) -> BTreeMap<HolderId, Placement> {
        let mut held = booked.clone();
        for guard in self.services.state() {
            let Ok(svc) = &guard.0 else { continue };
            let Some(uid) = svc.uid() else { continue };
            for r in svc.status.iter().flat_map(|s| &s.replicas) {
                if !r.placement.workers.is_empty() {
                    let id = ReplicaId { service: uid.clone(), index: r.index, attempt: r.attempt };
                    held.entry(HolderId::Replica(id)).or_insert_with(|| r.placement.clone());
                }
            }
        }
        held
    }

    /// Service replicas waiting for a placement (see [`placement::waiting_replicas`]).
    pub fn waiting_replicas(&self) -> Vec<flotilla_scheduler::JobRequest> {
        let services = self.services.state();
        services
            .iter()
            .filter_map(|g| g.0.as_ref().ok())
            .flat_map(placement::waiting_replicas)
            .collect()
    }

    /// Forget an object's transient failures (after a successful reconciliation).
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Sort an error: an invalid object waits for a change, a transient failure backs off
    /// exponentially from 1 s to 5 min.
    pub fn error_policy(&self, kind: &'static str, key: &str, error: &Error) -> Action {
        self.metrics.reconcile_errors.with_label_values(&[kind, error.metric_label()]).inc();
        if error.is_permanent() {
            tracing::warn!(kind, object = key, %error, "invalid object; waiting for it to change");
            return Action::await_change();
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Objects that stopped failing without succeeding here (deleted, or fixed while another
        // replica led) are forgotten once their backoff could no longer apply.
        failures.retain(|_, (_, last)| now.duration_since(*last) < FORGET_FAILURES_AFTER);
        let (n, last) = failures.entry(key.to_string()).or_insert((0, now));
        *n = n.saturating_add(1);
        *last = now;
        let delay = backoff(*n);
        tracing::warn!(kind, object = key, %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

/// The longest a transient failure backs off.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A failure record older than this no longer affects any backoff.
const FORGET_FAILURES_AFTER: Duration = Duration::from_secs(600);

/// The wait after the `n`th consecutive transient failure (1-based): 1 s doubled per earlier
/// failure, doubling at most 8 times and never past [`MAX_BACKOFF`].
fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(8)).min(MAX_BACKOFF)
}

/// When each job's status was last written by this process, by UID, so status writes caused by
/// progress alone can be spaced out.
#[derive(Debug, Default)]
pub struct StatusWrites(Mutex<HashMap<String, Instant>>);

impl StatusWrites {
    /// Status writes caused by progress alone happen at most this often per job (every write
    /// wakes the controller again through its watch).
    pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

    /// `None` to write `new` now (and note the write); otherwise how long to wait first,
    /// because `new` differs from `old` only in `progress` and the job's last write was too
    /// recent.
    pub fn progress_wait(
        &self,
        uid: &str,
        old: &TrainingJobStatus,
        new: &TrainingJobStatus,
        now: Instant,
    ) -> Option<Duration> {
        let mut writes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let progress_only =
            TrainingJobStatus { progress: old.progress.clone(), ..new.clone() } == *old;
        if progress_only
            && let Some(last) = writes.get(uid)
            && let Some(wait) = Self::PROGRESS_INTERVAL.checked_sub(now.duration_since(*last))
            && !wait.is_zero()
        {
            return Some(wait);
        }
        writes.insert(uid.to_string(), now);
        // Forget jobs not written for a long time, so the map stays small.
        writes.retain(|_, t| now.duration_since(*t) < Duration::from_secs(3600));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_stops_at_256_seconds() {
        let waits: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256]);
    }

    #[test]
    fn progress_alone_is_written_at_most_every_two_seconds_other_changes_at_once() {
        use crate::crd::JobPhase;
        let writes = StatusWrites::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let old = TrainingJobStatus { phase: JobPhase::Running, ..Default::default() };
        let step = |n: i64| TrainingJobStatus {
            progress: Some(crate::crd::Progress { step: n, ..Default::default() }),
            ..old.clone()
        };
        assert_eq!(writes.progress_wait("uid-p", &old, &step(1), at(0)), None, "first write");
        let wait = writes.progress_wait("uid-p", &step(1), &step(2), at(500));
        assert_eq!(wait, Some(Duration::from_millis(1500)));
        let phase = TrainingJobStatus { phase: JobPhase::Succeeded, ..step(3) };
        assert_eq!(writes.progress_wait("uid-p", &step(1), &phase, at(600)), None, "phase: now");
        assert!(writes.progress_wait("uid-p", &step(1), &step(4), at(2000)).is_some());
        assert_eq!(writes.progress_wait("uid-p", &step(1), &step(4), at(2600)), None);
        assert_eq!(writes.progress_wait("uid-q", &step(1), &step(4), at(2600)), None, "per job");
    }
}
