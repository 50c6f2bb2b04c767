//! Keeps the operator's job and fleet metrics from outside the controllers: a periodic pass over
//! the controllers' caches and the agents' fleet state turns what changed since the last pass
//! into gauges, counters and histograms.
//!
//! Everything here is derived from state the operator already writes (job status, restart
//! history, attempt times) or holds (agent streams, the last fault of each node), so the
//! controllers need no metric calls and an event is never counted twice: each one is keyed (job
//! UID and attempt, node and fault time) and remembered. Events older than the collector are not
//! counted, so a new leader does not replay its predecessor's history.

use crate::agents::{NodeRecord, NodeRegistry};
use crate::controller::Context;
use crate::crd::{InferenceService, RestartCause, TrainingJob};
use crate::metrics::Metrics;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the caches are read; the fleet is also read on every health change.
const PERIOD: Duration = Duration::from_secs(1);

const JOB_PHASES: [&str; 8] =
    ["Pending", "Queued", "Scheduled", "Running", "Restarting", "Suspended", "Succeeded", "Failed"];
const SERVICE_PHASES: [&str; 6] = ["Pending", "Queued", "Starting", "Ready", "Degraded", "Failed"];

/// The class of an NVIDIA XID, as the fleet treats it: the label of the table the agent
/// classifies with (`flotilla_contract::xid`).
pub fn xid_class(xid: u32) -> &'static str {
    flotilla_contract::xid::classify_xid(xid).metric_label()
}

fn reason_label(cause: RestartCause) -> &'static str {
    match cause {
        RestartCause::WorkerExit => "WorkerExit",
        RestartCause::HardwareFault => "HardwareFault",
        RestartCause::NodeLost => "NodeLost",
        RestartCause::Preempted => "Preempted",
        RestartCause::Hang => "Hang",
        RestartCause::Straggler => "Straggler",
    }
}

fn seconds_between(from: &Time, to: &Time) -> f64 {
    to.0.duration_since(from.0).as_secs_f64().max(0.0)
}

/// What has been counted already, and since when events count.
#[derive(Debug)]
pub struct MetricsCollector {
    metrics: Metrics,
    since: Timestamp,
    /// Job UIDs whose first placement was observed.
    placed: HashSet<String>,
    /// `(job UID, ended attempt)` of restarts counted.
    restarts: HashSet<(String, i32)>,
    /// `(job UID, attempt)` whose recovery was observed.
    recovered: HashSet<(String, i32)>,
    /// The last fault counted per node: its time (Unix ns) and GPU.
    faults: HashMap<String, (i64, u32)>,
}

impl MetricsCollector {
    /// A collector counting events from `since` on.
    pub fn new(metrics: Metrics, since: Timestamp) -> Self {
        MetricsCollector {
            metrics,
            since,
            placed: HashSet::new(),
            restarts: HashSet::new(),
            recovered: HashSet::new(),
            faults: HashMap::new(),
        }
    }

    fn is_new(&self, t: &Time) -> bool {
        t.0 >= self.since
    }

    /// Phase gauges for both kinds, and the queue waits, restarts and recoveries that appeared
    /// in the jobs' status since the last call.
    pub fn observe_objects(&mut self, jobs: &[&TrainingJob], services: &[&InferenceService]) {
        let mut job_phases: BTreeMap<&str, i64> = JOB_PHASES.iter().map(|p| (*p, 0)).collect();
        for job in jobs {
            let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
            *job_phases.entry(phase_name(&phase)).or_default() += 1;
            self.observe_job(job);
        }
        for (phase, n) in job_phases {
            self.metrics.jobs.with_label_values(&["TrainingJob", phase]).set(n);
        }
        let mut svc_phases: BTreeMap<&str, i64> = SERVICE_PHASES.iter().map(|p| (*p, 0)).collect();
        for svc in services {
            let phase = svc.status.as_ref().map(|s| s.phase).unwrap_or_default();
            *svc_phases.entry(phase_name(&phase)).or_default() += 1;
        }
        for (phase, n) in svc_phases {
            self.metrics.jobs.with_label_values(&["InferenceService", phase]).set(n);
        }
        let live: HashSet<String> = jobs.iter().filter_map(|j| j.uid()).collect();
        self.placed.retain(|uid| live.contains(uid));
        self.restarts.retain(|(uid, _)| live.contains(uid));
        self.recovered.retain(|(uid, _)| live.contains(uid));
    }

