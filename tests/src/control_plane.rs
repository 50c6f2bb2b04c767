//! One real Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager, built
//! from the Go modules by `tests/controlplane`) per scope, started on first use and stopped when
//! its last user drops it.
//!
//! A scope is a group of tests that may share an API server: the end-to-end tests start
//! operators that watch every namespace and agents whose `GpuNode`s are cluster-scoped, so two of
//! them on one API server would act on each other's objects. Each test module of the `e2e` binary
//! is its own scope (`control_plane_for(module_path!())`), as each was its own test binary
//! before. [`control_plane()`] is the one control plane of a process that needs no more.
//!
//! A control plane is stopped however the test process ends: it runs with
//! `--exit-on-stdin-close` and this process holds the write end of its standard input, which the
//! kernel closes when the process ends, after a panic or a kill too.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::namespace::unique_suffix;

/// How long a control plane may take from spawn to its ready line (a cold start on 2 busy cores).
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// How many lines of the control plane's log are kept for error messages.
const LOG_LINES: usize = 200;

/// A running control plane shared by the tests of one scope.
#[derive(Debug)]
pub struct ControlPlane {
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    dir: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Held, never written: closing it (on drop, or at process exit) tells the control plane to
    /// stop.
    stdin: Option<ChildStdin>,
    child: Option<Child>,
}

/// Per scope, the control plane its tests hold now, if any. The inner mutex is held while one
/// starts, so that two tests of a scope arriving together share it.
type Scopes = BTreeMap<String, Arc<Mutex<Weak<ControlPlane>>>>;

static SCOPES: Mutex<Scopes> = Mutex::new(BTreeMap::new());

/// The control plane of this process, started on the first call and kept until the process
/// exits: for a test binary or an example that needs one API server, not several scopes.
pub async fn control_plane() -> &'static ControlPlane {
    static PROCESS: OnceLock<Arc<ControlPlane>> = OnceLock::new();
    if let Some(cp) = PROCESS.get() {
        return cp;
    }
    let cp = control_plane_for("process").await;
    PROCESS.get_or_init(|| cp)
}

/// The control plane of `scope`, started on the first call or when every earlier holder has
/// dropped its one (which stops it, so a finished scope's memory is freed for the next).
///
/// Panics with the control plane's log when it cannot start: every test that needs it would fail
/// the same way, and the log is what explains why.
pub async fn control_plane_for(scope: &str) -> Arc<ControlPlane> {
    scoped(scope, Admission::NoPods).await
}

/// The control plane of `scope`, set up for a real node ([`crate::Node`]): Pods get their
/// ServiceAccount tokens (the ServiceAccount admission plugin is on).
pub async fn control_plane_with_pods_for(scope: &str) -> Arc<ControlPlane> {
    scoped(scope, Admission::Pods).await
}

/// Whether the control plane admits Pods as a cluster with nodes does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// No node runs Pods: no ServiceAccount admission (no default ServiceAccount to find).
    NoPods,
    /// A node runs Pods: `--pods`.
    Pods,
}

async fn scoped(scope: &str, admission: Admission) -> Arc<ControlPlane> {
    let slot = {
        let mut scopes = SCOPES.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(scopes.entry(scope.to_owned()).or_default())
    };
    let started = tokio::task::spawn_blocking(move || {
        let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cp) = held.upgrade() {
            return Ok(cp);
        }
        let cp = Arc::new(ControlPlane::start(admission)?);
        *held = Arc::downgrade(&cp);
        Ok::<_, anyhow::Error>(cp)
    })
    .await
    .expect("the control-plane start task panicked");
    started.unwrap_or_else(|err| panic!("starting the test control plane for {scope}: {err:#}"))
}

// === impl ControlPlane ===

