//! Time to find a hang, and the false positives of a long noisy run.
//!
//! Real parts throughout: the test control plane, the operator, two agents with 4 simulated GPUs
//! each and a 2-worker × 1-GPU `flotilla-worker` job spread over them, checkpointing every 20
//! steps, with a progress lease of `stepTimeoutSeconds: 5` (the default is 120 s). Each trial
//! waits until the current attempt trains, makes the GPU of one rank misbehave — alternately a
//! hang in compute (`hang`) on rank 0 and a hang in the all-reduce (`hang_collective`) on rank 1
//! — and measures from then (a) the time until the job's status records the `Hang` restart,
//! (b) whether it blamed the right rank, and (c) the time until the next attempt runs again.
//!
//! Then stragglers: a 2-worker job whose rank 1's GPU turns 4× slow (`slow=400`); measured from
//! then until its GPU is marked `Degraded` (`SlowSteps`) in its `GpuNode`, over `--straggler-trials`
//! (default 3; the GPU is cleared between trials).
//!
//! Then the noisy run: the same job for `--noisy-minutes` (default 5) while one GPU's slowness
//! changes every few seconds between 1× and 4× (seeded), counting `Hang` restarts (each one a
//! false positive).
//!
//! Run: `cargo run -p flotilla-tests --example hang_detection -- [--trials N]
//! [--noisy-minutes M]` (default 10 trials, about 10 minutes on the 2-core VM plus the noisy run).

use anyhow::{Context, Result, bail};
use flotilla_operator::crd::training_job::{
    CheckpointSpec, HangDetection, PlacementStrategy, RestartPolicy,
};
use flotilla_operator::crd::{GpuHealth, GpuNode, JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{Fault, Rig, eventually, install_crds, training_job};
use kube::api::{Api, DeleteParams, PostParams};
use std::time::{Duration, Instant};

const STEP_TIMEOUT_S: i32 = 5;
const WAIT: Duration = Duration::from_secs(240);

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse::<usize>().ok())
            .with_context(|| format!("{name}: expected a number")),
        None => Ok(default),
    }
}

