//! The agent's Prometheus metrics: DCGM-exporter names and labels, so existing dashboards work,
//! plus Flotilla's health metrics and the agent's own.
//!
//! The per-GPU gauges also carry `job_uid` and `rank`: the job attempt's worker that holds the
//! GPU now (empty, so absent in Prometheus, on a free GPU) — the per-job view DCGM lacks. The
//! holders are read from the worker supervisor at every scrape, and a GPU whose holder changed
//! has its series moved to the new labels, so a GPU is never shown under two jobs at once.

use crate::backend::{GpuDevice, GpuSample};
use crate::health::Health;
use crate::supervisor::{RunningWorker, WorkerSupervisor};
use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// DCGM-exporter labels, then the holder of the GPU, in order.
const GPU_LABELS: [&str; 7] = ["gpu", "UUID", "device", "modelName", "Hostname", "job_uid", "rank"];

/// The worker holding a GPU: job UID and rank (both empty when free).
type Holder = (String, String);

/// Every metric the agent exports, registered in one registry.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    hostname: String,
    gauges: Vec<(&'static str, GaugeVec)>,
    health_state: GaugeVec,
    /// The holder each GPU's series are labelled with now, by UUID.
    holders: Arc<Mutex<HashMap<String, Holder>>>,
    /// Where the holders come from; none until the agent starts its supervisor.
    workers: Arc<OnceLock<Arc<dyn WorkerSupervisor>>>,
    /// The GPUs seen so far (for moving their series), by UUID.
    devices: Arc<Mutex<HashMap<String, GpuDevice>>>,
    xid_events: IntCounterVec,
    /// Every `xid_events` series created so far, by its labels, with the XIDs that wait for the
    /// series' first scrape (0 once it was scraped). See [`AgentMetrics::observe_xid`].
    xid_series: Arc<Mutex<HashMap<[String; 4], u64>>>,
    /// 1 while the stream to the operator is up.
    pub connected: IntGauge,
    /// Connections opened to the operator.
    pub connects: IntCounter,
    /// Critical events raised but not yet acknowledged.
    pub unacked_events: IntGauge,
    /// Telemetry rounds taken.
    pub samples: IntCounter,
    /// Times the fence timeout fired, or a verdict arrived, and workers were killed.
    pub fence_kills: IntCounter,
    /// Renewals of the node's Lease, by `result` (`ok`, `error`).
    pub lease_renewals: IntCounterVec,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").field("hostname", &self.hostname).finish()
    }
}

/// DCGM field names with their help text.
const DCGM_GAUGES: [(&str, &str); 20] = [
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
    (
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "Total number of NVLink flow-control CRC errors.",
    ),
    ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "Total number of NVLink data CRC errors."),
    ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "Total number of NVLink retries."),
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "Total number of NVLink recovery errors."),
];

