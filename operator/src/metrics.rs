//! The operator's Prometheus metrics, in one registry.
//!
//! Most are kept from outside the controllers: the `metrics_collect` module reads the controllers'
//! caches and the node registry and turns what changed into gauges, counters and histograms. Only
//! reconciliations, their errors, the scheduler's decision time and the lease are recorded where
//! they happen.

use crate::crd::JobPhase;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::LazyLock;

/// Time one scheduling decision takes. The scheduler is pure and has no handle on [`Metrics`],
/// so this one histogram lives in a static that every registry exports.
pub static SCHEDULING_DECISION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "flotilla_operator_scheduling_decision_seconds",
            "Time one scheduling decision (a gang placement or the reason it waits) takes",
        )
        .buckets(prometheus::exponential_buckets(0.000_1, 4.0, 9).expect("valid buckets")),
    )
    .expect("valid metric")
});

/// The classes of `flotilla_operator_gpu_faults_total`.
pub const XID_CLASSES: [&str; 6] =
    ["application", "hardware-fatal", "hardware-reset", "degraded", "unknown", "not-xid"];

/// The reasons of `flotilla_operator_restarts_total` (the restart causes).
pub const RESTART_REASONS: [&str; 4] = ["WorkerExit", "HardwareFault", "NodeLost", "Preempted"];

/// The kinds the controllers reconcile (the `kind` label of the reconcile metrics).
pub const KINDS: [&str; 3] = ["TrainingJob", "InferenceService", "GpuNode"];

/// The phases of a TrainingJob (the `phase` label of its phase transitions). InferenceService
/// transitions are labelled with event reasons, an open set, so they are not made in advance.
const JOB_PHASES: [JobPhase; 8] = [
    JobPhase::Pending,
    JobPhase::Queued,
    JobPhase::Scheduled,
    JobPhase::Running,
    JobPhase::Restarting,
    JobPhase::Suspended,
    JobPhase::Succeeded,
    JobPhase::Failed,
];

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciliations run, by kind.
    pub reconciles: IntCounterVec,
    /// Reconciliations that failed, by kind and error label.
    pub reconcile_errors: IntCounterVec,
    /// Reconciliation duration, by kind.
    pub reconcile_seconds: HistogramVec,
    /// Phase changes written, by kind and new phase.
    pub phase_transitions: IntCounterVec,
    /// 1 while this replica holds the leader lease.
    pub is_leader: IntGauge,
    /// Objects in each phase now, by kind and phase.
    pub jobs: IntGaugeVec,
    /// Time from creation to the first placement, by kind.
    pub queue_wait_seconds: HistogramVec,
    /// Restarts, by kind and reason (the restart cause).
    pub restarts: IntCounterVec,
    /// GPU faults the agents reported, by XID class.
    pub gpu_faults: IntCounterVec,
    /// Time from an attempt's end to the next attempt running, by kind and reason.
    pub time_to_recover_seconds: HistogramVec,
    /// Agents with an open stream that are not lost.
    pub agents_connected: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric")
}

