//! `kubectl` of the control plane's version, and the committed CRDs applied with it.

use std::process::{Command, Output, Stdio};

use anyhow::{Result, bail};

use crate::ControlPlane;
use crate::binaries::{binary, workspace};

/// Run kubectl with `args`, feeding `stdin` when given.
pub fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = cp.kubectl();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawning kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    }
    child.wait_with_output().expect("waiting for kubectl")
}

/// `kubectl flotilla ...` through kubectl's plugin mechanism: the control plane's kubectl, with
/// the workspace's `kubectl-flotilla` first on `PATH`.
pub fn kubectl_flotilla(cp: &ControlPlane) -> Command {
    let plugin = binary("kubectl-flotilla", "flotilla-operator");
    let plugin_dir = plugin.parent().expect("plugin dir").to_owned();
    let path = std::env::join_paths(
        std::iter::once(plugin_dir)
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");
    let mut cmd = Command::new(cp.bin_dir().join("kubectl"));
    cmd.env("KUBECONFIG", cp.kubeconfig()).env("PATH", path).arg("flotilla");
    cmd
}

/// Apply the committed CRDs and wait until they are established.
pub fn install_crds(cp: &ControlPlane) -> Result<()> {
    let dir = workspace().join("deploy/crds");
    let out = kubectl(
        cp,
        &["apply", "--server-side", "--force-conflicts", "-f", dir.to_str().expect("utf-8 path")],
        None,
    );
    if !out.status.success() {
        bail!("applying CRDs: {}", String::from_utf8_lossy(&out.stderr));
    }
    for crd in
        ["trainingjobs.flotilla.dev", "inferenceservices.flotilla.dev", "gpunodes.flotilla.dev"]
    {
        let wait = ["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}")];
        let mut out = kubectl(cp, &wait, None);
        // kubectl wait fails instead of waiting while a just-created CRD has no conditions yet.
        for _ in 0..50 {
            let early = String::from_utf8_lossy(&out.stderr).contains("accessor error: <nil>");
            if out.status.success() || !early {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            out = kubectl(cp, &wait, None);
        }
        if !out.status.success() {
            bail!("waiting for {crd}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}
