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

#[allow(dead_code)]
#[path = "../../operator/scheduler/examples/bench_core/workload.rs"]
mod workload;

use anyhow::{Context as _, bail};
use flotilla_operator::crd::training_job::{RestartPolicy, WorkerCommand};
use flotilla_operator::crd::{GpuNode, TrainingJob, TrainingJobSpec};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// GPUs on every node.
const GPUS: u32 = 8;
/// The extended resource kube-scheduler counts.
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label naming a Pod's job.
const JOB_LABEL: &str = "bench.flotilla.dev/job";
/// How long setup steps (nodes, agents, check workload) may take on a busy machine.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a measured run may last, however it progresses.
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);
/// Marks the one line of a child's stdout that carries its figures.
const RESULT_PREFIX: &str = "RESULT ";

// === Arguments ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Kube,
    Flotilla,
}

impl System {
    fn arg(self) -> &'static str {
        match self {
            System::Kube => "kube",
            System::Flotilla => "flotilla",
        }
    }

    fn title(self) -> &'static str {
        match self {
            System::Kube => "kube-scheduler",
            System::Flotilla => "Flotilla",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "kube" => Ok(System::Kube),
            "flotilla" => Ok(System::Flotilla),
            other => bail!("expected kube or flotilla, got {other:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Mixed,
    Single,
}

impl Variant {
    fn arg(self) -> &'static str {
        match self {
            Variant::Mixed => "mixed",
            Variant::Single => "single",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "mixed" => Ok(Variant::Mixed),
            "single" => Ok(Variant::Single),
            other => bail!("expected mixed or single, got {other:?}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Args {
    /// Nodes in the fleet (8 GPUs each).
    nodes: usize,
    /// At most this many jobs per workload.
    jobs: Option<usize>,
    /// Share of the fleet's GPUs the workload asks for in all.
    fill: f64,
    /// Seed of the job stream.
    seed: u64,
    /// Once everything is submitted, a run ends after this long without a new placement.
    settle: Duration,
    /// Creates in flight while submitting.
    concurrency: usize,
    /// Only this workload (default both).
    variant: Option<Variant>,
    /// Only this scheduler (default both).
    only: Option<System>,
    /// Keep the logs (operator, kube-scheduler) under this directory instead of a temporary one.
    log_dir: Option<PathBuf>,
    /// Child mode: run this scheduler alone and print its figures.
    run: Option<System>,
}

const USAGE: &str = "kube_scheduler_bench [--nodes N] [--jobs J] [--fill F] [--seed S] \
                     [--settle SECONDS] [--concurrency C] [--variant mixed|single] [--only kube|flotilla] \
                     [--log-dir DIR]";

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 200,
        jobs: None,
        fill: 0.9,
        seed: 7,
        settle: Duration::from_secs(20),
        concurrency: 16,
        variant: None,
        only: None,
        log_dir: None,
        run: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("usage: {USAGE}");
            std::process::exit(0);
        }
        let value =
            it.next().with_context(|| format!("{flag}: expected a value\nusage: {USAGE}"))?;
        let bad = || format!("{flag}: cannot use {value:?}");
        match flag.as_str() {
            "--nodes" => args.nodes = value.parse().with_context(bad)?,
            "--jobs" => args.jobs = Some(value.parse().with_context(bad)?),
            "--fill" => args.fill = value.parse().with_context(bad)?,
            "--seed" => args.seed = value.parse().with_context(bad)?,
            "--settle" => args.settle = Duration::from_secs(value.parse().with_context(bad)?),
            "--concurrency" => args.concurrency = value.parse().with_context(bad)?,
            "--variant" => args.variant = Some(Variant::parse(value).with_context(bad)?),
            "--only" => args.only = Some(System::parse(value).with_context(bad)?),
            "--log-dir" => args.log_dir = Some(PathBuf::from(value)),
            "--run" => args.run = Some(System::parse(value).with_context(bad)?),
            other => bail!("unknown flag {other}\nusage: {USAGE}"),
        }
    }
    if args.nodes == 0 || !(args.fill > 0.0 && args.fill <= 1.0) || args.concurrency == 0 {
        bail!("--nodes and --concurrency must be positive and --fill in (0, 1]");
    }
    Ok(args)
}

