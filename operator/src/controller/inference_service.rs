//! The `InferenceService` controller: places each replica as a gang, replaces failed replicas,
//! and reports readiness.

use super::{Context, apply_status, object_key};
use crate::crd::common::{condition_types as ct, set_condition};
use crate::crd::inference_service::{
    InferenceService, InferenceServiceStatus, ReplicaStatus, ServicePhase,
};
use crate::crd::{GpuNode, Placement};
use crate::error::{Error, Result};
use crate::fleet::{Fleet, WorkloadKey};
use crate::lifecycle::{AttemptReport, Effect};
use crate::scheduling::{self, Holding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const KIND: &str = "InferenceService";
/// Finalizer that stops a deleted service's replicas before the object goes.
pub const FINALIZER: &str = "flotilla.dev/stop-replicas";

/// The plan for one service: the status to write and effects per replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    /// The status to write.
    pub status: InferenceServiceStatus,
    /// `(replica, effect)` pairs to run after the write.
    pub effects: Vec<(i32, Effect)>,
    /// `(warning, reason, note)` when the phase changed.
    pub event: Option<(bool, &'static str, String)>,
}

/// The pure middle: given the service, the fleet's reports per replica and free GPUs, decide.
pub fn plan(
    svc: &InferenceService,
    reports: &BTreeMap<i32, AttemptReport>,
    nodes: &[GpuNode],
    holdings: &[Holding],
    now: Timestamp,
) -> ServicePlan {
    let spec = &svc.spec;
    let old = svc.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = svc.meta().generation;
    status.gpus_per_replica = spec.workers_per_replica * spec.gpus_per_worker;
    let mut effects = Vec::new();
    if let Err(invalid) = crate::validate::node_selector(&spec.scheduling.node_selector) {
        return invalid_plan(svc, status, invalid, now);
    }
    let mut holdings = holdings.to_vec();
    let uid = svc.uid().unwrap_or_default();
    // Scale down from the top.
    status.replicas.retain(|r| {
        let keep = r.index < spec.replicas;
        if !keep && !r.placement.workers.is_empty() {
            effects
                .push((r.index, Effect::Stop { attempt: r.attempt, reason: "scaled down".into() }));
        }
        keep
    });
    let mut unschedulable = None;
    for index in 0..spec.replicas {
        let pos = match status.replicas.iter().position(|r| r.index == index) {
            Some(p) => p,
            None => {
                status.replicas.push(ReplicaStatus { index, ..Default::default() });
                status.replicas.len() - 1
            }
        };
        let r = &mut status.replicas[pos];
        let report = reports
            .get(&index)
            .cloned()
            .unwrap_or(AttemptReport { all_stopped: true, ..Default::default() });
        if !r.placement.workers.is_empty() {
            let failed =
                report.fault.is_some() || report.node_lost.is_some() || !report.exits.is_empty();
            if failed {
                effects.push((
                    index,
                    Effect::Stop {
                        attempt: r.attempt,
                        reason: "replica failed; replacing it".into(),
                    },
                ));
                r.placement = Placement::default();
                r.ready = false;
                r.endpoint = None;
                continue;
            }
            r.ready = report.running >= spec.workers_per_replica;
            r.endpoint = r
                .ready
                .then(|| format!("http://{}:{}", r.placement.workers[0].node, spec.serving.port));
            continue;
        }
        if !report.all_stopped {
            continue;
        }
        let replica = replica_request(svc, &uid, index);
        match scheduling::place(&replica, &[], nodes, &holdings, scheduling::unix(now)) {
            Ok(p) => {
                holdings.push(Holding {
                    id: replica.id.to_string(),
                    name: object_key(svc),
                    namespace: replica.namespace.clone(),
                    priority: spec.priority,
                    placement: p.clone(),
                    started_at: None,
                    expected_end: None,
                });
                r.attempt += 1;
                r.placement = p;
                effects.push((index, Effect::Launch { attempt: r.attempt }));
            }
            Err(u) => unschedulable = Some(u.message),
        }
    }
    status.replicas.sort_by_key(|r| r.index);
    status.ready_replicas = status.replicas.iter().filter(|r| r.ready).count() as i32;
    status.endpoints = status.replicas.iter().filter_map(|r| r.endpoint.clone()).collect();
    let placed = status.replicas.iter().filter(|r| !r.placement.workers.is_empty()).count() as i32;
    let (phase, reason, note) = if status.ready_replicas >= spec.replicas {
        (
            ServicePhase::Ready,
            "Ready",
            format!("{} of {} replicas serve", status.ready_replicas, spec.replicas),
        )
    } else if status.ready_replicas > 0 {
        (
            ServicePhase::Degraded,
            "Degraded",
            format!("{} of {} replicas serve", status.ready_replicas, spec.replicas),
        )
    } else if placed > 0 {
        (
            ServicePhase::Starting,
            "Starting",
            format!("{placed} of {} replicas placed, none serving yet", spec.replicas),
        )
    } else {
        let why = unschedulable.clone().unwrap_or_else(|| "waiting for GPUs".into());
        (ServicePhase::Queued, "Queued", why)
    };
    let mut cond = |type_: &str, ok: bool, reason: &str, message: &str| {
        set_condition(
            &mut status.conditions,
            Condition {
                type_: type_.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: svc.meta().generation,
                last_transition_time: Time(now),
            },
        );
    };
    cond(ct::VALID, true, "SpecValid", "the spec passed the operator's checks");
    match &unschedulable {
        Some(msg) => cond(ct::SCHEDULED, false, "Unschedulable", msg),
        None => cond(ct::SCHEDULED, true, "Placed", "every desired replica is placed"),
    }
    cond(ct::READY, phase == ServicePhase::Ready, reason, &note);
    let event = (old.phase != phase || old.observed_generation.is_none()).then(|| {
        (matches!(phase, ServicePhase::Degraded | ServicePhase::Failed), reason, note.clone())
    });
    if old.phase != phase {
        status.phase = phase;
        status.phase_transition_time = Some(Time(now));
    }
    status.message = Some(note);
    ServicePlan { status, effects, event }
}

/// What one replica asks of the scheduler; its id is `uid#index`, as in the bookings.
fn replica_request(
    svc: &InferenceService,
    uid: &str,
    index: i32,
) -> flotilla_scheduler::JobRequest {
    let spec = &svc.spec;
    let mut req = flotilla_scheduler::JobRequest::new(
        format!("{uid}#{index}"),
        u32::try_from(spec.workers_per_replica).unwrap_or(0),
        u32::try_from(spec.gpus_per_worker).unwrap_or(0),
    )
    .namespace(svc.namespace().unwrap_or_default())
    .priority(spec.priority)
    .spread(scheduling::spread(spec.scheduling.strategy));
    req.node_selector = spec.scheduling.node_selector.clone();
    req
}

/// An invalid service: Valid=False, phase Failed, every placed replica stopped.
fn invalid_plan(
    svc: &InferenceService,
    mut status: InferenceServiceStatus,
    invalid: crate::lifecycle::InvalidSpec,
    now: Timestamp,
) -> ServicePlan {
    let message = format!("{}: {}", invalid.field, invalid.message);
    let effects = status
        .replicas
        .drain(..)
        .filter(|r| !r.placement.workers.is_empty())
        .map(|r| (r.index, Effect::Stop { attempt: r.attempt, reason: "invalid spec".into() }))
        .collect();
    set_condition(
        &mut status.conditions,
        Condition {
            type_: ct::VALID.into(),
            status: "False".into(),
            reason: "InvalidSpec".into(),
            message: message.clone(),
            observed_generation: svc.meta().generation,
            last_transition_time: Time(now),
        },
    );
    status.ready_replicas = 0;
    status.endpoints.clear();
    let changed = status.phase != ServicePhase::Failed;
    if changed {
        status.phase = ServicePhase::Failed;
        status.phase_transition_time = Some(Time(now));
    }
    let event = (changed || status.message.as_deref() != Some(&message))
        .then(|| (true, "InvalidSpec", message.clone()));
    status.message = Some(message);
    ServicePlan { status, effects, event }
}

fn key(svc: &InferenceService, replica: i32) -> Result<WorkloadKey> {
    Ok(WorkloadKey {
        kind: KIND,
        namespace: svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        name: svc.name_any(),
        uid: svc.uid().ok_or(Error::MissingField("metadata.uid"))?,
        replica: Some(replica),
    })
}

fn reports(svc: &InferenceService, fleet: &dyn Fleet) -> Result<BTreeMap<i32, AttemptReport>> {
    let mut out = BTreeMap::new();
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        if !r.placement.workers.is_empty() {
            out.insert(r.index, fleet.report(&key(svc, r.index)?, r.attempt));
        }
    }
    Ok(out)
}

