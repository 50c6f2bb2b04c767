//! The Flotilla side: the real operator, one TrainingJob per job.

use crate::GPUS;
use crate::SETUP_TIMEOUT;
use crate::agents::synthetic_agent;
use crate::args::{Args, Variant};
use crate::children::{Tethered, free_port, profile_dir, run_dir, workspace};
use crate::jobs::{Job, check_workload, workload};
use crate::measure::{Tally, Unit, job_stage, submit, tally, until_empty, watch};
use anyhow::{Context as _, bail};
use flotilla_operator::crd::{GpuNode, TrainingJob};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub(crate) async fn run_flotilla(args: &Args, variant: Variant) -> anyhow::Result<Value> {
    let begun = Instant::now();
    let cp = flotilla_tests::control_plane().await;
    eprintln!("flotilla: control plane up in {:.1} s", begun.elapsed().as_secs_f64());
    let client = cp.client().await?;
    let (_tmp, dir) = run_dir(args, "flotilla")?;
    install_crds(cp)?;
    let system_ns = flotilla_tests::namespace(&client, "kbench-system").await?;
    let agent_port = free_port()?;
    let mut command = Command::new(profile_dir()?.join("flotilla-operator"));
    command
        .arg("run")
        .env("KUBECONFIG", cp.kubeconfig())
        .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
        .env("FLOTILLA_IDENTITY", "kbench-operator")
        .env("FLOTILLA_LEASE_NAMESPACE", &system_ns)
        .env("FLOTILLA_LOG", "info,kube=warn")
        .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{agent_port}"))
        .env("FLOTILLA_AGENT_INSECURE", "true")
        .env("FLOTILLA_CHECKPOINT_ROOT", dir.join("checkpoints"))
        .env("FLOTILLA_WORKER_MASTER_ADDR", "127.0.0.1")
        .env("FLOTILLA_MASTER_PORT_BASE", "20000");
    let mut operator = Tethered::spawn("flotilla-operator", command, &dir.join("operator.log"))?;

    let setup = Instant::now();
    let registered = Arc::new(AtomicUsize::new(0));
    let addr = format!("127.0.0.1:{agent_port}");
    for i in 0..args.nodes {
        tokio::spawn(synthetic_agent(i, addr.clone(), registered.clone()));
    }
    let gpu_nodes: Api<GpuNode> = Api::all(client.clone());
    loop {
        operator.check_alive()?;
        let ready = gpu_nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| n.status.as_ref().is_some_and(|s| s.healthy_gpus == GPUS as i32))
            .count();
        if ready == args.nodes {
            break;
        }
        if setup.elapsed() > SETUP_TIMEOUT {
            bail!(
                "{ready} of {} GpuNodes healthy ({} agents registered) after {SETUP_TIMEOUT:?}; end of the operator's log:\n{}",
                args.nodes,
                registered.load(Ordering::Relaxed),
                operator.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "flotilla: {} agents registered, GpuNodes healthy, in {:.1} s",
        args.nodes,
        setup.elapsed().as_secs_f64()
    );

    // The check: one 8-GPU job per node, all placed, then deleted.
    let check_ns = flotilla_tests::namespace(&client, "kbench-check").await?;
    let check = check_workload(args.nodes);
    let started = Instant::now();
    let figures = measure_jobs(&client, &check_ns, &check, args, Duration::from_secs(60)).await?;
    operator.check_alive()?;
    if figures.placed_jobs != check.len() {
        bail!(
            "Flotilla placed {} of {} check jobs (8 GPUs each, one per node); end of the operator's log:\n{}",
            figures.placed_jobs,
            check.len(),
            operator.log_tail(40)
        );
    }
    let jobs_api: Api<TrainingJob> = Api::namespaced(client.clone(), &check_ns);
    jobs_api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    until_empty(&jobs_api, "check TrainingJobs").await?;
    let check_s = started.elapsed().as_secs_f64();
    eprintln!(
        "flotilla: check passed: {} jobs of 8 GPUs placed, one per node, in {:.2} s; deleted",
        check.len(),
        figures.last_placed.unwrap_or_default().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let jobs = workload(args, variant);
    let ns = flotilla_tests::namespace(&client, "kbench").await?;
    let figures = measure_jobs(&client, &ns, &jobs, args, args.settle).await?;
    operator.check_alive()?;
    let mut out = figures.to_json();
    out["check_placed_s"] = json!(check_s);
    Ok(out)
}

/// Applies the committed CRDs and waits until they are established.
pub(crate) fn install_crds(cp: &flotilla_tests::ControlPlane) -> anyhow::Result<()> {
    let crds = workspace().join("deploy/crds");
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds)
        .output()?;
    if !out.status.success() {
        bail!("applying the CRDs: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=120s"])
        .args(["crd/trainingjobs.flotilla.dev", "crd/gpunodes.flotilla.dev"])
        .output()?;
    if !out.status.success() {
        bail!("waiting for the CRDs: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub(crate) fn training_job(job: &Job) -> TrainingJob {
    flotilla_tests::training_job(&job.name)
        .workers(job.workers as i32)
        .gpus_per_worker(job.gpus as i32)
        .command(&["/bin/sleep", "infinity"])
        .build()
}

/// Submits `jobs` as TrainingJobs into `ns` and counts their placements (and starts).
pub(crate) async fn measure_jobs(
    client: &kube::Client,
    ns: &str,
    jobs: &[Job],
    args: &Args,
    settle: Duration,
) -> anyhow::Result<Tally> {
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let units = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            (j.name.clone(), Unit { job: i, workers: j.workers, gpus_per_worker: j.gpus })
        })
        .collect();
    let objects = jobs.iter().map(training_job).collect();
    let (seen, ready) = watch(api.clone(), job_stage);
    ready.await.context("the TrainingJob watch ended before listing")?;
    let t0 = Instant::now();
    let submitted = submit(api, objects, args.concurrency);
    tally(jobs, units, t0, submitted, seen, settle, true).await
}