impl ControlPlane {
    fn start(admission: Admission) -> anyhow::Result<Self> {
        let bin_dir = controlplane_bin_dir()?;
        // A directory that does not exist yet: the control plane creates it and, having created
        // it, removes all of it at shutdown.
        static RUN: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flotilla-test-cp-{}-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed),
            unique_suffix()
        ));
        let kubeconfig = dir.join("kubeconfig");

        let mut child = Command::new(bin_dir.join("controlplane"))
            .arg("--dir")
            .arg(&dir)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--port=0")
            .arg("--exit-on-stdin-close")
            .args((admission == Admission::Pods).then_some("--pods"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin_dir.join("controlplane").display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let log = capture_lines(child.stderr.take().expect("stderr is piped"));

        let ready = wait_for_line(stdout, "controlplane ready: ", READY_TIMEOUT);
        let server = match ready.and_then(|line| server_field(&line)) {
            Ok(server) => server,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                let lines = log.lock().map(|l| Vec::from(l.clone()).join("\n")).unwrap_or_default();
                bail!("{err:#}\n--- control plane log (last {LOG_LINES} lines) ---\n{lines}");
            }
        };
        Ok(Self { bin_dir, kubeconfig, server, dir, log, stdin: Some(stdin), child: Some(child) })
    }

    /// A new client for the admin user. Make one per test: a client is bound to the Tokio
    /// runtime that created it, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin kubeconfig file.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The last lines the control plane logged (etcd, kube-apiserver, controller-manager).
    pub fn log_tail(&self) -> String {
        self.log.lock().map(|l| Vec::from(l.clone()).join("\n")).unwrap_or_default()
    }

    /// The control plane's data directory; it is gone once the control plane has stopped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `kubectl` of the control plane's version, with `--kubeconfig` already set.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        // Discovery is cached per server address; control planes of one test run may reuse a
        // port, so each keeps its own cache instead of reading another's resource list.
        cmd.arg("--cache-dir").arg(self.dir.join("kubectl-cache"));
        cmd
    }

    /// Freezes the whole control plane (etcd and the API server) with SIGSTOP, as an outage that
    /// answers nothing; [`ControlPlane::resume`] ends it. Every test of the scope sees it.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Ends a [`ControlPlane::freeze`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("a running control plane").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// The directory holding `controlplane`, `kubectl`, `kube-scheduler`,
    /// `kube-controller-manager`, `kubelet`, `flotilla-node` and `pause`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing stdin asks for a clean shutdown (the data directory removed); the child is
        // reaped on a thread of its own so that dropping never blocks a test.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

/// Where the control-plane binaries are: `FLOTILLA_CONTROLPLANE_BIN_DIR` if set, else what
/// `tests/controlplane/build.sh` prints (it builds once, then answers from its cache).
pub fn controlplane_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOTILLA_CONTROLPLANE_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    let stdout = String::from_utf8(output.stdout)?;
    let last = stdout.lines().last().unwrap_or_default().trim();
    if last.is_empty() {
        bail!("{} printed no binary directory", script.display());
    }
    Ok(PathBuf::from(last))
}

/// Reads a child's stdout until a line starting with `prefix`, and returns the rest of that line;
/// keeps draining it afterwards so the child never blocks on a full pipe.
pub(crate) fn wait_for_line(
    stdout: impl Read + Send + 'static,
    prefix: &'static str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let started = Instant::now();
    match rx.recv_timeout(timeout) {
        Ok(rest) => Ok(rest),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("no `{prefix}` line within {:?}", started.elapsed())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            bail!("the process exited before its `{prefix}` line")
        }
    }
}

/// The `server=URL` field of the control plane's ready line.
fn server_field(line: &str) -> anyhow::Result<String> {
    match line.split_whitespace().find_map(|field| field.strip_prefix("server=")) {
        Some(server) if !server.is_empty() => Ok(server.to_string()),
        _ => bail!("the ready line carried no server= field: {line}"),
    }
}

/// Keeps the last [`LOG_LINES`] lines of a child's output, draining it so the child never blocks.
pub(crate) fn capture_lines(output: impl Read + Send + 'static) -> Arc<Mutex<VecDeque<String>>> {
    let lines = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES)));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut kept) = sink.lock() {
                if kept.len() == LOG_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        }
    });
    lines
}
