//! `flotilla-worker train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flotilla_contract::worker_env;
use flotilla_engine::metrics::{Metrics, TrainMetrics};
use flotilla_engine::progress::{ProgressLine, ProgressReporter, loss_for_report};
use flotilla_engine::train::{LedgerEntry, Trainer};

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
    rt.spawn(watch_signals(stop.clone()));
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
    let ring = args.group.connect(timeout)?;
    let total = config.training.steps;
    let interval = config.training.checkpoint_interval;
    let target = config.training.target_loss;
    let mut trainer = Trainer::new(config, ring, args.checkpoint_dir.clone(), args.attempt)?;
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
    let socket = if args.group.rank == 0 { args.progress_socket.clone() } else { None };
    let mut progress = ProgressReporter::new(
        total,
        trainer.step(),
        socket,
        !args.no_progress_bar && args.group.rank == 0,
    );
    let layers: Vec<usize> = trainer.model().moe_blocks().map(|(i, _)| i).collect();
    let mut first_step = true;
    while trainer.step() < total {
        let report = trainer.train_step(stop.load(Ordering::SeqCst))?;
        if std::mem::take(&mut first_step) {
            // The moment a (re)started gang trains again: what recovery time is measured to.
            tracing::info!(step = report.step, "first step of this run done");
        }
        let biases: Vec<Vec<f32>> =
            trainer.model().moe_blocks().map(|(_, b)| b.bias.clone()).collect();
        train_metrics.observe_step(&report, &layers, &biases);
        let due = interval > 0 && report.step % interval == 0;
        if (report.stop || due || report.step == total)
            && let Some(seconds) = trainer.checkpoint()?
        {
            train_metrics.observe_checkpoint(seconds);
            tracing::debug!(step = report.step, seconds, "checkpoint written");
        }
        progress.report(&ProgressLine {
            step: report.step,
            total_steps: total,
            loss: loss_for_report(report.loss),
            tokens_per_second: report.tokens as f64 / report.seconds.max(1e-9),
            last_checkpoint_step: trainer.last_checkpoint_step,
        });
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

/// The first SIGTERM or SIGINT asks for a checkpoint and a clean stop; a second one exits at once.
async fn watch_signals(stop: Arc<AtomicBool>) {
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
        tracing::warn!("signal received: checkpointing after this step");
    }
}
