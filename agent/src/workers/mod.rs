//! The worker supervisor: runs each worker as a process-group leader with a torchrun-style
//! environment, keeps its output in size-bounded log files, listens for its progress on a Unix
//! socket, and reports started / progress / exited through the agent's update channel.
//!
//! A worker counts as exited only once its whole process group is gone: after the leader exits,
//! what is left of the group is killed and reaped (the agent is a child subreaper, so orphaned
//! grandchildren come back to it). That is what lets the operator treat "exited" as "confirmed
//! dead" (DESIGN.md safety rule 1).

use crate::supervisor::{
    RunningWorker, SupervisorError, WorkerId, WorkerLaunch, WorkerSupervisor, WorkerUpdate,
};
use flotilla_contract::worker_env as var;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

mod logs;
mod progress;
mod spawn;
#[cfg(test)]
mod tests;

pub(crate) use logs::rotated_path;
use logs::{BoundedLog, copy_to_log};
use progress::read_progress;

/// How long the progress lines a worker wrote before exiting may take to be read.
const PROGRESS_DRAIN: Duration = Duration::from_secs(2);

/// Where the supervisor keeps files, and how big a log may grow.
#[derive(Clone, Debug)]
pub struct WorkerFiles {
    /// Logs go to `<log_dir>/<job_uid>/attempt-<n>/rank-<r>.log`.
    pub log_dir: PathBuf,
    /// Progress sockets are created here (a short path: Unix socket paths are limited to 107
    /// bytes).
    pub socket_dir: PathBuf,
    /// A log file is rotated to `.log.1` when it reaches this many bytes (two files per worker).
    pub max_log_bytes: u64,
    /// With simulated GPUs: where each GPU's misbehaviour file is (`<dir>/<uuid>`), named in
    /// its workers' environment (`flotilla_engine::sim`).
    pub sim_misbehaviour_dir: Option<PathBuf>,
}

/// Runs workers as child processes of the agent.
#[derive(Debug)]
pub struct ProcessSupervisor {
    files: WorkerFiles,
    updates: OnceLock<UnboundedSender<WorkerUpdate>>,
    workers: Registry,
}

// === impl ProcessSupervisor ===

