//! RBAC against the real API server: the operator runs with a ServiceAccount token bound only to
//! the shipped ClusterRole and Role (deploy/rbac), not as admin, through a whole job lifecycle —
//! agents registering (GpuNodes created and mirrored), a TrainingJob placed, launched, running
//! and Succeeded with real workers — and the API server forbids it nothing.

use flotilla_operator::crd::{JobPhase, TrainingJob};
use flotilla_tests::{
    ControlPlane, Fleet, WAIT, eventually, install_crds, tiny_engine_job, workspace,
};
use kube::api::{Api, PostParams};
use kube::config::{AuthInfo, Kubeconfig};
use std::process::Command;
use std::time::{Duration, Instant};

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl().args(args).output().expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The admin kubeconfig with its user replaced by `token`.
fn kubeconfig_with_token(cp: &ControlPlane, token: &str) -> Kubeconfig {
    let mut config = Kubeconfig::read_from(cp.kubeconfig()).expect("admin kubeconfig");
    for named in &mut config.auth_infos {
        named.auth_info =
            Some(AuthInfo { token: Some(token.to_owned().into()), ..Default::default() });
    }
    config
}

#[tokio::test]
async fn the_operator_runs_a_job_to_success_with_only_its_shipped_rbac() {
    let started = Instant::now();
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let deploy = workspace().join("deploy");
    kubectl_ok(
        &cp,
        &["apply", "--server-side", "-f", &deploy.join("namespace.yaml").to_string_lossy()],
    );
    kubectl_ok(&cp, &["apply", "--server-side", "-f", &deploy.join("rbac").to_string_lossy()]);
    // A token for the ServiceAccount through the TokenRequest API.
    let token = kubectl_ok(
        &cp,
        &["create", "token", "flotilla-operator", "-n", "flotilla-system", "--duration=1h"],
    );
    let token = token.trim();
    assert!(token.split('.').count() == 3, "expected a JWT from TokenRequest, got {token:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("operator.kubeconfig");
    let config = kubeconfig_with_token(&cp, token);
    std::fs::write(&kubeconfig, serde_yaml_ng::to_string(&config).expect("kubeconfig YAML"))
        .expect("writing the kubeconfig");
    // The token really is the ServiceAccount and not admin.
    let whoami = Command::new(cp.bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["auth", "can-i", "list", "secrets", "-n", "flotilla-system"])
        .output()
        .expect("kubectl auth can-i");
    assert_eq!(String::from_utf8_lossy(&whoami.stdout).trim(), "no", "the token is too powerful");

    let client = cp.client().await.expect("admin client");
    let ns = flotilla_tests::namespace(&client, "rbac").await.expect("namespace");
    // GpuNodes are created and mirrored by the operator under the ServiceAccount.
    let fleet = Fleet::start(&kubeconfig, &ns, "flotilla-system", &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &tiny_engine_job("rbac-e2e", 30, 10))
        .await
        .expect("create job");
    eventually(WAIT, "rbac-e2e Running", || async {
        let s = jobs.get("rbac-e2e").await.ok()?.status?;
        matches!(s.phase, JobPhase::Running | JobPhase::Succeeded).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let done = eventually(Duration::from_secs(240), "rbac-e2e Succeeded or Failed", || async {
        let s = jobs.get("rbac-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, fleet.logs());
    let log = fleet.operator.log();
    let forbidden: Vec<&str> =
        log.lines().filter(|l| l.to_ascii_lowercase().contains("forbidden")).collect();
    assert!(forbidden.is_empty(), "the API server forbade the operator:\n{}", forbidden.join("\n"));
    assert!(log.contains("became leader"), "the operator never led:\n{log}");
    println!("(test took {:.0?})", started.elapsed());
}
