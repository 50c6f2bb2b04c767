//! `kubectl` of the control plane's version, and the committed CRDs applied with it.

use std::process::{Output, Stdio};

use anyhow::{Result, bail};

use crate::ControlPlane;
use crate::binaries::workspace;

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
