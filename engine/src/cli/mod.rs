//! Command line of `flotilla-worker`. Every flag has an environment fallback.
//!
//! Exit codes: 0 success; 1 runtime failure (lost peer, I/O, corrupt checkpoint); 2 invalid
//! configuration or usage; 3 `serve` cannot bind its port; 143 stopped by SIGTERM/SIGINT after
//! writing a checkpoint.

mod serve_cmd;
mod train_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use flotilla_contract::worker_env;
use flotilla_engine::config::{EngineConfig, PRESETS};

/// Exit code for a run stopped by a signal after checkpointing.
pub const EXIT_TERMINATED: u8 = 143;
/// Exit code for an invalid configuration.
pub const EXIT_INVALID_CONFIG: u8 = flotilla_engine::exit::INVALID_CONFIG;

/// `serve` could not bind its port (exits with [`flotilla_engine::exit::PORT_UNAVAILABLE`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {addr}: {source}")]
pub struct PortUnavailable {
    addr: String,
    source: std::io::Error,
}

#[derive(Parser)]
#[command(
    name = "flotilla-worker",
    version,
    about = "Trains or serves the Flotilla DeepSeek-style MoE model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (data-parallel over MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), checkpointing as it goes.
    Train(train_cmd::TrainArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API.
    Serve(serve_cmd::ServeArgs),
    /// Print a preset or a config file, validated, as YAML.
    Config(ConfigSource),
    /// Print the JSON schema of the engine configuration.
    Schema,
}

/// Where the engine configuration comes from: a file, the configuration itself as JSON, or a
/// preset (at most one).
#[derive(Args, Clone, Debug)]
pub struct ConfigSource {
    /// Configuration file (YAML or JSON).
    #[arg(long, env = "FLOTILLA_CONFIG", conflicts_with_all = ["preset", "config_json"])]
    pub config: Option<PathBuf>,
    /// The configuration itself, as JSON (how the operator hands a TrainingJob's `spec.engine`
    /// to its workers).
    #[arg(long, env = worker_env::ENGINE_CONFIG, hide_env_values = true, conflicts_with = "preset")]
    pub config_json: Option<String>,
    /// Built-in preset: tiny, small or base.
    #[arg(long, env = "FLOTILLA_PRESET")]
    pub preset: Option<String>,
}

/// A configuration that failed validation (exit code 2).
#[derive(Debug)]
pub struct InvalidConfig(String);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidConfig {}

impl ConfigSource {
    /// Whether a configuration was given at all.
    pub fn is_given(&self) -> bool {
        self.config.is_some() || self.config_json.is_some() || self.preset.is_some()
    }

    /// Loads and validates the configuration (`tiny` when nothing is given).
    pub fn load(&self) -> anyhow::Result<EngineConfig> {
        let config = match (&self.config, &self.config_json, &self.preset) {
            (Some(path), _, _) => read_config(path)?,
            (None, Some(json), _) => serde_json::from_str(json).map_err(|e| {
                InvalidConfig(format!(
                    "--config-json ({}): expected the engine configuration as JSON: {e}",
                    worker_env::ENGINE_CONFIG
                ))
            })?,
            (None, None, Some(name)) => EngineConfig::preset(name).ok_or_else(|| {
                InvalidConfig(format!(
                    "unknown preset {name:?}; expected one of {}",
                    PRESETS.join(", ")
                ))
            })?,
            (None, None, None) => EngineConfig::preset("tiny").context("tiny preset")?,
        };
        config.validate().map_err(|e| InvalidConfig(e.to_string()))?;
        Ok(config)
    }
}

fn read_config(path: &Path) -> anyhow::Result<EngineConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let parsed = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| InvalidConfig(format!("config {}: {e}", path.display())).into())
}

/// Parses the command line, runs the command and maps errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
        Command::Config(source) => print_config(&source),
        Command::Schema => {
            let schema = schemars::schema_for!(EngineConfig);
            serde_json::to_string_pretty(&schema)
                .map(|s| println!("{s}"))
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<InvalidConfig>().is_some() {
                ExitCode::from(EXIT_INVALID_CONFIG)
            } else if e.downcast_ref::<PortUnavailable>().is_some() {
                ExitCode::from(flotilla_engine::exit::PORT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_config(source: &ConfigSource) -> anyhow::Result<ExitCode> {
    let config = source.load()?;
    print!("{}", serde_yaml_ng::to_string(&config)?);
    Ok(ExitCode::SUCCESS)
}

/// Builds a small tokio runtime for the side tasks (signals, metrics, HTTP).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// A worker's place in its group (the variables PyTorch's launchers set).
#[derive(clap::Args)]
pub struct GroupArgs {
    /// Address rank 0 listens on for rendezvous.
    #[arg(long, env = worker_env::MASTER_ADDR, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port rank 0 listens on for rendezvous.
    #[arg(long, env = worker_env::MASTER_PORT, default_value_t = 29500)]
    pub master_port: u16,
    /// This worker's rank.
    #[arg(long, env = worker_env::RANK, default_value_t = 0)]
    pub rank: usize,
    /// Number of workers.
    #[arg(long, env = worker_env::WORLD_SIZE, default_value_t = 1)]
    pub world_size: usize,
}

impl GroupArgs {
    /// Forms the ring (at once for a group of one), declaring a peer lost after `timeout`.
    pub fn connect(
        &self,
        timeout: std::time::Duration,
    ) -> Result<flotilla_engine::collective::Ring, flotilla_engine::collective::CollectiveError>
    {
        let spec = flotilla_engine::collective::GroupSpec {
            rank: self.rank,
            world: self.world_size,
            timeout,
        };
        flotilla_engine::collective::Ring::connect(
            spec,
            &format!("{}:{}", self.master_addr, self.master_port),
        )
    }
}

/// Refuses a rank and world size that cannot form a ring (exit code 2).
pub fn check_group(rank: usize, world: usize) -> anyhow::Result<()> {
    if world == 0 || rank >= world {
        bail!(InvalidConfig(format!(
            "RANK must be below WORLD_SIZE and WORLD_SIZE at least 1; got RANK={rank}, WORLD_SIZE={world}"
        )));
    }
    Ok(())
}
