//! `flotilla-agent`: see `flotilla_agent::cli` for commands and flags.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    flotilla_agent::cli::main(flotilla_agent::cli::Cli::parse()).await
}
