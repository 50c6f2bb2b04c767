//! The `flotilla-agent` binary: start-up errors and the certificate command.

use std::process::Command;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    cmd
}

#[test]
fn without_libnvidia_ml_the_nvml_backend_fails_with_one_clear_sentence() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let out = agent()
        .args(["run", "--node", "node-a", "--backend", "nvml"])
        .args(["--operator", "http://127.0.0.1:9", "--admin-addr", "127.0.0.1:0"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains("NVML is unavailable"), "{stderr}");
    assert!(error_lines[0].contains("--backend simulated"), "{stderr}");
}

#[test]
fn certs_writes_a_ca_an_operator_cert_and_one_cert_per_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent()
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--node", "node-a,node-b"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in ["ca.pem", "operator.pem", "operator-key.pem", "node-a.pem", "node-b-key.pem"] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
}

#[test]
fn https_without_certificates_is_refused_naming_the_flags() {
    let out = agent()
        .args(["run", "--node", "node-a", "--operator", "https://127.0.0.1:9"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--tls-ca, --tls-cert and --tls-key"), "{stderr}");
}
