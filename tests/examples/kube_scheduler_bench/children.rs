//! Child processes: tethered to this one, their logs, the operator binary.

use crate::args::{Args, Variant};
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// A child process that dies with this one: it runs under a `bash` that holds a pipe from this
/// process and kills the child when the pipe closes — on drop, or when this process ends however
/// it ends (the kernel closes the pipe after a panic or a SIGKILL too).
pub(crate) struct Tethered {
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) child: Child,
    pub(crate) name: String,
    pub(crate) log: PathBuf,
}

/// The tether: SIGINT is left to this process (its exit closes the pipe); on EOF the command
/// gets SIGTERM, then SIGKILL after 10 s.
pub(crate) const TETHER: &str = r#"trap '' INT
"$@" &
pid=$!
while read -r _; do :; done
kill "$pid" 2>/dev/null
( sleep 10; kill -9 "$pid" 2>/dev/null ) &
killer=$!
wait "$pid"
kill "$killer" 2>/dev/null
exit 0"#;

impl Tethered {
    pub(crate) fn spawn(name: &str, command: Command, log: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let program = command.get_program().to_owned();
        let mut tether = Command::new("bash");
        tether.arg("-c").arg(TETHER).arg("tether").arg(&program).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => tether.env(key, v),
                None => tether.env_remove(key),
            };
        }
        let mut child = tether
            .stdin(Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", Path::new(&program).display()))?;
        let stdin = child.stdin.take();
        Ok(Tethered { stdin, child, name: name.to_owned(), log: log.to_owned() })
    }

    /// Fails, with the end of its log, when the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); end of its log:\n{}", self.name, self.log_tail(40));
        }
        Ok(())
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Tethered {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Where a run's logs go: a temporary directory (removed with the returned guard), or a
/// directory of its own under `--log-dir`.
pub(crate) fn run_dir(
    args: &Args,
    what: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match &args.log_dir {
        Some(root) => {
            let variant = args.variant.unwrap_or(Variant::Mixed).arg();
            let dir = root.join(format!("{variant}-{what}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok((None, dir))
        }
        None => {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().to_path_buf();
            Ok((Some(tmp), dir))
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// This example's build profile directory (`target/<profile>`).
pub(crate) fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("expected to run from target/<profile>/examples/")
}

/// Builds `flotilla-operator` in this example's profile (a no-op when it is up to date) and
/// returns its path.
pub(crate) fn build_operator() -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    // `cargo` as the user's shell runs it (the toolchain of rust-toolchain.toml), without what
    // `cargo run` adds to this process's environment: with those, cargo sees a different build
    // environment and recompiles part of the operator on every run.
    let mut cargo = Command::new("cargo");
    // Built together with this example, so that cargo resolves the same features for the
    // dependencies both share and neither build undoes the other's.
    cargo.args(["build", "--quiet", "-p", "flotilla-operator", "--bin", "flotilla-operator"]);
    cargo.args(["-p", "flotilla-tests", "--example", "kube_scheduler_bench"]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let configured = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL"].contains(&&*key)
            || ["CARGO_BUILD_", "CARGO_PROFILE_", "CARGO_NET_", "CARGO_REGISTRIES_", "CARGO_TERM_"]
                .iter()
                .any(|p| key.starts_with(p));
        if (key == "CARGO" || key.starts_with("CARGO_") || key == "RUSTUP_TOOLCHAIN") && !configured
        {
            cargo.env_remove(&*key);
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let target = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let kept: Vec<PathBuf> = std::env::split_paths(&paths)
            .filter(|p| !p.starts_with(&target) && !p.to_string_lossy().contains("/toolchains/"))
            .collect();
        if kept.is_empty() {
            cargo.env_remove("LD_LIBRARY_PATH");
        } else {
            cargo.env("LD_LIBRARY_PATH", std::env::join_paths(kept)?);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let status = cargo.current_dir(workspace()).status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p flotilla-operator failed ({status})");
    }
    Ok(dir.join("flotilla-operator"))
}
