//! Measuring: watches that see placements, and the tally of what was placed when.

use crate::RUN_TIMEOUT;
use crate::SETUP_TIMEOUT;
use crate::jobs::Job;
use anyhow::{Context as _, bail};
use flotilla_operator::crd::TrainingJob;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How far an object has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Waiting,
    Placed,
    Running,
}

/// An object reached a stage.
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) name: String,
    pub(crate) stage: Stage,
    pub(crate) at: Instant,
}

/// Watches `api` and reports each object's stage as it first reaches it. The receiver of the
/// second value fires once the initial list is done.
pub(crate) fn watch<K>(
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

pub(crate) fn pod_stage(pod: &Pod) -> Stage {
    if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
        Stage::Placed
    } else {
        Stage::Waiting
    }
}

pub(crate) fn job_stage(job: &TrainingJob) -> Stage {
    let Some(status) = &job.status else { return Stage::Waiting };
    match &status.attempt {
        Some(a) if a.start_time.is_some() => Stage::Running,
        Some(_) => Stage::Placed,
        None => Stage::Waiting,
    }
}

/// A watched object and the share of a job it stands for.
#[derive(Clone, Debug)]
pub(crate) struct Unit {
    pub(crate) job: usize,
    pub(crate) workers: u32,
    pub(crate) gpus_per_worker: u32,
}

/// Figures of one measured run.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) jobs: usize,
    pub(crate) workers: u64,
    pub(crate) gpus: u64,
    /// Time from the first create to the last create's answer.
    pub(crate) submitted: Option<Duration>,
    pub(crate) placed_jobs: usize,
    pub(crate) placed_workers: u64,
    pub(crate) placed_gpus: u64,
    /// Time from the first create to the last placement seen.
    pub(crate) last_placed: Option<Duration>,
    pub(crate) running_jobs: usize,
    pub(crate) last_running: Option<Duration>,
    /// Most jobs partly placed at once, and at the end.
    pub(crate) peak_partial: usize,
    pub(crate) partial_end: usize,
    /// GPUs held at the end by jobs that are only partly placed.
    pub(crate) stranded_gpus: u64,
}

impl Tally {
    pub(crate) fn to_json(&self) -> Value {
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
pub(crate) async fn tally(
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
pub(crate) fn submit<K>(
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
pub(crate) async fn until_empty<K>(api: &Api<K>, what: &str) -> anyhow::Result<()>
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
