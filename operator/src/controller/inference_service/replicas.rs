//! Facts about one replica and where it may go: its ids, revision and checkpoint, how its
//! attempt ended, and its placement away from the service's other replicas.

use crate::crd::GpuNode;
use crate::crd::Placement;
use crate::crd::inference_service::{
    InferenceService, InferenceServiceSpec, ModelSource, ReplicaState, ReplicaStatus,
};
use crate::ids::{HolderId, ReplicaId, object_key};
use crate::lifecycle::AttemptReport;
use crate::placement::{self, Holding, RACK_LABEL};
use flotilla_contract::fnv::fnv1a_64;
use flotilla_scheduler as sched;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use std::collections::BTreeSet;

use super::plan::Observed;

/// The id of one launch of a replica on the agents, and of its readiness verdict
/// ([`ReplicaId::on_agents`]).
pub fn replica_id(uid: &str, index: i32, attempt: i32) -> String {
    ReplicaId { service: uid.to_string(), index, attempt }.on_agents()
}

/// A short hash of what replicas run (`spec.model`, `spec.serving`); a change rolls them.
pub fn revision(spec: &InferenceServiceSpec) -> String {
    let text = serde_json::to_string(&(&spec.model, &spec.serving)).unwrap_or_default();
    format!("{:010x}", fnv1a_64(text.as_bytes()) & 0xff_ffff_ffff)
}

/// The checkpoint a replica of `spec` serves: the directory (its `latest`), or the named step
/// (`step-%08d`, as the engine names step directories).
pub fn checkpoint(spec: &InferenceServiceSpec) -> String {
    checkpoint_of(&spec.model)
}

pub(super) fn checkpoint_of(model: &ModelSource) -> String {
    match model.step {
        Some(step) => format!("{}/step-{step:08}", model.checkpoint_path),
        None => model.checkpoint_path.clone(),
    }
}

pub(super) fn live(r: &ReplicaStatus) -> bool {
    matches!(r.state, ReplicaState::Starting | ReplicaState::Ready | ReplicaState::Unready)
}

pub(super) fn elapsed(since: Option<&Time>, now: Timestamp) -> SignedDuration {
    since.map_or(SignedDuration::ZERO, |t| now.duration_since(t.0))
}

pub(super) fn set_state(
    r: &mut ReplicaStatus,
    state: ReplicaState,
    message: Option<String>,
    now: Timestamp,
) {
    r.state = state;
    r.ready = state == ReplicaState::Ready;
    r.state_time = Some(Time(now));
    r.message = message;
}

/// Why an attempt failed, from its report, or `None` while it runs.
pub(super) fn failure(report: &AttemptReport) -> Option<(bool, String)> {
    if let Some(f) = &report.fault {
        return Some((true, format!("hardware fault: {}", f.message)));
    }
    if let Some(lost) = &report.node_lost {
        return Some((true, format!("node lost: {}", lost.message)));
    }
    let exit = report.exits.first()?;
    let how = match (exit.code, exit.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "an unknown end".to_string(),
    };
    Some((false, format!("worker exited with {how}")))
}

/// Training jobs of lower priority whose preemption would let replica `slot` be placed (the
/// scheduler's cheapest choice; empty when preempting would not make it fit).
pub(super) fn preemption_victims(
    svc: &InferenceService,
    uid: &str,
    slot: i32,
    obs: &Observed<'_>,
    holdings: &[Holding],
) -> Vec<String> {
    let (nodes, policy, now) = (obs.nodes, obs.policy, obs.now);
    let request = placement::replica_request(svc, uid, slot);
    let nodes: Vec<&GpuNode> = nodes.iter().collect();
    let policy = sched::Policy { preemption: true, ..policy.clone() };
    placement::schedule(&request, &[], &nodes, holdings, &policy, placement::unix(now)).preempt
}

pub(super) fn holding(svc: &InferenceService, uid: &str, r: &ReplicaStatus) -> Holding {
    let id = ReplicaId { service: uid.to_string(), index: r.index, attempt: r.attempt };
    Holding {
        id: HolderId::Replica(id),
        name: object_key(svc),
        namespace: svc.namespace().unwrap_or_default(),
        priority: svc.spec.priority,
        placement: r.placement.clone(),
        started_at: None,
        expected_end: None,
        on_loan: false,
        arrival: 0,
    }
}

/// Place one replica, away from the service's other replicas when possible: first on racks
/// without one, then on nodes without one, then anywhere.
pub(super) fn place(
    svc: &InferenceService,
    uid: &str,
    slot: i32,
    replicas: &[ReplicaStatus],
    obs: &Observed<'_>,
    holdings: &[Holding],
) -> std::result::Result<Placement, String> {
    let (nodes, now) = (obs.nodes, obs.now);
    let taken: BTreeSet<&str> = replicas
        .iter()
        .filter(|r| live(r) || r.state == ReplicaState::Draining)
        .flat_map(|r| r.placement.workers.iter().map(|w| w.node.as_str()))
        .collect();
    let rack = |n: &GpuNode| n.labels().get(RACK_LABEL).cloned();
    let taken_racks: BTreeSet<String> =
        nodes.iter().filter(|n| taken.contains(n.name_any().as_str())).filter_map(rack).collect();
    let other_rack: Vec<&GpuNode> =
        nodes.iter().filter(|n| rack(n).is_some_and(|r| !taken_racks.contains(&r))).collect();
    let other_node: Vec<&GpuNode> =
        nodes.iter().filter(|n| !taken.contains(n.name_any().as_str())).collect();
    let all: Vec<&GpuNode> = nodes.iter().collect();
    let request = placement::replica_request(svc, uid, slot);
    let mut last = String::from("no GpuNodes");
    for tier in [other_rack.as_slice(), other_node.as_slice(), all.as_slice()] {
        if tier.is_empty() {
            continue;
        }
        match placement::place(&request, &[], tier, holdings, obs.policy, placement::unix(now)) {
            Ok(p) => return Ok(p),
            Err(u) => last = u.message,
        }
    }
    Err(format!("replica {slot}: {last}"))
}
