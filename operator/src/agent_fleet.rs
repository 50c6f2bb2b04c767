//! [`AgentFleet`]: the [`Fleet`] the controllers use, over the agents' gRPC server.
//!
//! `launch` reads the attempt's placement from the job's status (written before any launch) and
//! sends each node's agent its workers; `stop` asks every node of the attempt to stop them;
//! `report` folds the agents' worker events (started, progress, exited) and their health view
//! into the [`AttemptReport`] the job lifecycle decides on.
//!
//! Safety rule 1 (never two attempts at once): an attempt counts as stopped only when every
//! worker known to this process has exited or its agent has been silent past the fence timeout,
//! and — unless this process launched the attempt itself — only once the process has run for a
//! fence timeout, by when every agent has either re-registered (listing its workers) or killed
//! its workers on its own.

use crate::agents::{AgentServer, GpuHealth, NodeRecord, WorkerLaunchSpec, WorkerReport};
use crate::crd::{GpuNode, Progress, TrainingJob};
use crate::fleet::{Fleet, ReplicaLaunch, WorkloadKey};
use crate::lifecycle::{AttemptReport, HardwareFault, WorkerExit};
use futures::future::BoxFuture;
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The exit code recorded for a worker its agent could not start (as a shell's "not found").
pub const FAILED_TO_START_CODE: i32 = 127;
/// Rendezvous ports are `--master-port-base` plus an offset below this, from the job and attempt.
const MASTER_PORT_SPAN: u32 = 1000;
/// How long an agent may take to answer one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// How the operator launches workers through agents.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerLaunchArgs {
    /// The `flotilla-worker` executable on the nodes (a path or a name on the agent's PATH),
    /// for jobs that use the built-in engine.
    #[arg(long, env = "FLOTILLA_WORKER_BINARY", default_value = "flotilla-worker")]
    pub worker_binary: String,
    /// Checkpoints of jobs without `spec.checkpoint.path` go to `<root>/<namespace>/<name>-<uid>`.
    #[arg(long, env = "FLOTILLA_CHECKPOINT_ROOT", default_value = "/var/lib/flotilla/checkpoints")]
    pub checkpoint_root: PathBuf,
    /// Lowest rendezvous port (MASTER_PORT); each job and attempt gets one of the next 1000.
    #[arg(long, env = "FLOTILLA_MASTER_PORT_BASE", default_value_t = 29500)]
    pub master_port_base: u32,
    /// MASTER_ADDR when rank 0's `GpuNode` reports no address (127.0.0.1 for a one-host demo),
    /// and the address of service replicas' endpoints on such nodes; without it the node's
    /// name is used.
    #[arg(long, env = "FLOTILLA_WORKER_MASTER_ADDR")]
    pub worker_master_addr: Option<String>,
    /// Seconds a stopped worker gets between SIGTERM and SIGKILL.
    #[arg(long, env = "FLOTILLA_WORKER_STOP_GRACE_SECONDS", default_value_t = 30)]
    pub worker_stop_grace_seconds: u64,
}

/// What the operator knows of one worker of an attempt.
#[derive(Clone, Debug, PartialEq)]
struct RankSeen {
    node: String,
    gpu_uuids: Vec<String>,
    state: RankState,
    /// The instance id of the node's agent that runs (or was asked to run) the worker; empty
    /// when unknown. A different agent instance that does not list the worker means the agent
    /// restarted, and the worker died with it.
    instance: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RankState {
    /// A launch was sent; no event yet.
    Launching,
    /// Started (or reported progress, or listed by its agent at registration).
    Running,
    /// Exited, or could not be started.
    Exited { code: Option<i32>, signal: Option<i32> },
}

/// What the operator knows of one attempt.
#[derive(Clone, Debug, Default)]
struct AttemptSeen {
    /// This process sent every launch of the attempt, so it knows every worker.
    launched_here: bool,
    ranks: BTreeMap<u32, RankSeen>,
    /// The newest training progress reported for the attempt (the highest step; only rank 0
    /// reports with the built-in engine).
    progress: Option<Progress>,
    /// When and at which step the first progress of the attempt came, for the ETA.
    progress_origin: Option<(Instant, i64)>,
}

/// What one worker event changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Folded {
    /// Nothing new.
    Nothing,
    /// Only the attempt's training progress.
    Progress,
    /// A worker's state.
    State,
}

/// A stale attempt's workers are asked to stop again after this long.
const STALE_STOP_INTERVAL: Duration = Duration::from_secs(10);

/// A stop of an attempt is sent again at most this often (agents ignore repeats for workers
/// already stopping, so this only saves messages).
const STOP_RESEND_INTERVAL: Duration = Duration::from_secs(5);

/// Attempts of the job `uid` other than `current` whose workers agents listed as running.
fn stale_attempts(uid: &str, current: i32, nodes: &HashMap<String, NodeRecord>) -> Vec<u64> {
    let mut stale: Vec<u64> = nodes
        .values()
        .flat_map(|n| &n.workers)
        .filter(|w| w.job_uid == uid && w.attempt != current as u64)
        .map(|w| w.attempt)
        .collect();
    stale.sort_unstable();
    stale.dedup();
    stale
}

/// Progress alone wakes a job's controller at most this often.
const PROGRESS_WAKE_INTERVAL: Duration = Duration::from_secs(2);

type AttemptId = (String, u64);

/// The agents, as the controllers see them. Cheap to clone.
#[derive(Clone)]
pub struct AgentFleet(Arc<Inner>);

struct Inner {
    server: AgentServer,
    client: Client,
    args: WorkerLaunchArgs,
    fence_timeout: Duration,
    started: Instant,
    attempts: Mutex<HashMap<AttemptId, AttemptSeen>>,
    /// The workloads launched or stopped through this fleet, by UID, to announce changes.
    keys: Mutex<HashMap<String, WorkloadKey>>,
    /// Stale attempts this process asked agents to stop, and when.
    stale_stops: Mutex<HashMap<AttemptId, Instant>>,
    /// When this process last asked agents to stop each attempt (the state machine asks again
    /// on every look while workers of an attempt that is over still run).
    stops_sent: Mutex<HashMap<AttemptId, Instant>>,
    /// When progress alone last woke each workload, by UID.
    progress_woken: Mutex<HashMap<String, Instant>>,
    changed: tokio::sync::mpsc::UnboundedSender<WorkloadKey>,
    changes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<WorkloadKey>>>,
}

