//! Child processes of a test: agents, their fault injection, and the files they leave.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::backend::AgentGpus;
use crate::binaries::binary;

/// A child process killed when dropped, with its log file.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
    /// The node, for an agent.
    pub node: String,
}

impl Process {
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where an agent renews its node's Lease, as installed agents do: the API server (the control
/// plane's kubeconfig) and the operator's namespace.
#[derive(Clone, Debug)]
pub struct LeaseAccess {
    /// Kubeconfig of the control plane.
    pub kubeconfig: std::path::PathBuf,
    /// The operator's (lease) namespace.
    pub namespace: String,
}

/// Starts `flotilla-agent run` for `node` with 4 simulated GPUs, reporting to the operator on
/// `operator_port`, its admin server on `admin_port`, its files under `dir`, renewing its node
/// Lease through `lease`.
pub fn start_agent(
    node: &str,
    operator_port: u16,
    admin_port: u16,
    dir: &Path,
    lease: &LeaseAccess,
) -> Process {
    start_agent_on(node, operator_port, admin_port, dir, lease, &AgentGpus::Simulated)
}

/// [`start_agent`] on `gpus` (4 simulated GPUs, or the NVML backend on a stand-in of 4).
pub fn start_agent_on(
    node: &str,
    operator_port: u16,
    admin_port: u16,
    dir: &Path,
    lease: &LeaseAccess,
    gpus: &AgentGpus,
) -> Process {
    let log = dir.join(format!("agent-{node}.log"));
    // Appended to: a restarted agent keeps its predecessor's lines.
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("agent log");
    let child = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .arg("run")
        .env("FLOTILLA_NODE_NAME", node)
        .env("FLOTILLA_OPERATOR_URL", format!("http://127.0.0.1:{operator_port}"))
        .env("FLOTILLA_SIM_GPUS", "4")
        .env("KUBECONFIG", &lease.kubeconfig)
        .env("FLOTILLA_AGENT_LEASE_NAMESPACE", &lease.namespace)
        .env("FLOTILLA_AGENT_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("FLOTILLA_WORKER_LOG_DIR", dir.join(format!("logs-{node}")))
        .env("FLOTILLA_WORKER_SOCKET_DIR", dir.join(format!("s-{node}")))
        .env("FLOTILLA_LOG", "info")
        .envs(gpus.env())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-agent");
    Process { child, log, node: node.to_string() }
}

/// Injects XID `xid` into GPU `gpu` through the agent whose admin server listens on `admin`
/// (`flotilla-agent inject`, as an administrator would).
pub fn inject_xid_at(admin: u16, gpu: i32, xid: u32) {
    let out = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .args(["inject", "--agent", &format!("127.0.0.1:{admin}"), "--gpu", &gpu.to_string()])
        .args(["--xid", &xid.to_string()])
        .output()
        .expect("flotilla-agent inject");
    assert!(out.status.success(), "inject: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Appends every worker log under `dir` (the `logs-<node>` directories) to `all`, each after its
/// path.
pub fn append_worker_logs(all: &mut String, dir: &Path) {
    for worker_log in walk(dir).iter().filter(|p| p.to_string_lossy().contains("/logs-")) {
        let text = std::fs::read_to_string(worker_log).unwrap_or_default();
        all.push_str(&format!("\n{}:\n{text}", worker_log.display()));
    }
}