impl ProcessSupervisor {
    /// A supervisor writing under `files`. Makes the agent a child subreaper so that workers'
    /// orphaned grandchildren are re-parented to it and can be reaped.
    pub fn new(files: WorkerFiles) -> Result<Arc<Self>, SupervisorError> {
        for dir in [&files.log_dir, &files.socket_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| SupervisorError::Failed(format!("creating {}: {e}", dir.display())))?;
        }
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; grandchildren of workers may escape reaping");
        }
        Ok(Arc::new(Self { files, updates: OnceLock::new(), workers: Registry::default() }))
    }

    /// Connects the channel updates are reported through (the agent's, known once it started).
    pub fn attach(&self, updates: UnboundedSender<WorkerUpdate>) {
        let _ = self.updates.set(updates);
    }

    /// The log file of a worker (the current one; the previous chunk is `<file>.1`).
    pub fn log_path(&self, id: &WorkerId) -> PathBuf {
        self.files
            .log_dir
            .join(sanitize(&id.job_uid))
            .join(format!("attempt-{}", id.attempt))
            .join(format!("rank-{}.log", id.rank))
    }

    fn report(&self, update: WorkerUpdate) {
        match self.updates.get() {
            Some(tx) => {
                let _ = tx.send(update);
            }
            None => tracing::warn!(?update, "worker update before the supervisor was attached"),
        }
    }

    fn signal_group(&self, pid: u32, signal: Signal) {
        let Ok(pid) = i32::try_from(pid) else { return };
        // ESRCH (the group is gone) is the normal outcome of a race with its exit.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

impl WorkerSupervisor for ProcessSupervisor {
    fn launch(&self, launch: WorkerLaunch) -> Result<(), SupervisorError> {
        let id = launch.id.clone();
        if self.workers.contains(&id) {
            return Err(SupervisorError::Failed(format!(
                "job {} attempt {} rank {}: already running",
                id.job_uid, id.attempt, id.rank
            )));
        }
        let socket_path = self.files.socket_dir.join(format!(
            "{}-{}-{}.sock",
            short_hash(&id.job_uid),
            id.attempt,
            id.rank
        ));
        let _ = std::fs::remove_file(&socket_path);
        let listener = tokio::net::UnixListener::bind(&socket_path).map_err(|e| {
            SupervisorError::Failed(format!("progress socket {}: {e}", socket_path.display()))
        })?;
        let log_path = self.log_path(&id);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SupervisorError::Failed(format!("log dir {}: {e}", dir.display())))?;
        }

        let mut command = tokio::process::Command::new(&launch.command);
        command
            .args(&launch.args)
            .envs(worker_env(&launch, &socket_path, self.files.sim_misbehaviour_dir.as_deref()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // Its own process group, so a stop reaches everything it started.
        command.as_std_mut().process_group(0);
        // It dies with the agent (safety rule 1): an agent that crashes or is stopped must not
        // leave workers training or serving that nobody supervises and no restarted agent
        // knows of. The signal is SIGKILL, because nobody is left to wait for a checkpoint.
        spawn::die_with_agent(command.as_std_mut());
        let mut child = command.spawn().map_err(|e| {
            SupervisorError::Failed(format!(
                "job {} attempt {} rank {}: starting {}: {e}",
                id.job_uid, id.attempt, id.rank, launch.command
            ))
        })?;
        let pid = child.id().unwrap_or_default();
        let running = RunningWorker {
            id: id.clone(),
            pid,
            gpu_uuids: launch.gpu_uuids.clone(),
            started_at_unix_nanos: unix_nanos(),
        };
        self.workers.insert(running);
        tracing::info!(job = %id.job_uid, attempt = id.attempt, rank = id.rank, pid, command = %launch.command, "worker started");
        self.report(WorkerUpdate::Started(id.clone()));

        let log = BoundedLog::new(log_path, self.files.max_log_bytes);
        let stdout = child.stdout.take().map(|s| tokio::spawn(copy_to_log(s, log.clone())));
        let stderr = child.stderr.take().map(|s| tokio::spawn(copy_to_log(s, log.clone())));
        let worker_gone = Arc::new(tokio::sync::Notify::new());
        let mut progress = tokio::spawn(read_progress(
            listener,
            id.clone(),
            self.updates.get().cloned(),
            worker_gone.clone(),
        ));

        let updates = self.updates.get().cloned();
        let registry = self.workers.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The leader is gone; whatever it left in its group goes too, before we say "exited".
            if let Ok(raw) = i32::try_from(pid) {
                let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                reap_group(raw).await;
            }
            // Its last progress lines are read before its exit is reported.
            worker_gone.notify_one();
            if tokio::time::timeout(PROGRESS_DRAIN, &mut progress).await.is_err() {
                progress.abort();
            }
            for task in [stdout, stderr].into_iter().flatten() {
                let _ = task.await;
            }
            let _ = std::fs::remove_file(&socket_path);
            registry.remove(&id);
            let (code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            tracing::info!(job = %id.job_uid, attempt = id.attempt, rank = id.rank, ?code, ?signal, "worker exited");
            if let Some(tx) = updates {
                let _ = tx.send(WorkerUpdate::Exited { id, code, signal });
            }
        });
        Ok(())
    }

    fn stop(
        &self,
        job_uid: &str,
        attempt: u64,
        rank: Option<u32>,
        grace: Duration,
        reason: &str,
    ) -> Result<(), SupervisorError> {
        let targets: Vec<(WorkerId, u32)> = self
            .workers
            .snapshot()
            .into_iter()
            .filter(|w| w.id.job_uid == job_uid && w.id.attempt == attempt)
            .filter(|w| rank.is_none_or(|r| w.id.rank == r))
            .map(|w| (w.id, w.pid))
            .collect();
        for (id, pid) in targets {
            if !self.workers.begin_stop(&id) {
                tracing::debug!(job = %id.job_uid, attempt = id.attempt, rank = id.rank, "already stopping");
                continue;
            }
            tracing::info!(job = %id.job_uid, attempt = id.attempt, rank = id.rank, reason, "stopping worker");
            self.signal_group(pid, Signal::SIGTERM);
            let registry = self.workers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if registry.contains(&id) {
                    tracing::warn!(job = %id.job_uid, rank = id.rank, "grace period over: SIGKILL");
                    if let Ok(raw) = i32::try_from(pid) {
                        let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                    }
                }
            });
        }
        Ok(())
    }

    fn kill_all(&self, reason: &str) {
        for pid in self.workers.snapshot().into_iter().map(|w| w.pid) {
            tracing::warn!(pid, reason, "killing worker");
            self.signal_group(pid, Signal::SIGKILL);
        }
    }

    fn running(&self) -> Vec<RunningWorker> {
        self.workers.snapshot()
    }
}