impl std::fmt::Debug for AgentFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentFleet").field("args", &self.0.args).finish()
    }
}

// === impl AgentFleet ===

impl Inner {
    /// The UUID of GPU `index` on `node`, as its agent reported it.
    fn gpu_uuid(&self, node: &str, index: i32) -> Option<String> {
        let rec = self.server.fleet().node(node)?;
        rec.gpus.iter().find(|g| i64::from(g.index) == i64::from(index)).map(|g| g.uuid.clone())
    }

    /// Remember that this process launches `specs` for attempt `id`: each rank starts out
    /// Launching, and the attempt's report is complete without waiting for the fence timeout.
    fn record_launch(&self, id: &AttemptId, specs: &[(String, WorkerLaunchSpec)]) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let seen = attempts.entry(id.clone()).or_default();
        seen.launched_here = true;
        let fleet = self.server.fleet();
        for (node, spec) in specs {
            let instance = fleet.node(node).map(|n| n.instance_id).unwrap_or_default();
            seen.ranks.entry(spec.rank).or_insert(RankSeen {
                node: node.clone(),
                gpu_uuids: spec.gpu_uuids.clone(),
                state: RankState::Launching,
                instance,
            });
        }
    }

    /// Tell the controllers to look at the workloads whose UID `pick` selects.
    fn announce(&self, pick: impl Fn(&str) -> bool) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for (uid, key) in keys.iter() {
            if pick(uid) {
                let _ = self.changed.send(key.clone());
            }
        }
    }
}