// === Workload ===

/// One job: `workers` × `gpus` GPUs.
#[derive(Clone, Debug)]
struct Job {
    name: String,
    workers: u32,
    gpus: u32,
}

/// The jobs of `variant`, the same for both schedulers.
fn workload(args: &Args, variant: Variant) -> Vec<Job> {
    let budget = (args.nodes as f64 * f64::from(GPUS) * args.fill).floor() as u64;
    let most = args.jobs.unwrap_or(usize::MAX);
    match variant {
        Variant::Single => (0..budget.min(most as u64))
            .map(|i| Job { name: format!("job-{i:05}"), workers: 1, gpus: 1 })
            .collect(),
        Variant::Mixed => {
            let mut rng = workload::Rng::new(args.seed);
            let mut used = 0u64;
            let mut jobs = Vec::new();
            for arrival in workload::jobs(&mut rng) {
                let (workers, gpus) = (arrival.request.workers, arrival.request.gpus_per_worker);
                let need = u64::from(workers * gpus);
                if used + need > budget {
                    continue;
                }
                used += need;
                jobs.push(Job { name: format!("job-{:05}", jobs.len()), workers, gpus });
                if jobs.len() == most || used == budget {
                    break;
                }
            }
            jobs
        }
    }
}

/// The check workload: one 8-GPU worker per node.
fn check_workload(nodes: usize) -> Vec<Job> {
    (0..nodes).map(|i| Job { name: format!("check-{i:05}"), workers: 1, gpus: GPUS }).collect()
}

fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}

// === Measuring ===

/// How far an object has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Waiting,
    Placed,
    Running,
}

/// An object reached a stage.
#[derive(Debug)]
struct Seen {
    name: String,
    stage: Stage,
    at: Instant,
}

