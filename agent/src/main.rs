//! `flotilla-agent`: see `flotilla_agent::cli` for commands and flags.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = flotilla_agent::cli::Cli::parse();
    cli.init_logging();
    flotilla_agent::cli::main(cli).await
}