impl AgentFleet {
    /// A fleet over `server`, folding its worker reports from now on (a background task that
    /// ends when the server is dropped).
    pub fn start(
        server: AgentServer,
        client: Client,
        args: WorkerLaunchArgs,
        fence_timeout: Duration,
    ) -> Self {
        let (changed, changes) = tokio::sync::mpsc::unbounded_channel();
        let fleet = AgentFleet(Arc::new(Inner {
            server,
            client,
            args,
            fence_timeout,
            started: Instant::now(),
            attempts: Mutex::default(),
            keys: Mutex::default(),
            progress_woken: Mutex::default(),
            stale_stops: Mutex::default(),
            stops_sent: Mutex::default(),
            changed,
            changes: Mutex::new(Some(changes)),
        }));
        let mut reports = fleet.0.server.worker_reports();
        let folder = Arc::downgrade(&fleet.0);
        tokio::spawn(async move {
            loop {
                let report = match reports.recv().await {
                    Ok(r) => r,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "worker reports came faster than folded");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = folder.upgrade() else { return };
                let now = Instant::now();
                let folded = fold(
                    &mut inner.attempts.lock().unwrap_or_else(|e| e.into_inner()),
                    &report,
                    now,
                );
                let wake = match folded {
                    Folded::Nothing => false,
                    Folded::State => true,
                    Folded::Progress => {
                        let mut woken =
                            inner.progress_woken.lock().unwrap_or_else(|e| e.into_inner());
                        let last = woken.get(&report.job_uid).copied();
                        let due =
                            last.is_none_or(|t| now.duration_since(t) >= PROGRESS_WAKE_INTERVAL);
                        if due {
                            woken.insert(report.job_uid.clone(), now);
                        }
                        due
                    }
                };
                if wake {
                    inner.announce(|uid| uid == report.job_uid);
                }
            }
        });
        // Health, liveness and membership changes may fault or free a running attempt.
        let mut health = fleet.0.server.fleet().changed();
        let watcher = Arc::downgrade(&fleet.0);
        tokio::spawn(async move {
            while health.changed().await.is_ok() {
                let Some(inner) = watcher.upgrade() else { return };
                let live: Vec<String> = inner
                    .attempts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(_, seen)| {
                        seen.ranks.values().any(|r| !matches!(r.state, RankState::Exited { .. }))
                    })
                    .map(|((uid, _), _)| uid.clone())
                    .collect();
                inner.announce(|uid| live.iter().any(|l| l == uid));
            }
        });
        fleet
    }

    async fn launch_job(&self, key: &WorkloadKey, attempt: i32) -> Result<(), String> {
        let inner = &self.0;
        let what = format!("TrainingJob {}/{}", key.namespace, key.name);
        let api: Api<TrainingJob> = Api::namespaced(inner.client.clone(), &key.namespace);
        let job = api.get(&key.name).await.map_err(|e| format!("reading {what}: {e}"))?;
        if job.uid().as_deref() != Some(key.uid.as_str()) {
            return Err(format!("{what} was recreated; not launching for UID {}", key.uid));
        }
        let placement = job
            .status
            .as_ref()
            .and_then(|s| s.attempt.as_ref())
            .filter(|a| a.number == attempt)
            .map(|a| a.placement.clone())
            .ok_or_else(|| format!("{what}: status holds no attempt {attempt}; not launching"))?;
        let master_addr = self.master_addr(&placement).await;
        let uuid_of = |node: &str, index: i32| inner.gpu_uuid(node, index);
        let specs = launch_specs(&job, attempt, &uuid_of, &master_addr, &inner.args)?;
        let id: AttemptId = (key.uid.clone(), attempt as u64);
        inner.record_launch(&id, &specs);
        let sent = futures::future::join_all(specs.iter().map(|(node, spec)| async move {
            (spec.rank, inner.server.launch_worker(node, spec, COMMAND_TIMEOUT).await)
        }))
        .await;
        let mut failures = Vec::new();
        let mut attempts = inner.attempts.lock().unwrap_or_else(|e| e.into_inner());
        for (rank, result) in sent {
            if let Err(e) = result {
                tracing::warn!(job = %what, attempt, rank, error = %e, "worker launch failed");
                if let Some(r) = attempts.get_mut(&id).and_then(|s| s.ranks.get_mut(&rank))
                    && r.state == RankState::Launching
                {
                    r.state = RankState::Exited { code: Some(FAILED_TO_START_CODE), signal: None };
                }
                failures.push(format!("rank {rank}: {e}"));
            }
        }
        if failures.is_empty() {
            tracing::info!(job = %what, attempt, workers = specs.len(), "workers launched");
            Ok(())
        } else {
            Err(format!("{what} attempt {attempt}: {}", failures.join("; ")))
        }
    }

    /// Stop (in the background) every attempt of `key` other than `current` that an agent
    /// listed at registration, at most once per [`STALE_STOP_INTERVAL`] per attempt.
    fn stop_stale(&self, key: &WorkloadKey, current: i32, nodes: &HashMap<String, NodeRecord>) {
        let stale = stale_attempts(&key.uid, current, nodes);
        if stale.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let now = Instant::now();
        let mut stops = self.0.stale_stops.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in stale {
            let id = (key.uid.clone(), attempt);
            if stops.get(&id).is_some_and(|t| now.duration_since(*t) < STALE_STOP_INTERVAL) {
                continue;
            }
            stops.insert(id, now);
            let (fleet, key) = (self.clone(), key.clone());
            tracing::warn!(job = %key.name, attempt, current, "stopping workers of a stale attempt");
            runtime.spawn(async move {
                let reason = format!("attempt {attempt} is stale; the job runs attempt {current}");
                if let Err(e) = fleet.stop_attempt(&key, attempt as i32, &reason).await {
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
        let id: AttemptId = (key.uid.clone(), attempt as u64);
        // Every node of the attempt this process knows of, else every node (a restarted
        // operator may not know where an attempt ran; stopping is idempotent).
        let mut nodes: Vec<String> = inner
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|s| s.ranks.values().map(|r| r.node.clone()).collect())
            .unwrap_or_default();
        if nodes.is_empty() {
            nodes = inner.server.fleet().nodes().into_iter().map(|n| n.node).collect();
        }
        nodes.sort();
        nodes.dedup();
        let grace = Duration::from_secs(inner.args.worker_stop_grace_seconds);
        let results = futures::future::join_all(nodes.iter().map(|node| async move {
            let connected = inner.server.fleet().node(node).is_some_and(|n| n.connected);
            if !connected {
                // Its agent kills its workers itself once the fence timeout passes.
                return Ok(());
            }
            let timeout = COMMAND_TIMEOUT;
            inner
                .server
                .stop_workers(node, &key.uid, attempt as u64, grace, reason, timeout)
                .await
                .map(drop)
                .map_err(|e| format!("node {node}: {e}"))
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

impl Fleet for AgentFleet {
    fn report(&self, key: &WorkloadKey, attempt: i32) -> AttemptReport {
        let inner = &self.0;
        let id: AttemptId = (key.uid.clone(), attempt as u64);
        let mut seen = inner
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default();
        // Only the nodes this attempt's ranks were seen on and those whose agents list workers
        // of the job: a fleet of thousands of nodes is not copied for every report.
        let ranks_on: HashSet<&str> = seen.ranks.values().map(|r| r.node.as_str()).collect();
        let nodes: HashMap<String, NodeRecord> = inner
            .server
            .fleet()
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
                    instance: rec.instance_id.clone(),
                });
            }
        }
        let complete = seen.launched_here || inner.started.elapsed() > inner.fence_timeout;
        let mut report = summarize(&seen.ranks, complete, &nodes, inner.fence_timeout);
        report.progress = seen.progress;
        report
    }

    fn launch(&self, key: &WorkloadKey, attempt: i32) -> BoxFuture<'_, Result<(), String>> {
        let key = key.clone();
        self.0.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key.uid.clone(), key.clone());
        Box::pin(async move {
            if key.kind != "TrainingJob" {
                return Err(format!(
                    "{} {}/{}: service replicas launch through launch_replica",
                    key.kind, key.namespace, key.name
                ));
            }
            self.launch_job(&key, attempt).await
        })
    }

    fn launch_replica(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        replica: &ReplicaLaunch,
    ) -> BoxFuture<'_, Result<(), String>> {
        let (key, replica) = (key.clone(), replica.clone());
        self.0.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key.uid.clone(), key.clone());
        Box::pin(async move { self.launch_service_replica(&key, attempt, &replica).await })
    }

    fn stop(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), String>> {
        let (key, reason) = (key.clone(), reason.to_string());
        self.0.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key.uid.clone(), key.clone());
        let now = Instant::now();
        let id: AttemptId = (key.uid.clone(), attempt as u64);
        let repeat = {
            let mut sent = self.0.stops_sent.lock().unwrap_or_else(|e| e.into_inner());
            let recent =
                sent.get(&id).is_some_and(|t| now.duration_since(*t) < STOP_RESEND_INTERVAL);
            if !recent {
                sent.insert(id, now);
            }
            recent
        };
        Box::pin(async move {
            if repeat {
                return Ok(());
            }
            self.stop_attempt(&key, attempt, &reason).await
        })
    }

    fn changes(&self) -> Option<futures::stream::BoxStream<'static, WorkloadKey>> {
        let rx = self.0.changes.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
    }
}

/// Apply one worker event received at `now`. A later event wins, except that nothing revives
/// an exited worker. Progress is kept per attempt: the report with the highest step gives step,
/// total, loss and throughput; the checkpoint step only grows; the ETA comes from the step rate
/// since the attempt's first report.
fn fold(
    attempts: &mut HashMap<AttemptId, AttemptSeen>,
    report: &WorkerReport,
    now: Instant,
) -> Folded {
    let seen = attempts.entry((report.job_uid.clone(), report.attempt)).or_default();
    let progressed = report.progress.as_ref().is_some_and(|p| merge_progress(seen, p, now));
    let rank = seen.ranks.entry(report.rank).or_insert_with(|| RankSeen {
        node: report.node.clone(),
        gpu_uuids: Vec::new(),
        state: RankState::Launching,
        instance: String::new(),
    });
    let unchanged = if progressed { Folded::Progress } else { Folded::Nothing };
    if matches!(rank.state, RankState::Exited { .. }) {
        return unchanged;
    }
    let before = rank.state;
    rank.state = match report.phase.as_str() {
        "STARTED" | "PROGRESS" => RankState::Running,
        "EXITED" => RankState::Exited { code: report.exit_code, signal: report.signal },
        "FAILED_TO_START" => {
            RankState::Exited { code: Some(FAILED_TO_START_CODE), signal: report.signal }
        }
        _ => rank.state,
    };
    if rank.state != before { Folded::State } else { unchanged }
}

