//! End to end: the operator serving two real agents (4 simulated GPUs each, workers run as real
//! processes) runs a TrainingJob of 2 workers × 2 GPUs, one per agent, with `flotilla-worker
//! train` (the tiny preset) through Running to Succeeded.

mod operator_support;

use flotilla_operator::crd::engine::EngineConfig;
use flotilla_operator::crd::training_job::{
    PlacementStrategy, RestartPolicy, SchedulingSpec, TrainingJobSpec,
};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use operator_support::{Operator, eventually, install_crds, operator_binary, workspace};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// A binary next to this test executable, built from `package` when missing.
fn binary(name: &str, package: &str) -> PathBuf {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process killed when dropped, with its log file.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(node: &str, operator_port: u16, dir: &Path) -> Process {
    let log = dir.join(format!("agent-{node}.log"));
    let file = std::fs::File::create(&log).expect("agent log");
    let child = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .arg("run")
        .env("FLOTILLA_NODE_NAME", node)
        .env("FLOTILLA_OPERATOR_URL", format!("http://127.0.0.1:{operator_port}"))
        .env("FLOTILLA_SIM_GPUS", "4")
        .env("FLOTILLA_AGENT_ADMIN_ADDR", "127.0.0.1:0")
        .env("FLOTILLA_WORKER_LOG_DIR", dir.join(format!("logs-{node}")))
        .env("FLOTILLA_WORKER_SOCKET_DIR", dir.join(format!("s-{node}")))
        .env("FLOTILLA_LOG", "info")
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-agent");
    Process { child, log }
}

fn job(name: &str) -> TrainingJob {
    let mut engine = EngineConfig::preset("tiny").expect("tiny preset");
    engine.training.steps = 30;
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

#[tokio::test]
async fn a_two_node_engine_job_runs_real_workers_to_success() {
    let cp = flotilla_tests::control_plane().await;
    install_crds(cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "e2e").await.expect("namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let worker = binary("flotilla-worker", "flotilla-engine");
    let agent_port = free_port();
    let log = dir.path().join("operator.log");
    let file = std::fs::File::create(&log).expect("operator log");
    let child = Command::new(operator_binary())
        .arg("run")
        .env("KUBECONFIG", cp.kubeconfig())
        .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
        .env("FLOTILLA_IDENTITY", "op-e2e")
        .env("FLOTILLA_LEASE_NAMESPACE", &ns)
        .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
        .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
        .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
        .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{agent_port}"))
        .env("FLOTILLA_AGENT_INSECURE", "true")
        .env("FLOTILLA_WORKER_BINARY", &worker)
        .env("FLOTILLA_CHECKPOINT_ROOT", dir.path().join("checkpoints"))
        .env("FLOTILLA_WORKER_MASTER_ADDR", "127.0.0.1")
        .env("FLOTILLA_MASTER_PORT_BASE", free_port().saturating_sub(1000).max(20000).to_string())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-operator");
    let operator = Operator { child, identity: "op-e2e".into(), log };
    let agents: Vec<Process> =
        ["e2e-a", "e2e-b"].iter().map(|n| start_agent(n, agent_port, dir.path())).collect();
    let logs = || {
        let mut all = format!("operator:\n{}", operator.log());
        for a in &agents {
            all.push_str(&format!("\n{}:\n{}", a.log.display(), a.log()));
        }
        for worker_log in walk(dir.path()).iter().filter(|p| p.to_string_lossy().contains("/logs-"))
        {
            let text = std::fs::read_to_string(worker_log).unwrap_or_default();
            all.push_str(&format!("\n{}:\n{text}", worker_log.display()));
        }
        all
    };

    let nodes: Api<GpuNode> = Api::all(client.clone());
    for name in ["e2e-a", "e2e-b"] {
        eventually(WAIT, &format!("GpuNode {name} with 4 healthy GPUs"), || async {
            let n = nodes.get_opt(name).await.ok()??;
            (n.status?.healthy_gpus == 4).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }

    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &job("tiny-e2e")).await.expect("create job");
    let done = eventually(WAIT, "tiny-e2e Succeeded or Failed", || async {
        let s = jobs.get("tiny-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, logs());
    let attempt = done.attempt.expect("attempt");
    assert_eq!(attempt.number, 1);
    assert!(attempt.start_time.is_some(), "every worker was seen running before the end");
    let mut placed = attempt.placement.nodes();
    placed.sort_unstable();
    assert_eq!(placed, vec!["e2e-a", "e2e-b"]);

    // Both phases were announced, in `kubectl describe` terms.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("tiny-e2e"))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Scheduled", "Running", "Succeeded"] {
        assert!(reasons.iter().any(|r| r == reason), "no {reason} event in {reasons:?}");
    }
    // Each rank wrote its log through the agent's supervisor.
    let rank_logs = walk(dir.path()).into_iter().filter(|p| p.ends_with("rank-0.log")).count();
    assert_eq!(rank_logs, 1, "one rank-0 log\n{}", logs());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
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
