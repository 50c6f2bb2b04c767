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
//! launch is its own workload on the agents (`<uid>/replica-<index>.<attempt>`), so a new
//! launch of a slot can start beside the old one (surge) and the old one still be stopped.

use super::{Context, MANAGER, apply_status, object_key};
use crate::crd::common::{condition_types as ct, set_condition};
use crate::crd::inference_service::{
    InferenceService, InferenceServiceSpec, InferenceServiceStatus, ModelSource, ReplicaState,
    ReplicaStatus, ServicePhase, StableRevision,
};
use crate::crd::{GpuNode, Placement};
use crate::endpoints::{self, Probe, Prober, ServiceRef};
use crate::error::{Error, Result};
use crate::fleet::{Fleet, ReplicaLaunch, WorkloadKey};
use crate::lifecycle::AttemptReport;
use crate::scheduling::{self, Holding, RACK_LABEL};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const KIND: &str = "InferenceService";
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

/// What the controller does to a replica after the status is written.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaEffect {
    /// Launch a new replica's workers.
    Launch {
        /// Slot.
        index: i32,
        /// Launch number.
        attempt: i32,
        /// What it runs.
        launch: ReplicaLaunch,
    },
    /// Stop a replica's workers (idempotent).
    Stop {
        /// Slot.
        index: i32,
        /// Launch number.
        attempt: i32,
        /// Why, for the agents' logs.
        reason: String,
    },
}

/// What [`plan`] sees besides the service itself.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// Agent reports per replica id ([`replica_id`]).
    pub reports: &'a BTreeMap<String, AttemptReport>,
    /// Readiness verdicts per replica id.
    pub probes: &'a BTreeMap<String, Probe>,
    /// The fleet.
    pub nodes: &'a [GpuNode],
    /// GPUs held by other workloads.
    pub holdings: &'a [Holding],
    /// The address replicas on a node are reached at, by node name (the node's name when
    /// absent).
    pub hosts: &'a BTreeMap<String, String>,
    /// Ports other services' replicas use, by address.
    pub ports_in_use: &'a BTreeMap<String, BTreeSet<u16>>,
    /// Now.
    pub now: Timestamp,
}

/// The plan for one service: the status to write and what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    /// The status to write.
    pub status: InferenceServiceStatus,
    /// Stops, then launches, to run after the write.
    pub effects: Vec<ReplicaEffect>,
    /// `(warning, reason, note)` Events to publish.
    pub events: Vec<(bool, &'static str, String)>,
    /// When to look again with nothing reported.
    pub requeue: Duration,
    /// UIDs of lower-priority training jobs to preempt so a missing replica can be placed.
    pub preempt: Vec<String>,
}

/// The id of one launch of a replica on the agents, and of its readiness verdict.
pub fn replica_id(uid: &str, index: i32, attempt: i32) -> String {
    format!("{uid}/replica-{index}.{attempt}")
}

