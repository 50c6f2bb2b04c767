//! `flotilla-worker`: trains or serves the Flotilla MoE model. See `flotilla-worker --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
