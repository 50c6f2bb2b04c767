//! Prometheus metrics: one registry per process, served on `/metrics`.
//!
//! Training: `flotilla_train_*` and `flotilla_moe_*`. Serving: vLLM's names (`vllm:*`, label
//! `model_name`) so existing vLLM dashboards work unchanged.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::train::StepReport;

/// The process's registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the process collector (CPU, memory, file descriptors).
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = registry
                .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        Self { registry }
    }

    /// The registry, to register further collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        c: C,
    ) -> prometheus::Result<C> {
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }
}

/// Training metrics.
#[derive(Clone)]
pub struct TrainMetrics {
    loss: Gauge,
    tokens_per_second: Gauge,
    step_seconds: Histogram,
    checkpoint_seconds: Histogram,
    steps: IntCounter,
    expert_load: GaugeVec,
    max_violation: GaugeVec,
    router_bias: GaugeVec,
}

impl TrainMetrics {
    /// Registers the training metrics.
    pub fn new(m: &Metrics) -> prometheus::Result<Self> {
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        Ok(Self {
            loss: m.register(Gauge::new(
                "flotilla_train_loss",
                "Mean next-token loss of the last step",
            )?)?,
            tokens_per_second: m.register(Gauge::new(
                "flotilla_train_tokens_per_second",
                "Global tokens per second of the last step",
            )?)?,
            step_seconds: m.register(Histogram::with_opts(
                HistogramOpts::new(
                    "flotilla_train_step_seconds",
                    "Wall time of one optimizer step",
                )
                .buckets(buckets.clone()),
            )?)?,
            checkpoint_seconds: m.register(Histogram::with_opts(
                HistogramOpts::new(
                    "flotilla_train_checkpoint_seconds",
                    "Wall time of writing one checkpoint",
                )
                .buckets(buckets),
            )?)?,
            steps: m.register(IntCounter::new(
                "flotilla_train_steps_total",
                "Optimizer steps completed by this process",
            )?)?,
            expert_load: m.register(GaugeVec::new(
                Opts::new(
                    "flotilla_moe_expert_load",
                    "Tokens routed to each expert in the last global batch",
                ),
                &["layer", "expert"],
            )?)?,
            max_violation: m.register(GaugeVec::new(
                Opts::new(
                    "flotilla_moe_max_violation",
                    "MaxVio of the last global batch: (max load − mean) / mean",
                ),
                &["layer"],
            )?)?,
            router_bias: m.register(GaugeVec::new(
                Opts::new(
                    "flotilla_moe_router_bias",
                    "Selection bias of each expert (auxiliary-loss-free balancing)",
                ),
                &["layer", "expert"],
            )?)?,
        })
    }

    /// Records a finished step; `layers` are the MoE layers' indices and `biases` their biases.
    pub fn observe_step(&self, report: &StepReport, layers: &[usize], biases: &[Vec<f32>]) {
        self.loss.set(f64::from(report.loss));
        if report.seconds > 0.0 {
            self.tokens_per_second.set(report.tokens as f64 / report.seconds);
        }
        self.step_seconds.observe(report.seconds);
        self.steps.inc();
        for (i, &layer) in layers.iter().enumerate() {
            let layer_label = layer.to_string();
            if let Some(v) = report.max_violation.get(i) {
                self.max_violation.with_label_values(&[layer_label.as_str()]).set(f64::from(*v));
            }
            for (e, load) in report.expert_load.get(i).into_iter().flatten().enumerate() {
                let e = e.to_string();
                self.expert_load
                    .with_label_values(&[layer_label.as_str(), e.as_str()])
                    .set(f64::from(*load));
            }
            for (e, b) in biases.get(i).into_iter().flatten().enumerate() {
                let e = e.to_string();
                self.router_bias
                    .with_label_values(&[layer_label.as_str(), e.as_str()])
                    .set(f64::from(*b));
            }
        }
    }