/// The environment of a worker: the torchrun variables every training program understands,
/// plus Flotilla's own. The one place worker environments are built.
pub fn worker_env(
    launch: &WorkerLaunch,
    progress_socket: &Path,
    sim_misbehaviour_dir: Option<&Path>,
) -> BTreeMap<String, String> {
    let mut env = launch.env.clone();
    if let Some(dir) = sim_misbehaviour_dir {
        let files = std::env::join_paths(launch.gpu_uuids.iter().map(|u| dir.join(u)));
        match files {
            Ok(files) => {
                env.insert(var::SIM_GPU_FAULTS.into(), files.to_string_lossy().into_owned());
            }
            Err(e) => {
                tracing::warn!(error = %e, "GPU uuids that make no path; no simulated misbehaviour")
            }
        }
    }
    let id = &launch.id;
    let fixed = [
        (var::RANK, id.rank.to_string()),
        (var::LOCAL_RANK, launch.local_rank.to_string()),
        (var::WORLD_SIZE, launch.world_size.to_string()),
        (var::MASTER_ADDR, launch.master_addr.clone()),
        (var::MASTER_PORT, launch.master_port.to_string()),
        (var::CUDA_VISIBLE_DEVICES, launch.gpu_uuids.join(",")),
        (var::JOB_UID, id.job_uid.clone()),
        (var::ATTEMPT, id.attempt.to_string()),
        (var::CHECKPOINT_DIR, launch.checkpoint_dir.clone()),
        (var::PROGRESS_SOCKET, progress_socket.display().to_string()),
        // Workers are never on a terminal: plain log lines, not a progress bar.
        (var::NO_PROGRESS_BAR, var::NO_PROGRESS_BAR_VALUE.to_string()),
    ];
    for (key, value) in fixed {
        env.insert(key.to_string(), value);
    }
    env
}

/// The running set, shared with the tasks that watch each worker.
#[derive(Clone, Debug, Default)]
struct Registry {
    workers: Arc<Mutex<HashMap<WorkerId, RunningWorker>>>,
    /// Workers sent SIGTERM and not yet gone.
    stopping: Arc<Mutex<std::collections::HashSet<WorkerId>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, RunningWorker>> {
        // A panic while holding this lock leaves a plain map behind; keep using it.
        self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `id` as stopping; false when it already was (a repeated stop: the worker got its
    /// SIGTERM, and a second one would make it skip its checkpoint).
    fn begin_stop(&self, id: &WorkerId) -> bool {
        self.stopping.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone())
    }

    fn contains(&self, id: &WorkerId) -> bool {
        self.lock().contains_key(id)
    }

    fn insert(&self, worker: RunningWorker) {
        self.lock().insert(worker.id.clone(), worker);
    }

    fn remove(&self, id: &WorkerId) {
        self.lock().remove(id);
        self.stopping.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }

    fn snapshot(&self) -> Vec<RunningWorker> {
        self.lock().values().cloned().collect()
    }
}

/// Reaps whatever of a worker's process group was re-parented to this (subreaper) process.
async fn reap_group(pgid: i32) {
    for _ in 0..100 {
        match waitpid(Pid::from_raw(-pgid), Some(WaitPidFlag::WNOHANG)) {
            // Reaped one; there may be more.
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(_) => {}
            // ECHILD: no child of ours is left in the group.
            Err(_) => return,
        }
    }
}

fn short_hash(s: &str) -> String {
    // A stable, short file-name component; collisions only cost a clearer error on bind.
    let h = flotilla_contract::fnv::fnv1a_64(s.as_bytes());
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
