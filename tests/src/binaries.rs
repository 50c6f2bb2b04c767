//! The workspace's binaries, built by cargo next to the test executable.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A binary next to this test executable, built from `package` when missing.
pub fn binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join(name);
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .current_dir(workspace())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} --bin {name} failed");
    }
    bin
}

/// The `flotilla-operator` binary next to this test executable (target/<profile>/). Every call
/// runs `cargo build --workspace --bins` first — a no-op when nothing changed — so a test never
/// runs a stale binary left by an earlier build.
pub fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("flotilla-operator");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--workspace", "--bins"])
        .current_dir(workspace())
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build --workspace --bins failed");
    assert!(bin.exists(), "{} missing after cargo build", bin.display());
    bin
}
