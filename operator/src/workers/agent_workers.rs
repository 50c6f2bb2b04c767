//! [`AgentWorkers`]: the [`Workers`] the controllers use, over the agents' gRPC server.
//!
//! `launch` sends each node's agent its workers (built by [`super::launch`] from the placement
//! the controller wrote to status first); `stop` asks every node of the attempt to stop them;
//! `report` folds the agents' worker events ([`super::fold`]) and their health view into the
//! [`AttemptReport`] the lifecycle decides on ([`super::report`]).
//!
//! Safety rule 1 (never two attempts at once): an attempt counts as stopped only when every
//! worker known to this process has exited or its node is fenced (quiet on its stream and its
//! Lease past the fence timeout and margin, or its agent confirmed the operator's verdict:
//! [`crate::agents::liveness`]), and — unless this process launched the attempt itself — only
//! once every node that may run workers is accounted for (re-registered, listing its workers, or
//! fenced).

use super::fold::{AttemptId, AttemptSeen, Folded, RankSeen, RankState, fold};
use super::launch::{
    FAILED_TO_START_CODE, WorkerLaunchArgs, launch_specs, master_addr, replica_specs,
};
use super::pace;
use super::report::{attempt_report, stale_attempts};
use super::{Launch, ProgressPolicy, Workers};
use crate::agents::liveness::quiet_period;
use crate::agents::{AgentServer, GpuAction, NodeRecord, WorkerLaunchSpec};
use crate::ids::WorkloadKey;
use crate::lifecycle::AttemptReport;
use futures::future::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an agent may take to answer one command.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Progress alone wakes a job's controller at most this often.
const PROGRESS_WAKE_INTERVAL: Duration = Duration::from_secs(2);

/// A stale attempt's workers are asked to stop again after this long.
const STALE_STOP_INTERVAL: Duration = Duration::from_secs(10);

/// A stop of an attempt is sent again at most this often (agents ignore repeats for workers
/// already stopping, so this only saves messages).
const STOP_RESEND_INTERVAL: Duration = Duration::from_secs(5);

/// The agents, as the controllers see them. Cheap to clone.
#[derive(Clone)]
pub struct AgentWorkers(Arc<Inner>);

struct Inner {
    server: AgentServer,
    args: WorkerLaunchArgs,
    fence_timeout: Duration,
    attempts: Mutex<HashMap<AttemptId, AttemptSeen>>,
    /// The workloads launched or stopped here, by their id on the agents, to announce changes.
    keys: Mutex<HashMap<String, WorkloadKey>>,
    /// Stale attempts this process asked agents to stop, and when.
    stale_stops: Mutex<HashMap<AttemptId, Instant>>,
    /// When this process last asked agents to stop each attempt (the state machine asks again
    /// on every look while workers of an attempt that is over still run).
    stops_sent: Mutex<HashMap<AttemptId, Instant>>,
    /// When progress alone last woke each workload, by its id on the agents.
    progress_woken: Mutex<HashMap<String, Instant>>,
    /// When this process last asked an agent to mark each GPU (by UUID) for slow steps.
    suspects_sent: Mutex<HashMap<String, Instant>>,
    changed: tokio::sync::mpsc::UnboundedSender<WorkloadKey>,
    changes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<WorkloadKey>>>,
}

impl std::fmt::Debug for AgentWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentWorkers").field("args", &self.0.args).finish()
    }
}

/// True when `key` was sent within [`STOP_RESEND_INTERVAL`] before `now`; otherwise records
/// it as sent now (agents ignore repeats of stops and suspicions; this only saves messages).
fn sent_lately<K: std::hash::Hash + Eq>(
    sent: &Mutex<HashMap<K, Instant>>,
    key: K,
    now: Instant,
) -> bool {
    let mut sent = lock(sent);
    let recent = sent.get(&key).is_some_and(|t| now.duration_since(*t) < STOP_RESEND_INTERVAL);
    if !recent {
        sent.insert(key, now);
    }
    recent
}

/// Lock a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Inner ===

impl Inner {
    /// The UUID of GPU `index` on `node`, as its agent reported it.
    fn gpu_uuid(&self, node: &str, index: i32) -> Option<String> {
        let rec = self.server.registry().node(node)?;
        rec.gpus.iter().find(|g| i64::from(g.index) == i64::from(index)).map(|g| g.uuid.clone())
    }

