//! The README's install steps on a real node (issue 17, `install_e2e`), as far as this test node
//! carries them: `kubectl apply -k` of `tests/install` (deploy/ with the images built here and
//! simulated GPUs), the mTLS Secrets filled by `deploy/certs.sh`, the rollout restart — then the
//! operator Deployment becomes Ready under the shipped security context and RBAC, its leader
//! holds the Lease, and the agent DaemonSet's pod starts under its read-only root with only the
//! DaemonSet's volumes writable. (The agent dials the operator through its Service's DNS name;
//! this node has neither cluster DNS nor kube-proxy yet, so its link, the `GpuNode` and the
//! sample jobs are not asserted here.)

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};

use flotilla_tests::{Node, binary, eventually, kubectl, pod_report, workspace};

const NAMESPACE: &str = "flotilla-system";

#[tokio::test]
async fn the_shipped_operator_becomes_ready_from_kubectl_apply_k() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_with_pods_for(module_path!()).await;
    let client = cp.client().await?;
    let node = Node::start(&cp, "gpu-node-a").await?;

    let overlay = workspace().join("tests/install");
    let started = Instant::now();
    let applied = kubectl(&cp, &["apply", "-k", overlay.to_str().expect("utf-8 path")], None);
    assert!(
        applied.status.success(),
        "kubectl apply -k tests/install: {}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // The Secrets, the documented way.
    let path = format!("{}:{}", cp.bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let certs = Command::new("bash")
        .arg(workspace().join("deploy/certs.sh"))
        .arg(node.name())
        .env("FLOTILLA_AGENT", binary("flotilla-agent", "flotilla-agent"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("PATH", path)
        .output()?;
    assert!(
        certs.status.success(),
        "deploy/certs.sh {}: {}{}",
        node.name(),
        String::from_utf8_lossy(&certs.stdout),
        String::from_utf8_lossy(&certs.stderr)
    );
    let restarted = kubectl(
        &cp,
        &["-n", NAMESPACE, "rollout", "restart", "deploy/flotilla-operator", "ds/flotilla-agent"],
        None,
    );
    assert!(
        restarted.status.success(),
        "rollout restart: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let ready = eventually(
        Duration::from_secs(240),
        "the operator Deployment's 2 replicas available",
        || async {
            let d = deployments.get("flotilla-operator").await.ok()?;
            let status = d.status?;
            let current = status.updated_replicas == Some(2) && status.replicas == Some(2);
            (current && status.available_replicas == Some(2)).then_some(())
        },
    )
    .await;
    if let Err(err) = ready {
        let report = pod_report(&client, NAMESPACE, 20).await;
        anyhow::bail!("{err}\n{report}");
    }
    eprintln!(
        "install: kubectl apply -k to the operator Deployment available: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // One of its pods leads: it holds the Lease under its pod name.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let names: Vec<String> = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=flotilla-operator"))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder =
        eventually(Duration::from_secs(60), "the operator Lease held by a running pod", || async {
            let holder = leases.get("flotilla-operator").await.ok()?.spec?.holder_identity?;
            names.contains(&holder).then_some(holder)
        })
        .await?;
    eprintln!("install: {holder} leads");

    // The agent starts: it made its worker-log and socket directories and its admin server.
    let agent_log =
        eventually(Duration::from_secs(120), "the agent pod's `agent started` line", || async {
            let pod = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=flotilla-agent"))
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.metadata.deletion_timestamp.is_none())?;
            let name = pod.metadata.name?;
            let params = LogParams { container: Some("agent".into()), ..LogParams::default() };
            let log = pods.logs(&name, &params).await.ok()?;
            log.contains("agent started").then_some(log)
        })
        .await;
    match agent_log {
        Ok(log) => assert!(
            log.contains(node.name()),
            "the agent should name its node {}:\n{log}",
            node.name()
        ),
        Err(err) => {
            let report = pod_report(&client, NAMESPACE, 20).await;
            anyhow::bail!("{err}\n{report}");
        }
    }
    eprintln!(
        "install: agent started {:.1} s after kubectl apply -k",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
