//! `flotilla-worker serve`: one process serves a whole model; with `WORLD_SIZE` > 1 the
//! processes of a group share each MoE layer's experts (expert parallelism) and rank 0 serves
//! the HTTP API (see [`flotilla_engine::serve::expert_parallel`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use flotilla_contract::worker_env;
use flotilla_engine::checkpoint;
use flotilla_engine::metrics::{Metrics, ServeMetrics};
use flotilla_engine::model::Model;
use flotilla_engine::model::moe::ExpertShard;
use flotilla_engine::serve::batcher::Batcher;
use flotilla_engine::serve::expert_parallel::{self, GroupLeader};
use flotilla_engine::serve::{ServeState, router};

use super::{ConfigSource, GroupArgs, InvalidConfig, check_group, runtime};

/// How long a clean shutdown waits for the decode thread to tell the group to stop.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (with `latest`) or one `step-…` directory; without it a preset or
    /// config is served with freshly initialised weights.
    #[arg(long, env = worker_env::CHECKPOINT_DIR)]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    source: ConfigSource,
    /// Address to bind.
    #[arg(long, env = "FLOTILLA_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 picks a free one); the bound address is printed as `listening on ADDR`.
    #[arg(long, env = "FLOTILLA_PORT", default_value_t = 8000)]
    port: u16,
    /// Name the model is served under (`/v1/models`, the `model` of requests); overrides the
    /// configuration's `serving.modelName`.
    #[arg(long, env = "FLOTILLA_SERVED_MODEL_NAME")]
    model_name: Option<String>,
    /// Most requests decoded together; overrides `serving.maxBatchSize`.
    #[arg(long, env = "FLOTILLA_MAX_BATCH_SIZE", value_parser = clap::value_parser!(u32).range(1..))]
    max_batch_size: Option<u32>,
    /// `max_tokens` of a request that names none; overrides `serving.defaultMaxTokens`.
    #[arg(long, env = "FLOTILLA_DEFAULT_MAX_TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    default_max_tokens: Option<u32>,
    /// The expert-parallel group (rank 0 serves HTTP; `WORLD_SIZE` 1 serves alone).
    #[command(flatten)]
    group: GroupArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    check_group(args.group.rank, args.group.world_size)?;
    let device = Device::Cpu;
    let (mut config, model) = match &args.checkpoint {
        Some(dir) => {
            let (path, snapshot) = if dir.join("manifest.json").exists() {
                (dir.clone(), checkpoint::load(dir, &device)?)
            } else {
                checkpoint::load_latest(dir, &device)?
                    .with_context(|| format!("no checkpoint in {} (no `latest`)", dir.display()))?
            };
            let mut config = snapshot.trainer.config.clone();
            if args.source.is_given() {
                config.serving = args.source.load()?.serving;
            }
            let mut model = Model::new(&config.model, config.training.seed, &device)?;
            model
                .load_state(&snapshot.model)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            tracing::info!(checkpoint = %path.display(), step = snapshot.trainer.step, "loaded");
            (config, model)
        }
        None => {
            let config = args.source.load()?;
            let model = Model::new(&config.model, config.training.seed, &device)?;
            (config, model)
        }
    };
    if let Some(name) = &args.model_name {
        config.serving.model_name = name.clone();
    }
    if let Some(n) = args.max_batch_size {
        config.serving.max_batch_size = n;
    }
    if let Some(n) = args.default_max_tokens {
        config.serving.default_max_tokens = n;
    }
    let (rank, world) = (args.group.rank, args.group.world_size);
    let mut model = model;
    if world > 1 {
        let shard = ExpertShard { rank, world };
        model.shard_experts(shard).map_err(InvalidConfig)?;
        let experts = config.model.num_routed_experts as usize;
        tracing::info!(
            rank,
            world,
            "expert-parallel: {}",
            expert_parallel::describe_shard(shard, experts)
        );
    }
    let timeout = std::time::Duration::from_secs(config.training.collective_timeout_seconds);
    let rt = runtime()?;
    // Bind the API before the group forms: a taken port is reported as such (exit code 3).
    let listener = if rank == 0 {
        let bound = rt.block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)));
        Some(bound.map_err(|source| super::PortUnavailable {
            addr: format!("{}:{}", args.host, args.port),
            source,
        })?)
    } else {
        None
    };
    let mut ring = args.group.connect(timeout)?;
    let Some(listener) = listener else {
        expert_parallel::follow(&model, &mut ring)?;
        tracing::info!(rank, "the group's leader stopped serving");
        return Ok(ExitCode::SUCCESS);
    };

    let metrics = Metrics::new();
    let serve_metrics =
        ServeMetrics::new(&metrics, &config.serving.model_name).context("registering metrics")?;
    let max_batch = config.serving.max_batch_size as usize;
    let batcher = if world > 1 {
        Batcher::spawn(GroupLeader::new(model, ring), max_batch, serve_metrics)
    } else {
        Batcher::spawn(model, max_batch, serve_metrics)
    };
    let mut failure = batcher.failure();
    let state = Arc::new(ServeState::new(
        batcher.clone(),
        config.serving.model_name.clone(),
        config.model.max_seq_len as usize,
        config.serving.default_max_tokens as usize,
        metrics,
    ));
    rt.block_on(async move {
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let broken = async move {
            let _ = failure.wait_for(Option::is_some).await;
        };
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                tokio::select! {
                    () = shutdown() => {}
                    () = broken => {}
                }
            })
            .await
            .context("HTTP server")
    })?;
    if let Some(reason) = batcher.failure().borrow().clone() {
        anyhow::bail!("serving stopped: {reason}");
    }
    batcher.shutdown(SHUTDOWN_WAIT);
    Ok(ExitCode::SUCCESS)
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
