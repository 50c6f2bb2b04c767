//! Time to recover: how long a training job is down after a GPU fault and after a lost node.
//!
//! Real parts throughout: the test control plane, the operator, two agents with 4 simulated GPUs
//! each and a 2-worker × 2-GPU `flotilla-worker` job (one worker per node) that checkpoints every
//! 10 steps. Each trial waits until the current attempt trains, then either
//!
//! - **GPU fault**: injects XID 79 into a GPU of rank 0 (the agent stays up), or
//! - **lost node**: SIGKILLs the agent of rank 0's node (its worker dies with it; the operator
//!   may restart the job only once the fence timeout has passed, DESIGN.md safety rule 1),
//!
//! and measures, from the fault, (a) the time until every worker of the new attempt has started
//! (the last `start` line of the attempt in the job's ledger) and (b) the time until the new
//! attempt's rank 0 finished its first training step (its log line). Times come from wall-clock
//! stamps written by the workers themselves, so polling adds no error. Between trials the GPU is
//! cleared or the agent started again. Prints p50/p95/max per kind.
//!
//! Run: `cargo run -p flotilla-tests --example recovery -- [--trials N]` (default 10; about
//! 5 minutes on the 2-core VM). Needs what the tests need (`scripts/setup.sh`).

use anyhow::{Context, Result, bail};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use flotilla_tests::{Rig, binary, eventually, install_crds, tiny_engine_job, walk};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use std::process::Command;
use std::time::Duration;

const JOB: &str = "recovery";
/// The operator's fence timeout here (default 30 s): a lost node's workers count as dead after it.
const FENCE_TIMEOUT_S: u64 = 5;
const WAIT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Gpu,
    LostNode,
}

/// One trial: seconds from the fault to every worker started, and to the first step.
struct Trial {
    started_s: f64,
    first_step_s: f64,
    steps_lost: i64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let trials = match args.iter().position(|a| a == "--trials") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse::<usize>().ok())
            .context("--trials: expected a positive number")?,
        None => 10,
    };
    let cp = flotilla_tests::control_plane().await;
    install_crds(cp)?;
    let client = cp.client().await?;
    let ns = flotilla_tests::namespace(&client, "recovery").await?;
    let fence = FENCE_TIMEOUT_S.to_string();
    let env = [
        ("FLOTILLA_AGENT_HEARTBEAT_SECONDS", "1"),
        ("FLOTILLA_AGENT_HEARTBEAT_TIMEOUT_SECONDS", "3"),
        ("FLOTILLA_FENCE_TIMEOUT_SECONDS", fence.as_str()),
    ];
    let mut rig = Rig::start_with(cp, &ns, &client, 3, &env).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &tiny_engine_job(JOB, 10_000_000, 10)).await?;

    let mut results: Vec<(Fault, Vec<Trial>)> = Vec::new();
    for fault in [Fault::Gpu, Fault::LostNode] {
        let mut runs = Vec::new();
        for n in 0..trials {
            let trial = run_trial(&mut rig, &jobs, &client, fault)
                .await
                .with_context(|| format!("{fault:?} trial {}\n{}", n + 1, rig.logs()))?;
            println!(
                "{fault:?} trial {:>2}: all workers started {:6.2} s, first step {:6.2} s, \
                 {} steps lost",
                n + 1,
                trial.started_s,
                trial.first_step_s,
                trial.steps_lost
            );
            runs.push(trial);
        }
        results.push((fault, runs));
    }
    println!();
    println!(
        "machine: {} cores; fence timeout {FENCE_TIMEOUT_S} s; heartbeat timeout 3 s",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<10} {:>6} {:>22} {:>22} {:>12}",
        "fault", "trials", "started p50/p95/max", "1st step p50/p95/max", "steps lost"
    );
    for (fault, runs) in &results {
        let started = stats(runs.iter().map(|t| t.started_s).collect());
        let first = stats(runs.iter().map(|t| t.first_step_s).collect());
        let lost: i64 = runs.iter().map(|t| t.steps_lost).sum::<i64>() / runs.len().max(1) as i64;
        println!(
            "{:<10} {:>6} {:>22} {:>22} {:>12}",
            format!("{fault:?}"),
            runs.len(),
            started,
            first,
            format!("{lost} (mean)")
        );
    }
    Ok(())
}