    /// Remember that this process launches `specs` for attempt `id`: each rank starts out
    /// Launching, and the attempt's report is complete without waiting for the fence timeout.
    fn record_launch(&self, id: &AttemptId, specs: &[(String, WorkerLaunchSpec)]) {
        let mut attempts = lock(&self.attempts);
        let seen = attempts.entry(id.clone()).or_default();
        seen.launched_here = true;
        seen.watched_since.get_or_insert_with(Instant::now);
        let registry = self.server.registry();
        for (node, spec) in specs {
            let process = registry.node(node).map(|n| n.process_id).unwrap_or_default();
            seen.ranks.entry(spec.rank).or_insert(RankSeen {
                node: node.clone(),
                gpu_uuids: spec.gpu_uuids.clone(),
                state: RankState::Launching,
                process,
                pace: None,
            });
        }
    }

    /// Tell the controllers to look at the workloads whose id on the agents `pick` selects.
    fn announce(&self, pick: impl Fn(&str) -> bool) {
        let keys = lock(&self.keys);
        for (id, key) in keys.iter() {
            if pick(id) {
                let _ = self.changed.send(key.clone());
            }
        }
    }

    /// Remember `key`, so changes to its workers are announced.
    fn remember(&self, key: &WorkloadKey) {
        lock(&self.keys).insert(key.on_agents(), key.clone());
    }

    /// Fold one worker event; true when the workload's controller should look at it now.
    fn fold_report(&self, report: &crate::agents::WorkerReport, now: Instant) -> bool {
        match fold(&mut lock(&self.attempts), report, now) {
            Folded::Nothing => false,
            Folded::State => true,
            Folded::Progress => {
                let mut woken = lock(&self.progress_woken);
                let last = woken.get(&report.job_uid).copied();
                let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_WAKE_INTERVAL);
                if due {
                    woken.insert(report.job_uid.clone(), now);
                }
                due
            }
        }
    }

    /// The ids on the agents of attempts with a worker not known to have exited.
    fn live_attempts(&self) -> Vec<String> {
        lock(&self.attempts)
            .iter()
            .filter(|(_, seen)| {
                seen.ranks.values().any(|r| !matches!(r.state, RankState::Exited { .. }))
            })
            .map(|((id, _), _)| id.clone())
            .collect()
    }
}

// === impl AgentWorkers ===

