//! The kube-scheduler side: fake Nodes, one Pod per worker.

use crate::GPU_RESOURCE;
use crate::GPUS;
use crate::JOB_LABEL;
use crate::args::{Args, Variant};
use crate::children::{Tethered, run_dir};
use crate::jobs::{Job, check_workload, node_name, workload};
use crate::measure::{Tally, Unit, pod_stage, submit, tally, until_empty, watch};
use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

pub(crate) async fn run_kube(args: &Args, variant: Variant) -> anyhow::Result<Value> {
    let begun = Instant::now();
    let cp = flotilla_tests::control_plane().await;
    eprintln!("kube: control plane up in {:.1} s", begun.elapsed().as_secs_f64());
    let client = cp.client().await?;
    let (_tmp, dir) = run_dir(args, "kube")?;
    let setup = Instant::now();
    create_nodes(&client, args).await?;
    eprintln!(
        "kube: {} Nodes created and Ready in {:.1} s",
        args.nodes,
        setup.elapsed().as_secs_f64()
    );

    let config = dir.join("kube-scheduler.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1\n\
             kind: KubeSchedulerConfiguration\n\
             clientConnection:\n  kubeconfig: {}\n  qps: 5000\n  burst: 5000\n\
             leaderElection:\n  leaderElect: false\n",
            cp.kubeconfig().display()
        ),
    )?;
    let mut command = Command::new(cp.bin_dir().join("kube-scheduler"));
    command.arg("--config").arg(&config).arg("--secure-port=0");
    let mut scheduler =
        Tethered::spawn("kube-scheduler", command, &dir.join("kube-scheduler.log"))?;

    // The check: one 8-GPU Pod per node, all bound, then deleted.
    let check_ns = flotilla_tests::namespace(&client, "kbench-check").await?;
    let check = check_workload(args.nodes);
    let started = Instant::now();
    let figures = measure_pods(&client, &check_ns, &check, args, Duration::from_secs(60)).await?;
    scheduler.check_alive()?;
    if figures.placed_workers != check.len() as u64 {
        bail!(
            "kube-scheduler placed {} of {} check Pods (8 GPUs each, one per node); end of its log:\n{}",
            figures.placed_workers,
            check.len(),
            scheduler.log_tail(40)
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &check_ns);
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    pods.delete_collection(&now, &ListParams::default()).await?;
    until_empty(&pods, "check Pods").await?;
    let check_s = started.elapsed().as_secs_f64();
    eprintln!(
        "kube: check passed: {} Pods of 8 GPUs placed, one per node, in {:.2} s; deleted",
        check.len(),
        figures.last_placed.unwrap_or_default().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let jobs = workload(args, variant);
    let ns = flotilla_tests::namespace(&client, "kbench").await?;
    let figures = measure_pods(&client, &ns, &jobs, args, args.settle).await?;
    scheduler.check_alive()?;
    let mut out = figures.to_json();
    out["check_placed_s"] = json!(check_s);
    Ok(out)
}

/// Creates the fake Nodes, each with 8 GPUs, Ready and untainted.
pub(crate) async fn create_nodes(client: &kube::Client, args: &Args) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let capacity =
        json!({"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: GPUS.to_string()});
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "fake node of the kube-scheduler benchmark",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
    }});
    futures::stream::iter(0..args.nodes)
        .map(|i| {
            let (nodes, status) = (nodes.clone(), status.clone());
            async move {
                let name = node_name(i);
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(BTreeMap::from([(
                            "kubernetes.io/hostname".to_owned(),
                            name.clone(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    ..Node::default()
                };
                nodes.create(&PostParams::default(), &node).await?;
                // The API server taints new Nodes not-ready; the node controller would lift the
                // taint once the kubelet reports Ready, and there is neither here.
                let untaint = json!({"spec": {"taints": null}});
                nodes.patch(&name, &PatchParams::default(), &Patch::Merge(&untaint)).await?;
                nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let tainted = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| !t.is_empty()))
        .count();
    if tainted > 0 {
        bail!("{tainted} Nodes are still tainted");
    }
    Ok(())
}

pub(crate) fn pod(job: &Job, rank: u32) -> Pod {
    let gpus = BTreeMap::from([(GPU_RESOURCE.to_owned(), Quantity(job.gpus.to_string()))]);
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{rank}", job.name)),
            labels: Some(BTreeMap::from([(JOB_LABEL.to_owned(), job.name.clone())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "worker".into(),
                image: Some("flotilla.invalid/worker".into()),
                resources: Some(ResourceRequirements {
                    limits: Some(gpus),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(0),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Submits `jobs` as Pods (one per worker) into `ns` and counts their bindings.
pub(crate) async fn measure_pods(
    client: &kube::Client,
    ns: &str,
    jobs: &[Job],
    args: &Args,
    settle: Duration,
) -> anyhow::Result<Tally> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut units = HashMap::new();
    let mut objects = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        for rank in 0..job.workers {
            let p = pod(job, rank);
            units.insert(
                p.metadata.name.clone().unwrap_or_default(),
                Unit { job: i, workers: 1, gpus_per_worker: job.gpus },
            );
            objects.push(p);
        }
    }
    let (seen, ready) = watch(api.clone(), pod_stage);
    ready.await.context("the Pod watch ended before listing")?;
    let t0 = Instant::now();
    let submitted = submit(api, objects, args.concurrency);
    tally(jobs, units, t0, submitted, seen, settle, false).await
}