/// Reconcile one `InferenceService`.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<InferenceService>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let svc = match &guard.0 {
        Ok(svc) => svc,
        Err(invalid) => return Err(ctx.malformed(KIND, invalid).await),
    };
    let _timer = ctx.metrics.reconcile_seconds.with_label_values(&[KIND]).start_timer();
    ctx.metrics.reconciles.with_label_values(&[KIND]).inc();
    let ns = svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<InferenceService> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer(&api, FINALIZER, Arc::new(svc.clone()), |event| async {
        match event {
            Finalizer::Apply(svc) => apply(&svc, &api, &ctx).await,
            Finalizer::Cleanup(svc) => cleanup(&svc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.succeeded(&object_key(svc));
    Ok(action)
}

/// Stop every placed replica of a deleted service.
async fn cleanup(svc: &InferenceService, ctx: &Context) -> Result<Action> {
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    ctx.booked.lock().await.retain(|key, _| !key.starts_with(&format!("{uid}#")));
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        if !r.placement.workers.is_empty() {
            let k = key(svc, r.index)?;
            ctx.fleet
                .stop(&k, r.attempt, "the InferenceService was deleted")
                .await
                .map_err(Error::Fleet)?;
        }
    }
    Ok(Action::await_change())
}

async fn apply(
    svc: &InferenceService,
    api: &Api<InferenceService>,
    ctx: &Context,
) -> Result<Action> {
    let mut booked = ctx.booked.lock().await;
    ctx.prune_bookings(&mut booked);
    let guards = ctx.jobs.state();
    let jobs: Vec<_> = guards.iter().filter_map(|g| g.0.as_ref().ok()).collect();
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let holdings = scheduling::holdings(&jobs, &ctx.held_by_services(&booked), &uid);
    let nodes = ctx.gpu_nodes();
    let p = plan(svc, &reports(svc, ctx.fleet.as_ref())?, &nodes, &holdings, Timestamp::now());
    if svc.status.as_ref() != Some(&p.status) {
        apply_status(api, &svc.name_any(), &p.status).await?;
    }
    booked.retain(|key, _| !key.starts_with(&format!("{uid}#")));
    for r in &p.status.replicas {
        if !r.placement.workers.is_empty() {
            booked.insert(format!("{uid}#{}", r.index), r.placement.clone());
        }
    }
    drop(booked);
    if let Some((warning, reason, note)) = &p.event {
        ctx.metrics.phase_transitions.with_label_values(&[KIND, reason]).inc();
        ctx.publish(svc, *warning, reason, note.clone()).await;
    }
    for (replica, effect) in &p.effects {
        let k = key(svc, *replica)?;
        match effect {
            Effect::Launch { attempt } => {
                ctx.fleet.launch(&k, *attempt).await.map_err(Error::Fleet)?
            }
            Effect::Stop { attempt, reason } => {
                ctx.fleet.stop(&k, *attempt, reason).await.map_err(Error::Fleet)?
            }
            Effect::Delete => {}
        }
    }
    Ok(Action::requeue(Duration::from_secs(if p.status.phase == ServicePhase::Ready {
        60
    } else {
        10
    })))
}

/// What to do with a failed reconciliation.
pub fn error_policy(
    guard: Arc<DeserializeGuard<InferenceService>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = match &guard.0 {
        Ok(svc) => object_key(svc),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    ctx.error_policy(KIND, &key, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gpu_node::{GpuHealth, GpuNodeSpec, GpuNodeStatus, GpuState};
    use crate::crd::inference_service::{InferenceServiceSpec, ModelSource};
    use crate::lifecycle::WorkerExit;

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

    fn service(replicas: i32) -> InferenceService {
        let mut s = InferenceService::new(
            "chat",
            InferenceServiceSpec {
                replicas,
                workers_per_replica: 1,
                gpus_per_worker: 2,
                model: ModelSource { checkpoint_path: "/ckpt/a".into(), ..Default::default() },
                serving: Default::default(),
                priority: 0,
                scheduling: Default::default(),
            },
        );
        s.metadata.generation = Some(1);
        s
    }

    fn step(
        svc: &mut InferenceService,
        reports: &BTreeMap<i32, AttemptReport>,
        gpus: i32,
    ) -> ServicePlan {
        let p = plan(svc, reports, &[node("n", gpus)], &[], Timestamp::now());
        svc.status = Some(p.status.clone());
        p
    }

    fn running() -> AttemptReport {
        AttemptReport { running: 1, ..Default::default() }
    }

    #[test]
    fn replicas_are_placed_launched_then_ready() {
        let mut svc = service(2);
        let p = step(&mut svc, &BTreeMap::new(), 4);
        assert_eq!(p.status.phase, ServicePhase::Starting);
        assert_eq!(p.status.gpus_per_replica, 2);
        assert_eq!(
            p.effects,
            vec![(0, Effect::Launch { attempt: 1 }), (1, Effect::Launch { attempt: 1 })]
        );
        let gpus: Vec<_> =
            p.status.replicas.iter().map(|r| r.placement.workers[0].gpus.clone()).collect();
        assert_eq!(gpus, vec![vec![0, 1], vec![2, 3]]);
        let p = step(&mut svc, &BTreeMap::from([(0, running())]), 4);
        assert_eq!(p.status.phase, ServicePhase::Degraded);
        assert!(p.effects.is_empty());
        let p = step(&mut svc, &BTreeMap::from([(0, running()), (1, running())]), 4);
        assert_eq!(p.status.phase, ServicePhase::Ready);
        assert_eq!(p.status.ready_replicas, 2);
        assert_eq!(p.status.endpoints, vec!["http://n:8000", "http://n:8000"]);
    }

    #[test]
    fn a_failed_replica_is_stopped_and_placed_again_with_a_new_attempt() {
        let mut svc = service(1);
        step(&mut svc, &BTreeMap::new(), 2);
        let failed = AttemptReport {
            exits: vec![WorkerExit { rank: 0, code: Some(1), signal: None }],
            ..Default::default()
        };
        let p = step(&mut svc, &BTreeMap::from([(0, failed)]), 2);
        assert!(matches!(p.effects.as_slice(), [(0, Effect::Stop { attempt: 1, .. })]));
        assert!(p.status.replicas[0].placement.workers.is_empty());
        let p = step(&mut svc, &BTreeMap::new(), 2);
        assert_eq!(p.effects, vec![(0, Effect::Launch { attempt: 2 })]);
    }

    #[test]
    fn scaling_down_stops_the_highest_replicas() {
        let mut svc = service(2);
        step(&mut svc, &BTreeMap::new(), 4);
        svc.spec.replicas = 1;
        let p = step(&mut svc, &BTreeMap::from([(0, running()), (1, running())]), 4);
        assert!(matches!(p.effects.as_slice(), [(1, Effect::Stop { attempt: 1, .. })]));
        assert_eq!(p.status.replicas.len(), 1);
        assert_eq!(p.status.phase, ServicePhase::Ready);
    }

    #[test]
    fn an_invalid_selector_fails_the_service_naming_the_field() {
        let mut svc = service(1);
        step(&mut svc, &BTreeMap::new(), 2);
        svc.spec.scheduling.node_selector.insert("bad key".into(), "x".into());
        let p = step(&mut svc, &BTreeMap::new(), 2);
        assert_eq!(p.status.phase, ServicePhase::Failed);
        assert!(matches!(p.effects.as_slice(), [(0, Effect::Stop { attempt: 1, .. })]));
        let valid = p.status.conditions.iter().find(|c| c.type_ == "Valid").unwrap();
        assert!(valid.message.starts_with("spec.scheduling.nodeSelector"), "{}", valid.message);
    }

    #[test]
    fn without_free_gpus_the_service_is_queued_and_unschedulable() {
        let mut svc = service(1);
        let p = step(&mut svc, &BTreeMap::new(), 1);
        assert_eq!(p.status.phase, ServicePhase::Queued);
        let scheduled = p.status.conditions.iter().find(|c| c.type_ == "Scheduled").unwrap();
        assert_eq!(
            (scheduled.status.as_str(), scheduled.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert!(p.effects.is_empty());
    }
}
