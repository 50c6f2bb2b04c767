//! The service's status from the replicas a plan decided on: counts, endpoints, conditions,
//! phase and Events; and the plan of a service whose spec cannot run.

use super::plan::{ReplicaEffect, ServicePlan};
use super::replicas::{live, set_state};
use super::{DEGRADED, IDLE_REQUEUE, PROGRESSING};
use crate::crd::common::{condition_types as ct, set_condition};
use crate::crd::inference_service::{
    InferenceService, InferenceServiceStatus, ReplicaState, ReplicaStatus, ServicePhase,
    StableRevision,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use std::time::Duration;

/// What the replica pass found besides the replicas.
pub(super) struct Found {
    pub unschedulable: Option<String>,
    pub load_failure: Option<String>,
    pub requeue: Duration,
    pub now: Timestamp,
}

/// The plan's status fields, conditions and Events, from the replicas it decided on.
pub(super) fn conclude(
    svc: &InferenceService,
    old: InferenceServiceStatus,
    mut status: InferenceServiceStatus,
    effects: Vec<ReplicaEffect>,
    mut events: Vec<(bool, &'static str, String)>,
    found: Found,
) -> ServicePlan {
    let Found { unschedulable, load_failure, requeue, now } = found;
    let n = svc.spec.replicas;
    let rev = status.revision.clone();
    let serving: Vec<&ReplicaStatus> =
        status.replicas.iter().filter(|r| r.state == ReplicaState::Ready).collect();
    status.ready_replicas = serving.len() as i32;
    status.updated_replicas = serving.iter().filter(|r| r.revision == rev).count() as i32;
    status.endpoints = serving.iter().filter_map(|r| r.endpoint.clone()).collect();
    let live_count = status.replicas.iter().filter(|r| live(r)).count() as i32;
    status.current_replicas = live_count;
    status.selector = crate::endpoints::slice_selector(&svc.name_any());
    let settling = status.replicas.iter().any(|r| !live(r) || r.revision != rev);
    let blocked = status.failed_revision.as_deref() == Some(rev.as_str());
    let ready_note = format!("{} of {n} replicas serve", status.ready_replicas);
    let (phase, reason) = if blocked && status.ready_replicas == 0 && n > 0 {
        (ServicePhase::Failed, "ModelLoadFailed")
    } else if status.ready_replicas >= n {
        (ServicePhase::Ready, "Ready")
    } else if status.ready_replicas > 0 {
        (ServicePhase::Degraded, "Degraded")
    } else if live_count > 0 {
        (ServicePhase::Starting, "Starting")
    } else {
        (ServicePhase::Queued, "Queued")
    };
    let progressing: (bool, &str, String) = if blocked {
        let msg = match &load_failure {
            Some(m) => format!("{m}; rollout stopped, old replicas keep serving"),
            None => old
                .conditions
                .iter()
                .find(|c| c.type_ == PROGRESSING && c.reason == "ModelLoadFailed")
                .map(|c| c.message.clone())
                .unwrap_or_else(|| format!("revision {rev} failed to load; rollout stopped")),
        };
        (false, "ModelLoadFailed", msg)
    } else if let Some(msg) = &unschedulable {
        (false, "Unschedulable", msg.clone())
    } else if status.updated_replicas == n && live_count == n && !settling {
        status.stable = Some(StableRevision {
            revision: rev.clone(),
            model: svc.spec.model.clone(),
            serving: svc.spec.serving.clone(),
        });
        (true, "RolloutComplete", format!("{n} replicas of revision {rev} serve"))
    } else if status.replicas.iter().any(|r| r.revision != rev) {
        (
            true,
            "RollingUpdate",
            format!("{} of {n} replicas run revision {rev} and serve", status.updated_replicas),
        )
    } else {
        (true, "ReplicasStarting", format!("{ready_note}; starting or replacing the rest"))
    };
    let note = match phase {
        ServicePhase::Failed | ServicePhase::Queued => match (&unschedulable, phase) {
            (Some(msg), ServicePhase::Queued) => msg.clone(),
            _ => progressing.2.clone(),
        },
        _ => ready_note.clone(),
    };
    let generation = svc.meta().generation;
    let mut cond = |type_: &str, ok: bool, reason: &str, message: &str| {
        set_condition(
            &mut status.conditions,
            Condition {
                type_: type_.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: generation,
                last_transition_time: Time(now),
            },
        );
    };
    cond(ct::VALID, true, "SpecValid", "the spec passed the operator's checks");
    match &unschedulable {
        Some(msg) => cond(ct::SCHEDULED, false, "Unschedulable", msg),
        None => cond(ct::SCHEDULED, true, "Placed", "every replica wanted now is placed"),
    }
    let ready = status.ready_replicas >= n;
    cond(ct::READY, ready, if ready { "Ready" } else { "ReplicasNotReady" }, &ready_note);
    cond(PROGRESSING, progressing.0, progressing.1, &progressing.2);
    let degraded = status.ready_replicas < n;
    cond(
        DEGRADED,
        degraded,
        if degraded { "ReplicasUnavailable" } else { "AllReplicasServe" },
        &ready_note,
    );
    if old.phase != phase || old.observed_generation.is_none() {
        let warning = matches!(phase, ServicePhase::Degraded | ServicePhase::Failed);
        events.push((warning, reason, note.clone()));
    }
    if old.phase != phase {
        status.phase = phase;
        status.phase_transition_time = Some(Time(now));
    }
    status.message = Some(note);
    ServicePlan { status, effects, events, requeue, preempt: Vec::new() }
}

/// An invalid service: Valid=False, phase Failed, every running replica stopped.
pub(super) fn invalid_plan(
    svc: &InferenceService,
    mut status: InferenceServiceStatus,
    invalid: crate::validate::InvalidSpec,
    now: Timestamp,
) -> ServicePlan {
    let message = format!("{}: {}", invalid.field, invalid.message);
    let mut effects = Vec::new();
    for r in status.replicas.iter_mut() {
        effects.push(ReplicaEffect::Stop {
            index: r.index,
            attempt: r.attempt,
            reason: "invalid spec".into(),
        });
        if r.state != ReplicaState::Stopping {
            set_state(r, ReplicaState::Stopping, Some("invalid spec".into()), now);
        }
    }
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
    status.updated_replicas = 0;
    // Every replica is stopping: none counts for the scale subresource.
    status.current_replicas = 0;
    status.selector = crate::endpoints::slice_selector(&svc.name_any());
    status.endpoints.clear();
    let changed = status.phase != ServicePhase::Failed;
    if changed {
        status.phase = ServicePhase::Failed;
        status.phase_transition_time = Some(Time(now));
    }
    let events = if changed || status.message.as_deref() != Some(&message) {
        vec![(true, "InvalidSpec", message.clone())]
    } else {
        Vec::new()
    };
    status.message = Some(message);
    ServicePlan { status, effects, events, requeue: IDLE_REQUEUE, preempt: Vec::new() }
}
