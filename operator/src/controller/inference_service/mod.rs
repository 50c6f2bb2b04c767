//! The `InferenceService` controller: places each replica as a gang, launches it through the
//! agents, keeps only replicas whose readiness check passes in the endpoints, replaces failed
//! replicas, rolls spec changes one slot at a time, and stops a rollout whose model does not
//! load.
//!
//! Pipeline: *dereference* (agent reports, readiness verdicts, nodes, GPUs and ports held by
//! others) → [`plan`] (pure) → *apply*: the `EndpointSlice`s first (so a failed replica leaves
//! them at once), then status, then stops and launches.
//!
//! A replica is a slot `index` served by one launch (`attempt`, unique in the service). Each
//! launch is its own workload on the agents ([`ReplicaId::on_agents`]), so a new
//! launch of a slot can start beside the old one (surge) and the old one still be stopped.

mod plan;
mod replicas;
mod status;
#[cfg(test)]
mod tests;

pub use plan::{Observed, ReplicaEffect, ServicePlan, plan};
pub use replicas::{checkpoint, replica_id, revision};

use replicas::live;

use super::preemption::{request_preemption, victims_to_ask};
use super::{Context, MANAGER, apply_status, reconcile_object, with_finalizer};
use crate::crd::inference_service::{InferenceService, ReplicaStatus};
use crate::endpoints::{self, Prober, ServiceRef};
use crate::error::{Error, Result};
use crate::ids::{HolderId, ReplicaId, WorkloadKey, WorkloadKind, object_key};
use crate::lifecycle::AttemptReport;
use crate::placement;
use crate::workers::{Launch, Workers};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const KIND: &str = WorkloadKind::InferenceService.as_str();
/// Finalizer that stops a deleted service's replicas before the object goes.
pub const FINALIZER: &str = "flotilla.dev/stop-replicas";
/// Condition: replicas are being started, replaced or rolled (or that finished).
pub const PROGRESSING: &str = "Progressing";
/// Condition: fewer replicas serve than `spec.replicas`.
pub const DEGRADED: &str = "Degraded";
/// How often each running replica's readiness is checked.
pub const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long one readiness check may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a settled service waits before looking again with nothing reported.
const IDLE_REQUEUE: Duration = Duration::from_secs(30);

// === dereference and apply ===

/// What the `InferenceService` reconciler shares besides the common [`Context`].
pub struct ServiceContext {
    /// The common context.
    pub ctx: Arc<Context>,
    /// Readiness checks of the running replicas.
    pub prober: Prober,
    /// The address of a node whose `GpuNode` reports none (one-host demos); else its name.
    pub fallback_address: Option<String>,
}

fn key(svc: &InferenceService, index: i32, attempt: i32) -> Result<WorkloadKey> {
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    Ok(WorkloadKey::replica(
        svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        svc.name_any(),
        ReplicaId { service: uid, index, attempt },
    ))
}

/// The services controller, watching the Services and EndpointSlices it owns.
pub fn controller(
    client: &Client,
    config: watcher::Config,
) -> Controller<DeserializeGuard<InferenceService>> {
    Controller::new(Api::<DeserializeGuard<InferenceService>>::all(client.clone()), config.clone())
        .owns(Api::<Service>::all(client.clone()), config.clone())
        .owns(Api::<EndpointSlice>::all(client.clone()), config)
}

/// Split the fleet's change announcements into those for training jobs and those for services.
pub fn split_changes(
    changes: Option<futures::stream::BoxStream<'static, WorkloadKey>>,
) -> (
    Option<futures::stream::BoxStream<'static, WorkloadKey>>,
    Option<futures::stream::BoxStream<'static, WorkloadKey>>,
) {
    let Some(mut changes) = changes else { return (None, None) };
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::unbounded_channel();
    let (svc_tx, svc_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(k) = changes.next().await {
            let tx = match k.kind() {
                WorkloadKind::InferenceService => &svc_tx,
                WorkloadKind::TrainingJob => &jobs_tx,
            };
            let _ = tx.send(k);
        }
    });
    let stream = |rx| -> futures::stream::BoxStream<'static, WorkloadKey> {
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    };
    (Some(stream(jobs_rx)), Some(stream(svc_rx)))
}