impl AgentWorkers {
    /// The workers behind `server`, folding its worker reports from now on (background tasks
    /// that end when the last clone is dropped).
    pub fn start(server: AgentServer, args: WorkerLaunchArgs, fence_timeout: Duration) -> Self {
        let (changed, changes) = tokio::sync::mpsc::unbounded_channel();
        let workers = AgentWorkers(Arc::new(Inner {
            server,
            args,
            fence_timeout,
            attempts: Mutex::default(),
            keys: Mutex::default(),
            progress_woken: Mutex::default(),
            suspects_sent: Mutex::default(),
            stale_stops: Mutex::default(),
            stops_sent: Mutex::default(),
            changed,
            changes: Mutex::new(Some(changes)),
        }));
        let mut reports = workers.0.server.worker_reports();
        let folder = Arc::downgrade(&workers.0);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let report = match reports.recv().await {
                    Ok(r) => r,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "worker reports came faster than folded");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let Some(inner) = folder.upgrade() else { return };
                if inner.fold_report(&report, Instant::now()) {
                    inner.announce(|id| id == report.job_uid);
                }
            }
        });
        // Health, liveness and membership changes may fault or free a running attempt.
        let mut health = workers.0.server.registry().changed();
        let watcher = Arc::downgrade(&workers.0);
        tokio::spawn(async move {
            while health.changed().await.is_ok() {
                let Some(inner) = watcher.upgrade() else { return };
                let live = inner.live_attempts();
                inner.announce(|id| live.iter().any(|l| l == id));
            }
        });
        // GPUs marked for slow steps get work again only after validation passes.
        let watched = Arc::downgrade(&workers.0);
        tokio::spawn(pace::validate_idle_suspects(workers.0.server.clone(), move || {
            let inner = watched.upgrade()?;
            let busy = lock(&inner.attempts)
                .values()
                .flat_map(|a| a.ranks.values())
                .filter(|r| !matches!(r.state, RankState::Exited { .. }))
                .flat_map(|r| r.gpu_uuids.iter().cloned())
                .collect();
            Some(busy)
        }));
        workers
    }

    /// The launch specs of `attempt`, one per worker, by node.
    fn specs(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        launch: Launch<'_>,
    ) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
        let inner = &self.0;
        let uuid_of = |node: &str, index: i32| inner.gpu_uuid(node, index);
        let registry = inner.server.registry();
        let reported = |node: &str| registry.node(node).and_then(|r| r.address);
        match launch {
            Launch::Job(job) => {
                let placement = job
                    .status
                    .as_ref()
                    .and_then(|s| s.attempt.as_ref())
                    .filter(|a| a.number == attempt)
                    .map(|a| &a.placement)
                    .ok_or_else(|| {
                        format!(
                            "TrainingJob {}/{}: status holds no attempt {attempt}; not launching",
                            key.namespace, key.name
                        )
                    })?;
                let master_addr = master_addr(placement, reported, &inner.args);
                launch_specs(job, attempt, &uuid_of, &master_addr, &inner.args)
            }
            Launch::Replica(replica) => {
                let master_addr = if replica.placement.workers.len() > 1 {
                    master_addr(&replica.placement, reported, &inner.args)
                } else {
                    "127.0.0.1".into()
                };
                let id = key.on_agents();
                replica_specs(&id, attempt, replica, &uuid_of, &master_addr, &inner.args)
            }
        }
    }

    /// Send every worker of `attempt` to its agent. A rank whose launch fails counts as
    /// exited (code [`FAILED_TO_START_CODE`]) unless an event already said otherwise.
    async fn send_launches(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        specs: Vec<(String, WorkerLaunchSpec)>,
    ) -> Result<(), String> {
        let inner = &self.0;
        let what = format!("{} {}/{} ({})", key.kind(), key.namespace, key.name, key.on_agents());
        let id: AttemptId = (key.on_agents(), attempt as u64);
        inner.record_launch(&id, &specs);
        let sent = futures::future::join_all(specs.iter().map(|(node, spec)| async move {
            (spec.rank, inner.server.launch_worker(node, spec, COMMAND_TIMEOUT).await)
        }))
        .await;
        let mut failures = Vec::new();
        let mut attempts = lock(&inner.attempts);
        for (rank, result) in sent {
            if let Err(e) = result {
                tracing::warn!(workload = %what, attempt, rank, error = %e, "worker launch failed");
                if let Some(r) = attempts.get_mut(&id).and_then(|s| s.ranks.get_mut(&rank))
                    && r.state == RankState::Launching
                {
                    r.state = RankState::Exited { code: Some(FAILED_TO_START_CODE), signal: None };
                }
                failures.push(format!("rank {rank}: {e}"));
            }
        }
        if failures.is_empty() {
            tracing::info!(workload = %what, attempt, workers = specs.len(), "workers launched");
            Ok(())
        } else {
            Err(format!("{what} attempt {attempt}: {}", failures.join("; ")))
        }
    }

    /// Stop (in the background) every attempt of `key` other than `current` that an agent
    /// listed at registration, at most once per [`STALE_STOP_INTERVAL`] per attempt.
    fn stop_stale(&self, key: &WorkloadKey, current: i32, nodes: &HashMap<String, NodeRecord>) {
        let stale = stale_attempts(&key.on_agents(), current, nodes);
        if stale.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let now = Instant::now();
        let mut stops = lock(&self.0.stale_stops);
        for attempt in stale {
            let id = (key.on_agents(), attempt);
            if stops.get(&id).is_some_and(|t| now.duration_since(*t) < STALE_STOP_INTERVAL) {
                continue;
            }
            stops.insert(id, now);
            let (workers, key) = (self.clone(), key.clone());
            tracing::warn!(job = %key.name, attempt, current, "stopping workers of a stale attempt");
            runtime.spawn(async move {
                let reason = format!("attempt {attempt} is stale; the job runs attempt {current}");
                if let Err(e) = workers.stop_attempt(&key, attempt as i32, &reason).await {
                    tracing::warn!(job = %key.name, attempt, error = %e, "stopping a stale attempt failed");
                }
            });
        }
    }

    async fn stop_attempt(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> Result<(), String> {
        let inner = &self.0;
        let id: AttemptId = (key.on_agents(), attempt as u64);
        // Every node of the attempt this process knows of, else every node (a restarted
        // operator may not know where an attempt ran; stopping is idempotent).
        let mut nodes: Vec<String> = lock(&inner.attempts)
            .get(&id)
            .map(|s| s.ranks.values().map(|r| r.node.clone()).collect())
            .unwrap_or_default();
        if nodes.is_empty() {
            nodes = inner.server.registry().nodes().into_iter().map(|n| n.node).collect();
        }
        nodes.sort();
        nodes.dedup();
        let grace = Duration::from_secs(inner.args.worker_stop_grace_seconds);
        let results = futures::future::join_all(nodes.iter().map(|node| {
            let id = &id.0;
            async move {
                let connected = inner.server.registry().node(node).is_some_and(|n| n.connected);
                if !connected {
                    // Its workers stop on the verdict on its Lease, or by its own fence
                    // (crate::agents::liveness).
                    return Ok(());
                }
                inner
                    .server
                    .stop_workers(node, id, attempt as u64, grace, reason, COMMAND_TIMEOUT)
                    .await
                    .map(drop)
                    .map_err(|e| format!("node {node}: {e}"))
            }
        }))
        .await;
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!("stopping attempt {attempt} of {}: {}", key.name, failures.join("; ")))
        }
    }
}