/// A tenth of a second to a day: queue waits and recoveries range that wide.
fn long_buckets() -> Vec<f64> {
    vec![
        0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
        14400.0, 86400.0,
    ]
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = counter(
            "flotilla_operator_reconciles_total",
            "Reconciliations run, by kind",
            &["kind"],
        );
        let reconcile_errors = counter(
            "flotilla_operator_reconcile_errors_total",
            "Reconciliations that failed, by kind and error",
            &["kind", "error"],
        );
        let reconcile_seconds = histogram(
            "flotilla_operator_reconcile_duration_seconds",
            "Reconciliation duration, by kind",
            &["kind"],
            vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
        );
        let phase_transitions = counter(
            "flotilla_operator_phase_transitions_total",
            "Phase changes written, by kind and phase",
            &["kind", "phase"],
        );
        let is_leader = IntGauge::new(
            "flotilla_operator_is_leader",
            "1 while this replica holds the leader lease",
        )
        .expect("valid metric");
        let jobs = IntGaugeVec::new(
            Opts::new("flotilla_operator_jobs", "Objects in each phase now, by kind and phase"),
            &["kind", "phase"],
        )
        .expect("valid metric");
        let queue_wait_seconds = histogram(
            "flotilla_operator_queue_wait_seconds",
            "Time from creation to the first placement, by kind",
            &["kind"],
            long_buckets(),
        );
        let restarts = counter(
            "flotilla_operator_restarts_total",
            "Restarts, by kind and reason (WorkerExit, HardwareFault, NodeLost, Preempted)",
            &["kind", "reason"],
        );
        let gpu_faults = counter(
            "flotilla_operator_gpu_faults_total",
            "GPU faults the agents reported, by XID class (not-xid: a fault without an XID)",
            &["class"],
        );
        let time_to_recover_seconds = histogram(
            "flotilla_operator_time_to_recover_seconds",
            "Time from an attempt's end to every worker of the next attempt running",
            &["kind", "reason"],
            long_buckets(),
        );
        let agents_connected = IntGauge::new(
            "flotilla_operator_agents_connected",
            "Agents with an open stream that are not lost",
        )
        .expect("valid metric");
        // Series that exist before their first event, so `increase()` counts that event too:
        // a counter series that first appears at 1 has no earlier sample to increase from.
        // Only where the label values are a known, fixed set.
        for kind in KINDS {
            reconciles.with_label_values(&[kind]);
            reconcile_seconds.with_label_values(&[kind]);
            for error in crate::error::Error::METRIC_LABELS {
                reconcile_errors.with_label_values(&[kind, error]);
            }
        }
        for phase in JOB_PHASES {
            phase_transitions.with_label_values(&["TrainingJob", phase.as_str()]);
        }
        for class in XID_CLASSES {
            gpu_faults.with_label_values(&[class]);
        }
        for reason in RESTART_REASONS {
            restarts.with_label_values(&["TrainingJob", reason]);
            time_to_recover_seconds.with_label_values(&["TrainingJob", reason]);
        }
        queue_wait_seconds.with_label_values(&["TrainingJob"]);
        let collectors: [Box<dyn Collector>; 12] = [
            Box::new(reconciles.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(phase_transitions.clone()),
            Box::new(is_leader.clone()),
            Box::new(jobs.clone()),
            Box::new(queue_wait_seconds.clone()),
            Box::new(restarts.clone()),
            Box::new(gpu_faults.clone()),
            Box::new(time_to_recover_seconds.clone()),
            Box::new(agents_connected.clone()),
            Box::new(SCHEDULING_DECISION_SECONDS.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            phase_transitions,
            is_leader,
            jobs,
            queue_wait_seconds,
            restarts,
            gpu_faults,
            time_to_recover_seconds,
            agents_connected,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_metric_family() {
        let m = Metrics::new();
        m.reconciles.with_label_values(&["TrainingJob"]).inc();
        m.reconcile_errors.with_label_values(&["TrainingJob", "kube"]).inc();
        m.reconcile_seconds.with_label_values(&["TrainingJob"]).observe(0.2);
        m.phase_transitions.with_label_values(&["TrainingJob", "Queued"]).inc();
        m.is_leader.set(1);
        m.jobs.with_label_values(&["TrainingJob", "Running"]).set(2);
        m.queue_wait_seconds.with_label_values(&["TrainingJob"]).observe(3.0);
        m.restarts.with_label_values(&["TrainingJob", "HardwareFault"]).inc();
        m.gpu_faults.with_label_values(&["hardware-fatal"]).inc();
        m.time_to_recover_seconds.with_label_values(&["TrainingJob", "HardwareFault"]).observe(7.0);
        m.agents_connected.set(2);
        SCHEDULING_DECISION_SECONDS.observe(0.001);
        let text = m.render();
        for line in [
            "flotilla_operator_reconciles_total{kind=\"TrainingJob\"} 1",
            "flotilla_operator_reconcile_errors_total{error=\"kube\",kind=\"TrainingJob\"} 1",
            "flotilla_operator_reconcile_duration_seconds_bucket",
            "flotilla_operator_phase_transitions_total{kind=\"TrainingJob\",phase=\"Queued\"} 1",
            "flotilla_operator_is_leader 1",
            "flotilla_operator_jobs{kind=\"TrainingJob\",phase=\"Running\"} 2",
            "flotilla_operator_queue_wait_seconds_bucket{kind=\"TrainingJob\",le=\"5\"} 1",
            "flotilla_operator_queue_wait_seconds_bucket{kind=\"TrainingJob\",le=\"2\"} 0",
            "flotilla_operator_restarts_total{kind=\"TrainingJob\",reason=\"HardwareFault\"} 1",
            "flotilla_operator_gpu_faults_total{class=\"hardware-fatal\"} 1",
            "flotilla_operator_gpu_faults_total{class=\"degraded\"} 0",
            "flotilla_operator_restarts_total{kind=\"TrainingJob\",reason=\"NodeLost\"} 0",
            "flotilla_operator_time_to_recover_seconds_sum{kind=\"TrainingJob\",reason=\"HardwareFault\"} 7",
            "flotilla_operator_agents_connected 2",
            "flotilla_operator_scheduling_decision_seconds_count",
            // Made at 0 before their first event.
            "flotilla_operator_reconciles_total{kind=\"GpuNode\"} 0",
            "flotilla_operator_reconcile_errors_total{error=\"fleet\",kind=\"InferenceService\"} 0",
            "flotilla_operator_phase_transitions_total{kind=\"TrainingJob\",phase=\"Succeeded\"} 0",
            "flotilla_operator_phase_transitions_total{kind=\"TrainingJob\",phase=\"Failed\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn two_registries_both_export_the_scheduling_histogram() {
        let (a, b) = (Metrics::new(), Metrics::new());
        SCHEDULING_DECISION_SECONDS.observe(0.002);
        for m in [a, b] {
            assert!(m.render().contains("flotilla_operator_scheduling_decision_seconds_sum"));
        }
    }
}
