//! Helpers of the end-to-end tests: the operator and two agents with simulated GPUs as real
//! processes, and a tiny-engine TrainingJob.

#![allow(dead_code)]

use crate::operator_support::{Operator, eventually, operator_binary, workspace};
use flotilla_operator::crd::engine::EngineConfig;
use flotilla_operator::crd::training_job::{
    PlacementStrategy, RestartPolicy, SchedulingSpec, TrainingJobSpec,
};
use flotilla_operator::crd::{GpuNode, TrainingJob};
use kube::api::Api;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How long each phase may take.
pub const WAIT: Duration = Duration::from_secs(120);

/// A binary next to this test executable, built from `package` when missing.
pub fn binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join(name);
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .current_dir(workspace())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} --bin {name} failed");
    }
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

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

pub fn start_agent(node: &str, operator_port: u16, admin_port: u16, dir: &Path) -> Process {
    let log = dir.join(format!("agent-{node}.log"));
    let file = std::fs::File::create(&log).expect("agent log");
    let child = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .arg("run")
        .env("FLOTILLA_NODE_NAME", node)
        .env("FLOTILLA_OPERATOR_URL", format!("http://127.0.0.1:{operator_port}"))
        .env("FLOTILLA_SIM_GPUS", "4")
        .env("FLOTILLA_AGENT_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("FLOTILLA_WORKER_LOG_DIR", dir.join(format!("logs-{node}")))
        .env("FLOTILLA_WORKER_SOCKET_DIR", dir.join(format!("s-{node}")))
        .env("FLOTILLA_LOG", "info")
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-agent");
    Process { child, log, node: node.to_string() }
}

/// 2 workers × 2 GPUs, one per agent, training the tiny preset for `steps`, checkpointing every
/// `checkpoint_every` steps.
pub fn job(name: &str, steps: u64, checkpoint_every: u64) -> TrainingJob {
    let mut engine = EngineConfig::preset("tiny").expect("tiny preset");
    engine.training.steps = steps;
    engine.training.checkpoint_interval = checkpoint_every;
    TrainingJob::new(
        name,
        TrainingJobSpec {
            workers: 2,
            gpus_per_worker: 2,
            engine: Some(engine),
            command: None,
            checkpoint: None,
            restart_policy: RestartPolicy { max_restarts: 0, ..Default::default() },
            priority: 0,
            // One worker per agent, so rendezvous crosses agents.
            scheduling: SchedulingSpec {
                strategy: PlacementStrategy::Spread,
                ..Default::default()
            },
            suspend: false,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        },
    )
}

/// The operator and two agents (4 simulated GPUs each, admin servers on known ports).
pub struct Rig {
    /// The operator.
    pub operator: Operator,
    /// Agents and their admin ports.
    pub agents: Vec<(Process, u16)>,
    /// Logs, checkpoints, sockets.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Start everything and wait until both agents' GpuNodes show 4 healthy GPUs.
    pub async fn start(cp: &flotilla_tests::ControlPlane, ns: &str, client: &kube::Client) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = binary("flotilla-worker", "flotilla-engine");
        let agent_port = free_port();
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(operator_binary())
            .arg("run")
            .env("KUBECONFIG", cp.kubeconfig())
            .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
            .env("FLOTILLA_IDENTITY", format!("op-{ns}"))
            .env("FLOTILLA_LEASE_NAMESPACE", ns)
            .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
            .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
            .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
            .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{agent_port}"))
            .env("FLOTILLA_AGENT_INSECURE", "true")
            .env("FLOTILLA_WORKER_BINARY", &worker)
            .env("FLOTILLA_CHECKPOINT_ROOT", dir.path().join("checkpoints"))
            .env("FLOTILLA_WORKER_MASTER_ADDR", "127.0.0.1")
            .env(
                "FLOTILLA_MASTER_PORT_BASE",
                free_port().saturating_sub(1000).max(20000).to_string(),
            )
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("starting flotilla-operator");
        let operator = Operator { child, identity: format!("op-{ns}"), log };
        let agents = ["a", "b"]
            .iter()
            .map(|n| {
                let admin = free_port();
                (start_agent(&format!("{ns}-{n}"), agent_port, admin, dir.path()), admin)
            })
            .collect();
        let rig = Rig { operator, agents, dir };
        let nodes: Api<GpuNode> = Api::all(client.clone());
        for name in rig.node_names() {
            eventually(WAIT, &format!("GpuNode {name} with 4 healthy GPUs"), || async {
                let n = nodes.get_opt(&name).await.ok()??;
                (n.status?.healthy_gpus == 4).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
        }
        rig
    }

    /// The agents' node names.
    pub fn node_names(&self) -> Vec<String> {
        self.agents.iter().map(|(p, _)| p.node.clone()).collect()
    }

    /// Every log: operator, agents, workers.
    pub fn logs(&self) -> String {
        let mut all = format!("operator:\n{}", self.operator.log());
        for (a, _) in &self.agents {
            all.push_str(&format!("\n{}:\n{}", a.log.display(), a.log()));
        }
        for worker_log in
            walk(self.dir.path()).iter().filter(|p| p.to_string_lossy().contains("/logs-"))
        {
            let text = std::fs::read_to_string(worker_log).unwrap_or_default();
            all.push_str(&format!("\n{}:\n{text}", worker_log.display()));
        }
        all
    }
}

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
