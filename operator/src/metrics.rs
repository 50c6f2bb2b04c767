//! The operator's Prometheus metrics, in one registry.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

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

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("flotilla_operator_reconciles_total", "Reconciliations run, by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "flotilla_operator_reconcile_errors_total",
                "Reconciliations that failed, by kind and error",
            ),
            &["kind", "error"],
        )
        .expect("valid metric");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "flotilla_operator_reconcile_duration_seconds",
                "Reconciliation duration, by kind",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["kind"],
        )
        .expect("valid metric");
        let phase_transitions = IntCounterVec::new(
            Opts::new(
                "flotilla_operator_phase_transitions_total",
                "Phase changes written, by kind and phase",
            ),
            &["kind", "phase"],
        )
        .expect("valid metric");
        let is_leader = IntGauge::new(
            "flotilla_operator_is_leader",
            "1 while this replica holds the leader lease",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(phase_transitions.clone()),
            Box::new(is_leader.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            phase_transitions,
            is_leader,
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
        let text = m.render();
        for name in [
            "flotilla_operator_reconciles_total{kind=\"TrainingJob\"} 1",
            "flotilla_operator_reconcile_errors_total",
            "flotilla_operator_reconcile_duration_seconds_bucket",
            "flotilla_operator_phase_transitions_total",
            "flotilla_operator_is_leader 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
