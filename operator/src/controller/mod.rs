//! The controllers for the three kinds, and what they share.
//!
//! Each reconciliation is a pipeline: *dereference* (read the API and the fleet) → *validate*
//! and *build* (pure, unit-tested) → *apply* (write status, then act) → *requeue*.

pub mod gpu_node;
pub mod inference_service;
pub mod training_job;

use crate::crd::{GpuNode, InferenceService, Placement, TrainingJob};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "flotilla-operator";

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes `events.k8s.io` Events.
    pub recorder: Recorder,
    /// The agents.
    pub fleet: Arc<dyn Fleet>,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Cached `GpuNode`s.
    pub nodes: Store<kube::core::DeserializeGuard<GpuNode>>,
    /// Cached `TrainingJob`s (for conflicts and GPUs in use).
    pub jobs: Store<kube::core::DeserializeGuard<TrainingJob>>,
    /// Cached `InferenceService`s (for GPUs in use).
    pub services: Store<kube::core::DeserializeGuard<InferenceService>>,
    /// Placements this process wrote, by job UID; held while placing so two jobs never take
    /// the same GPUs from a cache that has not caught up.
    pub booked: tokio::sync::Mutex<BTreeMap<String, Placement>>,
    /// How long an agent may be silent before its node counts as lost.
    pub fence_timeout: k8s_openapi::jiff::SignedDuration,
    /// Consecutive transient failures per object, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Build a context.
    pub fn new(
        client: Client,
        reporter: Reporter,
        fleet: Arc<dyn Fleet>,
        metrics: Metrics,
        nodes: Store<kube::core::DeserializeGuard<GpuNode>>,
        jobs: Store<kube::core::DeserializeGuard<TrainingJob>>,
        services: Store<kube::core::DeserializeGuard<InferenceService>>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Context {
            client,
            recorder,
            fleet,
            metrics,
            nodes,
            jobs,
            services,
            booked: Default::default(),
            fence_timeout: k8s_openapi::jiff::SignedDuration::from_secs(30),
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
    pub fn prune_bookings(&self, booked: &mut BTreeMap<String, Placement>) {
        let (jobs, services) = (self.jobs.state(), self.services.state());
        let mut live: std::collections::HashSet<&str> = std::collections::HashSet::new();
        live.extend(jobs.iter().filter_map(|g| g.0.as_ref().ok()?.metadata.uid.as_deref()));
        live.extend(services.iter().filter_map(|g| g.0.as_ref().ok()?.metadata.uid.as_deref()));
        booked.retain(|key, _| live.contains(key.split('#').next().unwrap_or(key)));
    }

    /// `booked` plus the cached service replicas' placements, keyed `uid#index.attempt`.
    pub fn held_by_services(
        &self,
        booked: &BTreeMap<String, Placement>,
    ) -> BTreeMap<String, Placement> {
        let mut held = booked.clone();
        for guard in self.services.state() {
            let Ok(svc) = &guard.0 else { continue };
            let Some(uid) = svc.uid() else { continue };
            for r in svc.status.iter().flat_map(|s| &s.replicas) {
                if !r.placement.workers.is_empty() {
                    held.entry(format!("{uid}#{}.{}", r.index, r.attempt))
                        .or_insert_with(|| r.placement.clone());
                }
            }
        }
        held
    }

    /// Service replicas waiting for a placement (see [`inference_service::waiting_replicas`]).
    pub fn waiting_replicas(&self) -> Vec<flotilla_scheduler::JobRequest> {
        let services = self.services.state();
        services
            .iter()
            .filter_map(|g| g.0.as_ref().ok())
            .flat_map(inference_service::waiting_replicas)
            .collect()
    }

    /// Forget an object's transient failures (after a successful reconciliation).
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("not poisoned").remove(key);
    }

    /// Sort an error: an invalid object waits for a change, a transient failure backs off
    /// exponentially from 1 s to 5 min.
    pub fn error_policy(&self, kind: &'static str, key: &str, error: &Error) -> Action {
        self.metrics.reconcile_errors.with_label_values(&[kind, error.metric_label()]).inc();
        if error.is_permanent() {
            tracing::warn!(kind, object = key, %error, "invalid object; waiting for it to change");
            return Action::await_change();
        }
        let mut failures = self.failures.lock().expect("not poisoned");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300));
        tracing::warn!(kind, object = key, %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

/// The outcome of `kube`'s finalizer helper as this crate's result. Removing the finalizer of an
/// object that is already gone means an earlier reconciliation removed it and the API server
/// deleted the object since (this one ran from an older cache): nothing is left to do, so it is
/// not reported as a failure.
pub fn finalized(
    outcome: std::result::Result<Action, kube::runtime::finalizer::Error<Error>>,
) -> Result<Action, Error> {
    use kube::runtime::finalizer::Error as Finalizer;
    match outcome {
        Err(Finalizer::RemoveFinalizer(kube::Error::Api(status))) if status.code == 404 => {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

/// `namespace/name` of an object, for logs and backoff bookkeeping.
pub fn object_key<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// Write `status` with server-side apply, owning every status field the operator sets.
pub async fn apply_status<K, S>(api: &kube::Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as Finalizer;

    fn api_error(code: u16) -> kube::Error {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code})).expect("status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn removing_the_finalizer_of_an_object_already_gone_is_not_a_failure() {
        let gone = finalized(Err(Finalizer::RemoveFinalizer(api_error(404))));
        assert_eq!(gone.expect("not an error"), Action::await_change());
        let refused = finalized(Err(Finalizer::RemoveFinalizer(api_error(500))));
        assert!(matches!(refused, Err(Error::Finalizer(_))));
        let adding = finalized(Err(Finalizer::AddFinalizer(api_error(404))));
        assert!(matches!(adding, Err(Error::Finalizer(_))), "only removal of a gone object");
    }
}