/// "p50/p95/max" in seconds, nearest rank.
fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |p: usize| v[((v.len() * p).div_ceil(100)).saturating_sub(1).min(v.len() - 1)];
    format!("{:.2}/{:.2}/{:.2}", at(50), at(95), at(100))
}

async fn run_trial(
    rig: &mut Rig,
    jobs: &Api<TrainingJob>,
    client: &kube::Client,
    fault: Fault,
) -> Result<Trial> {
    // The current attempt trains (its rank 0 finished a step).
    let status = eventually(WAIT, "the job running", || async {
        let s = jobs.get(JOB).await.ok()?.status?;
        (s.phase == JobPhase::Running).then_some(s)
    })
    .await?;
    let attempt = status.attempt.context("a running job has an attempt")?;
    let n = attempt.number;
    let dir = rig.dir.path().to_path_buf();
    eventually(WAIT, "rank 0 training", || async { first_step_at(&dir, n) }).await?;
    let rank0 = attempt.placement.workers.iter().find(|w| w.rank == 0).context("rank 0")?;
    let (node, gpu) = (rank0.node.clone(), rank0.gpus[0]);
    let admin = rig.agents.iter().find(|(p, _)| p.node == node).context("agent")?.1;

    let fault_at = Timestamp::now();
    match fault {
        Fault::Gpu => agent_cli(admin, &["inject", "--gpu", &gpu.to_string(), "--xid", "79"])?,
        Fault::LostNode => rig.kill_agent(&node),
    }
    let next = eventually(WAIT, "the next attempt running", || async {
        let s = jobs.get(JOB).await.ok()?.status?;
        let a = s.attempt.as_ref()?;
        (a.number == n + 1 && s.phase == JobPhase::Running).then_some(s)
    })
    .await?;
    let first_step =
        eventually(WAIT, "the next attempt's first step", || async { first_step_at(&dir, n + 1) })
            .await?;
    let ledger = rig.ledger(JOB);
    let starts: Vec<u128> =
        ledger.iter().filter(|l| l.start && l.attempt == (n + 1) as u64).map(|l| l.at).collect();
    if starts.len() != 2 {
        bail!("attempt {}: expected 2 start lines in the ledger, got {}", n + 1, starts.len());
    }
    let last_start = Timestamp::from_nanosecond(*starts.iter().max().unwrap_or(&0) as i128)?;
    let steps_lost = next.restart_history.last().and_then(|r| r.steps_lost).unwrap_or(0);

    // Put the fleet back for the next trial.
    match fault {
        Fault::Gpu => agent_cli(admin, &["clear", "--gpu", &gpu.to_string()])?,
        Fault::LostNode => rig.restart_agent(&node),
    }
    let nodes: Api<GpuNode> = Api::all(client.clone());
    eventually(WAIT, "all 4 GPUs of the node healthy again", || async {
        let g = nodes.get_opt(&node).await.ok()??;
        (g.status?.healthy_gpus == 4).then_some(())
    })
    .await?;
    let secs = |t: Timestamp| t.duration_since(fault_at).as_secs_f64();
    Ok(Trial { started_s: secs(last_start), first_step_s: secs(first_step), steps_lost })
}

/// Runs `flotilla-agent <args> --agent <admin>` against an agent's admin server.
fn agent_cli(admin: u16, args: &[&str]) -> Result<()> {
    let out = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .args(args)
        .args(["--agent", &format!("127.0.0.1:{admin}")])
        .output()?;
    if !out.status.success() {
        bail!("flotilla-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// When rank 0 of `attempt` logged its first training step (the stamp its log line starts with).
fn first_step_at(dir: &std::path::Path, attempt: i32) -> Option<Timestamp> {
    let suffix = format!("/attempt-{attempt}/rank-0.log");
    walk(dir).into_iter().filter(|p| p.to_string_lossy().ends_with(&suffix)).find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        let line = text.lines().find(|l| l.contains("first step of this run done"))?;
        line.split_whitespace().next()?.parse().ok()
    })
}
