//! Helpers of the end-to-end tests: the operator and two (or more) agents with simulated GPUs as real
//! processes, and a tiny-engine TrainingJob.

#![allow(dead_code)]

use crate::operator_support::{Operator, eventually, operator_binary, workspace};
use flotilla_operator::crd::engine::EngineConfig;
use flotilla_operator::crd::training_job::{
    PlacementStrategy, RestartPolicy, SchedulingSpec, TrainingJobSpec,
};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A seed for port choices that differs between runs and processes.
fn port_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// A base for the operator's rendezvous ports (it adds up to 1,000 per job): 20000–26999, below
/// Linux's ephemeral range (32768 and up) where the OS hands out ports on its own, so a worker's
/// `MASTER_PORT` cannot collide with a connection or a port-0 listener of another process.
pub fn master_port_base() -> String {
    (20_000 + port_seed() % 6_000).to_string()
}

/// A first serving port for service replicas (each takes the next free one): 27000–32099, above
/// the rendezvous ports and below the ephemeral range, for the same reason.
pub fn serving_port_base() -> u16 {
    27_000 + (port_seed() % 5_000) as u16
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
    // Appended to: a restarted agent keeps its predecessor's lines.
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("agent log");
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

/// The operator and its agents (4 simulated GPUs each, admin servers on known ports).
pub struct Rig {
    /// The operator.
    pub operator: Operator,
    /// Agents and their admin ports.
    pub agents: Vec<(Process, u16)>,
    /// Logs, checkpoints, sockets.
    pub dir: tempfile::TempDir,
    /// How the operator was started, to start it again.
    settings: OperatorSettings,
    /// Logs of operators stopped earlier.
    old_operator_logs: Vec<PathBuf>,
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

    /// Injects XID `xid` into GPU `gpu` of `node` through its agent's admin server.
    pub fn inject_xid(&self, node: &str, gpu: i32, xid: u32) {
        let admin = self.agents.iter().find(|(p, _)| p.node == node).expect("agent").1;
        inject_xid_at(admin, gpu, xid);
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
    pub async fn start(cp: &flotilla_tests::ControlPlane, ns: &str, client: &kube::Client) -> Rig {
        Rig::start_with(cp, ns, client, 2, &[]).await
    }

    /// [`Rig::start`] with `nodes` agents (named a, b, c, …) and further operator environment.
    pub async fn start_with(
        cp: &flotilla_tests::ControlPlane,
        ns: &str,
        client: &kube::Client,
        nodes: usize,
        operator_env: &[(&str, &str)],
    ) -> Rig {
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
        let agents = ["a", "b", "c", "d"][..nodes]
            .iter()
            .map(|n| {
                let admin = free_port();
                (start_agent(&format!("{ns}-{n}"), agent_port, admin, dir.path()), admin)
            })
            .collect();
        let rig = Rig { operator, agents, dir, settings, old_operator_logs: Vec::new() };
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
        let agent_port = self.settings.agent_port;
        let dir = self.dir.path().to_path_buf();
        let (agent, admin) = self.agents.iter_mut().find(|(p, _)| p.node == node).expect("agent");
        *agent = start_agent(node, agent_port, *admin, &dir);
    }

    /// Start a new operator with the same settings (identity, agent port, checkpoint root).
    pub fn restart_operator(&mut self) {
        let n = self.old_operator_logs.len() + 2;
        let fresh = start_operator(&self.settings, self.dir.path(), &format!("operator-{n}.log"));
        let old = std::mem::replace(&mut self.operator, fresh);
        self.old_operator_logs.push(old.log.clone());
        drop(old);
    }

    /// Pids of the `flotilla-worker` processes of rank `rank` of the job `name` in this rig
    /// (their command line names the rank's engine configuration in the job's checkpoint
    /// directory, which lies in this rig's temporary directory).
    pub fn worker_pids(&self, name: &str, rank: u32) -> Vec<i32> {
        let config = format!("/{name}-[^/]*/engine-config.rank{rank}.json");
        let pattern = format!("{}/checkpoints/.*{config}", self.dir.path().display());
        let out = Command::new("pgrep").args(["-f", &pattern]).output().expect("running pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&pid: &i32| pid != std::process::id() as i32)
            .collect()
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

/// One line of a job's attempt ledger (written by each `flotilla-worker train`, see the
/// engine's `train::LedgerEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerLine {
    /// The job's UID.
    pub job: String,
    /// The attempt.
    pub attempt: u64,
    /// The worker's rank.
    pub rank: u32,
    /// True for `start`, false for `end`.
    pub start: bool,
    /// Wall-clock time, Unix nanoseconds.
    pub at: u128,
}

impl Rig {
    /// The attempt ledger of the job `name` (in its checkpoint directory), parsed; panics on a
    /// malformed line, naming it.
    pub fn ledger(&self, name: &str) -> Vec<LedgerLine> {
        let files: Vec<PathBuf> = walk(&self.dir.path().join("checkpoints"))
            .into_iter()
            .filter(|p| {
                p.file_name().is_some_and(|f| f == "attempts.ledger")
                    && p.parent()
                        .and_then(Path::file_name)
                        .is_some_and(|d| d.to_string_lossy().starts_with(&format!("{name}-")))
            })
            .collect();
        assert_eq!(files.len(), 1, "one attempt ledger for {name}, found {files:?}");
        let text = std::fs::read_to_string(&files[0]).expect("reading the attempt ledger");
        text.lines().map(|l| parse_ledger_line(l).unwrap_or_else(|e| panic!("{e}"))).collect()
    }
}

impl Rig {
    /// [`assert_no_overlap`] on the ledger of the job `name`, with every log on failure.
    pub fn assert_ledger(&self, name: &str, no_end: &[(u64, u32)]) -> Vec<(u64, Vec<u32>)> {
        let ledger = self.ledger(name);
        std::panic::catch_unwind(|| assert_no_overlap(&ledger, no_end))
            .unwrap_or_else(|_| panic!("the attempt ledger of {name} (above)\n{}", self.logs()))
    }
}

pub fn parse_ledger_line(line: &str) -> Result<LedgerLine, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let bad = |what: &str| format!("ledger line {line:?}: {what}");
    if f.len() != 6 {
        return Err(bad(&format!("expected 6 tab-separated fields, got {}", f.len())));
    }
    Ok(LedgerLine {
        job: f[0].to_string(),
        attempt: f[1].parse().map_err(|_| bad("attempt is not a number"))?,
        rank: f[2].parse().map_err(|_| bad("rank is not a number"))?,
        start: match f[3] {
            "start" => true,
            "end" => false,
            other => return Err(bad(&format!("expected start or end, got {other}"))),
        },
        at: f[4].parse().map_err(|_| bad("time is not a number"))?,
    })
}

/// Asserts from a job's ledger that its attempts never overlapped: every worker that started
/// also ended (except the `(attempt, rank)`s in `no_end`, killed by SIGKILL, which cannot write),
/// and each attempt's first start comes after the last end of every earlier attempt. Returns the
/// attempts in order, with the ranks that started in each.
pub fn assert_no_overlap(ledger: &[LedgerLine], no_end: &[(u64, u32)]) -> Vec<(u64, Vec<u32>)> {
    assert!(!ledger.is_empty(), "the attempt ledger is empty");
    let jobs: std::collections::BTreeSet<&str> = ledger.iter().map(|l| l.job.as_str()).collect();
    assert_eq!(jobs.len(), 1, "one job in the ledger, got {jobs:?}");
    // attempt -> (first start, last end, ranks started, ranks ended)
    let mut attempts: std::collections::BTreeMap<u64, (u128, u128, Vec<u32>, Vec<u32>)> =
        Default::default();
    for l in ledger {
        let a = attempts.entry(l.attempt).or_insert((u128::MAX, 0, Vec::new(), Vec::new()));
        if l.start {
            a.0 = a.0.min(l.at);
            a.2.push(l.rank);
        } else {
            a.1 = a.1.max(l.at);
            a.3.push(l.rank);
        }
    }
    let mut out = Vec::new();
    let mut earlier_end: Option<(u64, u128)> = None;
    for (&n, (first_start, last_end, started, ended)) in &attempts {
        for rank in started {
            let expected_end = !no_end.contains(&(n, *rank));
            assert_eq!(
                ended.contains(rank),
                expected_end,
                "attempt {n} rank {rank}: end line expected: {expected_end}\n{ledger:#?}"
            );
        }
        if let Some((m, end)) = earlier_end {
            assert!(
                *first_start > end,
                "attempt {n} started at {first_start} before attempt {m} ended at {end}\n{ledger:#?}"
            );
        }
        let end = earlier_end.map_or(*last_end, |(_, e)| e.max(*last_end));
        earlier_end = Some((n, end));
        let mut ranks = started.clone();
        ranks.sort_unstable();
        out.push((n, ranks));
    }
    out
}
