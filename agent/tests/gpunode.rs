//! Agents on 127.0.0.1 → the operator's agent server → `GpuNode` status in a real
//! kube-apiserver (the test control plane of `flotilla-tests`).

mod common;

use common::*;
use flotilla_agent::backend::simulated::Injection;
use flotilla_operator::agents::NodeRegistry;
use flotilla_operator::crd::gpu_node::{GpuHealth, GpuNode};
use kube::Api;
use std::path::Path;
use std::time::Duration;

fn install_crds(cp: &flotilla_tests::ControlPlane) {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds)
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "applying CRDs: {}", String::from_utf8_lossy(&out.stderr));
    let out = cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s", "crd/gpunodes.flotilla.dev"])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "waiting for the GpuNode CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls the API until `pred` holds for the named `GpuNode`.
async fn gpunode_until(
    api: &Api<GpuNode>,
    name: &str,
    what: &str,
    pred: impl Fn(&GpuNode) -> bool,
) -> GpuNode {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(Some(node)) = api.get_opt(name).await
            && pred(&node)
        {
            return node;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GpuNode {name}: {what} not seen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn registration_creates_gpunodes_and_xid_79_fails_a_gpu_there_but_xid_13_does_not() {
    let cp = flotilla_tests::control_plane().await;
    install_crds(cp);
    let client = cp.client().await.expect("client");
    let api: Api<GpuNode> = Api::all(client.clone());

    let nodes = ["mirror-a", "mirror-b"];
    let certs = Certs::new(&nodes);
    let fleet = NodeRegistry::new();
    let op = operator("127.0.0.1:0", fleet.clone(), Some(&certs), fast_config()).await;
    tokio::spawn(flotilla_operator::agents::mirror::run(client, fleet, Duration::from_secs(1)));
    let mut agents = Vec::new();
    for node in nodes {
        agents.push(agent(agent_options(node, op.addr, Some(certs.client(node)), 4)).await);
    }
    for (node, agent) in nodes.iter().zip(&agents) {
        let obj = gpunode_until(&api, node, "4 healthy GPUs", |n| {
            n.status.as_ref().is_some_and(|s| s.total_gpus == 4 && s.healthy_gpus == 4)
        })
        .await;
        let status = obj.status.expect("status");
        let uuids: Vec<&str> = status.gpus.iter().map(|g| g.uuid.as_str()).collect();
        let expected: Vec<&str> = agent.core.devices().iter().map(|d| d.uuid.as_str()).collect();
        assert_eq!(uuids, expected, "{node}");
        assert_eq!(status.gpu_model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert!(status.last_heartbeat_time.is_some());
    }

    let sim = agents[0].sim.as_ref().expect("simulated");
    sim.inject(1, Injection::Xid(13)).expect("inject 13");
    sim.inject(2, Injection::Xid(79)).expect("inject 79");
    let started = std::time::Instant::now();
    let obj = gpunode_until(&api, "mirror-a", "GPU 2 Failed", |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.gpus.get(2).is_some_and(|g| g.health == GpuHealth::Failed))
    })
    .await;
    eprintln!("XID 79 -> GpuNode status Failed in {:?}", started.elapsed());
    let status = obj.status.expect("status");
    assert_eq!(
        status.gpus[1].health,
        GpuHealth::Healthy,
        "XID 13 (the application's) condemned GPU 1"
    );
    assert_eq!(status.healthy_gpus, 3);
    let fault = status.last_fault.expect("last fault");
    assert_eq!((fault.gpu, fault.xid), (2, Some(79)));
    assert_eq!(fault.summary, "GPU 2 Xid79");

    let other = api.get("mirror-b").await.expect("mirror-b");
    assert_eq!(other.status.expect("status").healthy_gpus, 4, "the other node is untouched");

    let out = cp.kubectl().args(["get", "gpunodes", "mirror-a"]).output().expect("kubectl runs");
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(table.contains("GPU 2 Xid79"), "{table}");
}
