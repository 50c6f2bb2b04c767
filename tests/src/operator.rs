//! The built `flotilla-operator` binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context as _, Result};

use crate::ControlPlane;
use crate::binaries::operator_binary;

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
        cp: &ControlPlane,
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
