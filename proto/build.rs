//! Generates the `flotilla.agent.v1` client and server from `proto/`.
//!
//! protoc comes from `protoc-bin-vendored`, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // `set_var("PROTOC")` is unsafe in edition 2024; hand the path to prost-build's config instead.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &["proto/flotilla/agent/v1/agent.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
