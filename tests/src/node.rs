//! A real Kubernetes node beside a test control plane: containerd 1.6 with runc and the CNI
//! bridge plugins, the kubelet (v1.37.2, from the Kubernetes Go modules), and the
//! kube-controller-manager and kube-scheduler that Deployments and DaemonSets need — all run by
//! `flotilla-node` (`tests/controlplane/node`), with Flotilla's images built from the workspace's
//! binaries (`scripts/images.sh`) and imported before the kubelet starts.
//!
//! A node needs a control plane that admits Pods ([`crate::control_plane_with_pods_for`]). One
//! node runs on a machine at a time (its bridge, NAT chain and the kubelet's sysctls are
//! machine-wide): a second start waits for the first to stop. A node is stopped however the test
//! process ends, as the control plane is: `flotilla-node` runs with `--exit-on-stdin-close` and
//! this process holds its standard input; stopping undoes everything it changed on the machine
//! (and a node that was killed outright is undone by the next start).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Event, Node as KubeNode, Pod};
use kube::api::{Api, ListParams, LogParams};

use crate::binaries::{operator_binary, workspace};
use crate::control_plane::{ControlPlane, capture_lines, wait_for_line};
use crate::namespace::unique_suffix;
use crate::wait::eventually;

/// How long `flotilla-node` may take to its ready line: waiting for another node on the machine
/// to stop, then containerd, the image imports and the kubelet on 2 busy cores.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(420);

/// How long a started kubelet's Node may take to report Ready.
const NODE_CONDITION_TIMEOUT: Duration = Duration::from_secs(120);

/// An image built by `scripts/images.sh`.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its reference, as the manifests name it (`ghcr.io/flotilla-dev/flotilla-agent:0.1.0`).
    pub reference: String,
    /// The OCI archive.
    pub archive: PathBuf,
    /// The size of its one layer, in bytes.
    pub layer_bytes: u64,
}

/// Builds the images of the workspace's binaries next to this test executable (reused when the
/// binaries have not changed) and returns them with the time it took.
pub fn build_images() -> anyhow::Result<(Vec<Image>, Duration)> {
    let started = Instant::now();
    let bin_dir =
        operator_binary().parent().context("the operator binary has a directory")?.to_owned();
    let script = workspace().join("scripts/images.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} --bin-dir {} failed with {}", script.display(), bin_dir.display(), output.status);
    }
    let images = String::from_utf8(output.stdout)?
        .lines()
        .map(parse_image_line)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((images, started.elapsed()))
}

/// One `REF ARCHIVE LAYER-BYTES` line of `scripts/images.sh`.
fn parse_image_line(line: &str) -> anyhow::Result<Image> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [reference, archive, size] = fields[..] else {
        bail!("scripts/images.sh: expected `REF ARCHIVE LAYER-BYTES`, got {line:?}");
    };
    let layer_bytes =
        size.parse().with_context(|| format!("scripts/images.sh: layer size in {line:?}"))?;
    Ok(Image { reference: reference.into(), archive: archive.into(), layer_bytes })
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    name: String,
    dir: PathBuf,
    containerd: PathBuf,
    images: Vec<Image>,
    log: Arc<Mutex<VecDeque<String>>>,
    images_built_in: Duration,
    started_in: Duration,
    /// Held, never written: closing it stops the node.
    stdin: Option<ChildStdin>,
    child: Option<Child>,
}

// === impl Node ===

impl Node {
    /// Starts node `name` for `cp` with the workspace's images, and waits until the Node is
    /// Ready. The control plane must admit Pods ([`crate::control_plane_with_pods_for`]).
    pub async fn start(cp: &ControlPlane, name: &str) -> anyhow::Result<Node> {
        let (images, images_built_in) = tokio::task::spawn_blocking(build_images).await??;
        let started = Instant::now();
        let bin_dir = cp.bin_dir().to_owned();
        let kubeconfig = cp.kubeconfig().to_owned();
        let node_name = name.to_owned();
        let mut node = tokio::task::spawn_blocking(move || {
            Node::spawn(&bin_dir, &kubeconfig, &node_name, images)
        })
        .await??;
        node.wait_ready(cp).await?;
        node.started_in = started.elapsed();
        node.images_built_in = images_built_in;
        Ok(node)
    }

    fn spawn(
        bin_dir: &Path,
        kubeconfig: &Path,
        name: &str,
        images: Vec<Image>,
    ) -> anyhow::Result<Node> {
        static RUN: AtomicU32 = AtomicU32::new(0);
        // Short: containerd's socket paths live under it (a Unix socket path has 108 bytes).
        let dir = std::env::temp_dir().join(format!(
            "flotilla-node-{}-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed),
            unique_suffix()
        ));
        let archives: Vec<String> =
            images.iter().map(|i| i.archive.display().to_string()).collect();
        let program = bin_dir.join("flotilla-node");
        let mut child = Command::new(&program)
            .arg("--dir")
            .arg(&dir)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--name")
            .arg(name)
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--images")
            .arg(archives.join(","))
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let log = capture_lines(child.stderr.take().expect("stderr is piped"));
        let mut node = Node {
            name: name.to_owned(),
            containerd: dir.join("containerd.sock"),
            dir,
            images,
            log,
            images_built_in: Duration::ZERO,
            started_in: Duration::ZERO,
            stdin: Some(stdin),
            child: Some(child),
        };
        if let Err(err) = wait_for_line(stdout, "node ready: ", NODE_READY_TIMEOUT) {
            // Closing stdin makes it undo what it started; wait for that before reporting.
            drop(node.stdin.take());
            if let Some(mut child) = node.child.take() {
                let _ = child.wait();
            }
            bail!("flotilla-node {name}: {err:#}\n--- its log ---\n{}", node.log_tail());
        }
        Ok(node)
    }

