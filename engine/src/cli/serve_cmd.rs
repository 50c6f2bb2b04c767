//! `flotilla-worker serve`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use flotilla_engine::checkpoint;
use flotilla_engine::metrics::{Metrics, ServeMetrics};
use flotilla_engine::model::Model;
use flotilla_engine::serve::batcher::Batcher;
use flotilla_engine::serve::{ServeState, router};

use super::{ConfigSource, runtime};

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (with `latest`) or one `step-…` directory; without it a preset or
    /// config is served with freshly initialised weights.
    #[arg(long, env = "FLOTILLA_CHECKPOINT_DIR")]
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
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
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
            if args.source.config.is_some() || args.source.preset.is_some() {
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
    let metrics = Metrics::new();
    let serve_metrics =
        ServeMetrics::new(&metrics, &config.serving.model_name).context("registering metrics")?;
    let batcher = Batcher::spawn(model, config.serving.max_batch_size as usize, serve_metrics);
    let state = Arc::new(ServeState::new(
        batcher,
        config.serving.model_name.clone(),
        config.model.max_seq_len as usize,
        config.serving.default_max_tokens as usize,
        metrics,
    ));
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|source| super::PortUnavailable {
                addr: format!("{}:{}", args.host, args.port),
                source,
            })?;
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown())
            .await
            .context("HTTP server")
    })?;
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
