//! The `flotilla-operator` binary; everything lives in the library.

fn main() -> anyhow::Result<()> {
    flotilla_operator::cli::main()
}