    async fn wait_ready(&self, cp: &ControlPlane) -> anyhow::Result<()> {
        let nodes: Api<KubeNode> = Api::all(cp.client().await?);
        let what = format!("Node {} Ready", self.name);
        eventually(NODE_CONDITION_TIMEOUT, &what, || async {
            let node = nodes.get(&self.name).await.ok()?;
            let conditions = node.status?.conditions?;
            conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
        })
        .await
        .map_err(|err| {
            anyhow::anyhow!("{err}\n--- kubelet log ---\n{}", self.component_log("kubelet", 30))
        })
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's containerd socket (`ctr --address`).
    pub fn containerd_socket(&self) -> &Path {
        &self.containerd
    }

    /// The images imported into the node's containerd.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// From the images being ready to the Node's Ready condition: containerd, the imports, the
    /// controllers, the kubelet, registration.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// How long building (or reusing) the images took before the node started, the workspace
    /// build included.
    pub fn images_built_in(&self) -> Duration {
        self.images_built_in
    }

    /// The last lines `flotilla-node` itself logged.
    pub fn log_tail(&self) -> String {
        self.log.lock().map(|l| Vec::from(l.clone()).join("\n")).unwrap_or_default()
    }

    /// The last `lines` lines of a component's log: `kubelet`, `containerd`,
    /// `kube-controller-manager`, `kube-scheduler`.
    pub fn component_log(&self, component: &str, lines: usize) -> String {
        let path = self.dir.join(format!("{component}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the node and waits until it has undone everything (so that the next node can start
    /// at once).
    pub fn stop(mut self) {
        self.stop_and_wait();
    }

    fn stop_and_wait(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A test that ends without `stop` still leaves the machine clean for the next node:
        // flotilla-node's teardown takes seconds, and a dropped node is usually the last thing
        // a test holds.
        self.stop_and_wait();
    }
}

/// What is wrong with the pods of `namespace` that are not Ready: each one's name, phase,
/// warning events (unbound volumes, failed scheduling, image or mount errors), container states
/// and the last `lines` lines of each container's log — the message a test prints when a
/// workload does not come up.
pub async fn pod_report(client: &kube::Client, namespace: &str, lines: i64) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = match pods.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(err) => return format!("listing pods in {namespace}: {err}"),
    };
    let mut report = String::new();
    for pod in list {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let ready =
            status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            continue;
        }
        report.push_str(&format!(
            "pod {namespace}/{name} not Ready: phase {}\n",
            status.phase.as_deref().unwrap_or("?")
        ));
        let events: Api<Event> = Api::namespaced(client.clone(), namespace);
        let selector = format!("involvedObject.name={name},type=Warning");
        if let Ok(list) = events.list(&ListParams::default().fields(&selector)).await {
            for e in list.items.iter().rev().take(5) {
                report.push_str(&format!(
                    "  event {} (x{}): {}\n",
                    e.reason.as_deref().unwrap_or(""),
                    e.count.unwrap_or(1),
                    e.message.as_deref().unwrap_or("")
                ));
            }
        }
        let statuses = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in statuses {
            let state = c.state.clone().unwrap_or_default();
            let last = c.last_state.clone().unwrap_or_default();
            let describe = |s: &k8s_openapi::api::core::v1::ContainerState| {
                if let Some(w) = &s.waiting {
                    format!(
                        "waiting ({}: {})",
                        w.reason.as_deref().unwrap_or(""),
                        w.message.as_deref().unwrap_or("")
                    )
                } else if let Some(t) = &s.terminated {
                    format!(
                        "terminated (exit {}, {})",
                        t.exit_code,
                        t.reason.as_deref().unwrap_or("")
                    )
                } else if s.running.is_some() {
                    "running".into()
                } else {
                    "unknown".into()
                }
            };
            report.push_str(&format!(
                "  container {}: {}, restarts {}, last {}\n",
                c.name,
                describe(&state),
                c.restart_count,
                describe(&last)
            ));
            for previous in [false, true] {
                let params = LogParams {
                    container: Some(c.name.clone()),
                    tail_lines: Some(lines),
                    previous,
                    ..LogParams::default()
                };
                if let Ok(log) = pods.logs(&name, &params).await
                    && !log.trim().is_empty()
                {
                    let which = if previous { "previous run" } else { "current run" };
                    report.push_str(&format!(
                        "  --- {} log, {which} (last {lines} lines) ---\n",
                        c.name
                    ));
                    for line in log.lines() {
                        report.push_str(&format!("  {line}\n"));
                    }
                }
            }
        }
    }
    if report.is_empty() {
        report = format!("every pod in {namespace} is Ready");
    }
    report
}