/// A short hash of what replicas run (`spec.model`, `spec.serving`); a change rolls them.
pub fn revision(spec: &InferenceServiceSpec) -> String {
    let text = serde_json::to_string(&(&spec.model, &spec.serving)).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// The checkpoint a replica of `spec` serves: the directory (its `latest`), or the named step
/// (`step-%08d`, as the engine names step directories).
pub fn checkpoint(spec: &InferenceServiceSpec) -> String {
    checkpoint_of(&spec.model)
}

fn checkpoint_of(model: &ModelSource) -> String {
    match model.step {
        Some(step) => format!("{}/step-{step:08}", model.checkpoint_path),
        None => model.checkpoint_path.clone(),
    }
}

fn live(r: &ReplicaStatus) -> bool {
    matches!(r.state, ReplicaState::Starting | ReplicaState::Ready | ReplicaState::Unready)
}

fn elapsed(since: Option<&Time>, now: Timestamp) -> SignedDuration {
    since.map_or(SignedDuration::ZERO, |t| now.duration_since(t.0))
}

fn set_state(r: &mut ReplicaStatus, state: ReplicaState, message: Option<String>, now: Timestamp) {
    r.state = state;
    r.ready = state == ReplicaState::Ready;
    r.state_time = Some(Time(now));
    r.message = message;
}

/// Why an attempt failed, from its report, or `None` while it runs.
fn failure(report: &AttemptReport) -> Option<(bool, String)> {
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

/// The pure middle: given the service and what was observed, decide.
pub fn plan(svc: &InferenceService, obs: &Observed<'_>) -> ServicePlan {
    let spec = &svc.spec;
    let now = obs.now;
    let old = svc.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = svc.meta().generation;
    status.gpus_per_replica = spec.workers_per_replica * spec.gpus_per_worker;
    if let Err(invalid) = crate::validate::node_selector(&spec.scheduling.node_selector) {
        return invalid_plan(svc, status, invalid, now);
    }
    let uid = svc.uid().unwrap_or_default();
    let rev = revision(spec);
    status.revision = rev.clone();
    if status.failed_revision.as_ref().is_some_and(|f| *f != rev) {
        status.failed_revision = None;
    }
    let (n, surge, unavailable) =
        (spec.replicas, spec.rollout.max_surge, spec.rollout.max_unavailable);
    let startup = SignedDuration::from_secs(i64::from(spec.rollout.startup_timeout_seconds));
    let drain = SignedDuration::from_secs(i64::from(spec.rollout.drain_seconds));
    let mut effects = Vec::new();
    let mut events = Vec::new();
    let mut load_failure: Option<String> = None;
    let mut next_look = IDLE_REQUEUE;
    let mut look_at = |after: SignedDuration| {
        let d = Duration::try_from(after).unwrap_or(Duration::ZERO).max(Duration::from_millis(200));
        next_look = next_look.min(d);
    };
    let stop = |r: &ReplicaStatus, reason: &str| ReplicaEffect::Stop {
        index: r.index,
        attempt: r.attempt,
        reason: reason.to_string(),
    };

    // 1. What each replica is doing now.
    let mut replicas = Vec::new();
    for mut r in std::mem::take(&mut status.replicas) {
        let id = replica_id(&uid, r.index, r.attempt);
        let report = obs
            .reports
            .get(&id)
            .cloned()
            .unwrap_or(AttemptReport { all_stopped: true, ..Default::default() });
        if r.state == ReplicaState::Stopping {
            if !report.all_stopped {
                effects.push(stop(&r, r.message.as_deref().unwrap_or("stopping")));
                look_at(SignedDuration::from_secs(2));
                replicas.push(r);
            }
            continue;
        }
        if let Some((hardware, why)) = failure(&report) {
            let never_served = r.state == ReplicaState::Starting;
            // A taken port says nothing about the model: the replica is launched again (on the
            // next launch's port) instead of stopping the rollout.
            let port_taken = report
                .exits
                .iter()
                .any(|e| e.code == Some(i32::from(flotilla_engine::exit::PORT_UNAVAILABLE)));
            if never_served && !hardware && !port_taken && r.revision == rev {
                load_failure = Some(format!(
                    "replica {} (launch {}) of revision {rev} ({}) failed before it answered: {why}",
                    r.index,
                    r.attempt,
                    r.checkpoint.as_deref().unwrap_or("?")
                ));
            }
            if r.state != ReplicaState::Draining {
                events.push((true, "ReplicaFailed", format!("replica {}: {why}", r.index)));
            }
            effects.push(stop(&r, &why));
            set_state(&mut r, ReplicaState::Stopping, Some(why), now);
            replicas.push(r);
            continue;
        }
        if r.state == ReplicaState::Draining {
            let left = drain - elapsed(r.state_time.as_ref(), now);
            if left <= SignedDuration::ZERO {
                effects.push(stop(&r, "drained"));
                set_state(&mut r, ReplicaState::Stopping, Some("drained".into()), now);
            } else {
                look_at(left);
            }
            replicas.push(r);
            continue;
        }
        let probe = obs.probes.get(&id).cloned().unwrap_or_default();
        match (r.state, probe.passed) {
            (ReplicaState::Starting | ReplicaState::Unready, true) => {
                set_state(&mut r, ReplicaState::Ready, None, now);
            }
            (ReplicaState::Ready, false) if probe.checked => {
                set_state(&mut r, ReplicaState::Unready, probe.message.clone(), now);
            }
            _ => {}
        }
        let since = match r.state {
            ReplicaState::Starting => r.launch_time.as_ref(),
            _ => r.state_time.as_ref(),
        };
        if r.state != ReplicaState::Ready {
            let left = startup - elapsed(since, now);
            if left <= SignedDuration::ZERO {
                let why = format!(
                    "no answered readiness check within {}s{}",
                    spec.rollout.startup_timeout_seconds,
                    probe.message.map(|m| format!(" (last: {m})")).unwrap_or_default()
                );
                if r.state == ReplicaState::Starting && r.revision == rev {
                    load_failure = Some(format!(
                        "replica {} (launch {}) of revision {rev} ({}): {why}",
                        r.index,
                        r.attempt,
                        r.checkpoint.as_deref().unwrap_or("?")
                    ));
                }
                events.push((true, "ReplicaFailed", format!("replica {}: {why}", r.index)));
                effects.push(stop(&r, &why));
                set_state(&mut r, ReplicaState::Stopping, Some(why), now);
            } else {
                look_at(left);
            }
        }
        replicas.push(r);
    }
    if let Some(msg) = &load_failure {
        if status.failed_revision.as_deref() != Some(rev.as_str()) {
            events.push((true, "ModelLoadFailed", msg.clone()));
        }
        status.failed_revision = Some(rev.clone());
    }
    let blocked = status.failed_revision.as_deref() == Some(rev.as_str());
    // While the rollout is stopped, emptied slots are refilled with the last good revision.
    let fallback = status.stable.clone().filter(|s| blocked && s.revision != rev);
    let is_fallback =
        |r: &ReplicaStatus| fallback.as_ref().is_some_and(|s| s.revision == r.revision);

    // 2. Scale down, and drop old replicas that do not serve (they would never count), except
    // refills of the last good revision while the rollout is stopped.
    for r in replicas.iter_mut().filter(|r| live(r)) {
        let excess = r.index >= n;
        let stale_unserving =
            r.revision != rev && r.state != ReplicaState::Ready && !is_fallback(r);
        if excess && r.state == ReplicaState::Ready {
            set_state(r, ReplicaState::Draining, Some("scaled down".into()), now);
            look_at(drain);
        } else if excess || stale_unserving {
            let why = if excess { "scaled down" } else { "replaced by a new revision" };
            effects.push(stop(r, why));
            set_state(r, ReplicaState::Stopping, Some(why.into()), now);
        }
    }

    // 3. Fill and roll the slots, one at a time within maxSurge / maxUnavailable.
    let mut holdings = obs.holdings.to_vec();
    let mut ports_in_use = obs.ports_in_use.clone();
    for r in &replicas {
        holdings.push(holding(svc, &uid, r));
        if let Some((host, port)) = r.endpoint.as_deref().and_then(endpoints::host_port) {
            ports_in_use.entry(host).or_default().insert(port);
        }
    }
    let count = |rs: &[ReplicaStatus], f: &dyn Fn(&ReplicaStatus) -> bool| {
        rs.iter().filter(|r| f(r)).count() as i32
    };
    let mut total = count(&replicas, &|r| live(r) || r.state == ReplicaState::Draining);
    let mut available = count(&replicas, &|r| r.state == ReplicaState::Ready);
    let mut unschedulable = None;
    let mut preempt = Vec::new();
    for slot in 0..n {
        let in_slot = |r: &&ReplicaStatus| r.index == slot && live(r);
        let new = replicas.iter().filter(in_slot).find(|r| r.revision == rev).cloned();
        let olds = replicas.iter().filter(in_slot).filter(|r| r.revision != rev).count() as i32;
        match &new {
            Some(fresh) if fresh.state == ReplicaState::Ready && olds > 0 => {
                for r in replicas.iter_mut().filter(|r| r.index == slot && live(r)) {
                    if r.revision != rev {
                        set_state(r, ReplicaState::Draining, Some("replaced".into()), now);
                        available -= 1;
                        look_at(drain);
                    }
                }
                continue;
            }
            Some(_) => continue,
            None if blocked && (olds > 0 || fallback.is_none()) => continue,
            None => {}
        }
        // The revision this slot gets: the spec's, or the last good one while blocked.
        let (target_rev, model, serving) = match &fallback {
            Some(s) => (s.revision.clone(), &s.model, &s.serving),
            None => (rev.clone(), &spec.model, &spec.serving),
        };
        if total >= n + surge {
            // No room for another replica: make room by draining this slot's old replica if
            // enough others serve.
            if olds > 0 && available - olds >= n - unavailable {
                for r in replicas.iter_mut().filter(|r| r.index == slot && live(r)) {
                    set_state(r, ReplicaState::Draining, Some("rolling update".into()), now);
                    available -= 1;
                    look_at(drain);
                }
            }
            continue;
        }
        match place(svc, &uid, slot, &replicas, obs.nodes, &holdings, now) {
            Ok(placement) => {
                // Rank 0 serves the API (the only worker, or an expert-parallel group's leader).
                let rank0 = placement.workers.iter().min_by_key(|w| w.rank);
                let node = rank0.map(|w| w.node.clone()).unwrap_or_default();
                let host = obs.hosts.get(&node).cloned().unwrap_or_else(|| node.clone());
                let used = ports_in_use.entry(host.clone()).or_default();
                let Some(port) = (serving.port..=65535)
                    .filter_map(|p| u16::try_from(p).ok())
                    .find(|p| !used.contains(p))
                else {
                    unschedulable =
                        Some(format!("no free port from {} up on {host}", serving.port));
                    continue;
                };
                used.insert(port);
                status.launches += 1;
                let r = ReplicaStatus {
                    index: slot,
                    attempt: status.launches,
                    placement: placement.clone(),
                    state: ReplicaState::Starting,
                    ready: false,
                    endpoint: Some(endpoints::url(&host, port)),
                    revision: target_rev.clone(),
                    checkpoint: Some(checkpoint_of(model)),
                    launch_time: Some(Time(now)),
                    state_time: Some(Time(now)),
                    message: None,
                };
                holdings.push(holding(svc, &uid, &r));
                effects.push(ReplicaEffect::Launch {
                    index: slot,
                    attempt: r.attempt,
                    launch: ReplicaLaunch {
                        placement,
                        checkpoint: checkpoint_of(model),
                        served_name: model.served_name.clone().unwrap_or_else(|| svc.name_any()),
                        port,
                        max_batch_size: u32::try_from(serving.max_batch_size).unwrap_or(1),
                        default_max_tokens: u32::try_from(serving.max_new_tokens).unwrap_or(1),
                    },
                });
                look_at(startup);
                replicas.push(r);
                total += 1;
            }
            Err(message) => {
                // Below the replica count (not a surge of a rollout): lower-priority training
                // may be preempted, checkpoint-aware, through the scheduler.
                if total < n && preempt.is_empty() {
                    preempt = preemption_victims(svc, &uid, slot, obs.nodes, &holdings, now);
                }
                unschedulable = Some(message);
            }
        }
    }
    // Stops first: a replacement may take a failed replica's port on another GPU.
    effects.sort_by_key(|e| matches!(e, ReplicaEffect::Launch { .. }));
    replicas.sort_by_key(|r| (r.index, r.attempt));
    status.replicas = replicas;
    let found = Found { unschedulable, load_failure, requeue: next_look, now };
    let mut plan = summarize(svc, old, status, effects, events, found);
    plan.preempt = preempt;
    plan
}

/// Training jobs of lower priority whose preemption would let replica `slot` be placed (the
/// scheduler's cheapest choice; empty when preempting would not make it fit).
fn preemption_victims(
    svc: &InferenceService,
    uid: &str,
    slot: i32,
    nodes: &[GpuNode],
    holdings: &[Holding],
    now: Timestamp,
) -> Vec<String> {
    let request = replica_request(svc, uid, slot);
    let nodes: Vec<&GpuNode> = nodes.iter().collect();
    scheduling::schedule(&request, &[], &nodes, holdings, true, scheduling::unix(now)).preempt
}

/// What the replica pass found besides the replicas.
struct Found {
    unschedulable: Option<String>,
    load_failure: Option<String>,
    requeue: Duration,
    now: Timestamp,
}

/// Status fields and conditions from the replicas.
fn summarize(
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

fn holding(svc: &InferenceService, uid: &str, r: &ReplicaStatus) -> Holding {
    Holding {
        id: format!("{uid}#{}.{}", r.index, r.attempt),
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
fn place(
    svc: &InferenceService,
    uid: &str,
    slot: i32,
    replicas: &[ReplicaStatus],
    nodes: &[GpuNode],
    holdings: &[Holding],
    now: Timestamp,
) -> std::result::Result<Placement, String> {
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
    let request = replica_request(svc, uid, slot);
    let mut last = String::from("no GpuNodes");
    for tier in [other_rack.as_slice(), other_node.as_slice(), all.as_slice()] {
        if tier.is_empty() {
            continue;
        }
        match scheduling::place(&request, &[], tier, holdings, scheduling::unix(now)) {
            Ok(p) => return Ok(p),
            Err(u) => last = u.message,
        }
    }
    Err(format!("replica {slot}: {last}"))
}

/// What one replica asks of the scheduler.
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
    .spread(scheduling::spread(spec.scheduling.strategy))
    // A replica serves; it is never started on GPUs that may be taken back.
    .may_borrow(false);
    req.node_selector = spec.scheduling.node_selector.clone();
    req
}

/// The replicas `svc` wants and has no live replica for, as waiting requests for the scheduler:
/// training jobs placed meanwhile queue behind them by priority, so a job preempted for a
/// replica cannot take the freed GPUs back before the replica is placed. None for a failed
/// (invalid or blocked) service.
pub fn waiting_replicas(svc: &InferenceService) -> Vec<flotilla_scheduler::JobRequest> {
    let Some(uid) = svc.uid() else { return Vec::new() };
    let status = svc.status.as_ref();
    if svc.metadata.deletion_timestamp.is_some()
        || status.is_some_and(|s| s.phase == ServicePhase::Failed)
    {
        return Vec::new();
    }
    let replicas = status.map_or(&[][..], |s| s.replicas.as_slice());
    let arrival = svc.metadata.creation_timestamp.as_ref().map_or(0, |t| scheduling::unix(t.0));
    (0..svc.spec.replicas)
        .filter(|slot| !replicas.iter().any(|r| r.index == *slot && live(r)))
        .map(|slot| replica_request(svc, &uid, slot).arrival(arrival))
        .collect()
}

/// An invalid service: Valid=False, phase Failed, every running replica stopped.
fn invalid_plan(
    svc: &InferenceService,
    mut status: InferenceServiceStatus,
    invalid: crate::lifecycle::InvalidSpec,
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

fn key(svc: &InferenceService, r: &ReplicaStatus) -> Result<WorkloadKey> {
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    Ok(WorkloadKey {
        kind: KIND,
        namespace: svc.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        name: svc.name_any(),
        uid: replica_id(&uid, r.index, r.attempt),
        replica: Some(r.index),
    })
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
            let tx = if k.kind == KIND { &svc_tx } else { &jobs_tx };
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
    let ctx = &sctx.ctx;
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
            Finalizer::Apply(svc) => apply(&svc, &api, &sctx).await,
            Finalizer::Cleanup(svc) => cleanup(&svc, &sctx).await,
        }
    })
    .await;
    let action = super::finalized(action)?;
    ctx.succeeded(&object_key(svc));
    Ok(action)
}

/// Stop every replica of a deleted service and its readiness checks (its Service and
/// EndpointSlices go with it through their owner references).
async fn cleanup(svc: &InferenceService, sctx: &ServiceContext) -> Result<Action> {
    let ctx = &sctx.ctx;
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    ctx.booked.lock().await.retain(|key, _| !key.starts_with(&format!("{uid}#")));
    let me: ServiceRef = ObjectRef::from_obj(&DeserializeGuard(Ok(svc.clone())));
    sctx.prober.sync(&format!("{uid}/"), &me, &BTreeMap::new());
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        ctx.fleet
            .stop(&key(svc, r)?, r.attempt, "the InferenceService was deleted")
            .await
            .map_err(Error::Fleet)?;
    }
    Ok(Action::await_change())
}

fn reports(svc: &InferenceService, fleet: &dyn Fleet) -> Result<BTreeMap<String, AttemptReport>> {
    let mut out = BTreeMap::new();
    for r in svc.status.iter().flat_map(|s| &s.replicas) {
        let k = key(svc, r)?;
        out.insert(k.uid.clone(), fleet.report(&k, r.attempt));
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
    let holdings = scheduling::holdings(&jobs, &ctx.held_by_services(&booked), &uid);
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
    let probes = sctx.prober.verdicts(&format!("{uid}/"));
    let reports = reports(svc, ctx.fleet.as_ref())?;
    let ports = ports_of_others(ctx, &uid);
    let observed = Observed {
        reports: &reports,
        probes: &probes,
        nodes: &nodes,
        holdings: &holdings,
        hosts: &hosts,
        ports_in_use: &ports,
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
    booked.retain(|key, _| !key.starts_with(&format!("{uid}#")));
    for r in &p.status.replicas {
        booked.insert(format!("{uid}#{}.{}", r.index, r.attempt), r.placement.clone());
    }
    drop(booked);
    if !p.preempt.is_empty() {
        let me = format!("{} (InferenceService)", object_key(svc));
        let victims = super::training_job::victims_to_ask(&me, &p.preempt, &jobs);
        if let Err(e) =
            super::training_job::request_preemption(svc, &me, &victims, &jobs, ctx).await
        {
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
    sctx.prober.sync(&format!("{uid}/"), &me, &wanted);
    for effect in &p.effects {
        let result = match effect {
            ReplicaEffect::Launch { index, attempt, launch } => {
                let r = ReplicaStatus { index: *index, attempt: *attempt, ..Default::default() };
                ctx.fleet.launch_replica(&key(svc, &r)?, *attempt, launch).await
            }
            ReplicaEffect::Stop { index, attempt, reason } => {
                let r = ReplicaStatus { index: *index, attempt: *attempt, ..Default::default() };
                ctx.fleet.stop(&key(svc, &r)?, *attempt, reason).await
            }
        };
        if let Err(e) = result {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        // A failed launch shows up as an exited worker in the next report.
        return Err(Error::Fleet(failures.join("; ")));
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
    let selector = format!(
        "{}={},{}={}",
        endpoints::SERVICE_NAME_LABEL,
        svc.name_any(),
        endpoints::MANAGED_BY_LABEL,
        endpoints::MANAGED_BY
    );
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
    let key = match &guard.0 {
        Ok(svc) => object_key(svc),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    sctx.ctx.error_policy(KIND, &key, error)
}

#[cfg(test)]
#[path = "inference_service_tests.rs"]
mod tests;
