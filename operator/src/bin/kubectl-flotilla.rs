//! `kubectl-flotilla`: Flotilla's kubectl plugin; see `flotilla_operator::plugin`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = flotilla_operator::plugin::Cli::parse();
    if let Err(e) = flotilla_operator::plugin::main(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