impl Workers for AgentWorkers {
    fn report(&self, key: &WorkloadKey, attempt: i32) -> AttemptReport {
        let inner = &self.0;
        // A workload this operator never launched nor stopped (a new leader adopting running
        // workers) must still be woken by its workers' events and progress.
        inner.remember(key);
        let id: AttemptId = (key.on_agents(), attempt as u64);
        let mut seen = lock(&inner.attempts).get(&id).cloned().unwrap_or_default();
        // Only the nodes this attempt's ranks were seen on and those whose agents list workers
        // of the workload: a fleet of thousands of nodes is not copied for every report.
        let ranks_on: HashSet<&str> = seen.ranks.values().map(|r| r.node.as_str()).collect();
        let nodes: HashMap<String, NodeRecord> = inner
            .server
            .registry()
            .nodes_where(|n| {
                ranks_on.contains(n.node.as_str()) || n.workers.iter().any(|w| w.job_uid == id.0)
            })
            .into_iter()
            .map(|n| (n.node.clone(), n))
            .collect();
        // Workers of other attempts that agents listed when they registered (left over from
        // before an operator restart) must not train beside the current attempt.
        self.stop_stale(key, attempt, &nodes);
        // Workers agents listed when they registered (adoption after an operator restart).
        for rec in nodes.values() {
            for w in rec.workers.iter().filter(|w| w.job_uid == id.0 && w.attempt == id.1) {
                seen.ranks.entry(w.rank).or_insert(RankSeen {
                    node: rec.node.clone(),
                    gpu_uuids: w.gpu_uuids.clone(),
                    state: RankState::Running,
                    process: rec.process_id.clone(),
                    pace: None,
                });
            }
        }
        let registry = inner.server.registry();
        let quiet = quiet_period(inner.fence_timeout);
        let complete = seen.launched_here || registry.all_accounted(quiet);
        let fenced: HashSet<String> = seen
            .ranks
            .values()
            .map(|r| r.node.as_str())
            .filter(|n| registry.fenced(n, quiet))
            .map(str::to_owned)
            .collect();
        let mut report =
            attempt_report(&seen.ranks, complete, &nodes, &fenced, inner.fence_timeout);
        report.progress = seen.progress;
        report
    }

    fn judge_progress(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        policy: &ProgressPolicy,
        report: &mut AttemptReport,
    ) {
        let id: AttemptId = (key.on_agents(), attempt as u64);
        let Some(seen) = lock(&self.0.attempts).get(&id).cloned() else { return };
        let registry = self.0.server.registry();
        pace::judge(&seen, registry, policy, report);
    }

    fn suspect_gpu<'a>(
        &'a self,
        node: &'a str,
        gpu_uuid: &'a str,
        evidence: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        let now = Instant::now();
        let recent = sent_lately(&self.0.suspects_sent, gpu_uuid.to_owned(), now);
        Box::pin(async move {
            if recent {
                return Ok(());
            }
            let action = GpuAction::Suspect(evidence.to_owned());
            self.0.server.gpu_command(node, gpu_uuid, action, COMMAND_TIMEOUT).await.map(drop)
        })
    }

    fn launch<'a>(
        &'a self,
        key: &'a WorkloadKey,
        attempt: i32,
        launch: Launch<'a>,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.0.remember(key);
        let specs = self.specs(key, attempt, launch);
        Box::pin(async move { self.send_launches(key, attempt, specs?).await })
    }

    fn stop(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), String>> {
        let (key, reason) = (key.clone(), reason.to_string());
        self.0.remember(&key);
        let now = Instant::now();
        let id: AttemptId = (key.on_agents(), attempt as u64);
        let repeat = sent_lately(&self.0.stops_sent, id, now);
        Box::pin(async move {
            if repeat {
                return Ok(());
            }
            self.stop_attempt(&key, attempt, &reason).await
        })
    }

    fn changes(&self) -> Option<futures::stream::BoxStream<'static, WorkloadKey>> {
        let rx = lock(&self.0.changes).take()?;
        Some(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
    }
}