/// Watches `api` and reports each object's stage as it first reaches it. The receiver of the
/// second value fires once the initial list is done.
fn watch<K>(
    api: Api<K>,
    stage: fn(&K) -> Stage,
) -> (mpsc::UnboundedReceiver<Seen>, oneshot::Receiver<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut reached: HashMap<String, Stage> = HashMap::new();
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(event) = events.next().await {
            let object = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                Ok(watcher::Event::InitDone) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("watch error (retrying): {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let at = Instant::now();
            let now = stage(&object);
            let name = object.meta().name.clone().unwrap_or_default();
            let before = reached.get(&name).copied().unwrap_or(Stage::Waiting);
            if now > before {
                reached.insert(name.clone(), now);
                // Placed and running in one step still counts as placed at that moment.
                for s in [Stage::Placed, Stage::Running] {
                    if s > before
                        && s <= now
                        && tx.send(Seen { name: name.clone(), stage: s, at }).is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    (rx, ready_rx)
}

fn pod_stage(pod: &Pod) -> Stage {
    if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
        Stage::Placed
    } else {
        Stage::Waiting
    }
}

fn job_stage(job: &TrainingJob) -> Stage {
    let Some(status) = &job.status else { return Stage::Waiting };
    match &status.attempt {
        Some(a) if a.start_time.is_some() => Stage::Running,
        Some(_) => Stage::Placed,
        None => Stage::Waiting,
    }
}

/// A watched object and the share of a job it stands for.
#[derive(Clone, Debug)]
struct Unit {
    job: usize,
    workers: u32,
    gpus_per_worker: u32,
}

/// Figures of one measured run.
#[derive(Debug, Default)]
struct Tally {
    jobs: usize,
    workers: u64,
    gpus: u64,
    /// Time from the first create to the last create's answer.
    submitted: Option<Duration>,
    placed_jobs: usize,
    placed_workers: u64,
    placed_gpus: u64,
    /// Time from the first create to the last placement seen.
    last_placed: Option<Duration>,
    running_jobs: usize,
    last_running: Option<Duration>,
    /// Most jobs partly placed at once, and at the end.
    peak_partial: usize,
    partial_end: usize,
    /// GPUs held at the end by jobs that are only partly placed.
    stranded_gpus: u64,
}

impl Tally {
    fn to_json(&self) -> Value {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        json!({
            "jobs": self.jobs,
            "workers": self.workers,
            "gpus": self.gpus,
            "submitted_s": secs(self.submitted),
            "placed_jobs": self.placed_jobs,
            "placed_workers": self.placed_workers,
            "placed_gpus": self.placed_gpus,
            "last_placed_s": secs(self.last_placed),
            "running_jobs": self.running_jobs,
            "last_running_s": secs(self.last_running),
            "peak_partial": self.peak_partial,
            "partial_end": self.partial_end,
            "stranded_gpus": self.stranded_gpus,
        })
    }
}

/// Counts placements from `seen` until every unit is placed (and running, with `want_running`),
/// or until `settle` passes without a placement once everything is submitted.
async fn tally(
    jobs: &[Job],
    units: HashMap<String, Unit>,
    t0: Instant,
    submit: tokio::task::JoinHandle<anyhow::Result<()>>,
    mut seen: mpsc::UnboundedReceiver<Seen>,
    settle: Duration,
    want_running: bool,
) -> anyhow::Result<Tally> {
    let mut t = Tally {
        jobs: jobs.len(),
        workers: jobs.iter().map(|j| u64::from(j.workers)).sum(),
        gpus: jobs.iter().map(|j| u64::from(j.workers * j.gpus)).sum(),
        ..Tally::default()
    };
    let mut placed_per_job = vec![0u32; jobs.len()];
    let mut partial_now = 0usize;
    let mut placed_units = HashSet::new();
    let mut running_units = HashSet::new();
    let mut submit = Some(submit);
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let all_placed = placed_units.len() == units.len();
        if all_placed && (!want_running || running_units.len() == units.len()) {
            break;
        }
        tokio::select! {
            event = seen.recv() => {
                let Some(event) = event else { bail!("the watch ended") };
                let Some(unit) = units.get(&event.name) else { continue };
                last_progress = Instant::now();
                match event.stage {
                    Stage::Placed if placed_units.insert(event.name.clone()) => {
                        let total = jobs[unit.job].workers;
                        let before = placed_per_job[unit.job];
                        let after = before + unit.workers;
                        placed_per_job[unit.job] = after;
                        let partial = |n: u32| n > 0 && n < total;
                        match (partial(before), partial(after)) {
                            (false, true) => partial_now += 1,
                            (true, false) => partial_now -= 1,
                            _ => {}
                        }
                        t.peak_partial = t.peak_partial.max(partial_now);
                        if after == total {
                            t.placed_jobs += 1;
                        }
                        t.placed_workers += u64::from(unit.workers);
                        t.placed_gpus += u64::from(unit.workers * unit.gpus_per_worker);
                        t.last_placed = Some(event.at.duration_since(t0));
                    }
                    Stage::Running if running_units.insert(event.name.clone()) => {
                        t.running_jobs += 1;
                        t.last_running = Some(event.at.duration_since(t0));
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if let Some(handle) = submit.as_mut().filter(|h| h.is_finished()) {
                    handle.await.context("the submit task")??;
                    t.submitted = Some(t0.elapsed());
                    submit = None;
                    last_progress = Instant::now();
                }
                if submit.is_none() && last_progress.elapsed() > settle {
                    break;
                }
                if t0.elapsed() > RUN_TIMEOUT {
                    eprintln!("giving up after {RUN_TIMEOUT:?}");
                    break;
                }
            }
        }
    }
    if let Some(handle) = submit {
        handle.await.context("the submit task")??;
        t.submitted = Some(t0.elapsed());
    }
    t.partial_end = partial_now;
    t.stranded_gpus = jobs
        .iter()
        .zip(&placed_per_job)
        .filter(|(j, n)| **n > 0 && **n < j.workers)
        .map(|(j, n)| u64::from(n * j.gpus))
        .sum();
    Ok(t)
}

/// Creates `objects` through `api`, `concurrency` at a time, in order.
fn submit<K>(
    api: Api<K>,
    objects: Vec<K>,
    concurrency: usize,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    tokio::spawn(async move {
        futures::stream::iter(objects)
            .map(|o| {
                let api = api.clone();
                async move {
                    let name = o.meta().name.clone().unwrap_or_default();
                    api.create(&PostParams::default(), &o)
                        .await
                        .with_context(|| format!("creating {name}"))
                }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await
    })
}

/// Polls until `list` returns no object, or fails after [`SETUP_TIMEOUT`].
async fn until_empty<K>(api: &Api<K>, what: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let start = Instant::now();
    loop {
        if api.list_metadata(&ListParams::default()).await?.items.is_empty() {
            return Ok(());
        }
        if start.elapsed() > SETUP_TIMEOUT {
            bail!("{what} still there after {SETUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// === Child processes ===

/// A child process that dies with this one: it runs under a `bash` that holds a pipe from this
/// process and kills the child when the pipe closes — on drop, or when this process ends however
/// it ends (the kernel closes the pipe after a panic or a SIGKILL too).
struct Tethered {
    stdin: Option<ChildStdin>,
    child: Child,
    name: String,
    log: PathBuf,
}

/// The tether: SIGINT is left to this process (its exit closes the pipe); on EOF the command
/// gets SIGTERM, then SIGKILL after 10 s.
const TETHER: &str = r#"trap '' INT
"$@" &
pid=$!
while read -r _; do :; done
kill "$pid" 2>/dev/null
( sleep 10; kill -9 "$pid" 2>/dev/null ) &
killer=$!
wait "$pid"
kill "$killer" 2>/dev/null
exit 0"#;

impl Tethered {
    fn spawn(name: &str, command: Command, log: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let program = command.get_program().to_owned();
        let mut tether = Command::new("bash");
        tether.arg("-c").arg(TETHER).arg("tether").arg(&program).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => tether.env(key, v),
                None => tether.env_remove(key),
            };
        }
        let mut child = tether
            .stdin(Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", Path::new(&program).display()))?;
        let stdin = child.stdin.take();
        Ok(Tethered { stdin, child, name: name.to_owned(), log: log.to_owned() })
    }

    /// Fails, with the end of its log, when the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); end of its log:\n{}", self.name, self.log_tail(40));
        }
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Tethered {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Where a run's logs go: a temporary directory (removed with the returned guard), or a
/// directory of its own under `--log-dir`.
fn run_dir(args: &Args, what: &str) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match &args.log_dir {
        Some(root) => {
            let variant = args.variant.unwrap_or(Variant::Mixed).arg();
            let dir = root.join(format!("{variant}-{what}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok((None, dir))
        }
        None => {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().to_path_buf();
            Ok((Some(tmp), dir))
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// This example's build profile directory (`target/<profile>`).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("expected to run from target/<profile>/examples/")
}

/// Builds `flotilla-operator` in this example's profile (a no-op when it is up to date) and
/// returns its path.
fn build_operator() -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    // `cargo` as the user's shell runs it (the toolchain of rust-toolchain.toml), without what
    // `cargo run` adds to this process's environment: with those, cargo sees a different build
    // environment and recompiles part of the operator on every run.
    let mut cargo = Command::new("cargo");
    // Built together with this example, so that cargo resolves the same features for the
    // dependencies both share and neither build undoes the other's.
    cargo.args(["build", "--quiet", "-p", "flotilla-operator", "--bin", "flotilla-operator"]);
    cargo.args(["-p", "flotilla-tests", "--example", "kube_scheduler_bench"]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let configured = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL"].contains(&&*key)
            || ["CARGO_BUILD_", "CARGO_PROFILE_", "CARGO_NET_", "CARGO_REGISTRIES_", "CARGO_TERM_"]
                .iter()
                .any(|p| key.starts_with(p));
        if (key == "CARGO" || key.starts_with("CARGO_") || key == "RUSTUP_TOOLCHAIN") && !configured
        {
            cargo.env_remove(&*key);
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let target = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let kept: Vec<PathBuf> = std::env::split_paths(&paths)
            .filter(|p| !p.starts_with(&target) && !p.to_string_lossy().contains("/toolchains/"))
            .collect();
        if kept.is_empty() {
            cargo.env_remove("LD_LIBRARY_PATH");
        } else {
            cargo.env("LD_LIBRARY_PATH", std::env::join_paths(kept)?);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let status = cargo.current_dir(workspace()).status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p flotilla-operator failed ({status})");
    }
    Ok(dir.join("flotilla-operator"))
}

// === kube-scheduler ===

async fn run_kube(args: &Args, variant: Variant) -> anyhow::Result<Value> {
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
async fn create_nodes(client: &kube::Client, args: &Args) -> anyhow::Result<()> {
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

fn pod(job: &Job, rank: u32) -> Pod {
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
async fn measure_pods(
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

// === Flotilla ===

async fn run_flotilla(args: &Args, variant: Variant) -> anyhow::Result<Value> {
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
fn install_crds(cp: &flotilla_tests::ControlPlane) -> anyhow::Result<()> {
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

fn training_job(job: &Job) -> TrainingJob {
    TrainingJob::new(
        &job.name,
        TrainingJobSpec {
            workers: job.workers as i32,
            gpus_per_worker: job.gpus as i32,
            engine: None,
            command: Some(WorkerCommand {
                command: vec!["/bin/sleep".into(), "infinity".into()],
                ..WorkerCommand::default()
            }),
            checkpoint: None,
            restart_policy: RestartPolicy { max_restarts: 0, ..RestartPolicy::default() },
            priority: 0,
            scheduling: Default::default(),
            suspend: false,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        },
    )
}

/// Submits `jobs` as TrainingJobs into `ns` and counts their placements (and starts).
async fn measure_jobs(
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

// === Synthetic agents ===

fn gpu_uuid(i: usize, g: u32) -> String {
    format!("GPU-bench-{i:05}-{g}")
}

/// Workers a synthetic agent "runs": (job UID, attempt) → (rank, GPU UUIDs).
type Running = HashMap<(String, u64), Vec<(u32, Vec<String>)>>;

/// Agent `i`: registers `node-i` with 8 GPUs, heartbeats, acknowledges launches with a started
/// worker and stops with an exited one; reconnects whenever its stream ends.
async fn synthetic_agent(i: usize, addr: String, registered: Arc<AtomicUsize>) {
    let mut running = Running::new();
    let mut counted = false;
    loop {
        let _ = agent_session(i, &addr, &mut running, &mut counted, &registered).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn agent_session(
    i: usize,
    addr: &str,
    running: &mut Running,
    counted: &mut bool,
    registered: &AtomicUsize,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    let gpus = (0..GPUS)
        .map(|g| pb::GpuInfo {
            index: g,
            uuid: gpu_uuid(i, g),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: format!("00000000:{:02X}:00.0", g + 1),
            nvlink_peers: (0..GPUS).filter(|&p| p != g).collect(),
            topology_domain: format!("{}/nvl0", node_name(i)),
        })
        .collect();
    let workers = running
        .iter()
        .flat_map(|((uid, attempt), ranks)| {
            ranks.iter().map(move |(rank, uuids)| pb::WorkerStatus {
                worker: Some(pb::WorkerRef {
                    job_uid: uid.clone(),
                    attempt: *attempt,
                    rank: *rank,
                }),
                pid: 1,
                gpu_uuids: uuids.clone(),
                started_at_unix_nanos: flotilla_proto::now_unix_nanos(),
            })
        })
        .collect();
    let register = pb::Register {
        node_name: node_name(i),
        agent_version: "kube-scheduler-bench".into(),
        instance_id: format!("kbench-{i}"),
        backend: "simulated".into(),
        gpus,
        workers,
        ..pb::Register::default()
    };
    tx.send(pb::AgentMessage { body: Some(Up::Register(register)) }).await?;
    let mut inbound = client.link(ReceiverStream::new(rx)).await?.into_inner();
    let heartbeat_ms = match inbound.message().await? {
        Some(pb::OperatorMessage { body: Some(Down::Registered(r)) }) => r.heartbeat_interval_ms,
        other => bail!("expected Registered, got {other:?}"),
    };
    if !std::mem::replace(counted, true) {
        registered.fetch_add(1, Ordering::Relaxed);
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(100)));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message? else { bail!("the operator closed the stream") };
                for reply in answer(message, running) {
                    tx.send(reply).await?;
                }
            }
            _ = heartbeat.tick() => {
                let beat = pb::Heartbeat {
                    sent_at_unix_nanos: flotilla_proto::now_unix_nanos(),
                    last_critical_seq: 0,
                };
                tx.send(pb::AgentMessage { body: Some(Up::Heartbeat(beat)) }).await?;
            }
        }
    }
}

/// What a synthetic agent sends back for one command.
fn answer(message: pb::OperatorMessage, running: &mut Running) -> Vec<pb::AgentMessage> {
    let result = |command_id, message: &str| pb::AgentMessage {
        body: Some(Up::CommandResult(pb::CommandResult {
            command_id,
            ok: true,
            message: message.into(),
        })),
    };
    let event =
        |worker: pb::WorkerRef, phase: pb::WorkerPhase, signal: Option<i32>| pb::AgentMessage {
            body: Some(Up::Worker(pb::WorkerEvent {
                worker: Some(worker),
                phase: phase as i32,
                signal,
                at_unix_nanos: flotilla_proto::now_unix_nanos(),
                ..pb::WorkerEvent::default()
            })),
        };
    match message.body {
        Some(Down::LaunchWorker(launch)) => {
            let worker = launch.worker.unwrap_or_default();
            running
                .entry((worker.job_uid.clone(), worker.attempt))
                .or_default()
                .push((worker.rank, launch.gpu_uuids));
            vec![
                result(launch.command_id, "launched"),
                event(worker, pb::WorkerPhase::Started, None),
            ]
        }
        Some(Down::StopWorker(stop)) => {
            let worker = stop.worker.unwrap_or_default();
            let key = (worker.job_uid.clone(), worker.attempt);
            let ranks = running.remove(&key).unwrap_or_default();
            let (stopped, kept): (Vec<_>, Vec<_>) =
                ranks.into_iter().partition(|(rank, _)| stop.all_ranks || *rank == worker.rank);
            if !kept.is_empty() {
                running.insert(key, kept);
            }
            let mut replies = vec![result(stop.command_id, "stopping")];
            for (rank, _) in stopped {
                let r = pb::WorkerRef { rank, ..worker.clone() };
                replies.push(event(r, pb::WorkerPhase::Exited, Some(15)));
            }
            replies
        }
        Some(Down::GpuCommand(c)) => vec![result(c.command_id, "done")],
        _ => Vec::new(),
    }
}

// === Parent: run every pair, print the table ===

fn run_child(args: &[String], system: System, variant: Variant) -> anyhow::Result<Value> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .args(["--run", system.arg(), "--variant", variant.arg()])
        // The child exits when this pipe closes, so it never outlives this process.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a benchmark child")?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.strip_prefix(RESULT_PREFIX) {
            Some(r) => result = Some(serde_json::from_str::<Value>(r)?),
            None => println!("{line}"),
        }
    }
    let status = child.wait()?;
    match result {
        Some(r) if status.success() => Ok(r),
        _ => bail!("the {} run of {} failed ({status})", variant.arg(), system.title()),
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn print_table(args: &Args, rows: &[(Variant, System, Value)]) {
    let (jobs_mixed, jobs_single) =
        (workload(args, Variant::Mixed), workload(args, Variant::Single));
    println!();
    println!(
        "fleet: {} nodes × {GPUS} GPUs = {} GPUs; workloads fill {:.0}% of it; seed {}; {} creates in flight",
        args.nodes,
        args.nodes * GPUS as usize,
        args.fill * 100.0,
        args.seed,
        args.concurrency
    );
    for (variant, jobs) in [(Variant::Mixed, &jobs_mixed), (Variant::Single, &jobs_single)] {
        let mut sizes: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for j in jobs.iter() {
            *sizes.entry((j.workers * j.gpus, j.workers)).or_default() += 1;
        }
        let classes = |lo: u32, hi: u32| -> usize {
            sizes.iter().filter(|((g, _), _)| *g >= lo && *g <= hi).map(|(_, n)| n).sum()
        };
        println!(
            "{:>6}: {} jobs (1 GPU: {}, 2–8: {}, 9–64: {}, 65+: {}), {} workers/Pods, {} GPUs",
            variant.arg(),
            jobs.len(),
            classes(1, 1),
            classes(2, 8),
            classes(9, 64),
            classes(65, u32::MAX),
            jobs.iter().map(|j| j.workers).sum::<u32>(),
            jobs.iter().map(|j| j.workers * j.gpus).sum::<u32>()
        );
    }
    println!();
    println!(
        "{:<7} {:<15} {:>6} {:>7} {:>6} {:>8} {:>9} {:>9} {:>10} {:>8} {:>10} {:>11} {:>9}",
        "work",
        "scheduler",
        "jobs",
        "pods/wk",
        "GPUs",
        "submit s",
        "placed s",
        "jobs/s",
        "pods|wk/s",
        "unplaced",
        "partial pk",
        "partial end",
        "stranded"
    );
    for (variant, system, v) in rows {
        let placed_s = f(v, "last_placed_s");
        let unplaced = n(v, "workers").saturating_sub(n(v, "placed_workers"));
        println!(
            "{:<7} {:<15} {:>6} {:>7} {:>6} {:>8.2} {:>9.2} {:>9.1} {:>10.1} {:>8} {:>10} {:>11} {:>9}",
            variant.arg(),
            system.title(),
            n(v, "jobs"),
            n(v, "workers"),
            n(v, "placed_gpus"),
            f(v, "submitted_s"),
            placed_s,
            f(v, "placed_jobs") / placed_s,
            f(v, "placed_workers") / placed_s,
            unplaced,
            n(v, "peak_partial"),
            n(v, "partial_end"),
            n(v, "stranded_gpus"),
        );
    }
    println!();
    for variant in [Variant::Mixed, Variant::Single] {
        let find = |s: System| rows.iter().find(|(v, sys, _)| *v == variant && *sys == s);
        if let (Some((_, _, k)), Some((_, _, fl))) = (find(System::Kube), find(System::Flotilla)) {
            let (tk, tf) = (f(k, "last_placed_s"), f(fl, "last_placed_s"));
            let complete = |v: &Value| v["placed_workers"] == v["workers"];
            println!(
                "{}: time to the last placement, Flotilla / kube-scheduler = {:.2} / {:.2} s = {:.2}× ({}){}",
                variant.arg(),
                tf,
                tk,
                tf / tk,
                if tf <= tk { "Flotilla faster" } else { "kube-scheduler faster" },
                match (complete(k), complete(fl)) {
                    (true, true) => String::new(),
                    (a, b) => format!(
                        "; not everything placed: kube-scheduler {}, Flotilla {}",
                        if a { "complete" } else { "incomplete" },
                        if b { "complete" } else { "incomplete" }
                    ),
                }
            );
            if let Some(running) = fl["last_running_s"].as_f64() {
                println!(
                    "{}: Flotilla, every job's workers reported started by the synthetic agents: {:.2} s",
                    variant.arg(),
                    running
                );
            }
        }
    }
    for (variant, system, v) in rows {
        println!(
            "check before {} ({}): {} 8-GPU jobs, one per node, placed and deleted in {:.1} s",
            variant.arg(),
            system.title(),
            args.nodes,
            f(v, "check_placed_s")
        );
    }
}

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
