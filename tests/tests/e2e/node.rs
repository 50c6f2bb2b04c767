//! A real node under the tests: containerd, runc and the CNI bridge, the kubelet, and Flotilla's
//! own images built here without a registry. The operator image runs as a Deployment under the
//! shipped security context, reaches the API server from its pod, and takes the leader Lease.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde_json::json;

use flotilla_tests::{Node, eventually, pod_report};

const OPERATOR_IMAGE: &str = "ghcr.io/flotilla-dev/flotilla-operator:0.1.0";

#[tokio::test]
async fn the_operator_image_runs_as_a_deployment_on_a_real_node() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_with_pods_for(module_path!()).await;
    flotilla_tests::install_crds(&cp)?;
    let client = cp.client().await?;

    let node = Node::start(&cp, "node-a").await?;
    let first_start = node.started_in();
    let images: Vec<String> = node
        .images()
        .iter()
        .map(|i| format!("{} {:.1} MB", i.reference, i.layer_bytes as f64 / 1e6))
        .collect();
    eprintln!(
        "node: first start {:.1} s (after the images, built or reused in {:.1} s); images: {}",
        first_start.as_secs_f64(),
        node.images_built_in().as_secs_f64(),
        images.join(", ")
    );

    let ns = flotilla_tests::namespace(&client, "node").await?;
    create_operator(&client, &ns).await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let available =
        eventually(Duration::from_secs(180), "the operator Deployment available", || async {
            let status = deployments.get("flotilla-operator").await.ok()?.status?;
            (status.available_replicas == Some(1)).then_some(())
        })
        .await;
    if let Err(err) = available {
        let report = pod_report(&client, &ns, 20).await;
        anyhow::bail!(
            "{err}\n{report}\n--- kubelet log ---\n{}",
            node.component_log("kubelet", 20)
        );
    }
    eprintln!(
        "node: operator Deployment available {:.1} s after create",
        started.elapsed().as_secs_f64()
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=flotilla-operator"))
        .await?
        .items
        .into_iter()
        .next()
        .expect("an available Deployment has a pod");
    let pod_name = pod.metadata.name.clone().expect("a pod has a name");
    let spec = pod.spec.clone().expect("a pod has a spec");
    let status = pod.status.clone().expect("a running pod has a status");
    assert_eq!(spec.node_name.as_deref(), Some(node.name()), "the pod runs on the test node");
    let pod_ip = status.pod_ip.unwrap_or_default();
    assert!(
        pod_ip.starts_with("10.244.77."),
        "pod IP {pod_ip:?}: expected one of the node's bridge"
    );

    // The pod reached the API server through the `kubernetes` Service with its own token: it
    // holds the Lease, under its own name.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = eventually(Duration::from_secs(60), "the leader Lease held", || async {
        leases.get("flotilla-operator").await.ok()?.spec?.holder_identity
    })
    .await?;
    assert_eq!(holder, pod_name, "the Lease holder is the operator's pod");

    // Its log, read through the API server from the kubelet.
    let log = pods.logs(&pod_name, &LogParams::default()).await?;
    assert!(
        log.contains("became leader") && log.contains(&pod_name),
        "the operator's log should say it became leader as {pod_name}:\n{log}"
    );

    // A second start of the node on a warm machine (images and builds cached).
    node.stop();
    let node = Node::start(&cp, "node-a").await?;
    eprintln!(
        "node: first start {:.1} s, second start {:.1} s",
        first_start.as_secs_f64(),
        node.started_in().as_secs_f64()
    );
    Ok(())
}

/// The operator's ServiceAccount (cluster-admin here: RBAC is the install test's subject, not
/// this one's) and its Deployment, with the shipped security context.
async fn create_operator(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    let post = PostParams::default();
    let sa: ServiceAccount = serde_json::from_value(json!({
        "metadata": { "name": "flotilla-operator", "namespace": ns }
    }))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&post, &sa).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": format!("{ns}-operator") },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": "flotilla-operator", "namespace": ns }]
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone()).create(&post, &binding).await?;
    let labels = json!({ "app.kubernetes.io/name": "flotilla-operator" });
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "flotilla-operator", "namespace": ns },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "serviceAccountName": "flotilla-operator",
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "fsGroup": 65532, "seccompProfile": { "type": "RuntimeDefault" }
                    },
                    "containers": [{
                        "name": "operator",
                        "image": OPERATOR_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["run"],
                        "env": [
                            { "name": "FLOTILLA_ADMIN_ADDR", "value": "0.0.0.0:9090" },
                            // No agent joins: the agent link's mTLS is the install test's.
                            { "name": "FLOTILLA_AGENT_INSECURE", "value": "true" },
                            { "name": "FLOTILLA_LEASE_NAMESPACE",
                              "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                            { "name": "FLOTILLA_IDENTITY",
                              "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/ready", "port": 9090 }, "periodSeconds": 2
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"] }
                        }
                    }]
                }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns).create(&post, &deployment).await?;
    Ok(())
}
