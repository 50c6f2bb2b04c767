//! The worker supervisor: runs each worker as a process-group leader with a torchrun-style
//! environment, keeps its output in size-bounded log files, listens for its progress on a Unix
//! socket, and reports started / progress / exited through the agent's update channel.
//!
//! A worker counts as exited only once its whole process group is gone: after the leader exits,
//! what is left of the group is killed and reaped (the agent is a child subreaper, so orphaned
//! grandchildren come back to it). That is what lets the operator treat "exited" as "confirmed
//! dead" (DESIGN.md safety rule 1).

use crate::supervisor::{
    Progress, RunningWorker, SupervisorError, WorkerId, WorkerLaunch, WorkerSupervisor,
    WorkerUpdate,
};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;

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
            .envs(worker_env(&launch, &socket_path))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // Its own process group, so a stop reaches everything it started.
        command.as_std_mut().process_group(0);
        // It dies with the agent (safety rule 1): an agent that crashes or is stopped must not
        // leave workers training or serving that nobody supervises and no restarted agent
        // knows of. The signal is SIGKILL, because nobody is left to wait for a checkpoint.
        let agent_pid = std::process::id();
        // SAFETY: `die_with_parent` makes only async-signal-safe calls (prctl, getppid) and
        // allocates nothing, as code between fork and exec must.
        #[allow(unsafe_code)]
        unsafe {
            command.as_std_mut().pre_exec(move || die_with_parent(agent_pid));
        }
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

/// In a worker between fork and exec: ask for SIGKILL when the agent dies, and fail the spawn if
/// it already died (then the child was re-parented before the request could take effect).
///
/// Linux sends the signal when the *thread* that forked the child ends. Workers are forked by
/// the agent's runtime worker threads (the link task), which live as long as the agent.
fn die_with_parent(agent_pid: u32) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
    if nix::unistd::getppid().as_raw() as u32 != agent_pid {
        // The spawn fails and the child exits without running the worker.
        return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
    }
    Ok(())
}

/// The environment of a worker: the torchrun variables every training program understands,
/// plus Flotilla's own. The one place worker environments are built.
pub fn worker_env(launch: &WorkerLaunch, progress_socket: &Path) -> BTreeMap<String, String> {
    let mut env = launch.env.clone();
    let id = &launch.id;
    let fixed = [
        ("RANK", id.rank.to_string()),
        ("LOCAL_RANK", launch.local_rank.to_string()),
        ("WORLD_SIZE", launch.world_size.to_string()),
        ("MASTER_ADDR", launch.master_addr.clone()),
        ("MASTER_PORT", launch.master_port.to_string()),
        ("CUDA_VISIBLE_DEVICES", launch.gpu_uuids.join(",")),
        ("FLOTILLA_JOB_UID", id.job_uid.clone()),
        ("FLOTILLA_ATTEMPT", id.attempt.to_string()),
        ("FLOTILLA_CHECKPOINT_DIR", launch.checkpoint_dir.clone()),
        ("FLOTILLA_PROGRESS_SOCKET", progress_socket.display().to_string()),
        // Workers are never on a terminal: plain log lines, not a progress bar.
        ("FLOTILLA_NO_PROGRESS_BAR", "1".to_string()),
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

/// Copies a worker's output into its log, line by line where lines are short.
async fn copy_to_log(mut output: impl AsyncRead + Unpin, log: BoundedLog) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match output.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => log.write(&buf[..n]).await,
        }
    }
}

/// A log file that rotates to `<file>.1` at a size limit, so a chatty worker cannot fill a disk.
#[derive(Clone, Debug)]
struct BoundedLog(Arc<tokio::sync::Mutex<BoundedLogState>>);

#[derive(Debug)]
struct BoundedLogState {
    path: PathBuf,
    max_bytes: u64,
    written: u64,
    file: Option<tokio::fs::File>,
}

impl BoundedLog {
    fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(BoundedLogState {
            path,
            max_bytes: max_bytes.max(1024),
            written: 0,
            file: None,
        })))
    }

    async fn write(&self, bytes: &[u8]) {
        let mut state = self.0.lock().await;
        if state.file.is_none() || state.written + bytes.len() as u64 > state.max_bytes {
            if state.file.take().is_some() {
                let rotated = rotated_path(&state.path);
                let _ = tokio::fs::rename(&state.path, rotated).await;
            }
            match tokio::fs::File::create(&state.path).await {
                Ok(file) => {
                    state.file = Some(file);
                    state.written = 0;
                }
                Err(e) => {
                    tracing::warn!(path = %state.path.display(), error = %e, "cannot write worker log");
                    return;
                }
            }
        }
        if let Some(file) = state.file.as_mut()
            && file.write_all(bytes).await.is_ok()
        {
            let _ = file.flush().await;
            state.written += bytes.len() as u64;
        }
    }
}

fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// One progress line as `flotilla-worker` writes it (see the engine's `progress` module).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProgressLine {
    step: u64,
    total_steps: u64,
    loss: f64,
    tokens_per_second: f64,
    last_checkpoint_step: Option<u64>,
}

/// Accepts the worker's progress connections (it reconnects after a failure) and forwards each
/// well-formed line; a malformed line is logged and skipped, never fatal.
/// Returns once `gone` is notified (the worker exited) and no connection is open.
async fn read_progress(
    listener: tokio::net::UnixListener,
    id: WorkerId,
    updates: Option<UnboundedSender<WorkerUpdate>>,
    gone: Arc<tokio::sync::Notify>,
) {
    loop {
        let stream = tokio::select! {
            biased;
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => return,
            },
            () = gone.notified() => return,
        };
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.len() > 4096 {
                tracing::warn!(
                    rank = id.rank,
                    bytes = line.len(),
                    "progress line too long; skipped"
                );
                continue;
            }
            match serde_json::from_str::<ProgressLine>(&line) {
                Ok(p) => {
                    let progress = Progress {
                        step: p.step,
                        total_steps: p.total_steps,
                        loss: p.loss,
                        tokens_per_second: p.tokens_per_second,
                        last_checkpoint_step: p.last_checkpoint_step.unwrap_or(0),
                    };
                    if let Some(tx) = &updates {
                        let _ = tx.send(WorkerUpdate::Progress(id.clone(), progress));
                    }
                }
                Err(e) => {
                    tracing::warn!(rank = id.rank, error = %e, "malformed progress line skipped")
                }
            }
        }
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
    // FNV-1a: a stable, short file-name component; collisions only cost a clearer error on bind.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn launch(job: &str, attempt: u64, script: &str) -> WorkerLaunch {
        WorkerLaunch {
            id: WorkerId { job_uid: job.into(), attempt, rank: 1 },
            local_rank: 0,
            world_size: 2,
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: [("USER_VAR".to_string(), "kept".to_string())].into(),
            checkpoint_dir: "/ckpt/job".into(),
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    fn supervisor(dir: &Path) -> (Arc<ProcessSupervisor>, mpsc::UnboundedReceiver<WorkerUpdate>) {
        let files = WorkerFiles {
            log_dir: dir.join("logs"),
            socket_dir: dir.join("s"),
            max_log_bytes: 4096,
        };
        let sup = ProcessSupervisor::new(files).expect("supervisor");
        let (tx, rx) = mpsc::unbounded_channel();
        sup.attach(tx);
        (sup, rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<WorkerUpdate>) -> WorkerUpdate {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("an update within 20 s")
            .expect("channel open")
    }

    #[tokio::test]
    async fn a_worker_gets_the_torchrun_environment_and_its_output_is_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut rx) = supervisor(dir.path());
        let job = launch("job-1", 3, "env; echo done; exit 7");
        sup.launch(job.clone()).expect("launch");
        assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
        match next(&mut rx).await {
            WorkerUpdate::Exited { id, code, signal } => {
                assert_eq!((id, code, signal), (job.id.clone(), Some(7), None));
            }
            other => panic!("expected Exited, got {other:?}"),
        }
        let log = std::fs::read_to_string(sup.log_path(&job.id)).expect("log");
        for line in [
            "RANK=1",
            "LOCAL_RANK=0",
            "WORLD_SIZE=2",
            "MASTER_ADDR=127.0.0.1",
            "MASTER_PORT=29500",
            "CUDA_VISIBLE_DEVICES=GPU-a,GPU-b",
            "FLOTILLA_ATTEMPT=3",
            "FLOTILLA_CHECKPOINT_DIR=/ckpt/job",
            "USER_VAR=kept",
            "done",
        ] {
            assert!(log.lines().any(|l| l == line), "log lacks {line}:\n{log}");
        }
        assert!(sup.running().is_empty());
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group_after_the_grace_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut rx) = supervisor(dir.path());
        // The leader ignores SIGTERM, and leaves a grandchild in its group.
        let job = launch("job-2", 1, "trap '' TERM; sleep 300 & echo $! > grandchild; wait");
        let cwd_script = format!("cd {} && {}", dir.path().display(), job.args[1]);
        let job = WorkerLaunch { args: vec!["-c".into(), cwd_script], ..job };
        sup.launch(job.clone()).expect("launch");
        assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
        let pidfile = dir.path().join("grandchild");
        for _ in 0..200 {
            if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let grandchild: i32 =
            std::fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("pid");
        assert_eq!(sup.running().len(), 1);

        sup.stop("job-2", 1, None, Duration::from_millis(300), "test").expect("stop");
        match next(&mut rx).await {
            WorkerUpdate::Exited { id, signal, .. } => {
                assert_eq!(id, job.id);
                assert_eq!(signal, Some(9), "SIGTERM was ignored, so SIGKILL ended it");
            }
            other => panic!("expected Exited, got {other:?}"),
        }
        let alive = nix::sys::signal::kill(Pid::from_raw(grandchild), None).is_ok();
        assert!(!alive, "grandchild {grandchild} outlived its worker");
        assert!(sup.running().is_empty());
    }

    #[tokio::test]
    async fn a_repeated_stop_sends_no_second_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut rx) = supervisor(dir.path());
        // Counts SIGTERMs (like the engine, a second one would mean "skip the checkpoint"),
        // exits 0 two seconds after the first.
        let script = format!(
            "cd {} && n=0; trap 'n=$((n+1)); echo $n > terms' TERM; \
             while [ ! -f terms ]; do sleep 0.05; done; sleep 2; exit 0",
            dir.path().display()
        );
        let job = launch("job-4", 1, &script);
        sup.launch(job.clone()).expect("launch");
        assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            sup.stop("job-4", 1, None, Duration::from_secs(30), "test").expect("stop");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match next(&mut rx).await {
            WorkerUpdate::Exited { code, .. } => assert_eq!(code, Some(0)),
            other => panic!("expected Exited, got {other:?}"),
        }
        let terms = std::fs::read_to_string(dir.path().join("terms")).expect("terms file");
        assert_eq!(terms.trim(), "1", "three stops, one SIGTERM");
    }

    #[tokio::test]
    async fn progress_lines_on_the_socket_become_updates_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut rx) = supervisor(dir.path());
        let job = launch("job-3", 2, "echo \"$FLOTILLA_PROGRESS_SOCKET\"; sleep 30");
        sup.launch(job.clone()).expect("launch");
        assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
        let log_path = sup.log_path(&job.id);
        let mut socket = String::new();
        for _ in 0..200 {
            socket = std::fs::read_to_string(&log_path).unwrap_or_default().trim().to_string();
            if !socket.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let mut stream = tokio::net::UnixStream::connect(&socket).await.expect("connect");
        stream.write_all(b"not json\n").await.expect("write");
        stream
            .write_all(b"{\"step\":5,\"totalSteps\":10,\"loss\":1.5,\"tokensPerSecond\":100.0,\"lastCheckpointStep\":4}\n")
            .await
            .expect("write");
        match next(&mut rx).await {
            WorkerUpdate::Progress(id, p) => {
                assert_eq!(id, job.id);
                assert_eq!((p.step, p.total_steps, p.last_checkpoint_step), (5, 10, 4));
                assert!((p.loss - 1.5).abs() < 1e-9);
            }
            other => panic!("expected Progress, got {other:?}"),
        }
        sup.kill_all("test over");
        assert!(matches!(next(&mut rx).await, WorkerUpdate::Exited { signal: Some(9), .. }));
    }

    #[test]
    fn logs_rotate_at_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.log");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let log = BoundedLog::new(path.clone(), 1024);
            for _ in 0..5 {
                log.write(&[b'x'; 400]).await;
            }
        });
        let current = std::fs::metadata(&path).expect("current").len();
        let previous = std::fs::metadata(rotated_path(&path)).expect("rotated").len();
        assert!(current <= 1024 && previous <= 1024, "current {current}, previous {previous}");
        assert_eq!(
            current + previous,
            1200,
            "the newest 1200 bytes survive rotation (2000 written)"
        );
    }
}