/// The value of `gauge`'s series with `labels`, if that series exists (without creating it, as
/// `get_metric_with_label_values` would).
fn gauge_value(gauge: &GaugeVec, labels: &[&str; 7]) -> Option<f64> {
    gauge.collect().iter().flat_map(|family| family.get_metric()).find_map(|m| {
        let pairs = m.get_label();
        let matches = pairs.len() == GPU_LABELS.len()
            && GPU_LABELS.iter().zip(labels).all(|(name, value)| {
                pairs.iter().any(|p| p.name() == *name && p.value() == *value)
            });
        matches.then(|| m.get_gauge().get_value())
    })
}

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
            "Times workers were killed: neither the operator nor the API server reached past the \
             fence timeout, or the operator declared the node lost.",
        )?;
        let lease_renewals = IntCounterVec::new(
            Opts::new(
                "flotilla_agent_lease_renewals_total",
                "Renewals of the node's Lease on the API server, by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lease_renewals.clone()))?;
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
            holders: Arc::default(),
            workers: Arc::default(),
            devices: Arc::default(),
            xid_events,
            xid_series: Arc::default(),
            connected,
            connects,
            unacked_events,
            samples,
            fence_kills,
            lease_renewals,
        })
    }

    /// Reads the GPUs' holders from `workers` at every scrape from now on.
    pub fn label_gpus_with_workers_of(&self, workers: Arc<dyn WorkerSupervisor>) {
        let _ = self.workers.set(workers);
    }

    /// The holders, locked while a GPU's series are written so a concurrent move cannot leave
    /// a series under a holder that just left.
    fn lock_holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_xid_series(&self) -> std::sync::MutexGuard<'_, HashMap<[String; 4], u64>> {
        self.xid_series.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn labels<'a>(
        &'a self,
        gpu: &'a GpuDevice,
        index: &'a str,
        holder: &'a Holder,
    ) -> [&'a str; 7] {
        [index, &gpu.uuid, "nvidia", &gpu.model, &self.hostname, &holder.0, &holder.1]
    }

    fn remember(&self, gpu: &GpuDevice) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if !devices.contains_key(&gpu.uuid) {
            devices.insert(gpu.uuid.clone(), gpu.clone());
        }
    }

    /// Labels every GPU's series with the worker in `running` that holds it, moving the series
    /// of GPUs whose holder changed.
    ///
    /// Only series that exist are moved: a gauge the GPU never had under its old holder (the
    /// last-XID gauge of a GPU without an XID, say) is not created under the new one, so no
    /// made-up zero appears.
    pub fn set_holders(&self, running: &[RunningWorker]) {
        let mut now: HashMap<&str, Holder> = HashMap::new();
        for w in running {
            for uuid in &w.gpu_uuids {
                now.insert(uuid, (w.id.job_uid.clone(), w.id.rank.to_string()));
            }
        }
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut holders = self.lock_holders();
        for (uuid, gpu) in &devices {
            let new = now.get(uuid.as_str()).cloned().unwrap_or_default();
            let old = holders.get(uuid).cloned().unwrap_or_default();
            if new == old {
                continue;
            }
            let index = gpu.index.to_string();
            let (from, to) = (self.labels(gpu, &index, &old), self.labels(gpu, &index, &new));
            for gauge in self.gauges.iter().map(|(_, g)| g).chain([&self.health_state]) {
                // `get_metric_with_label_values` would create the series it looks up, at 0.
                if let Some(value) = gauge_value(gauge, &from) {
                    let _ = gauge.remove_label_values(&from);
                    gauge.with_label_values(&to).set(value);
                }
            }
            holders.insert(uuid.clone(), new);
        }
    }

    /// Records one telemetry sample.
    pub fn observe_sample(&self, gpu: &GpuDevice, s: &GpuSample) {
        self.remember(gpu);
        let index = gpu.index.to_string();
        let holders = self.lock_holders();
        let holder = holders.get(&gpu.uuid).cloned().unwrap_or_default();
        let labels = self.labels(gpu, &index, &holder);
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
            s.nvlink_errors.crc_flit as f64,
            s.nvlink_errors.crc_data as f64,
            s.nvlink_errors.replay as f64,
            s.nvlink_errors.recovery as f64,
        ];
        for ((name, gauge), value) in self.gauges.iter().zip(values) {
            if *name == "DCGM_FI_DEV_XID_ERRORS" {
                continue;
            }
            gauge.with_label_values(&labels).set(value);
        }
    }

    /// Records an XID: DCGM's last-XID gauge and Flotilla's per-XID counter.
    ///
    /// A counter series that first appears at 1 hides its first event from `increase()` and
    /// `rate()`, which need two samples, and the first XID of a kind on a GPU is the one that
    /// matters. The set of XIDs is open, so the series cannot all be made at startup; instead a
    /// new series is created at 0 and the XIDs wait in `xid_unexposed` until a scrape has shown
    /// it ([`Self::render`] adds them after encoding). The count is one scrape late the first
    /// time only; later XIDs of the kind count at once.
    pub fn observe_xid(&self, gpu: &GpuDevice, xid: u32) {
        self.remember(gpu);
        let index = gpu.index.to_string();
        {
            let holders = self.lock_holders();
            let holder = holders.get(&gpu.uuid).cloned().unwrap_or_default();
            if let Some((_, g)) = self.gauges.iter().find(|(n, _)| *n == "DCGM_FI_DEV_XID_ERRORS") {
                g.with_label_values(&self.labels(gpu, &index, &holder)).set(f64::from(xid));
            }
        }
        let labels = [index, gpu.uuid.clone(), self.hostname.clone(), xid.to_string()];
        let mut series = self.lock_xid_series();
        match series.get_mut(&labels) {
            // Created, not scraped yet: one more XID waits.
            Some(waiting) if *waiting > 0 => *waiting += 1,
            // Scraped at least once: counts at once.
            Some(_) => {
                self.xid_events.with_label_values(&labels.each_ref().map(|l| l.as_str())).inc()
            }
            // New: the series appears at 0 and the XID waits for it to be scraped.
            None => {
                self.xid_events.with_label_values(&labels.each_ref().map(|l| l.as_str()));
                series.insert(labels, 1);
            }
        }
    }

    /// Records a GPU's health.
    pub fn observe_health(&self, gpu: &GpuDevice, health: Health) {
        self.remember(gpu);
        let index = gpu.index.to_string();
        let holders = self.lock_holders();
        let holder = holders.get(&gpu.uuid).cloned().unwrap_or_default();
        self.health_state
            .with_label_values(&self.labels(gpu, &index, &holder))
            .set(health.gauge_value());
    }

    /// The Prometheus text exposition of every metric, with the GPUs' holders as of now.
    pub fn render(&self) -> String {
        if let Some(workers) = self.workers.get() {
            self.set_holders(&workers.running());
        }
        // Held from before the gathering to the adding, so an XID series created meanwhile
        // cannot have its XIDs added before a scrape showed it at 0.
        let mut xid_series = self.lock_xid_series();
        let families = self.registry.gather();
        for (labels, waiting) in xid_series.iter_mut().filter(|(_, w)| **w > 0) {
            self.xid_events
                .with_label_values(&labels.each_ref().map(|l| l.as_str()))
                .inc_by(*waiting);
            *waiting = 0;
        }
        drop(xid_series);
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&families, &mut buf);
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
        m.render(); // the XID counter's first scrape shows it at 0
        let text = m.render();
        let labels = r#"Hostname="node-a",UUID="GPU-abc",device="nvidia",gpu="3",job_uid="",modelName="NVIDIA H100 80GB HBM3",rank="""#;
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

    fn worker(job: &str, rank: u32, gpus: &[&str]) -> RunningWorker {
        RunningWorker {
            id: crate::supervisor::WorkerId { job_uid: job.into(), attempt: 1, rank },
            pid: 1,
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            started_at_unix_nanos: 0,
        }
    }

    fn series(text: &str, name: &str) -> Vec<String> {
        text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).map(str::to_owned).collect()
    }

    #[test]
    fn gpu_series_carry_their_holder_and_move_when_it_changes() {
        let m = AgentMetrics::new("node-a").expect("metrics");
        let gpu = device();
        let sample = GpuSample { index: 3, temperature_c: 61.0, ..Default::default() };
        m.observe_sample(&gpu, &sample);
        m.observe_health(&gpu, Health::Healthy);
        m.set_holders(&[worker("uid-1", 5, &["GPU-abc", "GPU-other"])]);
        let text = m.render();
        let temp = series(&text, "DCGM_FI_DEV_GPU_TEMP");
        assert_eq!(temp.len(), 1, "{temp:?}");
        assert!(temp[0].contains(r#"job_uid="uid-1""#) && temp[0].contains(r#"rank="5""#));
        assert!(temp[0].ends_with(" 61"), "the value moves with the series: {temp:?}");
        let health = series(&text, "flotilla_gpu_health_state");
        assert_eq!(health.len(), 1, "{health:?}");
        assert!(health[0].contains(r#"job_uid="uid-1""#) && health[0].ends_with(" 0"));

        // New samples land on the holder's series; freeing the GPU moves them back.
        m.observe_sample(&gpu, &GpuSample { temperature_c: 70.0, ..sample });
        m.set_holders(&[]);
        let temp = series(&m.render(), "DCGM_FI_DEV_GPU_TEMP");
        assert_eq!(temp.len(), 1, "{temp:?}");
        assert!(temp[0].contains(r#"job_uid="""#) && temp[0].ends_with(" 70"), "{temp:?}");
    }

    #[test]
    fn a_new_xid_series_is_scraped_at_zero_before_it_counts() {
        let m = AgentMetrics::new("node-a").expect("metrics");
        let gpu = device();
        let count = |text: &str, xid: u32| {
            let prefix = format!(
                r#"flotilla_gpu_xid_events_total{{Hostname="node-a",UUID="GPU-abc",gpu="3",xid="{xid}"}} "#
            );
            text.lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        };
        m.observe_xid(&gpu, 79);
        m.observe_xid(&gpu, 79);
        let first = m.render();
        assert_eq!(count(&first, 79).as_deref(), Some("0"), "{first}");
        // The XIDs that waited for that scrape count from the next one on.
        assert_eq!(count(&m.render(), 79).as_deref(), Some("2"));
        // Once scraped, a series counts at once.
        m.observe_xid(&gpu, 79);
        assert_eq!(count(&m.render(), 79).as_deref(), Some("3"));
        // Another XID gets its own series, at 0 first again.
        m.observe_xid(&gpu, 13);
        let text = m.render();
        assert_eq!(
            (count(&text, 13).as_deref(), count(&text, 79).as_deref()),
            (Some("0"), Some("3"))
        );
        assert_eq!(count(&m.render(), 13).as_deref(), Some("1"));
    }

    #[test]
    fn moving_a_holder_moves_only_the_series_that_exist() {
        let m = AgentMetrics::new("node-a").expect("metrics");
        let (quiet, faulty) =
            (device(), GpuDevice { index: 4, uuid: "GPU-def".into(), ..device() });
        for gpu in [&quiet, &faulty] {
            let sample = GpuSample { index: gpu.index, temperature_c: 61.0, ..Default::default() };
            m.observe_sample(gpu, &sample);
            m.observe_health(gpu, Health::Healthy);
        }
        m.observe_xid(&faulty, 13);
        m.set_holders(&[worker("uid-1", 0, &["GPU-abc", "GPU-def"])]);
        m.set_holders(&[worker("uid-2", 1, &["GPU-abc", "GPU-def"])]);
        let text = m.render();
        // The GPU without an XID has no last-XID series, under any holder.
        let xid = series(&text, "DCGM_FI_DEV_XID_ERRORS");
        assert_eq!(xid.len(), 1, "{xid:?}");
        assert!(xid[0].contains(r#"UUID="GPU-def""#), "{xid:?}");
        assert!(xid[0].contains(r#"job_uid="uid-2""#) && xid[0].ends_with(" 13"), "{xid:?}");
        // The gauges both GPUs have moved, one series each, with their values.
        let temp = series(&text, "DCGM_FI_DEV_GPU_TEMP");
        assert_eq!(temp.len(), 2, "{temp:?}");
        assert!(temp.iter().all(|t| t.contains(r#"rank="1""#) && t.ends_with(" 61")), "{temp:?}");
    }
}