/// Merge one progress report into the attempt's; true when anything shown changed.
fn merge_progress(seen: &mut AttemptSeen, p: &Progress, now: Instant) -> bool {
    let before = seen.progress.clone();
    let (origin_at, origin_step) = *seen.progress_origin.get_or_insert((now, p.step));
    let current = seen.progress.get_or_insert_with(|| Progress { step: -1, ..Default::default() });
    let checkpoint = current.last_checkpoint_step.max(p.last_checkpoint_step);
    if p.step >= current.step {
        current.step = p.step;
        current.total_steps = p.total_steps.or(current.total_steps);
        current.loss = p.loss.or(current.loss);
        current.tokens_per_second = p.tokens_per_second.or(current.tokens_per_second);
        let elapsed = now.saturating_duration_since(origin_at).as_secs_f64();
        let done = (p.step - origin_step) as f64;
        current.eta_seconds = match current.total_steps {
            Some(total) if p.step >= total => Some(0),
            Some(total) if done > 0.0 && elapsed > 0.0 => {
                Some(((total - p.step) as f64 * elapsed / done).ceil() as i64)
            }
            _ => current.eta_seconds,
        };
    }
    current.last_checkpoint_step = checkpoint;
    seen.progress != before
}

/// True when the worker `rank` was started by an earlier agent process on its node than the
/// one registered now, and the new one does not list it: it died with the old agent (workers
/// get SIGKILL when their agent dies), so it is confirmed gone.
fn agent_restarted_without(rec: &NodeRecord, seen: &RankSeen, rank: u32) -> bool {
    !seen.instance.is_empty()
        && rec.instance_id != seen.instance
        && !rec.workers.iter().any(|w| w.rank == rank && seen.gpu_uuids == w.gpu_uuids)
}

/// The lifecycle's summary of an attempt from what is known of its workers and their nodes.
/// `complete`: the known workers are all the attempt has.
fn summarize(
    ranks: &BTreeMap<u32, RankSeen>,
    complete: bool,
    nodes: &HashMap<String, NodeRecord>,
    fence_timeout: Duration,
) -> AttemptReport {
    let mut report = AttemptReport::default();
    let silent =
        |node: &str| nodes.get(node).is_some_and(|n| n.last_heard.elapsed() > fence_timeout);
    let mut stopped = true;
    for (&rank, seen) in ranks {
        match seen.state {
            RankState::Exited { code, signal } => {
                report.exits.push(WorkerExit { rank: rank as i32, code, signal });
                continue;
            }
            RankState::Running => report.running += 1,
            RankState::Launching => {}
        }
        if silent(&seen.node) {
            report.node_lost.get_or_insert_with(|| HardwareFault {
                node: seen.node.clone(),
                gpu: None,
                xid: None,
                message: format!(
                    "node {} stopped reporting for longer than the fence timeout ({}s)",
                    seen.node,
                    fence_timeout.as_secs()
                ),
            });
            continue;
        }
        if let Some(rec) = nodes.get(&seen.node) {
            if agent_restarted_without(rec, seen, rank) {
                report.node_lost.get_or_insert_with(|| HardwareFault {
                    node: seen.node.clone(),
                    gpu: None,
                    xid: None,
                    message: format!(
                        "the agent on {} restarted and no longer runs worker {rank}: workers die with their agent",
                        seen.node
                    ),
                });
                continue;
            }
            if !rec.connected || rec.lost {
                report.node_unreachable.get_or_insert_with(|| seen.node.clone());
            }
        }
        stopped = false;
        if report.fault.is_none()
            && let Some(rec) = nodes.get(&seen.node)
            && let Some(gpu) = rec
                .gpus
                .iter()
                .find(|g| g.health == GpuHealth::Failed && seen.gpu_uuids.contains(&g.uuid))
        {
            report.fault = Some(HardwareFault {
                node: seen.node.clone(),
                gpu: Some(gpu.index as i32),
                xid: (gpu.last_xid != 0).then_some(gpu.last_xid as i32),
                message: if gpu.message.is_empty() {
                    format!("GPU {} on {} failed ({})", gpu.index, seen.node, gpu.reason)
                } else {
                    format!("GPU {} on {}: {}", gpu.index, seen.node, gpu.message)
                },
            });
        }
    }
    report.all_stopped = complete && stopped;
    report
}

