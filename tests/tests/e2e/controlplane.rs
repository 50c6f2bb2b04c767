//! The test control plane itself: a real kube-apiserver + etcd that the other tests rely on.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

fn meta(name: &str, ns: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() }
}

#[tokio::test]
async fn namespace_configmap_lease_and_a_watch_that_sees_a_change() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    let client = cp.client().await?;
    let ns = flotilla_tests::namespace(&client, "smoke").await?;
    let created = Api::<Namespace>::all(client.clone()).get(&ns).await?;
    assert_eq!(created.metadata.name.as_deref(), Some(ns.as_str()));

    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = ConfigMap {
        metadata: meta("settings", &ns),
        data: Some([("colour".to_string(), "blue".to_string())].into()),
        ..ConfigMap::default()
    };
    configmaps.create(&PostParams::default(), &cm).await?;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = Lease {
        metadata: meta("leader", &ns),
        spec: Some(LeaseSpec {
            holder_identity: Some("replica-a".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await?;
    let read = leases.get("leader").await?;
    assert_eq!(read.spec.and_then(|s| s.holder_identity).as_deref(), Some("replica-a"));

    // Start watching, then change the ConfigMap: the watch must deliver the new value.
    let config = watcher::Config::default().fields("metadata.name=settings");
    let mut stream = watcher(configmaps.clone(), config).applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.try_next()).await??;
    assert_eq!(
        first.and_then(|c| c.data).and_then(|d| d.get("colour").cloned()).as_deref(),
        Some("blue")
    );

    let patch = serde_json::json!({ "data": { "colour": "green" } });
    configmaps.patch("settings", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(cm) = stream.try_next().await? {
            if cm.data.as_ref().and_then(|d| d.get("colour")).map(String::as_str) == Some("green") {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await??;
    assert!(seen, "the watch ended before it delivered the change");
    Ok(())
}

#[tokio::test]
async fn kubectl_of_the_same_version_talks_to_it() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;

    let version = cp.kubectl().args(["get", "--raw", "/version"]).output()?;
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    let version: serde_json::Value = serde_json::from_slice(&version.stdout)?;
    let git_version = version["gitVersion"].as_str().unwrap_or_default();
    assert!(git_version.starts_with("v1.37."), "server reports {git_version}");

    let resources = cp.kubectl().args(["api-resources", "-o", "name"]).output()?;
    assert!(resources.status.success(), "{}", String::from_utf8_lossy(&resources.stderr));
    let names = String::from_utf8(resources.stdout)?;
    for wanted in [
        "leases.coordination.k8s.io",
        "events.events.k8s.io",
        "nodes",
        "customresourcedefinitions.apiextensions.k8s.io",
    ] {
        assert!(names.lines().any(|l| l == wanted), "api-resources lacks {wanted}:\n{names}");
    }

    let client_version = cp.kubectl().args(["version", "--client", "-o", "json"]).output()?;
    let client_version: serde_json::Value = serde_json::from_slice(&client_version.stdout)?;
    let kubectl_version = client_version["clientVersion"]["gitVersion"].as_str().unwrap_or("");
    assert!(kubectl_version.starts_with("v1.37."), "kubectl reports {kubectl_version}");
    Ok(())
}

#[tokio::test]
async fn namespaces_finish_terminating_because_the_namespace_controller_runs() -> anyhow::Result<()>
{
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    let client = cp.client().await?;
    let ns = flotilla_tests::namespace(&client, "deleted").await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    configmaps
        .create(
            &PostParams::default(),
            &ConfigMap { metadata: meta("doomed", &ns), ..ConfigMap::default() },
        )
        .await?;
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.delete(&ns, &Default::default()).await?;
    let gone = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if namespaces.get_opt(&ns).await?.is_none() {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "namespace {ns} still exists a minute after deletion");
    gone??;
    Ok(())
}

/// The full name of the test run as a child process.
const CHILD: &str = "controlplane::child_that_panics_while_holding_the_control_plane";

/// Runs only as the child process of `the_control_plane_stops_when_its_test_binary_panics`.
#[tokio::test]
#[ignore = "run as a child process by the_control_plane_stops_when_its_test_binary_panics"]
async fn child_that_panics_while_holding_the_control_plane() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    println!("CONTROL_PLANE_DIR={}", cp.dir().display());
    println!("CONTROL_PLANE_SERVER={}", cp.server());
    panic!("a deliberate panic while the control plane runs");
}

#[tokio::test]
async fn the_control_plane_stops_when_its_test_binary_panics() -> anyhow::Result<()> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .args(["--ignored", "--exact", CHILD])
        .arg("--nocapture")
        .env("FLOTILLA_CONTROLPLANE_BIN_DIR", flotilla_tests::controlplane_bin_dir()?)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "the child test was meant to panic:\n{stdout}");
    let field = |key: &str| {
        stdout.lines().find_map(|l| l.strip_prefix(key)).map(str::to_string).unwrap_or_else(|| {
            panic!(
                "the child never printed {key}: stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    };
    let dir = std::path::PathBuf::from(field("CONTROL_PLANE_DIR="));
    let server = field("CONTROL_PLANE_SERVER=");
    let address = server.trim_start_matches("https://").to_string();

    // A clean shutdown ends with the data directory removed and the port closed.
    let stopped = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let port_closed = tokio::net::TcpStream::connect(&address).await.is_err();
            if !dir.exists() && port_closed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "90 s after its test binary panicked, the control plane still runs (dir {} exists: {})",
        dir.display(),
        dir.exists()
    );
    Ok(())
}
