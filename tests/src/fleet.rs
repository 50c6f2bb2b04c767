//! The operator and two agents with simulated GPUs as real processes, for the observability and
//! RBAC tests: like [`crate::Rig`], but the operator's kubeconfig and admin port are chosen
//! by the test, and workers serve their metrics on free ports (named in their logs).

use std::path::Path;
use std::process::Command;

use flotilla_operator::crd::GpuNode;
use kube::api::Api;

use crate::RigTurn;
use crate::binaries::{binary, operator_binary};
use crate::ports::{free_port, master_port_base};
use crate::process::{Process, append_worker_logs, walk};
use crate::wait::{WAIT, eventually};

/// The operator and its two agents.
pub struct Fleet {
    /// The operator process.
    pub operator: Process,
    /// The operator's admin port (`/metrics`).
    pub operator_admin: u16,
    /// Agents and their admin ports.
    pub agents: Vec<(Process, u16)>,
    /// Logs, checkpoints, sockets.
    pub dir: tempfile::TempDir,
    /// Last, so that it is released after every process above is gone.
    _turn: RigTurn,
}

fn spawn(mut cmd: Command, log: &Path, what: &str) -> std::process::Child {
    let file = std::fs::File::create(log).expect("log file");
    cmd.stdout(file.try_clone().expect("log")).stderr(file);
    cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"))
}

impl Fleet {
    /// Start the operator with `kubeconfig` (its Lease in `lease_ns`) and two agents `<ns>-a`,
    /// `<ns>-b` with 4 simulated GPUs each; wait until both `GpuNode`s show 4 healthy GPUs (read
    /// with `client`).
    pub async fn start(
        kubeconfig: &Path,
        ns: &str,
        lease_ns: &str,
        client: &kube::Client,
    ) -> Fleet {
        let turn = RigTurn::take().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (agent_port, operator_admin) = (free_port(), free_port());
        let log = dir.path().join("operator.log");
        let mut cmd = Command::new(operator_binary());
        cmd.arg("run")
            .env("KUBECONFIG", kubeconfig)
            .env("FLOTILLA_ADMIN_ADDR", format!("127.0.0.1:{operator_admin}"))
            .env("FLOTILLA_IDENTITY", format!("op-{ns}"))
            .env("FLOTILLA_LEASE_NAMESPACE", lease_ns)
            .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
            .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
            .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
            .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{agent_port}"))
            .env("FLOTILLA_AGENT_INSECURE", "true")
            .env("FLOTILLA_WORKER_BINARY", binary("flotilla-worker", "flotilla-engine"))
            .env("FLOTILLA_CHECKPOINT_ROOT", dir.path().join("checkpoints"))
            .env("FLOTILLA_WORKER_MASTER_ADDR", "127.0.0.1")
            .env("FLOTILLA_MASTER_PORT_BASE", master_port_base());
        let child = spawn(cmd, &log, "flotilla-operator");
        let operator = Process { child, log, node: String::new() };
        let mut agents = Vec::new();
        for n in ["a", "b"] {
            let node = format!("{ns}-{n}");
            let admin = free_port();
            let log = dir.path().join(format!("agent-{node}.log"));
            let mut cmd = Command::new(binary("flotilla-agent", "flotilla-agent"));
            cmd.arg("run")
                .env("FLOTILLA_NODE_NAME", &node)
                .env("FLOTILLA_OPERATOR_URL", format!("http://127.0.0.1:{agent_port}"))
                .env("FLOTILLA_SIM_GPUS", "4")
                .env("FLOTILLA_AGENT_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
                .env("FLOTILLA_WORKER_LOG_DIR", dir.path().join(format!("logs-{node}")))
                .env("FLOTILLA_WORKER_SOCKET_DIR", dir.path().join(format!("s-{node}")))
                .env("FLOTILLA_LOG", "info")
                // Workers inherit the agent's environment: each serves /metrics on a free port.
                .env("FLOTILLA_METRICS_PORT", "0");
            let child = spawn(cmd, &log, "flotilla-agent");
            agents.push((Process { child, log, node }, admin));
        }
        let fleet = Fleet { operator, operator_admin, agents, dir, _turn: turn };
        let nodes: Api<GpuNode> = Api::all(client.clone());
        for (agent, _) in &fleet.agents {
            eventually(WAIT, &format!("GpuNode {} with 4 healthy GPUs", agent.node), || async {
                let n = nodes.get_opt(&agent.node).await.ok()??;
                (n.status?.healthy_gpus == 4).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
        }
        fleet
    }

    /// The admin port of the agent on `node`.
    pub fn agent_admin(&self, node: &str) -> u16 {
        self.agents.iter().find(|(p, _)| p.node == node).map(|(_, port)| *port).expect("agent")
    }

    /// `127.0.0.1:PORT` of every worker that said where it serves metrics, with its log path.
    pub fn worker_metrics(&self) -> Vec<(String, String)> {
        worker_metrics(self.dir.path())
    }

    /// Every log: operator, agents, workers.
    pub fn logs(&self) -> String {
        let mut all = format!("operator:\n{}", self.operator.log());
        for (a, _) in &self.agents {
            all.push_str(&format!("\n{}:\n{}", a.log.display(), a.log()));
        }
        append_worker_logs(&mut all, self.dir.path());
        all
    }
}

/// `127.0.0.1:PORT` of every worker under `dir` that said where it serves metrics, with its log.
pub fn worker_metrics(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for log in walk(dir).iter().filter(|p| p.to_string_lossy().contains("/logs-")) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text
            .lines()
            .find_map(|l| l.split("metrics on ").nth(1))
            .and_then(|addr| addr.trim().rsplit(':').next().map(str::to_owned));
        if let Some(port) = port {
            out.push((format!("127.0.0.1:{port}"), log.display().to_string()));
        }
    }
    out.sort();
    out
}