/// Every worker of `attempt` of `job` as `(node, launch)`, in rank order. `uuid_of(node, index)`
/// names a GPU as its agent registered it.
pub fn launch_specs(
    job: &TrainingJob,
    attempt: i32,
    uuid_of: &dyn Fn(&str, i32) -> Option<String>,
    master_addr: &str,
    args: &WorkerLaunchArgs,
) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
    let uid = job.uid().unwrap_or_default();
    let placement = job
        .status
        .as_ref()
        .and_then(|s| s.attempt.as_ref())
        .map(|a| a.placement.clone())
        .unwrap_or_default();
    let mut workers = placement.workers.clone();
    workers.sort_by_key(|w| w.rank);
    let world_size = workers.len() as u32;
    let checkpoint_dir = match &job.spec.checkpoint {
        Some(c) => c.path.clone(),
        None => args
            .checkpoint_root
            .join(job.namespace().unwrap_or_default())
            .join(format!("{}-{uid}", job.name_any()))
            .display()
            .to_string(),
    };
    let (command, program_args, env) = worker_program(job, args)?;
    let master_port = args.master_port_base + port_offset(&uid, attempt);
    let mut on_node: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::with_capacity(workers.len());
    for w in &workers {
        let local = on_node.entry(w.node.as_str()).or_default();
        let gpu_uuids = w
            .gpus
            .iter()
            .map(|&g| {
                uuid_of(&w.node, g).ok_or_else(|| {
                    format!("rank {}: node {} has no registered GPU {g}", w.rank, w.node)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push((
            w.node.clone(),
            WorkerLaunchSpec {
                job_uid: uid.clone(),
                attempt: attempt as u64,
                rank: w.rank as u32,
                local_rank: *local,
                world_size,
                gpu_uuids,
                command: command.clone(),
                args: program_args.clone(),
                env: env.clone(),
                checkpoint_dir: checkpoint_dir.clone(),
                master_addr: master_addr.to_string(),
                master_port,
            },
        ));
        *local += 1;
    }
    Ok(out)
}

/// A program, its arguments and extra environment.
type Program = (String, Vec<String>, BTreeMap<String, String>);

/// The program every worker runs: the custom command, or `flotilla-worker train` with the
/// job's engine configuration. The engine reads its configuration from a file, so a shell
/// writes the JSON (passed in the environment) next to the checkpoints first. The agent sets
/// `FLOTILLA_NO_PROGRESS_BAR=1`, which the engine's flag refuses (it takes true or false).
fn worker_program(job: &TrainingJob, args: &WorkerLaunchArgs) -> Result<Program, String> {
    if let Some(cmd) = &job.spec.command {
        let (program, leading) = cmd
            .command
            .split_first()
            .ok_or("spec.command.command: expected a program, got none")?;
        let program_args = leading.iter().chain(&cmd.args).cloned().collect();
        let env = cmd.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect();
        return Ok((program.clone(), program_args, env));
    }
    let engine = job.spec.engine.as_ref().ok_or("spec: expected engine or command, got neither")?;
    let config = serde_json::to_string(engine).map_err(|e| format!("spec.engine: {e}"))?;
    let script = r#"mkdir -p "$FLOTILLA_CHECKPOINT_DIR" && f="$FLOTILLA_CHECKPOINT_DIR/engine-config.rank$RANK.json" && printf '%s' "$FLOTILLA_ENGINE_CONFIG" > "$f" && FLOTILLA_NO_PROGRESS_BAR=true exec "$0" train --config "$f""#;
    Ok((
        "/bin/sh".into(),
        vec!["-c".into(), script.into(), args.worker_binary.clone()],
        BTreeMap::from([("FLOTILLA_ENGINE_CONFIG".to_string(), config)]),
    ))
}

/// A rendezvous port offset from the job and attempt (FNV-1a), so attempts and jobs sharing a
/// node rarely collide and a new attempt never reuses the previous one's port.
fn port_offset(uid: &str, attempt: i32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in uid.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h % MASTER_PORT_SPAN + attempt.max(0) as u32) % MASTER_PORT_SPAN
}

// === service replicas ===

impl AgentFleet {
    /// The address the other ranks reach rank 0 of `placement` at: the address its node's
    /// agent reported, else `--worker-master-addr`, else the node's name.
    async fn master_addr(&self, placement: &crate::crd::Placement) -> String {
        let inner = &self.0;
        let rank0 = placement
            .workers
            .iter()
            .min_by_key(|w| w.rank)
            .map(|w| w.node.clone())
            .unwrap_or_default();
        let nodes: Api<GpuNode> = Api::all(inner.client.clone());
        let reported = nodes.get_opt(&rank0).await.ok().flatten().and_then(|n| n.status?.address);
        reported.or_else(|| inner.args.worker_master_addr.clone()).unwrap_or(rank0)
    }

    /// Launch one service replica's workers (`key.uid` names the replica's launch, so each
    /// launch is its own workload on the agents and an old one can be stopped after a new one
    /// of the same slot started).
    async fn launch_service_replica(
        &self,
        key: &WorkloadKey,
        attempt: i32,
        replica: &ReplicaLaunch,
    ) -> Result<(), String> {
        let inner = &self.0;
        let what = format!("InferenceService {}/{} {}", key.namespace, key.name, key.uid);
        let uuid_of = |node: &str, index: i32| inner.gpu_uuid(node, index);
        let master_addr = if replica.placement.workers.len() > 1 {
            self.master_addr(&replica.placement).await
        } else {
            "127.0.0.1".into()
        };
        let specs = replica_specs(&key.uid, attempt, replica, &uuid_of, &master_addr, &inner.args)?;
        let id: AttemptId = (key.uid.clone(), attempt as u64);
        inner.record_launch(&id, &specs);
        let mut failures = Vec::new();
        for (node, spec) in &specs {
            if let Err(e) = inner.server.launch_worker(node, spec, COMMAND_TIMEOUT).await {
                tracing::warn!(replica = %what, attempt, rank = spec.rank, error = %e, "replica launch failed");
                let mut attempts = inner.attempts.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = attempts.get_mut(&id).and_then(|s| s.ranks.get_mut(&spec.rank))
                    && r.state == RankState::Launching
                {
                    r.state = RankState::Exited { code: Some(FAILED_TO_START_CODE), signal: None };
                }
                failures.push(format!("rank {}: {e}", spec.rank));
            }
        }
        if failures.is_empty() {
            tracing::info!(replica = %what, attempt, port = replica.port, "replica launched");
            Ok(())
        } else {
            Err(format!("{what} attempt {attempt}: {}", failures.join("; ")))
        }
    }
}

/// The workers of one launch of a service replica, in rank order: `flotilla-worker serve` on
/// the replica's GPUs. Rank 0 listens on every address of its node at `replica.port`; with more
/// than one worker the others join it at `master_addr` as an expert-parallel group (each holds
/// a share of every MoE layer's experts) on a rendezvous port chosen like a training attempt's.
pub fn replica_specs(
    uid: &str,
    attempt: i32,
    replica: &ReplicaLaunch,
    uuid_of: &dyn Fn(&str, i32) -> Option<String>,
    master_addr: &str,
    args: &WorkerLaunchArgs,
) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
    let mut workers = replica.placement.workers.clone();
    workers.sort_by_key(|w| w.rank);
    if workers.is_empty() {
        return Err("placement: expected at least one worker, got none".into());
    }
    let world_size = workers.len() as u32;
    let master_port = args.master_port_base + port_offset(uid, attempt);
    let program_args = [
        "serve",
        "--checkpoint",
        &replica.checkpoint,
        "--host",
        "0.0.0.0",
        "--port",
        &replica.port.to_string(),
        "--model-name",
        &replica.served_name,
        "--max-batch-size",
        &replica.max_batch_size.to_string(),
        "--default-max-tokens",
        &replica.default_max_tokens.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut on_node: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::with_capacity(workers.len());
    for w in &workers {
        let local = on_node.entry(w.node.as_str()).or_default();
        let gpu_uuids = w
            .gpus
            .iter()
            .map(|&g| {
                uuid_of(&w.node, g).ok_or_else(|| {
                    format!("rank {}: node {} has no registered GPU {g}", w.rank, w.node)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push((
            w.node.clone(),
            WorkerLaunchSpec {
                job_uid: uid.to_string(),
                attempt: attempt as u64,
                rank: w.rank as u32,
                local_rank: *local,
                world_size,
                gpu_uuids,
                command: args.worker_binary.clone(),
                args: program_args.clone(),
                env: BTreeMap::new(),
                checkpoint_dir: replica.checkpoint.clone(),
                master_addr: master_addr.to_string(),
                master_port,
            },
        ));
        *local += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::{GpuRecord, RunningWorkerRecord};
    use crate::crd::training_job::{TrainingJobSpec, TrainingJobStatus, WorkerCommand};
    use crate::crd::{Attempt, JobPhase, Placement, WorkerPlacement};

    fn args() -> WorkerLaunchArgs {
        WorkerLaunchArgs {
            worker_binary: "/opt/flotilla-worker".into(),
            checkpoint_root: "/ckpt".into(),
            master_port_base: 30000,
            worker_master_addr: None,
            worker_stop_grace_seconds: 5,
        }
    }

    fn gpu(index: u32, health: GpuHealth) -> GpuRecord {
        GpuRecord {
            index,
            uuid: format!("GPU-{index}"),
            model: "sim".into(),
            memory_bytes: 1,
            pci_bus_id: String::new(),
            nvlink_peers: vec![],
            topology_domain: String::new(),
            health,
            reason: "Xid79".into(),
            message: String::new(),
            last_xid: if health == GpuHealth::Failed { 79 } else { 0 },
            temperature_c: None,
            memory_used_bytes: None,
        }
    }

    fn node(name: &str, gpus: Vec<GpuRecord>, silent_for: Duration) -> (String, NodeRecord) {
        let rec = NodeRecord {
            node: name.into(),
            agent_version: "0".into(),
            instance_id: "i".into(),
            backend: "simulated".into(),
            gpus,
            applied_seq: 0,
            connected: true,
            lost: false,
            last_heard: Instant::now() - silent_for,
            last_fault: None,
            workers: Vec::new(),
            session: 1,
            address: None,
        };
        (name.into(), rec)
    }

    fn report(rank: u32, phase: &str, code: Option<i32>) -> WorkerReport {
        WorkerReport {
            node: "a".into(),
            job_uid: "u".into(),
            attempt: 1,
            rank,
            phase: phase.into(),
            exit_code: code,
            signal: None,
            message: String::new(),
            progress: None,
        }
    }

    fn progress(rank: u32, step: i64, loss: f64, checkpoint: Option<i64>) -> WorkerReport {
        WorkerReport {
            progress: Some(Progress {
                step,
                total_steps: Some(100),
                loss: Some(loss),
                tokens_per_second: Some(1000.0 + step as f64),
                last_checkpoint_step: checkpoint,
                ..Default::default()
            }),
            ..report(rank, "PROGRESS", None)
        }
    }

    const FENCE: Duration = Duration::from_secs(30);

    #[test]
    fn reports_fold_into_running_then_exits_and_an_exit_is_final() {
        let mut attempts = HashMap::new();
        let fold = |a: &mut HashMap<AttemptId, AttemptSeen>, r: &WorkerReport| {
            super::fold(a, r, Instant::now()) == Folded::State
        };
        assert!(fold(&mut attempts, &report(0, "STARTED", None)));
        assert!(!fold(&mut attempts, &report(0, "PROGRESS", None)), "progress alone is no change");
        assert!(fold(&mut attempts, &report(1, "PROGRESS", None)));
        let nodes = HashMap::from([node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO)]);
        let seen = &attempts[&("u".to_string(), 1)];
        let r = summarize(&seen.ranks, true, &nodes, FENCE);
        assert_eq!((r.running, r.all_stopped), (2, false));
        fold(&mut attempts, &report(0, "EXITED", Some(0)));
        assert!(!fold(&mut attempts, &report(0, "STARTED", None)), "late, out of order: ignored");
        fold(&mut attempts, &report(1, "FAILED_TO_START", None));
        let seen = &attempts[&("u".to_string(), 1)];
        let r = summarize(&seen.ranks, true, &nodes, FENCE);
        assert_eq!(r.running, 0);
        assert_eq!(
            r.exits,
            vec![
                WorkerExit { rank: 0, code: Some(0), signal: None },
                WorkerExit { rank: 1, code: Some(FAILED_TO_START_CODE), signal: None },
            ]
        );
        assert!(r.all_stopped);
        // Not knowing every worker (a restarted operator inside the fence timeout) is not stopped.
        assert!(!summarize(&seen.ranks, false, &nodes, FENCE).all_stopped);
        assert!(!summarize(&BTreeMap::new(), false, &nodes, FENCE).all_stopped);
        assert!(summarize(&BTreeMap::new(), true, &nodes, FENCE).all_stopped);
    }

    #[test]
    fn progress_folds_to_the_highest_step_with_its_loss_a_growing_checkpoint_and_an_eta() {
        let mut attempts = HashMap::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(fold(&mut attempts, &report(0, "STARTED", None), at(0)), Folded::State);
        assert_eq!(fold(&mut attempts, &progress(0, 10, 2.5, None), at(0)), Folded::Progress);
        let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
        assert_eq!(
            (p.step, p.loss, p.last_checkpoint_step, p.eta_seconds),
            (10, Some(2.5), None, None)
        );
        // 20 steps in 10 s: 70 left take 35 s.
        assert_eq!(fold(&mut attempts, &progress(0, 30, 2.0, Some(20)), at(10)), Folded::Progress);
        // A rank behind does not move the step back, nor the checkpoint.
        assert_eq!(fold(&mut attempts, &report(1, "STARTED", None), at(10)), Folded::State);
        assert_eq!(fold(&mut attempts, &progress(1, 25, 9.0, Some(10)), at(10)), Folded::Nothing);
        let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
        assert_eq!(
            (p.step, p.total_steps, p.loss, p.tokens_per_second),
            (30, Some(100), Some(2.0), Some(1030.0))
        );
        assert_eq!((p.last_checkpoint_step, p.eta_seconds), (Some(20), Some(35)));
        // Progress of a running rank is no change of its state.
        assert_eq!(fold(&mut attempts, &progress(1, 31, 1.9, Some(20)), at(11)), Folded::Progress);
        assert_eq!(attempts[&("u".to_string(), 1)].ranks[&1].state, RankState::Running);
        // The last step finishes the ETA; a late line after the exit still counts.
        fold(&mut attempts, &report(0, "EXITED", Some(0)), at(12));
        assert_eq!(
            fold(&mut attempts, &progress(0, 100, 1.0, Some(100)), at(12)),
            Folded::Progress
        );
        let p = attempts[&("u".to_string(), 1)].progress.clone().expect("progress");
        assert_eq!((p.step, p.eta_seconds, p.last_checkpoint_step), (100, Some(0), Some(100)));
        // Another attempt has its own progress.
        let other = WorkerReport { attempt: 2, ..progress(0, 5, 3.0, None) };
        fold(&mut attempts, &other, at(13));
        assert_eq!(attempts[&("u".to_string(), 2)].progress.as_ref().map(|p| p.step), Some(5));
    }

    #[test]
    fn a_failed_gpu_under_a_worker_is_a_fault_and_a_silent_node_is_lost_after_the_fence() {
        let ranks = BTreeMap::from([
            (
                0,
                RankSeen {
                    node: "a".into(),
                    gpu_uuids: vec!["GPU-1".into()],
                    state: RankState::Running,
                    instance: "i".into(),
                },
            ),
            (
                1,
                RankSeen {
                    node: "b".into(),
                    gpu_uuids: vec!["GPU-0".into()],
                    state: RankState::Running,
                    instance: "i".into(),
                },
            ),
        ]);
        let nodes = HashMap::from([
            node("a", vec![gpu(0, GpuHealth::Failed), gpu(1, GpuHealth::Healthy)], Duration::ZERO),
            node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
        ]);
        let r = summarize(&ranks, true, &nodes, FENCE);
        assert_eq!(r.fault, None, "GPU 0 of node a fails but no worker uses it");
        let nodes = HashMap::from([
            node("a", vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Failed)], Duration::ZERO),
            node("b", vec![gpu(0, GpuHealth::Healthy)], FENCE + Duration::from_secs(1)),
        ]);
        let r = summarize(&ranks, true, &nodes, FENCE);
        let fault = r.fault.expect("fault");
        assert_eq!((fault.node.as_str(), fault.gpu, fault.xid), ("a", Some(1), Some(79)));
        assert_eq!(r.node_lost.map(|l| l.node).as_deref(), Some("b"));
        assert!(!r.all_stopped, "rank 0 on node a still runs");
    }

    #[test]
    fn a_restarted_agent_that_does_not_list_a_worker_means_it_is_gone_and_a_closed_stream_is_doubt()
    {
        let rank = |node: &str, uuid: &str| RankSeen {
            node: node.into(),
            gpu_uuids: vec![uuid.into()],
            state: RankState::Running,
            instance: "i".into(),
        };
        let ranks = BTreeMap::from([(0, rank("a", "GPU-0")), (1, rank("b", "GPU-0"))]);
        let (name, mut restarted) = node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO);
        restarted.instance_id = "j".into();
        let mut nodes = HashMap::from([
            (name, restarted),
            node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
        ]);
        let r = summarize(&ranks, true, &nodes, FENCE);
        let lost = r.node_lost.expect("rank 0's agent restarted without it");
        assert_eq!(lost.node, "a");
        assert!(lost.message.contains("restarted"), "{}", lost.message);
        assert!(!r.all_stopped, "rank 1 on node b still runs");

        // The same worker listed by the new agent (adopted across its restart) is not lost.
        nodes.get_mut("a").unwrap().workers.push(RunningWorkerRecord {
            job_uid: "job".into(),
            attempt: 1,
            rank: 0,
            pid: 7,
            gpu_uuids: vec!["GPU-0".into()],
        });
        assert_eq!(summarize(&ranks, true, &nodes, FENCE).node_lost, None);

        // A closed stream (same instance): the worker's fate is unknown until the fence.
        let nodes = HashMap::from([
            node("a", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
            node("b", vec![gpu(0, GpuHealth::Healthy)], Duration::ZERO),
        ]);
        let mut nodes = nodes;
        nodes.get_mut("b").unwrap().connected = false;
        let r = summarize(&ranks, true, &nodes, FENCE);
        assert_eq!((r.node_lost, r.node_unreachable.as_deref()), (None, Some("b")));
        assert!(!r.all_stopped, "an unreachable node's worker is not confirmed stopped");
    }

    #[test]
    fn workers_of_other_attempts_listed_at_registration_are_stale() {
        let worker = |uid: &str, attempt| crate::agents::RunningWorkerRecord {
            job_uid: uid.into(),
            attempt,
            rank: 0,
            pid: 1,
            gpu_uuids: vec![],
        };
        let (a, mut ra) = node("a", vec![], Duration::ZERO);
        ra.workers = vec![worker("u", 1), worker("u", 3), worker("other", 1)];
        let (b, mut rb) = node("b", vec![], Duration::ZERO);
        rb.workers = vec![worker("u", 2), worker("u", 1)];
        let nodes = HashMap::from([(a, ra), (b, rb)]);
        assert_eq!(stale_attempts("u", 3, &nodes), vec![1, 2]);
        assert_eq!(stale_attempts("u", 1, &nodes), vec![2, 3]);
        assert!(stale_attempts("none", 1, &nodes).is_empty());
    }

    fn job(engine: bool) -> TrainingJob {
        let spec = TrainingJobSpec {
            workers: 3,
            gpus_per_worker: 2,
            engine: engine.then(|| crate::crd::engine::EngineConfig::preset("tiny").unwrap()),
            command: (!engine).then(|| WorkerCommand {
                command: vec!["/usr/bin/python3".into(), "train.py".into()],
                args: vec!["--fast".into()],
                env: vec![crate::crd::training_job::EnvVar { name: "A".into(), value: "b".into() }],
            }),
            checkpoint: None,
            restart_policy: Default::default(),
            priority: 0,
            scheduling: Default::default(),
            suspend: false,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        };
        let mut j = TrainingJob::new("j", spec);
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some("uid-1".into());
        let seat =
            |rank, node: &str, gpus: Vec<i32>| WorkerPlacement { rank, node: node.into(), gpus };
        j.status = Some(TrainingJobStatus {
            phase: JobPhase::Scheduled,
            attempt: Some(Attempt {
                number: 2,
                placement: Placement {
                    workers: vec![
                        seat(1, "a", vec![2, 3]),
                        seat(0, "a", vec![0, 1]),
                        seat(2, "b", vec![0, 1]),
                    ],
                },
                ..Default::default()
            }),
            ..Default::default()
        });
        j
    }

    #[test]
    fn launch_specs_give_ranks_local_ranks_gpu_uuids_and_the_custom_command() {
        let uuid = |node: &str, i: i32| (i < 4).then(|| format!("{node}-{i}"));
        let specs = launch_specs(&job(false), 2, &uuid, "10.0.0.1", &args()).unwrap();
        let seats: Vec<(&str, u32, u32, Vec<String>)> = specs
            .iter()
            .map(|(n, s)| (n.as_str(), s.rank, s.local_rank, s.gpu_uuids.clone()))
            .collect();
        assert_eq!(
            seats,
            vec![
                ("a", 0, 0, vec!["a-0".into(), "a-1".into()]),
                ("a", 1, 1, vec!["a-2".into(), "a-3".into()]),
                ("b", 2, 0, vec!["b-0".into(), "b-1".into()]),
            ]
        );
        let s = &specs[0].1;
        assert_eq!((s.world_size, s.attempt, s.job_uid.as_str()), (3, 2, "uid-1"));
        assert_eq!(
            (s.command.as_str(), s.args.clone()),
            ("/usr/bin/python3", vec!["train.py".to_string(), "--fast".into()])
        );
        assert_eq!(s.env.get("A").map(String::as_str), Some("b"));
        assert_eq!(s.checkpoint_dir, "/ckpt/ns/j-uid-1");
        assert_eq!(s.master_addr, "10.0.0.1");
        assert!((30000..31000).contains(&s.master_port));
        assert!(specs.iter().all(|(_, x)| x.master_port == s.master_port));
        let missing = |_: &str, _: i32| None;
        let err = launch_specs(&job(false), 2, &missing, "x", &args()).unwrap_err();
        assert!(err.contains("has no registered GPU"), "{err}");
    }

    #[test]
    fn engine_jobs_run_the_worker_binary_with_their_configuration() {
        let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
        let specs = launch_specs(&job(true), 2, &uuid, "h", &args()).unwrap();
        let s = &specs[0].1;
        assert_eq!(s.command, "/bin/sh");
        assert_eq!(s.args[2], "/opt/flotilla-worker");
        assert!(s.args[1].contains(r#"exec "$0" train --config"#), "{}", s.args[1]);
        let config: crate::crd::engine::EngineConfig =
            serde_json::from_str(&s.env["FLOTILLA_ENGINE_CONFIG"]).unwrap();
        assert_eq!(Some(config), job(true).spec.engine);
    }

    #[test]
    fn a_replica_runs_the_worker_binary_serving_its_checkpoint_on_its_port() {
        let replica = ReplicaLaunch {
            placement: Placement {
                workers: vec![WorkerPlacement { rank: 0, node: "b".into(), gpus: vec![2] }],
            },
            checkpoint: "/ckpt/m/step-00000010".into(),
            served_name: "chat".into(),
            port: 8001,
            max_batch_size: 4,
            default_max_tokens: 16,
        };
        let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
        let specs =
            replica_specs("u/replica-0.3", 3, &replica, &uuid, "127.0.0.1", &args()).unwrap();
        let (node, s) = &specs[0];
        assert_eq!((node.as_str(), s.job_uid.as_str(), s.attempt), ("b", "u/replica-0.3", 3));
        assert_eq!((s.world_size, s.gpu_uuids.clone()), (1, vec!["b-2".to_string()]));
        assert_eq!(s.command, "/opt/flotilla-worker");
        assert_eq!(
            s.args.join(" "),
            "serve --checkpoint /ckpt/m/step-00000010 --host 0.0.0.0 --port 8001 --model-name chat --max-batch-size 4 --default-max-tokens 16"
        );
    }

    #[test]
    fn a_multi_worker_replica_is_one_expert_parallel_group_led_by_rank_0() {
        let replica = ReplicaLaunch {
            placement: Placement {
                workers: vec![
                    WorkerPlacement { rank: 1, node: "a".into(), gpus: vec![0, 1] },
                    WorkerPlacement { rank: 0, node: "b".into(), gpus: vec![2, 3] },
                    WorkerPlacement { rank: 2, node: "a".into(), gpus: vec![4, 5] },
                ],
            },
            checkpoint: "/ckpt/m".into(),
            served_name: "chat".into(),
            port: 8001,
            max_batch_size: 4,
            default_max_tokens: 16,
        };
        let uuid = |node: &str, i: i32| Some(format!("{node}-{i}"));
        let specs =
            replica_specs("u/replica-1.4", 4, &replica, &uuid, "10.0.0.2", &args()).unwrap();
        let seen: Vec<(&str, u32, u32, u32)> = specs
            .iter()
            .map(|(node, s)| (node.as_str(), s.rank, s.local_rank, s.world_size))
            .collect();
        assert_eq!(seen, [("b", 0, 0, 3), ("a", 1, 0, 3), ("a", 2, 1, 3)]);
        assert_eq!(specs[2].1.gpu_uuids, ["a-4", "a-5"]);
        let port = specs[0].1.master_port;
        assert!((30000..31000).contains(&port), "{port}");
        assert_ne!(port, 8001, "the rendezvous port is not the API port");
        for (_, s) in &specs {
            assert_eq!((s.master_addr.as_str(), s.master_port), ("10.0.0.2", port));
            assert!(s.args.join(" ").contains("--port 8001"), "{:?}", s.args);
        }
        let mut lost = replica.clone();
        lost.placement.workers[2].gpus = vec![9];
        let none = |node: &str, i: i32| (i < 8).then(|| format!("{node}-{i}"));
        let err = replica_specs("u", 1, &lost, &none, "10.0.0.2", &args()).unwrap_err();
        assert!(err.contains("rank 2: node a has no registered GPU 9"), "{err}");
    }

    #[test]
    fn a_new_attempt_gets_a_different_port() {
        assert_ne!(port_offset("uid-1", 1), port_offset("uid-1", 2));
        assert!(port_offset("uid-1", i32::MAX) < MASTER_PORT_SPAN);
    }
}
