//! `flotilla-worker train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flotilla_contract::worker_env;
use flotilla_engine::collective::CollectiveError;
use flotilla_engine::metrics::{Metrics, TrainMetrics};
use flotilla_engine::progress::{Activity, ProgressLine, ProgressReporter, loss_for_report};
use flotilla_engine::sim::SimFaults;
use flotilla_engine::train::{LedgerEntry, TrainError, Trainer};
use flotilla_engine::whereabouts::Whereabouts;

use super::{ConfigSource, EXIT_TERMINATED, check_group, runtime};

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    source: ConfigSource,
    /// Directory for checkpoints; the run resumes from the newest complete one found there.
    #[arg(long, env = worker_env::CHECKPOINT_DIR)]
    checkpoint_dir: Option<PathBuf>,
    /// Override `training.checkpointInterval` (steps; 0 = only at the end and on SIGTERM).
    #[arg(long, env = "FLOTILLA_CHECKPOINT_INTERVAL")]
    checkpoint_interval: Option<u64>,
    /// Override `training.steps`.
    #[arg(long, env = "FLOTILLA_STEPS")]
    steps: Option<u64>,
    /// Serve Prometheus metrics on this port (0 picks a free one); off when absent.
    #[arg(long, env = "FLOTILLA_METRICS_PORT")]
    metrics_port: Option<u16>,
    #[command(flatten)]
    group: super::GroupArgs,
    /// Restart attempt number, recorded in checkpoints.
    #[arg(long, env = worker_env::ATTEMPT, default_value_t = 0)]
    attempt: u64,
    /// The job this worker belongs to, for the attempt ledger in the checkpoint directory.
    #[arg(long, env = worker_env::JOB_UID, default_value = "")]
    job_uid: String,
    /// Unix socket of the agent, which receives one JSON progress line per step.
    #[arg(long, env = worker_env::PROGRESS_SOCKET)]
    progress_socket: Option<PathBuf>,
    /// Log lines instead of a progress bar even on a terminal (the variable takes 1/0,
    /// true/false, yes/no or on/off).
    #[arg(long, env = worker_env::NO_PROGRESS_BAR, value_parser = clap::builder::BoolishValueParser::new())]
    no_progress_bar: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.source.load()?;
    if let Some(steps) = args.steps {
        config.training.steps = steps;
    }
    if let Some(interval) = args.checkpoint_interval {
        config.training.checkpoint_interval = interval;
    }
    config.validate().map_err(|e| super::InvalidConfig(e.to_string()))?;
    check_group(args.group.rank, args.group.world_size)?;
    // Ended (an `end` line) when `run` returns, whichever way.
    let _ledger = match &args.checkpoint_dir {
        Some(dir) => Some(
            LedgerEntry::start(dir, &args.job_uid, args.attempt, args.group.rank)
                .with_context(|| format!("attempt ledger in {}", dir.display()))?,
        ),
        None => None,
    };

    let rt = runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    let rank = args.group.rank;
    // Every rank reports to its own agent socket; rank 0 logs (or draws the bar) for the group.
    let progress = ProgressReporter::new(
        config.training.steps,
        0,
        args.progress_socket.clone(),
        !args.no_progress_bar && rank == 0,
        rank == 0,
    );
    let whereabouts = Whereabouts::starting(0);
    progress.send(&ProgressLine {
        activity: Activity::Starting,
        ..ProgressLine::at_step(0, config.training.steps, 0.0, 0.0, None)
    });
    progress.heartbeats(whereabouts.clone(), config.training.steps);
    rt.spawn(watch_signals(stop.clone(), whereabouts.clone(), rank));
    let metrics = Metrics::new();
    let train_metrics = TrainMetrics::new(&metrics).context("registering metrics")?;
    if let Some(port) = args.metrics_port {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("0.0.0.0", port)))
            .context("metrics port")?;
        let addr = listener.local_addr()?;
        println!("metrics on {addr}");
        let registry = metrics.clone();
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(move || std::future::ready(registry.render())));
        rt.spawn(async move { axum::serve(listener, app).await });
    }

    let timeout = Duration::from_secs(config.training.collective_timeout_seconds);
    let mut ring = args.group.connect(timeout)?;
    ring.watch(whereabouts.clone());
    let total = config.training.steps;
    let interval = config.training.checkpoint_interval;
    let target = config.training.target_loss;
    let mut trainer = Trainer::new(config, ring, args.checkpoint_dir.clone(), args.attempt)
        .inspect_err(|e| {
            peer_lost(&progress, &whereabouts, e, total);
        })?;
    let sim = SimFaults::from_env();
    if !sim.is_empty() {
        trainer.before_all_reduce(Box::new(move |compute| sim.before_all_reduce(compute)));
    }
    if trainer.step() > 0 {
        tracing::info!(step = trainer.step(), "resumed from checkpoint");
    }
    tracing::info!(
        rank = args.group.rank,
        world = args.group.world_size,
        params = trainer.model().num_params(),
        kernels = if flotilla_engine::model::avx512_kernels() { "avx512" } else { "portable" },
        "training"
    );
    progress.set_position(trainer.step());
    whereabouts.resumed_at(trainer.step());
    let layers: Vec<usize> = trainer.model().moe_blocks().map(|(i, _)| i).collect();
    let mut first_step = true;
    while trainer.step() < total {
        let report = trainer.train_step(stop.load(Ordering::SeqCst)).inspect_err(|e| {
            peer_lost(&progress, &whereabouts, e, total);
        })?;
        whereabouts.step_done(report.step);
        if std::mem::take(&mut first_step) {
            // The moment a (re)started gang trains again: what recovery time is measured to.
            tracing::info!(step = report.step, "first step of this run done");
        }
        let biases: Vec<Vec<f32>> =
            trainer.model().moe_blocks().map(|(_, b)| b.bias.clone()).collect();
        train_metrics.observe_step(&report, &layers, &biases);
        let line = ProgressLine {
            step_seconds: Some(report.seconds),
            compute_seconds: Some((report.seconds - report.allreduce_seconds).max(0.0)),
            ..ProgressLine::at_step(
                report.step,
                total,
                loss_for_report(report.loss),
                report.tokens as f64 / report.seconds.max(1e-9),
                trainer.last_checkpoint_step,
            )
        };
        let due = interval > 0 && report.step % interval == 0;
        if report.stop || due || report.step == total {
            // Hang detection gives a checkpoint its own budget.
            whereabouts.set(Activity::Checkpointing);
            progress.send(&ProgressLine { activity: Activity::Checkpointing, ..line.clone() });
            if let Some(seconds) = trainer.checkpoint()? {
                train_metrics.observe_checkpoint(seconds);
                tracing::debug!(step = report.step, seconds, "checkpoint written");
            }
            whereabouts.set(Activity::Training);
        }
        progress
            .report(&ProgressLine { last_checkpoint_step: trainer.last_checkpoint_step, ..line });
        if report.stop {
            progress.finish();
            match trainer.last_checkpoint_step {
                Some(step) if step == report.step => {
                    eprintln!("stopped by signal at step {step} after checkpointing");
                }
                _ => {
                    eprintln!("stopped by signal at step {} (no checkpoint directory)", report.step)
                }
            }
            return Ok(ExitCode::from(EXIT_TERMINATED));
        }
    }
    progress.finish();
    let final_loss = trainer.losses().last().copied().unwrap_or(f32::NAN);
    match target {
        Some(t) => println!(
            "finished {total} steps: final loss {final_loss} (target {t}: {})",
            if f64::from(final_loss) <= t { "reached" } else { "not reached" }
        ),
        None => println!("finished {total} steps: final loss {final_loss}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Tells the agent, before the worker exits, which peer the collective gave up on: the rank
/// to blame, not this one.
fn peer_lost(progress: &ProgressReporter, whereabouts: &Whereabouts, e: &TrainError, total: u64) {
    if let TrainError::Collective(CollectiveError::PeerLost { lost, .. }) = e {
        let step = whereabouts.now().step;
        progress.send(&ProgressLine {
            activity: Activity::PeerLost,
            waiting_on_rank: Some(*lost as u32),
            ..ProgressLine::at_step(step, total, 0.0, 0.0, None)
        });
    }
}

/// The first SIGTERM or SIGINT asks for a checkpoint and a clean stop, and logs where the
/// worker is (a hung gang's logs then say where each rank was); a second one exits at once.
async fn watch_signals(stop: Arc<AtomicBool>, whereabouts: Arc<Whereabouts>, rank: usize) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    for _ in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("second signal: exiting without a checkpoint");
            std::process::exit(i32::from(EXIT_TERMINATED));
        }
        eprintln!("signal received while {}", whereabouts.describe(rank));
        tracing::warn!("signal received: checkpointing after this step");
    }
}