fn job(rig: &Rig, ns: &str, name: &str) -> TrainingJob {
    let path = rig.dir.path().join("checkpoints").join(ns).join(format!("{name}-ckpt"));
    training_job(name)
        .workers(2)
        .gpus_per_worker(1)
        .tiny_engine(10_000_000, 20)
        .placement(PlacementStrategy::Spread)
        .restart_policy(RestartPolicy {
            max_restarts: 1000,
            backoff_seconds: 1,
            max_backoff_seconds: 1,
            ..Default::default()
        })
        .checkpoint(CheckpointSpec {
            path: path.display().to_string(),
            interval_seconds: Some(60),
            keep: 3,
        })
        .hang_detection(HangDetection {
            step_timeout_seconds: STEP_TIMEOUT_S,
            ..Default::default()
        })
        .build()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let trials = arg(&args, "--trials", 10)?;
    let noisy_minutes = arg(&args, "--noisy-minutes", 5)?;
    let cp = flotilla_tests::control_plane().await;
    install_crds(cp)?;
    let client = cp.client().await?;
    let ns = flotilla_tests::namespace(&client, "hangs").await?;
    let rig = Rig::start(cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);

    jobs.create(&PostParams::default(), &job(&rig, &ns, "hangs")).await?;
    let mut found = Vec::new();
    let mut running_again = Vec::new();
    let mut right_rank = 0;
    for n in 0..trials {
        let (fault, rank) = if n % 2 == 0 { (Fault::Hang, 0) } else { (Fault::HangCollective, 1) };
        let (detect, back, blamed) = trial(&rig, &jobs, fault, rank)
            .await
            .with_context(|| format!("trial {}\n{}", n + 1, rig.logs()))?;
        println!(
            "trial {:>2}: {fault:?} on rank {rank}: found {detect:6.2} s, blamed rank {blamed}, \
             running again {back:6.2} s",
            n + 1
        );
        right_rank += usize::from(blamed == rank);
        found.push(detect);
        running_again.push(back);
    }
    jobs.delete("hangs", &DeleteParams::default()).await?;

    let straggler_trials = arg(&args, "--straggler-trials", 3)?;
    let mut marked = Vec::new();
    jobs.create(&PostParams::default(), &job(&rig, &ns, "slow")).await?;
    for n in 0..straggler_trials {
        let s = straggler_trial(&rig, &jobs, &client).await.with_context(|| {
            format!(
                "straggler trial {}
{}",
                n + 1,
                rig.logs()
            )
        })?;
        println!("straggler trial {:>2}: GPU marked SlowSteps after {s:6.2} s", n + 1);
        marked.push(s);
    }
    jobs.delete("slow", &DeleteParams::default()).await?;

    let noisy = noisy_run(&rig, &jobs, &ns, Duration::from_secs(60 * noisy_minutes as u64))
        .await
        .with_context(|| format!("noisy run\n{}", rig.logs()))?;

    println!();
    println!(
        "machine: {} cores; stepTimeoutSeconds {STEP_TIMEOUT_S}; agents forward progress once a second",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("hang found after           p50/p95/max {}", stats(found));
    println!("running again after        p50/p95/max {}", stats(running_again));
    println!("right rank blamed          {right_rank}/{trials}");
    println!("straggler GPU marked after p50/p95/max {}", stats(marked));
    println!(
        "noisy run: {} steps in {} min on a GPU 1×–4× slow, {} Hang restarts (false positives)",
        noisy.0, noisy_minutes, noisy.1
    );
    Ok(())
}

/// "p50/p95/max" in seconds, nearest rank.
fn stats(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: usize| v[((v.len() * p).div_ceil(100)).saturating_sub(1).min(v.len() - 1)];
    format!("{:.2}/{:.2}/{:.2}", at(50), at(95), at(100))
}

/// One hang: seconds to the `Hang` record, seconds to running again, the rank blamed.
async fn trial(
    rig: &Rig,
    jobs: &Api<TrainingJob>,
    fault: Fault,
    rank: i32,
) -> Result<(f64, f64, i32)> {
    // The current attempt trains: its step moved since we last looked.
    let status = eventually(WAIT, "the job running", || async {
        let s = jobs.get("hangs").await.ok()?.status?;
        (s.phase == JobPhase::Running).then_some(s)
    })
    .await?;
    let step = status.progress.as_ref().map_or(0, |p| p.step);
    eventually(WAIT, "the job stepping", || async {
        let s = jobs.get("hangs").await.ok()?.status?;
        (s.progress?.step > step + 20).then_some(())
    })
    .await?;
    let hangs_before =
        status.restart_history.iter().filter(|r| r.cause == RestartCause::Hang).count();
    let attempt = status.attempt.context("a running job has an attempt")?;
    let w = attempt.placement.workers.iter().find(|w| w.rank == rank).context("rank")?;
    let (node, gpu) = (w.node.clone(), u32::try_from(w.gpus[0])?);
    let injected = Instant::now();
    rig.inject(&node, gpu, fault);
    let record = eventually(WAIT, "a Hang restart", || async {
        let s = jobs.get("hangs").await.ok()?.status?;
        let hangs: Vec<_> =
            s.restart_history.into_iter().filter(|r| r.cause == RestartCause::Hang).collect();
        (hangs.len() > hangs_before).then(|| hangs.last().cloned()).flatten()
    })
    .await?;
    let detect = injected.elapsed().as_secs_f64();
    rig.inject(&node, gpu, Fault::Recover);
    eventually(WAIT, "the next attempt running", || async {
        let s = jobs.get("hangs").await.ok()?.status?;
        (s.attempt?.number > attempt.number && s.phase == JobPhase::Running).then_some(())
    })
    .await?;
    let back = injected.elapsed().as_secs_f64();
    Ok((detect, back, record.rank.unwrap_or(-1)))
}

/// Rank 1's GPU turns 4× slow: seconds until its `GpuNode` shows it Degraded (`SlowSteps`).
/// Then it is cleared, and validated back to Healthy before the next trial.
async fn straggler_trial(rig: &Rig, jobs: &Api<TrainingJob>, client: &kube::Client) -> Result<f64> {
    let status = eventually(WAIT, "the slow job running", || async {
        let s = jobs.get("slow").await.ok()?.status?;
        (s.phase == JobPhase::Running).then_some(s)
    })
    .await?;
    let w = status
        .attempt
        .as_ref()
        .and_then(|a| a.placement.workers.iter().find(|w| w.rank == 1))
        .context("rank 1")?
        .clone();
    let gpu = w.gpus[0];
    // A full window of normal steps first.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let injected = Instant::now();
    rig.inject(&w.node, u32::try_from(gpu)?, Fault::Slow(400));
    let nodes: Api<GpuNode> = Api::all(client.clone());
    let gpu_health = |want: GpuHealth| {
        let nodes = nodes.clone();
        let node = w.node.clone();
        async move {
            let s = nodes.get(&node).await.ok()?.status?;
            s.gpus.into_iter().find(|g| g.index == gpu).filter(|g| g.health == want).map(drop)
        }
    };
    eventually(WAIT, "the slow GPU marked", || gpu_health(GpuHealth::Degraded)).await?;
    let marked = injected.elapsed().as_secs_f64();
    rig.inject(&w.node, u32::try_from(gpu)?, Fault::Recover);
    // The job still runs on it (no moveOff), so no validation: once its window of slow reports
    // has passed, an admin clears it.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let out =
        std::process::Command::new(flotilla_tests::binary("flotilla-agent", "flotilla-agent"))
            .args(["clear", "--gpu", &gpu.to_string()])
            .args(["--agent", &format!("127.0.0.1:{}", rig.admin_port(&w.node))])
            .output()?;
    if !out.status.success() {
        bail!("flotilla-agent clear: {}", String::from_utf8_lossy(&out.stderr));
    }
    eventually(WAIT, "the GPU cleared", || gpu_health(GpuHealth::Healthy)).await?;
    Ok(marked)
}

/// A job on a GPU whose slowness changes every few seconds: steps done and Hang restarts.
async fn noisy_run(
    rig: &Rig,
    jobs: &Api<TrainingJob>,
    ns: &str,
    length: Duration,
) -> Result<(i64, usize)> {
    jobs.create(&PostParams::default(), &job(rig, ns, "noisy")).await?;
    let status = eventually(WAIT, "the noisy job running", || async {
        let s = jobs.get("noisy").await.ok()?.status?;
        (s.phase == JobPhase::Running).then_some(s)
    })
    .await?;
    let w = status.attempt.as_ref().and_then(|a| a.placement.workers.first()).context("rank 0")?;
    let (node, gpu) = (w.node.clone(), u32::try_from(w.gpus[0])?);
    // A fixed seed: the same schedule of slowness every run.
    let mut state: u64 = 0x5eed;
    let started = Instant::now();
    while started.elapsed() < length {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let percent = 100 + (state >> 33) % 301; // 100..=400
        if percent > 100 {
            rig.inject(&node, gpu, Fault::Slow(percent as u32));
        } else {
            rig.inject(&node, gpu, Fault::Recover);
        }
        tokio::time::sleep(Duration::from_secs(2 + (state >> 40) % 5)).await;
    }
    rig.inject(&node, gpu, Fault::Recover);
    let s = jobs.get("noisy").await?.status.context("status")?;
    if s.phase == JobPhase::Failed {
        bail!("the noisy job failed: {:?}", s.message);
    }
    let hangs = s.restart_history.iter().filter(|r| r.cause == RestartCause::Hang).count();
    Ok((s.progress.map_or(0, |p| p.step), hangs))
}
