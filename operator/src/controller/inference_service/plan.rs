//! The pure middle of the `InferenceService` controller: from the service and what was observed
//! (agent reports, readiness verdicts, nodes, GPUs and ports held by others), the status to write
//! and the replicas to stop and launch.

use super::IDLE_REQUEUE;
use super::replicas::{
    checkpoint_of, elapsed, failure, holding, live, place, preemption_victims, replica_id,
    revision, set_state,
};
use super::status::{Found, conclude, invalid_plan};
use crate::crd::GpuNode;
use crate::crd::inference_service::{
    InferenceService, InferenceServiceStatus, ReplicaState, ReplicaStatus, StableRevision,
};
use crate::endpoints;
use crate::endpoints::Probe;
use crate::lifecycle::AttemptReport;
use crate::placement::Holding;
use crate::workers::ReplicaLaunch;
use flotilla_scheduler as sched;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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
    /// The scheduler's policy.
    pub policy: &'a sched::Policy,
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
    let rev = revision(spec);
    status.revision = rev.clone();
    if status.failed_revision.as_ref().is_some_and(|f| *f != rev) {
        status.failed_revision = None;
    }
    let mut p = Planner {
        svc,
        obs,
        uid: svc.uid().unwrap_or_default(),
        rev: rev.clone(),
        startup: SignedDuration::from_secs(i64::from(spec.rollout.startup_timeout_seconds)),
        drain: SignedDuration::from_secs(i64::from(spec.rollout.drain_seconds)),
        effects: Vec::new(),
        events: Vec::new(),
        load_failure: None,
        next_look: IDLE_REQUEUE,
    };

    // 1. What each replica is doing now.
    let mut replicas: Vec<ReplicaStatus> =
        std::mem::take(&mut status.replicas).into_iter().filter_map(|r| p.observe(r)).collect();
    if let Some(msg) = &p.load_failure {
        if status.failed_revision.as_deref() != Some(rev.as_str()) {
            p.events.push((true, "ModelLoadFailed", msg.clone()));
        }
        status.failed_revision = Some(rev.clone());
    }
    let blocked = status.failed_revision.as_deref() == Some(rev.as_str());
    // While the rollout is stopped, emptied slots are refilled with the last good revision.
    let fallback = status.stable.clone().filter(|s| blocked && s.revision != rev);

    // 2. Scale down, and drop old replicas that do not serve.
    p.trim(&mut replicas, fallback.as_ref());

    // 3. Fill and roll the slots, one at a time within maxSurge / maxUnavailable.
    let filled = p.fill(&mut replicas, &mut status.launches, fallback.as_ref(), blocked);

    // Stops first: a replacement may take a failed replica's port on another GPU.
    let Planner { mut effects, events, load_failure, next_look, .. } = p;
    effects.sort_by_key(|e| matches!(e, ReplicaEffect::Launch { .. }));
    replicas.sort_by_key(|r| (r.index, r.attempt));
    status.replicas = replicas;
    let found =
        Found { unschedulable: filled.unschedulable, load_failure, requeue: next_look, now };
    let mut plan = conclude(svc, old, status, effects, events, found);
    plan.preempt = filled.preempt;
    plan
}

/// One plan in the making: what it has decided so far.
struct Planner<'a> {
    svc: &'a InferenceService,
    obs: &'a Observed<'a>,
    uid: String,
    /// The spec's revision.
    rev: String,
    /// How long a replica may take to answer its first readiness check.
    startup: SignedDuration,
    /// How long a replica leaving the endpoints keeps serving requests in flight.
    drain: SignedDuration,
    effects: Vec<ReplicaEffect>,
    events: Vec<(bool, &'static str, String)>,
    /// Why the spec's revision does not load, when a replica of it failed before serving.
    load_failure: Option<String>,
    next_look: Duration,
}

/// What filling the slots left open.
struct Filled {
    /// Why a slot could not be placed.
    unschedulable: Option<String>,
    /// UIDs of lower-priority training jobs to preempt for a missing replica.
    preempt: Vec<String>,
}

