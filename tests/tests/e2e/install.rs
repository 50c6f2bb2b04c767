//! The README's install steps on a real node (issue 17, `install_e2e`): `kubectl apply -k` of
//! `tests/install` (deploy/ with the images built here, simulated GPUs, and a PersistentVolume for
//! the shared-volume claim), the mTLS Secrets filled by `deploy/certs.sh`, the rollout restart —
//! then, on the installed system only (no process of the test talks to a Flotilla component
//! except through the cluster: Services, the GpuNode's adminUrl, `kubectl flotilla`):
//!
//! - the operator Deployment becomes available and one replica leads; the agent DaemonSet's pod
//!   starts under its read-only root, dials the operator through its Service's DNS name, and
//!   its `GpuNode` turns Ready;
//! - the sample `TrainingJob` (deploy/examples) runs to `Succeeded` with its checkpoints on the
//!   shared volume, and `kubectl flotilla logs` shows a worker's log;
//! - the custom-command example runs its program (the agent image's shell) and writes to its
//!   default checkpoint directory on the shared volume;
//! - the sample `InferenceService` serves that checkpoint: a completion through its Service's
//!   ClusterIP;
//! - a longer copy of the sample job survives `kubectl flotilla inject` of an XID 79 (restart from
//!   its checkpoint on healthy GPUs), the deletion of the agent pod (the DaemonSet recreates it;
//!   the job restarts from its checkpoint) and of the leading operator pod (the standby takes
//!   over; the job goes on), and its attempt ledger shows no two attempts ever ran at once;
//! - `kubectl delete -k` removes everything the install created.
//!
//! Every wait that fails reports the pods of the namespace that are not Ready, with their states,
//! events and last log lines.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_operator::crd::{GpuNode, InferenceService, JobPhase, TrainingJob};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, LogParams};

use flotilla_tests::{
    ControlPlane, Node, assert_no_overlap, binary, eventually, kubectl, kubectl_flotilla,
    pod_report, read_ledger, walk, workspace,
};

const NAMESPACE: &str = "flotilla-system";
/// Where the jobs of this test live (the samples name no namespace).
const JOBS: &str = "default";
/// The hostPath behind the overlay's PersistentVolume (tests/install/shared-pv.yaml).
const SHARED: &str = "/var/tmp/flotilla-install-shared";
/// The agent's user (deploy/agent/daemonset.yaml).
const AGENT_UID: u32 = 65532;
/// The sample job's steps are few (120: about 15 s here); the disrupted copy runs long enough
/// for three faults.
const DISRUPTED_STEPS: u64 = 1200;

/// The test's view of the installed system, for waits that explain themselves when they fail.
struct Installed<'a> {
    cp: &'a ControlPlane,
    client: kube::Client,
    node: &'a Node,
}

