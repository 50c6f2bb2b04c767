//! Helpers shared by the operator's integration tests: install the committed CRDs, run the
//! built `flotilla-operator` binary, wait for conditions.

#![allow(dead_code)]

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `flotilla-operator` binary next to this test executable (target/<profile>/). Every call
/// runs `cargo build --workspace --bins` first — a no-op when nothing changed — so a test never
/// runs a stale binary left by an earlier build.
pub fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("flotilla-operator");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--workspace", "--bins"])
        .current_dir(workspace())
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build --workspace --bins failed");
    assert!(bin.exists(), "{} missing after cargo build", bin.display());
    bin
}

/// Run kubectl with `args`, feeding `stdin` when given.
pub fn kubectl(cp: &flotilla_tests::ControlPlane, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = cp.kubectl();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawning kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    }
    child.wait_with_output().expect("waiting for kubectl")
}

/// Apply the committed CRDs and wait until they are established.
pub fn install_crds(cp: &flotilla_tests::ControlPlane) -> Result<()> {
    let dir = workspace().join("deploy/crds");
    let out = kubectl(
        cp,
        &["apply", "--server-side", "--force-conflicts", "-f", dir.to_str().expect("utf-8 path")],
        None,
    );
    if !out.status.success() {
        bail!("applying CRDs: {}", String::from_utf8_lossy(&out.stderr));
    }
    for crd in
        ["trainingjobs.flotilla.dev", "inferenceservices.flotilla.dev", "gpunodes.flotilla.dev"]
    {
        let out = kubectl(
            cp,
            &["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}")],
            None,
        );
        if !out.status.success() {
            bail!("waiting for {crd}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// A running operator process, killed when dropped.
pub struct Operator {
    /// The child process.
    pub child: Child,
    /// Its identity on the lease.
    pub identity: String,
    /// Where its log goes.
    pub log: PathBuf,
}

impl Operator {
    /// Start the operator against `cp` with a short lease in `lease_namespace`.
    pub fn start(
        cp: &flotilla_tests::ControlPlane,
        identity: &str,
        lease_namespace: &str,
        log_dir: &Path,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(operator_binary())
            .arg("run")
            .env("KUBECONFIG", cp.kubeconfig())
            .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
            .env("FLOTILLA_IDENTITY", identity)
            .env("FLOTILLA_LEASE_NAMESPACE", lease_namespace)
            .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
            .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
            .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
            // No agents in these tests, but the operator refuses to run without an agent link.
            .env("FLOTILLA_AGENT_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_AGENT_INSECURE", "true")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting flotilla-operator")?;
        Ok(Operator { child, identity: identity.into(), log })
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the admin server (its address is in the log); the response body, or
    /// `None` before the server listens or when the status is not 200.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let log = self.log();
        let line = log.lines().find(|l| l.contains("admin server listening"))?;
        let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200").then(|| body.to_string())
    }

    /// SIGKILL: the process dies without releasing its lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `check` every 200 ms until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
