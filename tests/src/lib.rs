//! Test support: one real Kubernetes control plane (etcd + kube-apiserver, built from the Go
//! modules by `tests/controlplane`) per test binary, started on first use.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let cp = flotilla_tests::control_plane().await;
//! let client = cp.client().await?;
//! let ns = flotilla_tests::namespace(&client, "smoke").await?;
//! # Ok(()) }
//! ```
//!
//! The control plane is stopped when the test binary exits, however it exits: it runs with
//! `--exit-on-stdin-close` and this process holds the write end of its standard input, which the
//! kernel closes when the process ends, after a panic or a kill too.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// How long a control plane may take from spawn to its ready line (a cold start on 2 busy cores).
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// How many lines of the control plane's log are kept for error messages.
const LOG_LINES: usize = 200;

/// A running control plane shared by every test of one test binary.
#[derive(Debug)]
pub struct ControlPlane {
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    dir: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Held, never written: its closing (at process exit) tells the control plane to stop.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane of this test binary, started on the first call.
///
/// Panics with the control plane's log when it cannot start: every test that needs it would fail
/// the same way, and the log is what explains why.
pub async fn control_plane() -> &'static ControlPlane {
    if let Some(cp) = CONTROL_PLANE.get() {
        return cp;
    }
    tokio::task::spawn_blocking(|| {
        CONTROL_PLANE.get_or_init(|| match ControlPlane::start() {
            Ok(cp) => cp,
            Err(err) => panic!("starting the test control plane: {err:#}"),
        })
    })
    .await
    .expect("the control-plane start task panicked")
}

// === impl ControlPlane ===

impl ControlPlane {
    fn start() -> anyhow::Result<Self> {
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
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin_dir.join("controlplane").display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let log = capture_lines(child.stderr.take().expect("stderr is piped"));

        let server = match wait_for_ready_line(stdout) {
            Ok(server) => server,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                let lines = log.lock().map(|l| Vec::from(l.clone()).join("\n")).unwrap_or_default();
                bail!("{err:#}\n--- control plane log (last {LOG_LINES} lines) ---\n{lines}");
            }
        };
        Ok(Self {
            bin_dir,
            kubeconfig,
            server,
            dir,
            log,
            _stdin: Mutex::new(stdin),
            _child: Mutex::new(child),
        })
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
        cmd
    }

    /// The directory holding `controlplane`, `kubectl`, `kube-scheduler` and
    /// `kube-controller-manager`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
}

/// Creates a fresh namespace named `<prefix>-<n>-<random>` and returns its name.
pub async fn namespace(client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let suffix = unique_suffix();
    // A namespace name is a DNS label: at most 63 characters.
    let prefix: String = prefix.chars().take(40).collect();
    let name = format!("{prefix}-{n}-{suffix}").to_lowercase();
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
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

/// Reads the control plane's stdout until its `controlplane ready: server=URL ...` line.
fn wait_for_ready_line(stdout: impl Read + Send + 'static) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("controlplane ready: ") {
                let server = rest
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("server="))
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(server);
            }
        }
        // Keep draining until the pipe closes so the child never blocks on a full pipe.
    });
    let started = Instant::now();
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(server) if !server.is_empty() => Ok(server),
        Ok(_) => bail!("the ready line carried no server= field"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("no ready line within {:?}", started.elapsed())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            bail!("the control plane exited before it was ready")
        }
    }
}

/// Keeps the last [`LOG_LINES`] lines of a child's output, draining it so the child never blocks.
fn capture_lines(output: impl Read + Send + 'static) -> Arc<Mutex<VecDeque<String>>> {
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