impl Installed<'_> {
    /// Fails with the report of the namespace's pods that are not Ready, and the node's log.
    async fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        let flotilla = pod_report(&self.client, NAMESPACE, 30).await;
        let operator = self.operator_log(40).await;
        anyhow::anyhow!(
            "{err}\n--- pods in {NAMESPACE} ---\n{flotilla}\n--- leading operator (last 40 lines) \
             ---\n{operator}\n--- node ---\n{}",
            self.node.log_tail()
        )
    }

    async fn pods(&self, app: &str) -> anyhow::Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let params = ListParams::default().labels(&format!("app.kubernetes.io/name={app}"));
        let list = pods.list(&params).await?;
        Ok(list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
    }

    /// The holder of the operator's Lease.
    async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        leases.get("flotilla-operator").await.ok()?.spec?.holder_identity
    }

    async fn operator_log(&self, lines: i64) -> String {
        let Some(leader) = self.leader().await else { return "no leader".into() };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let params = LogParams {
            container: Some("operator".into()),
            tail_lines: Some(lines),
            ..LogParams::default()
        };
        pods.logs(&leader, &params).await.unwrap_or_else(|e| format!("log of {leader}: {e}"))
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = kubectl(self.cp, args, None);
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply` of `yaml` in the jobs' namespace.
    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let out = kubectl(self.cp, &["apply", "-n", JOBS, "-f", "-"], Some(yaml));
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn kubectl_flotilla(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = kubectl_flotilla(self.cp).args(args).output()?;
        if !out.status.success() {
            bail!("kubectl flotilla {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits for the job `name` to reach a running attempt `> after` that has resumed from a
    /// checkpoint when `resumed`; returns the attempt number.
    async fn running_attempt_after(
        &self,
        name: &str,
        after: i32,
        resumed: bool,
        timeout: Duration,
    ) -> anyhow::Result<i32> {
        let jobs: Api<TrainingJob> = Api::namespaced(self.client.clone(), JOBS);
        let what = format!("{name}: an attempt after {after} Running (resumed: {resumed})");
        let found = eventually(timeout, &what, || async {
            let s = jobs.get(name).await.ok()?.status?;
            let a = s.attempt?;
            let ok = s.phase == JobPhase::Running
                && a.number > after
                && (!resumed || a.resumed_from_step.unwrap_or(0) > 0);
            ok.then_some(a.number)
        })
        .await;
        match found {
            Ok(n) => Ok(n),
            Err(err) => Err(self.explain(err).await),
        }
    }

    async fn succeeded(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let jobs: Api<TrainingJob> = Api::namespaced(self.client.clone(), JOBS);
        let done = eventually(timeout, &format!("{name} Succeeded"), || async {
            let s = jobs.get(name).await.ok()?.status?;
            assert_ne!(s.phase, JobPhase::Failed, "{name} failed: {:?}", s.message);
            (s.phase == JobPhase::Succeeded).then_some(())
        })
        .await;
        match done {
            Ok(()) => Ok(()),
            Err(err) => Err(self.explain(err).await),
        }
    }
}

/// The agent's state on the node (the DaemonSet's hostPath): the machine's own directory, so
/// what an earlier run left (GPUs it failed) is removed first.
const AGENT_STATE: &str = "/var/lib/flotilla/agent-state.json";

/// The shared filesystem an administrator exports: empty, owned by the agent's user. And a node
/// without an earlier run's agent state.
fn prepare_shared_dir() -> anyhow::Result<PathBuf> {
    match std::fs::remove_file(AGENT_STATE) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!("removing {AGENT_STATE}: {e}"));
        }
        _ => {}
    }
    let dir = PathBuf::from(SHARED);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {SHARED}"))?;
    }
    std::fs::create_dir_all(&dir)?;
    chown(&dir, Some(AGENT_UID), Some(AGENT_UID))?;
    Ok(dir)
}

/// The sample TrainingJob, renamed `name` with `steps` steps and its checkpoints beside the
/// sample's, as YAML.
fn sample_job(name: &str, steps: u64) -> anyhow::Result<String> {
    let path = workspace().join("deploy/examples/trainingjob-engine.yaml");
    let mut job: TrainingJob = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    job.metadata.name = Some(name.into());
    job.spec.engine.as_mut().context("the sample uses the engine")?.training.steps = steps;
    job.spec.checkpoint.as_mut().context("the sample checkpoints")?.path =
        format!("/shared/checkpoints/{name}");
    Ok(serde_yaml_ng::to_string(&job)?)
}

#[tokio::test]
async fn the_shipped_install_runs_jobs_and_services_on_a_real_node() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_with_pods_for(module_path!()).await;
    let client = cp.client().await?;
    let node = Node::start(&cp, "gpu-node-a").await?;
    let shared = prepare_shared_dir()?;
    let at = Installed { cp: &cp, client: client.clone(), node: &node };
    eprintln!(
        "install: node {} Ready {:.1} s after flotilla-node started (images built in {:.1} s)",
        node.name(),
        node.started_in().as_secs_f64(),
        node.images_built_in().as_secs_f64()
    );

    // === the README's install steps ===
    let overlay = workspace().join("tests/install");
    let overlay = overlay.to_str().expect("utf-8 path");
    let started = Instant::now();
    at.kubectl(&["apply", "-k", overlay])?;
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
    at.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "restart",
        "deploy/flotilla-operator",
        "ds/flotilla-agent",
    ])?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let ready = eventually(
        Duration::from_secs(240),
        "the operator Deployment's 2 replicas available",
        || async {
            let d = deployments.get("flotilla-operator").await.ok()?;
            let (generation, status) = (d.metadata.generation, d.status?);
            // The rollout restart's generation, observed: not the replicas from before it.
            let current = status.observed_generation == generation
                && status.updated_replicas == Some(2)
                && status.replicas == Some(2);
            (current && status.available_replicas == Some(2)).then_some(())
        },
    )
    .await;
    if let Err(err) = ready {
        return Err(at.explain(err).await);
    }
    eprintln!(
        "install: kubectl apply -k to the operator Deployment available: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let names: Vec<String> =
        at.pods("flotilla-operator").await?.into_iter().filter_map(|p| p.metadata.name).collect();
    let holder =
        eventually(Duration::from_secs(60), "the operator Lease held by a running pod", || async {
            at.leader().await.filter(|h| names.contains(h))
        })
        .await?;
    eprintln!("install: {holder} leads");

    // The agent registers through the Service's DNS name and its GpuNode turns Ready.
    let gpu_nodes: Api<GpuNode> = Api::all(client.clone());
    let registered = eventually(Duration::from_secs(180), "GpuNode gpu-node-a Ready", || async {
        let status = gpu_nodes.get(node.name()).await.ok()?.status?;
        let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && status.healthy_gpus > 0).then_some(status)
    })
    .await;
    let registered = match registered {
        Ok(status) => status,
        Err(err) => return Err(at.explain(err).await),
    };
    eprintln!(
        "install: kubectl apply -k to the agent's GpuNode Ready ({} GPUs): {:.1} s",
        registered.healthy_gpus,
        started.elapsed().as_secs_f64()
    );

    // === the sample TrainingJob, to the end ===
    let sample = workspace().join("deploy/examples/trainingjob-engine.yaml");
    let applied = Instant::now();
    at.kubectl(&["apply", "-n", JOBS, "-f", sample.to_str().expect("utf-8 path")])?;
    at.succeeded("moe-tiny", Duration::from_secs(600)).await?;
    eprintln!(
        "install: sample TrainingJob applied to Succeeded: {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    let checkpoints = walk(&shared.join("checkpoints/moe-tiny"));
    assert!(
        checkpoints.iter().any(|p| p.to_string_lossy().contains("/step-")),
        "the sample's checkpoints are on the shared volume: {checkpoints:?}"
    );
    let log = at.kubectl_flotilla(&["logs", "moe-tiny", "-n", JOBS, "--rank", "1"])?;
    assert!(log.contains("step"), "kubectl flotilla logs moe-tiny --rank 1:\n{log}");

    // === the custom-command example: its program exists in the agent image, and its default
    // checkpoint directory is on the shared volume (the operator's FLOTILLA_CHECKPOINT_ROOT) ===
    let custom = workspace().join("deploy/examples/trainingjob-command.yaml");
    let mut job: TrainingJob = serde_yaml_ng::from_str(&std::fs::read_to_string(&custom)?)?;
    job.spec.scheduling.node_selector.clear(); // the example's pool label is not on this node
    at.apply(&serde_yaml_ng::to_string(&job)?)?;
    at.succeeded("custom-script", Duration::from_secs(120)).await?;
    let done: Vec<PathBuf> = walk(&shared.join("checkpoints").join(JOBS))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f == "rank-0.done"))
        .collect();
    assert_eq!(done.len(), 1, "custom-script's file under /shared/checkpoints/{JOBS}: {done:?}");
    let log = at.kubectl_flotilla(&["logs", "custom-script", "-n", JOBS, "--rank", "0"])?;
    assert!(log.contains("rank 0 of 1"), "kubectl flotilla logs custom-script:\n{log}");

    // === the sample InferenceService, through its Service ===
    let service = workspace().join("deploy/examples/inferenceservice.yaml");
    at.kubectl(&["apply", "-n", JOBS, "-f", service.to_str().expect("utf-8 path")])?;
    let services: Api<InferenceService> = Api::namespaced(client.clone(), JOBS);
    let serving =
        eventually(Duration::from_secs(300), "moe-tiny-chat: 2 replicas ready", || async {
            (services.get("moe-tiny-chat").await.ok()?.status?.ready_replicas == 2).then_some(())
        })
        .await;
    if let Err(err) = serving {
        return Err(at.explain(err).await);
    }
    let kube_services: Api<Service> = Api::namespaced(client.clone(), JOBS);
    let svc = kube_services.get("moe-tiny-chat").await?;
    let cluster_ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).context("a ClusterIP")?;
    let port = svc.spec.as_ref().and_then(|s| s.ports.as_ref()?.first().map(|p| p.port));
    let addr = format!("{cluster_ip}:{}", port.context("a Service port")?);
    // kube-proxy programs the ClusterIP a moment after the slices list the replicas ready.
    let answered = Instant::now();
    let text = eventually(Duration::from_secs(60), "a completion through the Service", || async {
        flotilla_operator::endpoints::complete(&addr, "hello", 4, Duration::from_secs(10))
            .await
            .ok()
    })
    .await;
    let text = match text {
        Ok(t) => t,
        Err(err) => {
            let last =
                flotilla_operator::endpoints::complete(&addr, "hello", 4, Duration::from_secs(10))
                    .await;
            return Err(at
                .explain(anyhow::anyhow!("{err}: POST /v1/completions to {addr}: {last:?}"))
                .await);
        }
    };
    eprintln!(
        "install: the Service answered {:.1} s after both replicas were ready",
        answered.elapsed().as_secs_f64()
    );
    eprintln!("install: moe-tiny-chat answered through its Service {addr}: {text:?}");
    services.delete("moe-tiny-chat", &DeleteParams::default()).await?;

    // === a longer copy of the sample through three faults ===
    let name = "moe-disrupted";
    at.apply(&sample_job(name, DISRUPTED_STEPS)?)?;
    let first = at.running_attempt_after(name, 0, false, Duration::from_secs(300)).await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), JOBS);
    let has_checkpoint =
        |after: &Path| walk(after).iter().any(|p| p.to_string_lossy().contains("/step-"));
    let job_dir = shared.join("checkpoints").join(name);
    eventually(Duration::from_secs(300), "a first checkpoint of moe-disrupted", || async {
        has_checkpoint(&job_dir).then_some(())
    })
    .await?;

    // 1. XID 79 on rank 0's GPU, through `kubectl flotilla inject` (the GpuNode's adminUrl).
    let placement = jobs.get(name).await?.status.and_then(|s| s.attempt).context("an attempt")?;
    let gpu = placement.placement.workers[0].gpus[0].to_string();
    let injected = Instant::now();
    at.kubectl_flotilla(&["inject", node.name(), "--gpu", &gpu, "--xid", "79"])?;
    let second = at.running_attempt_after(name, first, true, Duration::from_secs(120)).await?;
    eprintln!(
        "install: XID 79 to {name} running again from its checkpoint: {:.2} s",
        injected.elapsed().as_secs_f64()
    );

    // 2. The agent pod deleted: its workers die with it; the DaemonSet makes a new one, which
    //    registers, and the job restarts from its checkpoint.
    let agent_pod = at.pods("flotilla-agent").await?.pop().and_then(|p| p.metadata.name);
    let agent_pod = agent_pod.context("an agent pod")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.delete(&agent_pod, &DeleteParams::default()).await?;
    let deleted = Instant::now();
    let third = at.running_attempt_after(name, second, true, Duration::from_secs(240)).await?;
    eprintln!(
        "install: agent pod {agent_pod} deleted to {name} running again: {:.1} s",
        deleted.elapsed().as_secs_f64()
    );

    // 3. The leading operator pod deleted: the standby takes over and the job goes on.
    let leader = at.leader().await.context("a leader")?;
    pods.delete(&leader, &DeleteParams::default()).await?;
    let new_leader = eventually(Duration::from_secs(120), "another operator pod leads", || async {
        at.leader().await.filter(|h| *h != leader)
    })
    .await;
    let new_leader = match new_leader {
        Ok(l) => l,
        Err(err) => return Err(at.explain(err).await),
    };
    eprintln!("install: {new_leader} leads after {leader} was deleted");
    // The new leader adopts the running workers: their progress reaches the job's status again.
    let step_at = |s: &flotilla_operator::crd::TrainingJobStatus| {
        s.progress.as_ref().map(|p| p.step).unwrap_or_default()
    };
    let before = jobs.get(name).await?.status.as_ref().map(step_at).unwrap_or_default();
    let advancing = eventually(
        Duration::from_secs(60),
        "moe-disrupted's progress advancing under the new leader",
        || async {
            let s = jobs.get(name).await.ok()?.status?;
            (step_at(&s) > before + 20).then_some(())
        },
    )
    .await;
    if let Err(err) = advancing {
        return Err(at.explain(err).await);
    }
    at.succeeded(name, Duration::from_secs(900)).await?;
    let status = jobs.get(name).await?.status.context("status")?;
    let last = status.attempt.map(|a| a.number).unwrap_or_default();
    assert_eq!(
        last, third,
        "the operator's replacement restarted the job (attempts: {:?})",
        status.restart_history
    );

    // The ledger: no attempt started before the last worker of an earlier one ended. The
    // workers of the attempt the agent pod took down died with its container: each wrote its end
    // line only if it noticed first (a peer's collective failing), so those may lack one; every
    // other worker must have one.
    let lines = read_ledger(&shared.join("checkpoints").join(name).join("attempts.ledger"));
    let killed: Vec<(u64, u32)> = lines
        .iter()
        .filter(|l| l.start && l.attempt == second as u64)
        .filter(|l| !lines.iter().any(|e| !e.start && e.attempt == l.attempt && e.rank == l.rank))
        .map(|l| (l.attempt, l.rank))
        .collect();
    let attempts = assert_no_overlap(&lines, &killed);
    assert_eq!(
        attempts.iter().map(|(a, _)| *a as i32).collect::<Vec<_>>(),
        vec![first, second, third]
    );

    // === kubectl delete -k removes what apply -k made ===
    at.kubectl(&["delete", "-n", JOBS, "trainingjob", "moe-tiny", "custom-script", name])?;
    at.kubectl(&["delete", "-k", overlay, "--wait=true", "--timeout=180s"])?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    eventually(Duration::from_secs(180), "the flotilla-system namespace gone", || async {
        namespaces.get_opt(NAMESPACE).await.ok()?.is_none().then_some(())
    })
    .await?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    assert!(volumes.get_opt("flotilla-install-shared").await?.is_none());
    let crds = at.kubectl(&["get", "crd", "-o", "name"])?;
    assert!(!crds.contains("flotilla.dev"), "CRDs left after delete -k: {crds}");
    Ok(())
}

/// The failure report install_e2e gives on a broken manifest names the failing pod and shows its
/// last log lines: here the agent without its writable worker-log volume.
#[tokio::test]
async fn a_broken_agent_manifest_is_reported_with_its_pod_and_log() -> anyhow::Result<()> {
    let cp = flotilla_tests::control_plane_with_pods_for(module_path!()).await;
    let client = cp.client().await?;
    let node = Node::start(&cp, "gpu-node-b").await?;
    prepare_shared_dir()?;
    let at = Installed { cp: &cp, client: client.clone(), node: &node };
    let overlay = workspace().join("tests/install-broken");
    at.kubectl(&["apply", "-k", overlay.to_str().expect("utf-8 path")])?;
    let gpu_nodes: Api<GpuNode> = Api::all(client.clone());
    let err = eventually(Duration::from_secs(90), "GpuNode gpu-node-b Ready", || async {
        gpu_nodes.get(node.name()).await.ok().map(drop)
    })
    .await
    .expect_err("an agent that cannot start registers no GpuNode");
    // What install_e2e prints: wait until the agent has failed at least once, then the report.
    let failed = eventually(Duration::from_secs(120), "the agent container failed", || async {
        let pod = at.pods("flotilla-agent").await.ok()?.pop()?;
        let statuses = pod.status?.container_statuses?;
        statuses.iter().any(|c| c.name == "agent" && c.restart_count > 0).then_some(())
    })
    .await;
    let report = at.explain(err).await.to_string();
    failed.map_err(|e| anyhow::anyhow!("{e}\n{report}"))?;
    for want in ["pod flotilla-system/flotilla-agent-", "container agent:", "/var/log/flotilla"] {
        assert!(report.contains(want), "the report lacks {want:?}:\n{report}");
    }
    Ok(())
}
