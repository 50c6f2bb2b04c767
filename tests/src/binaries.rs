//! The workspace's binaries, built by cargo next to the test executable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The directory of the workspace's binaries (target/<profile>/, next to this test executable),
/// after `cargo build --workspace --bins` — once per test process, a no-op when nothing changed —
/// so a test never runs a stale binary left by an earlier build.
pub fn binaries_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> or target/<profile>/examples/<example>
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--workspace", "--bins"]).current_dir(workspace());
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        // Cargo gives this process the variables of the package under test (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, ...). Build scripts such as ring's rerun when one of those they
        // name changes, so passing them on would rebuild ring and everything above it on every
        // switch between `cargo test` and this build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let per_package = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || key.starts_with("CARGO_BIN_")
                || key.starts_with("CARGO_CRATE_")
                || key.starts_with("CARGO_TARGET_TMPDIR")
                || key.starts_with("CARGO_PRIMARY_PACKAGE")
                || key.starts_with("CARGO_RUSTC_CURRENT_DIR")
                || key == "OUT_DIR";
            if per_package {
                cmd.env_remove(key.as_ref());
            }
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        profile_dir.to_owned()
    })
}

/// The binary `name` of the workspace (`package` says where it comes from, for the message).
pub fn binary(name: &str, package: &str) -> PathBuf {
    let bin = binaries_dir().join(name);
    assert!(bin.exists(), "{} (package {package}) missing after cargo build", bin.display());
    bin
}

/// The `flotilla-operator` binary.
pub fn operator_binary() -> PathBuf {
    binary("flotilla-operator", "flotilla-operator")
}