    fn observe_job(&mut self, job: &TrainingJob) {
        let (Some(uid), Some(status)) = (job.uid(), job.status.as_ref()) else { return };
        if let (Some(created), Some(attempt)) =
            (job.metadata.creation_timestamp.as_ref(), status.attempt.as_ref())
            && attempt.number == 1
            && let Some(scheduled) = attempt.scheduled_time.as_ref()
            && self.is_new(scheduled)
            && self.placed.insert(uid.clone())
        {
            self.metrics
                .queue_wait_seconds
                .with_label_values(&["TrainingJob"])
                .observe(seconds_between(created, scheduled));
        }
        for record in &status.restart_history {
            if self.is_new(&record.time) && self.restarts.insert((uid.clone(), record.attempt)) {
                self.metrics
                    .restarts
                    .with_label_values(&["TrainingJob", reason_label(record.cause)])
                    .inc();
            }
        }
        let Some(attempt) = status.attempt.as_ref() else { return };
        let Some(running) = attempt.start_time.as_ref() else { return };
        let Some(ended) = status.restart_history.iter().find(|r| r.attempt == attempt.number - 1)
        else {
            return;
        };
        if self.is_new(&ended.time) && self.recovered.insert((uid, attempt.number)) {
            self.metrics
                .time_to_recover_seconds
                .with_label_values(&["TrainingJob", reason_label(ended.cause)])
                .observe(seconds_between(&ended.time, running));
        }
    }

    /// Agents connected, and each node's newest fault if it was not counted yet.
    pub fn observe_fleet(&mut self, nodes: &[NodeRecord]) {
        let connected = nodes.iter().filter(|n| n.connected && !n.lost).count();
        self.metrics.agents_connected.set(i64::try_from(connected).unwrap_or(i64::MAX));
        let since = self.since.as_nanosecond();
        for node in nodes {
            let Some(fault) = node.last_fault.as_ref() else { continue };
            let key = (fault.observed_at_unix_nanos, fault.gpu);
            if i128::from(fault.observed_at_unix_nanos) < since
                || self.faults.get(&node.node) == Some(&key)
            {
                continue;
            }
            self.faults.insert(node.node.clone(), key);
            let class = match fault.xid {
                Some(x) if x > 0 => xid_class(x),
                _ => "not-xid",
            };
            self.metrics.gpu_faults.with_label_values(&[class]).inc();
        }
    }
}

/// A phase's name as the API writes it (the enums serialize as their variant names).
fn phase_name(phase: &impl std::fmt::Debug) -> &'static str {
    let name = format!("{phase:?}");
    JOB_PHASES
        .iter()
        .chain(SERVICE_PHASES.iter())
        .find(|p| **p == name)
        .copied()
        .unwrap_or("Unknown")
}

// === the loops ===

/// Read the controllers' caches every second until `stop`.
pub async fn objects(ctx: Arc<Context>, stop: CancellationToken) {
    let mut collector = MetricsCollector::new(ctx.metrics.clone(), Timestamp::now());
    loop {
        let jobs = ctx.jobs.state();
        let services = ctx.services.state();
        let jobs: Vec<&TrainingJob> = jobs.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        let services: Vec<&InferenceService> =
            services.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        collector.observe_objects(&jobs, &services);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

/// Read the fleet state on every health change, and every second for connections.
pub async fn nodes(state: Arc<NodeRegistry>, metrics: Metrics) {
    let mut collector = MetricsCollector::new(metrics, Timestamp::now());
    let mut changed = state.changed();
    loop {
        collector.observe_fleet(&state.nodes());
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

#[cfg(test)]
mod tests;