/// Run the services controller until `stop`: woken by its objects, the objects it owns, the
/// fleet's announcements for its replicas, and changed readiness verdicts.
pub fn run(
    controller: Controller<DeserializeGuard<InferenceService>>,
    ctx: Arc<Context>,
    changes: Option<futures::stream::BoxStream<'static, WorkloadKey>>,
    fallback_address: Option<String>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    let (prober, woken) = Prober::new(PROBE_PERIOD, PROBE_TIMEOUT);
    let probed = tokio_stream::wrappers::UnboundedReceiverStream::new(woken);
    let controller = controller.reconcile_on(probed);
    let controller = match changes {
        Some(keys) => controller.reconcile_on(
            keys.map(|k| ObjectRef::<ServiceGuard>::new(&k.name).within(&k.namespace)),
        ),
        None => controller,
    };
    let sctx = Arc::new(ServiceContext { ctx, prober, fallback_address });
    controller.graceful_shutdown_on(stop).run(reconcile, error_policy, sctx).map(|r| {
        if let Err(e) = r {
            tracing::debug!(kind = KIND, error = %e, "controller event");
        }
    })
}

type ServiceGuard = DeserializeGuard<InferenceService>;

/// Reconcile one `InferenceService`.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<InferenceService>>,
    sctx: Arc<ServiceContext>,
) -> Result<Action> {
    let sctx = &*sctx;
    reconcile_object(&sctx.ctx, KIND, &guard, |svc| async move {
        let ns = svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<InferenceService> = Api::namespaced(sctx.ctx.client.clone(), &ns);
        let apply_api = &api;
        with_finalizer(
            &api,
            FINALIZER,
            svc,
            |svc| async move { apply(&svc, apply_api, sctx).await },
            |svc| async move { cleanup(&svc, sctx).await },
        )
        .await
    })
    .await
}

/// Stop every replica of a deleted service and its readiness checks (its Service and
/// EndpointSlices go with it through their owner references).
async fn cleanup(svc: &InferenceService, sctx: &ServiceContext) -> Result<Action> {
    let ctx = &sctx.ctx;
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    ctx.booked.lock().await.retain(|key, _| key.owner() != uid);
    let me: ServiceRef = ObjectRef::from_obj(&DeserializeGuard(Ok(svc.clone())));
    sctx.prober.sync(&ReplicaId::service_prefix(&uid), &me, &BTreeMap::new());
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        ctx.workers
            .stop(&key(svc, r.index, r.attempt)?, r.attempt, "the InferenceService was deleted")
            .await
            .map_err(Error::Workers)?;
    }
    Ok(Action::await_change())
}

fn reports(
    svc: &InferenceService,
    workers: &dyn Workers,
) -> Result<BTreeMap<String, AttemptReport>> {
    let mut out = BTreeMap::new();
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        let k = key(svc, r.index, r.attempt)?;
        out.insert(k.on_agents(), workers.report(&k, r.attempt));
    }
    Ok(out)
}

/// Ports of other services' replicas by address, from the cache.
fn ports_of_others(ctx: &Context, me: &str) -> BTreeMap<String, BTreeSet<u16>> {
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for guard in ctx.services.state() {
        let Ok(other) = &guard.0 else { continue };
        if other.uid().as_deref() == Some(me) {
            continue;
        }
        for r in other.status.iter().flat_map(|s| &s.replicas) {
            if let Some((host, port)) = r.endpoint.as_deref().and_then(endpoints::host_port) {
                out.entry(host).or_default().insert(port);
            }
        }
    }
    out
}