    /// Records the duration of a checkpoint write.
    pub fn observe_checkpoint(&self, seconds: f64) {
        self.checkpoint_seconds.observe(seconds);
    }
}

/// Serving metrics under vLLM's names.
#[derive(Clone)]
pub struct ServeMetrics {
    model: Arc<str>,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    e2e_latency: HistogramVec,
}

impl ServeMetrics {
    /// Registers the serving metrics for `model`.
    pub fn new(m: &Metrics, model: &str) -> prometheus::Result<Self> {
        let labels = &["model_name"];
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        };
        let latency = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        Ok(Self {
            model: model.into(),
            running: m.register(IntGaugeVec::new(
                Opts::new("vllm:num_requests_running", "Requests being decoded"),
                labels,
            )?)?,
            waiting: m.register(IntGaugeVec::new(
                Opts::new("vllm:num_requests_waiting", "Requests queued for a batch slot"),
                labels,
            )?)?,
            prompt_tokens: m.register(IntCounterVec::new(
                Opts::new("vllm:prompt_tokens_total", "Prompt tokens processed"),
                labels,
            )?)?,
            generation_tokens: m.register(IntCounterVec::new(
                Opts::new("vllm:generation_tokens_total", "Tokens generated"),
                labels,
            )?)?,
            time_to_first_token: m.register(hist(
                "vllm:time_to_first_token_seconds",
                "Time to the first generated token",
                latency.clone(),
            )?)?,
            inter_token_latency: m.register(hist(
                "vllm:inter_token_latency_seconds",
                "Time between generated tokens",
                latency.clone(),
            )?)?,
            e2e_latency: m.register(hist(
                "vllm:e2e_request_latency_seconds",
                "Request latency from arrival to last token",
                latency,
            )?)?,
        })
    }

    fn label(&self) -> [&str; 1] {
        [&self.model]
    }

    /// Sets the running and waiting request gauges.
    pub fn set_queue(&self, running: usize, waiting: usize) {
        self.running.with_label_values(&self.label()).set(running as i64);
        self.waiting.with_label_values(&self.label()).set(waiting as i64);
    }

    /// Counts prompt tokens of an admitted request.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.with_label_values(&self.label()).inc_by(n as u64);
    }

    /// Records one generated token; `first` says whether it was the request's first.
    pub fn observe_token(&self, since_previous: f64, first: bool) {
        self.generation_tokens.with_label_values(&self.label()).inc();
        let hist = if first { &self.time_to_first_token } else { &self.inter_token_latency };
        hist.with_label_values(&self.label()).observe(since_previous);
    }

    /// Records a finished request's end-to-end latency.
    pub fn observe_request(&self, seconds: f64) {
        self.e2e_latency.with_label_values(&self.label()).observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_and_serving_metrics_render_under_their_names() {
        let metrics = Metrics::new();
        let train = TrainMetrics::new(&metrics).expect("train metrics");
        let report = StepReport {
            step: 1,
            loss: 2.5,
            tokens: 100,
            seconds: 0.5,
            allreduce_seconds: 0.1,
            expert_load: vec![vec![3.0, 1.0]],
            max_violation: vec![0.5],
            grad_norm: 1.0,
            learning_rate: 1e-3,
            stop: false,
        };
        train.observe_step(&report, &[1], &[vec![0.001, -0.001]]);
        train.observe_checkpoint(0.2);
        let serve = ServeMetrics::new(&metrics, "m").expect("serve metrics");
        serve.observe_token(0.01, true);
        let text = metrics.render();
        for needle in [
            "flotilla_train_loss 2.5",
            "flotilla_train_tokens_per_second 200",
            "flotilla_moe_expert_load{expert=\"0\",layer=\"1\"} 3",
            "flotilla_moe_max_violation{layer=\"1\"} 0.5",
            "flotilla_moe_router_bias{expert=\"1\",layer=\"1\"} -0.001",
            "flotilla_train_checkpoint_seconds_count 1",
            "vllm:generation_tokens_total{model_name=\"m\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
