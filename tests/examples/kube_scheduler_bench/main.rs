//! End to end beside kube-scheduler: how long Flotilla and kube-scheduler take to place the same
//! workload on the same fleet, through a real API server.
//!
//! Each (workload, scheduler) pair runs in a child process of its own with a fresh control plane
//! (etcd + kube-apiserver from `tests/controlplane`), so neither run inherits the other's objects,
//! watch caches or etcd history:
//!
//! - kube-scheduler: the one built from the same Go modules as the control plane, default profile,
//!   no leader election, its client's rate limit raised (QPS and burst 5,000) so binds are not
//!   throttled by the 50 QPS default. It sees N fake `Node`s (cpu 64, memory 512Gi, pods 110,
//!   `nvidia.com/gpu: 8`, Ready), with the `node.kubernetes.io/not-ready` taint the API server adds
//!   at creation removed, as the node controller would once the kubelet reports Ready. A job of W
//!   workers × G GPUs becomes W Pods each limiting `nvidia.com/gpu: G`.
//! - Flotilla: the real `flotilla-operator` binary (same build profile as this example), plaintext
//!   agent link, and N synthetic agents in this process (one gRPC stream each, 8 GPUs, heartbeats
//!   only, no health samples, like the fake Nodes that have no kubelet). They acknowledge every
//!   launch and report the worker started, and report it exited when told to stop. A job is one
//!   `TrainingJob` (W workers × G GPUs, default scheduling: workers kept on one node, packed).
//!
//! Before the clock starts, each side must place a check workload of N single-worker 8-GPU jobs,
//! which only fits if the scheduler sees all N nodes with 8 GPUs each; the check jobs are then
//! deleted. The clock starts at the first create and stops at the last placement seen by a watch
//! from this process: a Pod's `spec.nodeName`, a `TrainingJob`'s `status.attempt` (the gang's
//! placement, written before any worker is launched). Both sides submit the same objects in the
//! same order with the same number of creates in flight.
//!
//! Workloads:
//! - `mixed`: a prefix of the scheduler core benchmark's seeded job stream
//!   (`operator/scheduler/examples/bench_core/workload.rs`: about 60% 1 GPU, 20% 8 GPUs, 15% 16–64,
//!   5% 128–512), skipping jobs that would take total demand past `--fill` of the fleet, so all of
//!   it fits at once. kube-scheduler places Pods one at a time with no gang semantics, which is the
//!   easier problem: it may leave a job partly placed (its GPUs stranded) where Flotilla must find
//!   room for the whole gang at once. Those partly placed jobs are counted, at their peak and at
//!   the end.
//! - `single`: `--fill` of the fleet in 1×1 jobs, so both place exactly the same number of
//!   single-GPU units, Pod for `TrainingJob`.
//!
//! Figures come from one run each and are printed, not asserted.
//!
//! Run: `cargo run --release -p flotilla-tests --example kube_scheduler_bench -- [--nodes N]
//! [--jobs J] [--fill F] [--seed S] [--settle SECONDS] [--concurrency C] [--variant mixed|single]
//! [--only kube|flotilla] [--log-dir DIR]` (`--log-dir` keeps the operator's and
//! kube-scheduler's logs, one directory per run).

mod agents;
mod args;
mod children;
mod flotilla;
mod jobs;
mod kube_scheduler;
mod measure;
mod report;
#[allow(dead_code)]
#[path = "../../../operator/scheduler/examples/bench_core/workload.rs"]
mod workload;

use crate::args::{System, Variant, parse_args};
use crate::children::build_operator;
use crate::flotilla::run_flotilla;
use crate::kube_scheduler::run_kube;
use crate::report::{print_table, run_child};
use std::io::Read;
use std::time::Duration;

/// GPUs on every node.
pub(crate) const GPUS: u32 = 8;
/// The extended resource kube-scheduler counts.
pub(crate) const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label naming a Pod's job.
pub(crate) const JOB_LABEL: &str = "bench.flotilla.dev/job";
/// How long setup steps (nodes, agents, check workload) may take on a busy machine.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a measured run may last, however it progresses.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(1200);
/// Marks the one line of a child's stdout that carries its figures.
pub(crate) const RESULT_PREFIX: &str = "RESULT ";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = parse_args(&argv)?;
    if let Some(system) = args.run {
        // A child of the parent below: exit when the parent goes.
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            eprintln!("kube_scheduler_bench: the parent is gone; stopping");
            std::process::exit(3);
        });
        let variant = args.variant.unwrap_or(Variant::Mixed);
        let result = match system {
            System::Kube => run_kube(&args, variant).await?,
            System::Flotilla => run_flotilla(&args, variant).await?,
        };
        println!("{RESULT_PREFIX}{result}");
        // Exit now: the control plane stops when this process's end closes its stdin.
        std::process::exit(0);
    }

    let operator = build_operator()?;
    eprintln!("operator: {}", operator.display());
    let variants = args.variant.map_or(vec![Variant::Mixed, Variant::Single], |v| vec![v]);
    let systems = args.only.map_or(vec![System::Kube, System::Flotilla], |s| vec![s]);
    let mut rows = Vec::new();
    for &variant in &variants {
        for &system in &systems {
            eprintln!("== {} workload, {} ==", variant.arg(), system.title());
            let v = run_child(&argv, system, variant)?;
            rows.push((variant, system, v));
        }
    }
    print_table(&args, &rows);
    Ok(())
}