impl Planner<'_> {
    /// Look again after `after` (at least 200 ms), if nothing sooner is due.
    fn look_at(&mut self, after: SignedDuration) {
        let d = Duration::try_from(after).unwrap_or(Duration::ZERO).max(Duration::from_millis(200));
        self.next_look = self.next_look.min(d);
    }

    fn stop(&mut self, r: &ReplicaStatus, reason: &str) {
        self.effects.push(ReplicaEffect::Stop {
            index: r.index,
            attempt: r.attempt,
            reason: reason.to_string(),
        });
    }

    /// Step 1 for one replica: fold its report and readiness verdict into its state; `None`
    /// once it is gone.
    fn observe(&mut self, mut r: ReplicaStatus) -> Option<ReplicaStatus> {
        let (now, rev) = (self.obs.now, self.rev.clone());
        let id = replica_id(&self.uid, r.index, r.attempt);
        let report = self
            .obs
            .reports
            .get(&id)
            .cloned()
            .unwrap_or(AttemptReport { all_stopped: true, ..Default::default() });
        if r.state == ReplicaState::Stopping {
            if report.all_stopped {
                return None;
            }
            self.stop(&r, r.message.as_deref().unwrap_or("stopping"));
            self.look_at(SignedDuration::from_secs(2));
            return Some(r);
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
                self.load_failure = Some(format!(
                    "replica {} (launch {}) of revision {rev} ({}) failed before it answered: {why}",
                    r.index,
                    r.attempt,
                    r.checkpoint.as_deref().unwrap_or("?")
                ));
            }
            if r.state != ReplicaState::Draining {
                self.events.push((true, "ReplicaFailed", format!("replica {}: {why}", r.index)));
            }
            self.stop(&r, &why);
            set_state(&mut r, ReplicaState::Stopping, Some(why), now);
            return Some(r);
        }
        if r.state == ReplicaState::Draining {
            let left = self.drain - elapsed(r.state_time.as_ref(), now);
            if left <= SignedDuration::ZERO {
                self.stop(&r, "drained");
                set_state(&mut r, ReplicaState::Stopping, Some("drained".into()), now);
            } else {
                self.look_at(left);
            }
            return Some(r);
        }
        let probe = self.obs.probes.get(&id).cloned().unwrap_or_default();
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
            let left = self.startup - elapsed(since, now);
            if left <= SignedDuration::ZERO {
                let why = format!(
                    "no answered readiness check within {}s{}",
                    self.svc.spec.rollout.startup_timeout_seconds,
                    probe.message.map(|m| format!(" (last: {m})")).unwrap_or_default()
                );
                if r.state == ReplicaState::Starting && r.revision == rev {
                    self.load_failure = Some(format!(
                        "replica {} (launch {}) of revision {rev} ({}): {why}",
                        r.index,
                        r.attempt,
                        r.checkpoint.as_deref().unwrap_or("?")
                    ));
                }
                self.events.push((true, "ReplicaFailed", format!("replica {}: {why}", r.index)));
                self.stop(&r, &why);
                set_state(&mut r, ReplicaState::Stopping, Some(why), now);
            } else {
                self.look_at(left);
            }
        }
        Some(r)
    }

    /// Step 2: scale down, and drop old replicas that do not serve (they would never count),
    /// except refills of the last good revision while the rollout is stopped.
    fn trim(&mut self, replicas: &mut [ReplicaStatus], fallback: Option<&StableRevision>) {
        let (n, now) = (self.svc.spec.replicas, self.obs.now);
        let is_fallback = |r: &ReplicaStatus| fallback.is_some_and(|s| s.revision == r.revision);
        for r in replicas.iter_mut().filter(|r| live(r)) {
            let excess = r.index >= n;
            let stale_unserving =
                r.revision != self.rev && r.state != ReplicaState::Ready && !is_fallback(r);
            if excess && r.state == ReplicaState::Ready {
                set_state(r, ReplicaState::Draining, Some("scaled down".into()), now);
                self.look_at(self.drain);
            } else if excess || stale_unserving {
                let why = if excess { "scaled down" } else { "replaced by a new revision" };
                self.stop(r, why);
                set_state(r, ReplicaState::Stopping, Some(why.into()), now);
            }
        }
    }

    /// Step 3: fill and roll the slots, one at a time within maxSurge / maxUnavailable.
    fn fill(
        &mut self,
        replicas: &mut Vec<ReplicaStatus>,
        launches: &mut i32,
        fallback: Option<&StableRevision>,
        blocked: bool,
    ) -> Filled {
        let (svc, obs, now) = (self.svc, self.obs, self.obs.now);
        let spec = &svc.spec;
        let (n, surge, unavailable) =
            (spec.replicas, spec.rollout.max_surge, spec.rollout.max_unavailable);
        let rev = self.rev.clone();
        let mut holdings = obs.holdings.to_vec();
        let mut ports_in_use = obs.ports_in_use.clone();
        for r in replicas.iter() {
            holdings.push(holding(svc, &self.uid, r));
            if let Some((host, port)) = r.endpoint.as_deref().and_then(endpoints::host_port) {
                ports_in_use.entry(host).or_default().insert(port);
            }
        }
        let count = |rs: &[ReplicaStatus], f: &dyn Fn(&ReplicaStatus) -> bool| {
            rs.iter().filter(|r| f(r)).count() as i32
        };
        let mut total = count(replicas, &|r| live(r) || r.state == ReplicaState::Draining);
        let mut available = count(replicas, &|r| r.state == ReplicaState::Ready);
        let mut filled = Filled { unschedulable: None, preempt: Vec::new() };
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
                            self.look_at(self.drain);
                        }
                    }
                    continue;
                }
                Some(_) => continue,
                None if blocked && (olds > 0 || fallback.is_none()) => continue,
                None => {}
            }
            // The revision this slot gets: the spec's, or the last good one while blocked.
            let (target_rev, model, serving) = match fallback {
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
                        self.look_at(self.drain);
                    }
                }
                continue;
            }
            let placement = match place(svc, &self.uid, slot, replicas, obs, &holdings) {
                Ok(placement) => placement,
                Err(message) => {
                    // Below the replica count (not a surge of a rollout): lower-priority
                    // training may be preempted, checkpoint-aware, through the scheduler.
                    if total < n && filled.preempt.is_empty() {
                        filled.preempt = preemption_victims(svc, &self.uid, slot, obs, &holdings);
                    }
                    filled.unschedulable = Some(message);
                    continue;
                }
            };
            // Rank 0 serves the API (the only worker, or an expert-parallel group's leader).
            let rank0 = placement.workers.iter().min_by_key(|w| w.rank);
            let node = rank0.map(|w| w.node.clone()).unwrap_or_default();
            let host = obs.hosts.get(&node).cloned().unwrap_or_else(|| node.clone());
            let used = ports_in_use.entry(host.clone()).or_default();
            let Some(port) = (serving.port..=65535)
                .filter_map(|p| u16::try_from(p).ok())
                .find(|p| !used.contains(p))
            else {
                filled.unschedulable =
                    Some(format!("no free port from {} up on {host}", serving.port));
                continue;
            };
            used.insert(port);
            *launches += 1;
            let r = ReplicaStatus {
                index: slot,
                attempt: *launches,
                placement: placement.clone(),
                state: ReplicaState::Starting,
                ready: false,
                endpoint: Some(endpoints::url(&host, port)),
                revision: target_rev,
                checkpoint: Some(checkpoint_of(model)),
                launch_time: Some(Time(now)),
                state_time: Some(Time(now)),
                message: None,
            };
            holdings.push(holding(svc, &self.uid, &r));
            self.effects.push(ReplicaEffect::Launch {
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
            self.look_at(self.startup);
            replicas.push(r);
            total += 1;
        }
        filled
    }
}
