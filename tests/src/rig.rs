//! The operator and two (or more) agents as real processes, on simulated GPUs or on the NVML
//! backend with the stand-in library ([`Backend`]): the rig of the end-to-end training tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use kube::api::Api;

use crate::ControlPlane;
use crate::backend::{AgentGpus, Backend, Fault};
use crate::binaries::{binary, operator_binary};
use crate::operator::Operator;
use crate::ports::{free_port, master_port_base};
use crate::process::{LeaseAccess, Process, append_worker_logs, start_agent_on, walk};
use crate::wait::{WAIT, eventually};

/// The operator and its agents (4 GPUs each, admin servers on known ports).
pub struct Rig {
    /// The operator.
    pub operator: Operator,
    /// Agents and their admin ports.
    pub agents: Vec<(Process, u16)>,
    /// Each agent's GPUs, by node.
    gpus: Vec<(String, AgentGpus)>,
    /// Logs, checkpoints, sockets.
    pub dir: tempfile::TempDir,
    /// How the operator was started, to start it again.
    settings: OperatorSettings,
    /// Logs of operators stopped earlier.
    old_operator_logs: Vec<PathBuf>,
    /// Last, so that it is released after every process above is gone.
    _turn: RigTurn,
}

impl Rig {
    /// Waits until the job `name` runs and has written a first checkpoint of its own; returns
    /// the running attempt.
    pub async fn running_with_checkpoint(
        &self,
        jobs: &Api<TrainingJob>,
        name: &str,
    ) -> flotilla_operator::crd::Attempt {
        let running = eventually(WAIT, &format!("{name} Running"), || async {
            let s = jobs.get(name).await.ok()?.status?;
            (s.phase == JobPhase::Running).then_some(s)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        let checkpoints = self.dir.path().join("checkpoints");
        // Checkpoint directories are `<root>/<namespace>/<name>-<uid>/step-…`.
        let own = format!("/{name}-");
        eventually(WAIT, &format!("a first checkpoint of {name}"), || async {
            walk(&checkpoints)
                .iter()
                .any(|p| {
                    let p = p.to_string_lossy();
                    p.contains(&own) && p.contains("/step-")
                })
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        running.attempt.expect("a running job has an attempt")
    }

    /// Whether a worker log of attempt `attempt` (of any job) says it resumed from a checkpoint.
    pub fn resumed_from_checkpoint(&self, attempt: i32) -> bool {
        let dir = format!("/attempt-{attempt}/");
        walk(self.dir.path())
            .into_iter()
            .filter(|p| {
                let p = p.to_string_lossy();
                p.contains("/logs-") && p.contains(&dir)
            })
            .any(|p| {
                std::fs::read_to_string(p).unwrap_or_default().contains("resumed from checkpoint")
            })
    }

    /// Injects XID `xid` into GPU `gpu` of `node`: through its agent's admin server (simulated)
    /// or the stand-in NVML library (a critical XID event from `nvmlEventSetWait`).
    pub fn inject_xid(&self, node: &str, gpu: i32, xid: u32) {
        let gpu = u32::try_from(gpu).expect("a GPU index");
        self.inject(node, gpu, Fault::Xid(xid));
    }

    /// Injects `fault` into GPU `gpu` of `node`, in its backend's terms.
    pub fn inject(&self, node: &str, gpu: u32, fault: Fault) {
        self.gpus_of(node).inject(self.admin_port(node), gpu, fault);
    }

    /// The GPUs of `node`'s agent.
    pub fn gpus_of(&self, node: &str) -> &AgentGpus {
        self.gpus.iter().find(|(n, _)| n == node).map(|(_, g)| g).expect("agent")
    }

    /// The admin port of `node`'s agent.
    pub fn admin_port(&self, node: &str) -> u16 {
        self.agents.iter().find(|(p, _)| p.node == node).expect("agent").1
    }

    /// Waits (up to 5 minutes) until the job `name` Succeeded or Failed; returns its status.
    pub async fn finished(
        &self,
        jobs: &Api<TrainingJob>,
        name: &str,
    ) -> flotilla_operator::crd::TrainingJobStatus {
        eventually(Duration::from_secs(300), &format!("{name} Succeeded or Failed"), || async {
            let s = jobs.get(name).await.ok()?.status?;
            s.phase.is_terminal().then_some(s)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }
}

/// The operator's settings in a rig.
#[derive(Clone)]
struct OperatorSettings {
    kubeconfig: PathBuf,
    namespace: String,
    agent_port: u16,
    master_port_base: String,
    /// Further environment (timeouts a test shortens).
    env: Vec<(String, String)>,
}

impl OperatorSettings {
    /// Where the rig's agents renew their Leases: the operator's namespace.
    fn lease(&self) -> LeaseAccess {
        LeaseAccess { kubeconfig: self.kubeconfig.clone(), namespace: self.namespace.clone() }
    }
}

fn start_operator(s: &OperatorSettings, dir: &Path, log_name: &str) -> Operator {
    let worker = binary("flotilla-worker", "flotilla-engine");
    let log = dir.join(log_name);
    let file = std::fs::File::create(&log).expect("operator log");
    let ns = &s.namespace;
    let child = Command::new(operator_binary())
        .arg("run")
        .env("KUBECONFIG", &s.kubeconfig)
        .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
        .env("FLOTILLA_IDENTITY", format!("op-{ns}"))
        .env("FLOTILLA_LEASE_NAMESPACE", ns)
        .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
        .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
        .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
        .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{}", s.agent_port))
        .env("FLOTILLA_AGENT_INSECURE", "true")
        .env("FLOTILLA_WORKER_BINARY", &worker)
        .env("FLOTILLA_CHECKPOINT_ROOT", dir.join("checkpoints"))
        .env("FLOTILLA_WORKER_MASTER_ADDR", "127.0.0.1")
        .env("FLOTILLA_MASTER_PORT_BASE", &s.master_port_base)
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-operator");
    Operator { child, identity: format!("op-{ns}"), log }
}

impl Rig {
    /// Start everything with two agents and wait until their GpuNodes show 4 healthy GPUs.
    pub async fn start(cp: &ControlPlane, ns: &str, client: &kube::Client) -> Rig {
        Rig::start_with(cp, ns, client, 2, &[]).await
    }

    /// [`Rig::start`] with `nodes` agents (named a, b, c, …) and further operator environment.
    pub async fn start_with(
        cp: &ControlPlane,
        ns: &str,
        client: &kube::Client,
        nodes: usize,
        operator_env: &[(&str, &str)],
    ) -> Rig {
        let backends = vec![Backend::Simulated; nodes];
        Rig::start_on(cp, ns, client, &backends, operator_env).await
    }

    /// [`Rig::start`] with one agent per entry of `backends` (named a, b, c, …, in order), each
    /// on that backend, and further operator environment. Returns once every `GpuNode` shows 4
    /// healthy GPUs and every NVML agent's event loop is armed.
    pub async fn start_on(
        cp: &ControlPlane,
        ns: &str,
        client: &kube::Client,
        backends: &[Backend],
        operator_env: &[(&str, &str)],
    ) -> Rig {
        let turn = RigTurn::take().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_port = free_port();
        let settings = OperatorSettings {
            kubeconfig: cp.kubeconfig().into(),
            namespace: ns.to_string(),
            agent_port,
            master_port_base: master_port_base(),
            env: operator_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let operator = start_operator(&settings, dir.path(), "operator.log");
        let mut agents = Vec::new();
        let mut gpus = Vec::new();
        let lease = settings.lease();
        for (n, &backend) in ["a", "b", "c", "d"][..backends.len()].iter().zip(backends) {
            let node = format!("{ns}-{n}");
            let admin = free_port();
            let node_gpus = AgentGpus::new(backend, &node, 4, dir.path());
            let agent = start_agent_on(&node, agent_port, admin, dir.path(), &lease, &node_gpus);
            agents.push((agent, admin));
            gpus.push((node, node_gpus));
        }
        let rig = Rig {
            operator,
            agents,
            gpus,
            dir,
            settings,
            old_operator_logs: Vec::new(),
            _turn: turn,
        };
        let nodes: Api<GpuNode> = Api::all(client.clone());
        for name in rig.node_names() {
            eventually(WAIT, &format!("GpuNode {name} with 4 healthy GPUs"), || async {
                let n = nodes.get_opt(&name).await.ok()??;
                (n.status?.healthy_gpus == 4).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
        }
        for (_, gpus) in &rig.gpus {
            gpus.armed(4).await.unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
        }
        rig
    }

    /// SIGKILL the operator (no clean shutdown: its lease stays until it expires) and wait
    /// for it to be gone.
    pub fn kill_operator(&mut self) {
        self.operator.child.kill().expect("SIGKILL the operator");
        self.operator.child.wait().expect("reaping the operator");
    }

    /// SIGKILL the agent of `node` (no clean shutdown) and wait for it to be gone.
    pub fn kill_agent(&mut self, node: &str) {
        let (agent, _) = self.agents.iter_mut().find(|(p, _)| p.node == node).expect("agent");
        agent.child.kill().expect("SIGKILL the agent");
        agent.child.wait().expect("reaping the agent");
    }

    /// Start the agent of `node` again (after [`Rig::kill_agent`]), on the same admin port.
    pub fn restart_agent(&mut self, node: &str) {
        self.restart_agent_via(node, self.settings.agent_port);
    }

    /// Start the agent of `node` again, dialling the operator at `127.0.0.1:operator_port`
    /// (a [`crate::Proxy`] in front of [`Rig::agent_port`]).
    pub fn restart_agent_via(&mut self, node: &str, operator_port: u16) {
        let dir = self.dir.path().to_path_buf();
        let lease = self.settings.lease();
        let gpus = self.gpus.iter().find(|(n, _)| n == node).map(|(_, g)| g).expect("agent");
        let (agent, admin) = self.agents.iter_mut().find(|(p, _)| p.node == node).expect("agent");
        *agent = start_agent_on(node, operator_port, *admin, &dir, &lease, gpus);
    }

    /// The port the operator serves agents on.
    pub fn agent_port(&self) -> u16 {
        self.settings.agent_port
    }

    /// Start a new operator with the same settings (identity, agent port, checkpoint root).
    pub fn restart_operator(&mut self) {
        let n = self.old_operator_logs.len() + 2;
        let fresh = start_operator(&self.settings, self.dir.path(), &format!("operator-{n}.log"));
        let old = std::mem::replace(&mut self.operator, fresh);
        self.old_operator_logs.push(old.log.clone());
        drop(old);
    }

    /// Pids of the `flotilla-worker` processes of rank `rank` of the job `name` in this rig:
    /// the processes whose environment (as the agent set it) has `RANK=<rank>` and a
    /// checkpoint directory `<rig>/checkpoints/<namespace>/<name>-<uid>`.
    pub fn worker_pids(&self, name: &str, rank: u32) -> Vec<i32> {
        let root = format!("{}/checkpoints/", self.dir.path().display());
        let rank_var = format!("RANK={rank}");
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
            let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            let has = |want: &str| vars.contains(&want.as_bytes());
            let checkpoint = vars.iter().find_map(|v| {
                std::str::from_utf8(v).ok()?.strip_prefix("FLOTILLA_CHECKPOINT_DIR=")
            });
            let ours = checkpoint.is_some_and(|dir| {
                dir.strip_prefix(&root).and_then(|rest| rest.split('/').nth(1)).is_some_and(
                    |leaf| leaf.strip_prefix(name).is_some_and(|uid| uid.starts_with('-')),
                )
            });
            if ours && has(&rank_var) {
                pids.push(pid);
            }
        }
        pids
    }

    /// The agents' node names.
    pub fn node_names(&self) -> Vec<String> {
        self.agents.iter().map(|(p, _)| p.node.clone()).collect()
    }

    /// Every log: operator, agents, workers.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for old in &self.old_operator_logs {
            let text = std::fs::read_to_string(old).unwrap_or_default();
            all.push_str(&format!("{}:\n{text}\n", old.display()));
        }
        all.push_str(&format!("operator:\n{}", self.operator.log()));
        for (a, _) in &self.agents {
            all.push_str(&format!("\n{}:\n{}", a.log.display(), a.log()));
        }
        for (node, gpus) in &self.gpus {
            if let Some(mock) = gpus.stand_in() {
                all.push_str(&format!("\nstand-in NVML of {node}:\n{}", mock.log()));
            }
        }
        append_worker_logs(&mut all, self.dir.path());
        all
    }
}

/// One rig at a time per process: a rig's workers train for real, and the tests' timings (fence
/// and heartbeat timeouts, serving without a failed request) assume that one rig has the machine,
/// as it had when each test was a binary of its own and binaries ran one after another. Held by
/// [`Rig`], [`crate::ServingRig`] and [`crate::Fleet`] from their start until they are dropped.
pub(crate) struct RigTurn {
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

impl RigTurn {
    /// Waits until no other rig of this process runs.
    pub(crate) async fn take() -> RigTurn {
        static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        RigTurn { _guard: TURN.lock().await }
    }
}