async fn apply(
    svc: &InferenceService,
    api: &Api<InferenceService>,
    sctx: &ServiceContext,
) -> Result<Action> {
    let ctx = &sctx.ctx;
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let me: ServiceRef = ObjectRef::from_obj(&DeserializeGuard(Ok(svc.clone())));
    let mut booked = ctx.booked.lock().await;
    ctx.prune_bookings(&mut booked);
    let guards = ctx.jobs.state();
    let jobs: Vec<_> = guards.iter().filter_map(|g| g.0.as_ref().ok()).collect();
    let holdings = placement::holdings(&jobs, &ctx.held_by_services(&booked), &uid);
    let nodes = ctx.gpu_nodes();
    let hosts: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| {
            let address = n.status.as_ref().and_then(|s| s.address.clone());
            let host =
                address.or_else(|| sctx.fallback_address.clone()).unwrap_or_else(|| n.name_any());
            (n.name_any(), host)
        })
        .collect();
    let probes = sctx.prober.verdicts(&ReplicaId::service_prefix(&uid));
    let reports = reports(svc, ctx.workers.as_ref())?;
    let ports = ports_of_others(ctx, &uid);
    let observed = Observed {
        reports: &reports,
        probes: &probes,
        nodes: &nodes,
        holdings: &holdings,
        hosts: &hosts,
        ports_in_use: &ports,
        policy: &ctx.policy,
        now: Timestamp::now(),
    };
    let p = plan(svc, &observed);
    // Clients see a failed or leaving replica go before anything else happens; a slice the API
    // server refuses does not hold up replacing replicas (its error is returned at the end).
    let mut failures = Vec::new();
    if let Err(e) = apply_endpoints(svc, &p.status.replicas, &ctx.client).await {
        tracing::warn!(service = %object_key(svc), error = %e, "applying the Service or EndpointSlices failed");
        failures.push(format!("endpoints: {e}"));
    }
    if svc.status.as_ref() != Some(&p.status) {
        apply_status(api, &svc.name_any(), &p.status).await?;
    }
    booked.retain(|key, _| key.owner() != uid);
    for r in &p.status.replicas {
        let id = ReplicaId { service: uid.clone(), index: r.index, attempt: r.attempt };
        booked.insert(HolderId::Replica(id), r.placement.clone());
    }
    drop(booked);
    if !p.preempt.is_empty() {
        let me = format!("{} (InferenceService)", object_key(svc));
        let victims = victims_to_ask(&me, &p.preempt, &jobs);
        if let Err(e) = request_preemption(svc, &me, &victims, &jobs, ctx).await {
            failures.push(format!("preemption: {e}"));
        }
    }
    for (warning, reason, note) in &p.events {
        ctx.metrics.phase_transitions.with_label_values(&[KIND, reason]).inc();
        ctx.publish(svc, *warning, reason, note.clone()).await;
    }
    let wanted: BTreeMap<String, String> = p
        .status
        .replicas
        .iter()
        .filter(|r| live(r))
        .filter_map(|r| {
            let addr = endpoints::dial_addr(r.endpoint.as_deref()?)?;
            Some((replica_id(&uid, r.index, r.attempt), addr))
        })
        .collect();
    sctx.prober.sync(&ReplicaId::service_prefix(&uid), &me, &wanted);
    for effect in &p.effects {
        let result = match effect {
            ReplicaEffect::Launch { index, attempt, launch } => {
                let key = key(svc, *index, *attempt)?;
                ctx.workers.launch(&key, *attempt, Launch::Replica(launch)).await
            }
            ReplicaEffect::Stop { index, attempt, reason } => {
                ctx.workers.stop(&key(svc, *index, *attempt)?, *attempt, reason).await
            }
        };
        if let Err(e) = result {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        // A failed launch shows up as an exited worker in the next report.
        return Err(Error::Workers(failures.join("; ")));
    }
    Ok(Action::requeue(p.requeue))
}

/// Apply the Service and the EndpointSlices, and delete slices no longer wanted.
async fn apply_endpoints(
    svc: &InferenceService,
    replicas: &[ReplicaStatus],
    client: &Client,
) -> Result<()> {
    let ns = svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let pp = PatchParams::apply(MANAGER).force();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = endpoints::service(svc);
    services.patch(&svc.name_any(), &pp, &Patch::Apply(&service)).await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let wanted = endpoints::endpoint_slices(svc, replicas);
    for slice in &wanted {
        let name = slice.metadata.name.clone().unwrap_or_default();
        slices.patch(&name, &pp, &Patch::Apply(slice)).await?;
    }
    let names: BTreeSet<String> = wanted.iter().filter_map(|s| s.metadata.name.clone()).collect();
    let selector = endpoints::slice_selector(&svc.name_any());
    for old in slices.list(&ListParams::default().labels(&selector)).await? {
        let name = old.name_any();
        if !names.contains(&name) {
            match slices.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// What to do with a failed reconciliation.
pub fn error_policy(
    guard: Arc<DeserializeGuard<InferenceService>>,
    error: &Error,
    sctx: Arc<ServiceContext>,
) -> Action {
    super::error_policy(&sctx.ctx, KIND, &guard, error)
}
