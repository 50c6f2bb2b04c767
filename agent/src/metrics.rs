//! The agent's Prometheus metrics: DCGM-exporter names and labels, so existing dashboards work,
//! plus Flotilla's health metrics and the agent's own.

use crate::backend::{GpuDevice, GpuSample};
use crate::health::Health;
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// DCGM-exporter labels, in order.
const GPU_LABELS: [&str; 5] = ["gpu", "UUID", "device", "modelName", "Hostname"];

/// Every metric the agent exports, registered in one registry.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    hostname: String,
    gauges: Vec<(&'static str, GaugeVec)>,
    health_state: GaugeVec,
    xid_events: IntCounterVec,
    /// 1 while the stream to the operator is up.
    pub connected: IntGauge,
    /// Connections opened to the operator.
    pub connects: IntCounter,
    /// Critical events raised but not yet acknowledged.
    pub unacked_events: IntGauge,
    /// Telemetry rounds taken.
    pub samples: IntCounter,
    /// Times the fence timeout fired and workers were killed.
    pub fence_kills: IntCounter,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").field("hostname", &self.hostname).finish()
    }
}

/// DCGM field names with their help text.
const DCGM_GAUGES: [(&str, &str); 16] = [
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ)."),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered."),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries."),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors.",
    ),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors."),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed."),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors."),
];

impl AgentMetrics {
    /// Creates and registers every metric; `hostname` fills the `Hostname` label.
    pub fn new(hostname: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let mut gauges = Vec::new();
        for (name, help) in DCGM_GAUGES {
            let g = GaugeVec::new(Opts::new(name, help), &GPU_LABELS)?;
            registry.register(Box::new(g.clone()))?;
            gauges.push((name, g));
        }
        let health_state = GaugeVec::new(
            Opts::new("flotilla_gpu_health_state", "GPU health: 0 healthy, 1 degraded, 2 failed."),
            &GPU_LABELS,
        )?;
        registry.register(Box::new(health_state.clone()))?;
        let xid_events = IntCounterVec::new(
            Opts::new("flotilla_gpu_xid_events_total", "XID events seen, by GPU and XID."),
            &["gpu", "UUID", "Hostname", "xid"],
        )?;
        registry.register(Box::new(xid_events.clone()))?;
        let connected =
            IntGauge::new("flotilla_agent_connected", "1 while the operator stream is up.")?;
        let connects =
            IntCounter::new("flotilla_agent_connects_total", "Streams opened to the operator.")?;
        let unacked_events = IntGauge::new(
            "flotilla_agent_unacked_events",
            "Critical events not yet acknowledged.",
        )?;
        let samples = IntCounter::new("flotilla_agent_samples_total", "Telemetry rounds taken.")?;
        let fence_kills = IntCounter::new(
            "flotilla_agent_fence_kills_total",
            "Times workers were killed because the operator was unreachable past the fence timeout.",
        )?;
        for c in [&connected, &unacked_events] {
            registry.register(Box::new(c.clone()))?;
        }
        for c in [&connects, &samples, &fence_kills] {
            registry.register(Box::new(c.clone()))?;
        }
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self {
            registry,
            hostname: hostname.to_owned(),
            gauges,
            health_state,
            xid_events,
            connected,
            connects,
            unacked_events,
            samples,
            fence_kills,
        })
    }

    fn labels<'a>(&'a self, gpu: &'a GpuDevice, index: &'a str) -> [&'a str; 5] {
        [index, &gpu.uuid, "nvidia", &gpu.model, &self.hostname]
    }

    /// Records one telemetry sample.
    pub fn observe_sample(&self, gpu: &GpuDevice, s: &GpuSample) {
        let index = gpu.index.to_string();
        let labels = self.labels(gpu, &index);
        let mib = |b: u64| (b >> 20) as f64;
        let values = [
            f64::from(s.temperature_c),
            f64::from(s.memory_temperature_c),
            f64::from(s.power_w),
            s.energy_mj as f64,
            f64::from(s.gpu_util_pct),
            f64::from(s.mem_copy_util_pct),
            f64::from(s.sm_clock_mhz),
            f64::from(s.mem_clock_mhz),
            mib(s.memory_free_bytes),
            mib(s.memory_used_bytes),
            f64::NAN, // XID: set by observe_xid
            s.pcie_replay_count as f64,
            s.remapped_rows_uncorrectable as f64,
            s.remapped_rows_correctable as f64,
            if s.row_remap_failure { 1.0 } else { 0.0 },
            s.ecc_corrected_volatile as f64,
        ];
        for ((name, gauge), value) in self.gauges.iter().zip(values) {
            if *name == "DCGM_FI_DEV_XID_ERRORS" {
                continue;
            }
            gauge.with_label_values(&labels).set(value);
        }
    }

    /// Records an XID: DCGM's last-XID gauge and Flotilla's per-XID counter.
    pub fn observe_xid(&self, gpu: &GpuDevice, xid: u32) {
        let index = gpu.index.to_string();
        if let Some((_, g)) = self.gauges.iter().find(|(n, _)| *n == "DCGM_FI_DEV_XID_ERRORS") {
            g.with_label_values(&self.labels(gpu, &index)).set(f64::from(xid));
        }
        self.xid_events
            .with_label_values(&[index.as_str(), &gpu.uuid, &self.hostname, &xid.to_string()])
            .inc();
    }

    /// Records a GPU's health.
    pub fn observe_health(&self, gpu: &GpuDevice, health: Health) {
        let index = gpu.index.to_string();
        self.health_state.with_label_values(&self.labels(gpu, &index)).set(health.gauge_value());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> GpuDevice {
        GpuDevice {
            index: 3,
            uuid: "GPU-abc".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: "00000000:48:00.0".into(),
            nvlink_peers: vec![],
            topology_domain: "n/nvl0".into(),
        }
    }

    #[test]
    fn dcgm_names_and_labels() {
        let m = AgentMetrics::new("node-a").expect("metrics");
        let gpu = device();
        let sample = GpuSample {
            index: 3,
            temperature_c: 61.0,
            memory_free_bytes: 2 << 20,
            ..Default::default()
        };
        m.observe_sample(&gpu, &sample);
        m.observe_xid(&gpu, 79);
        m.observe_health(&gpu, Health::Failed);
        let text = m.render();
        let labels = r#"Hostname="node-a",UUID="GPU-abc",device="nvidia",gpu="3",modelName="NVIDIA H100 80GB HBM3""#;
        for line in [
            format!("DCGM_FI_DEV_GPU_TEMP{{{labels}}} 61"),
            format!("DCGM_FI_DEV_FB_FREE{{{labels}}} 2"),
            format!("DCGM_FI_DEV_XID_ERRORS{{{labels}}} 79"),
            format!("flotilla_gpu_health_state{{{labels}}} 2"),
            r#"flotilla_gpu_xid_events_total{Hostname="node-a",UUID="GPU-abc",gpu="3",xid="79"} 1"#
                .to_owned(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
