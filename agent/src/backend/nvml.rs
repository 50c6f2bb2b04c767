//! Real GPUs through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time).
//!
//! Polling gives telemetry; a blocking thread waits on the NVML event set for XID and ECC events,
//! as NVIDIA's device plugin does (5 s wait, then again).

use super::{BackendError, GpuBackend, GpuDevice, GpuEvent, GpuSample};
use crate::health::Fault;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor, TemperatureThreshold,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_UNC,
};
use nvml_wrapper::{Device, Nvml};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// NVML event wait timeout, milliseconds.
const EVENT_WAIT_MS: u32 = 5_000;
/// NVLink links probed per GPU.
const MAX_NVLINKS: u32 = 18;

/// GPUs read through NVML.
pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    node: String,
    count: u32,
    lost: Mutex<HashSet<u32>>,
    events: Mutex<Option<mpsc::UnboundedSender<GpuEvent>>>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend").field("node", &self.node).field("count", &self.count).finish()
    }
}

fn nvml_err(call: &'static str, gpu: impl ToString) -> impl FnOnce(NvmlError) -> BackendError {
    let gpu = gpu.to_string();
    move |e| BackendError::Nvml { call, gpu, detail: e.to_string() }
}

impl NvmlBackend {
    /// Loads NVML. Fails with [`BackendError::NvmlUnavailable`] when the library is missing or the
    /// driver is not loaded.
    pub fn new(node: &str) -> Result<Self, BackendError> {
        let nvml =
            Nvml::init().map_err(|e| BackendError::NvmlUnavailable { detail: e.to_string() })?;
        let count = nvml.device_count().map_err(nvml_err("device_count", "-"))?;
        Ok(Self {
            nvml: Arc::new(nvml),
            node: node.to_owned(),
            count,
            lost: Mutex::new(HashSet::new()),
            events: Mutex::new(None),
        })
    }

    fn device(&self, index: u32) -> Result<Device<'_>, BackendError> {
        self.nvml.device_by_index(index).map_err(nvml_err("device_by_index", index))
    }

    fn report_lost(&self, index: u32) {
        let newly = self.lost.lock().unwrap_or_else(|e| e.into_inner()).insert(index);
        if newly && let Some(tx) = self.events.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(GpuEvent { index, fault: Fault::GpuLost });
        }
    }

    fn sample_one(&self, index: u32) -> Result<GpuSample, NvmlError> {
        let dev = self.nvml.device_by_index(index)?;
        // Optional readings (not every board reports them) fall back to zero.
        let temperature = dev.temperature(TemperatureSensor::Gpu)?;
        let memory = dev.memory_info()?;
        let util = dev.utilization_rates()?;
        let remap = remapped_rows(&dev);
        Ok(GpuSample {
            index,
            temperature_c: temperature as f32,
            memory_temperature_c: 0.0,
            power_w: dev.power_usage().map(|mw| mw as f32 / 1000.0).unwrap_or(0.0),
            energy_mj: dev.total_energy_consumption().unwrap_or(0),
            gpu_util_pct: util.gpu as f32,
            mem_copy_util_pct: util.memory as f32,
            memory_used_bytes: memory.used,
            memory_free_bytes: memory.free,
            sm_clock_mhz: dev.clock_info(Clock::SM).unwrap_or(0),
            mem_clock_mhz: dev.clock_info(Clock::Memory).unwrap_or(0),
            ecc_corrected_volatile: dev
                .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                .unwrap_or(0),
            ecc_uncorrected_volatile: dev
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .unwrap_or(0),
            retired_pages: [
                RetirementCause::MultipleSingleBitEccErrors,
                RetirementCause::DoubleBitEccError,
            ]
            .into_iter()
            .map(|c| dev.retired_pages(c).map(|p| p.len() as u64).unwrap_or(0))
            .sum(),
            retired_pages_pending: dev.are_pages_pending_retired().unwrap_or(false),
            remapped_rows_correctable: remap.0,
            remapped_rows_uncorrectable: remap.1,
            row_remap_failure: remap.2,
            throttle_reasons: dev.current_throttle_reasons().map(|r| r.bits()).unwrap_or(0),
            pcie_replay_count: dev.pcie_replay_counter().map(u64::from).unwrap_or(0),
            slowdown_temperature_c: dev
                .temperature_threshold(TemperatureThreshold::Slowdown)
                .map(|t| t as f32)
                .unwrap_or(0.0),
        })
    }
}

/// (correctable, uncorrectable, failure) remapped-row counters; zeros where unsupported.
fn remapped_rows(dev: &Device<'_>) -> (u64, u64, bool) {
    let ids = [
        FieldId(NVML_FI_DEV_REMAPPED_COR),
        FieldId(NVML_FI_DEV_REMAPPED_UNC),
        FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
    ];
    let Ok(values) = dev.field_values_for(&ids) else { return (0, 0, false) };
    let mut out = [0u64; 3];
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = match value.map(|s| s.value) {
            Ok(Ok(SampleValue::U32(v))) => u64::from(v),
            Ok(Ok(SampleValue::U64(v))) => v,
            Ok(Ok(SampleValue::I64(v))) => u64::try_from(v).unwrap_or(0),
            Ok(Ok(SampleValue::F64(v))) => v as u64,
            _ => 0,
        };
    }
    (out[0], out[1], out[2] != 0)
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<Vec<GpuDevice>, BackendError> {
        let mut devices = Vec::with_capacity(self.count as usize);
        let mut bus_to_index = std::collections::HashMap::new();
        for index in 0..self.count {
            let dev = self.device(index)?;
            let pci = dev.pci_info().map_err(nvml_err("pci_info", index))?;
            bus_to_index.insert(pci.bus_id.to_ascii_lowercase(), index);
            devices.push(GpuDevice {
                index,
                uuid: dev.uuid().map_err(nvml_err("uuid", index))?,
                model: dev.name().map_err(nvml_err("name", index))?,
                memory_bytes: dev.memory_info().map_err(nvml_err("memory_info", index))?.total,
                pci_bus_id: pci.bus_id,
                nvlink_peers: Vec::new(),
                topology_domain: String::new(),
            });
        }
        // NVLink peers: remote ends of active links that are GPUs of this node. Through an
        // NVSwitch the remote end is the switch, so GPUs without direct GPU peers but with active
        // links share one switch domain.
        for (index, gpu) in devices.iter_mut().enumerate() {
            let dev = self.device(index as u32)?;
            let mut peers = HashSet::new();
            let mut active_links = 0;
            for link in 0..MAX_NVLINKS {
                let nvlink = dev.link_wrapper_for(link);
                if !nvlink.is_active().unwrap_or(false) {
                    continue;
                }
                active_links += 1;
                if let Ok(remote) = nvlink.remote_pci_info()
                    && let Some(&peer) = bus_to_index.get(&remote.bus_id.to_ascii_lowercase())
                {
                    peers.insert(peer);
                }
            }
            let mut peers: Vec<u32> = peers.into_iter().collect();
            peers.sort_unstable();
            gpu.topology_domain = if active_links > 0 {
                format!("{}/nvl0", self.node)
            } else {
                format!("{}/pcie{index}", self.node)
            };
            gpu.nvlink_peers = peers;
        }
        // Behind an NVSwitch every GPU with links reaches every other one with links.
        let switched: Vec<u32> = devices
            .iter()
            .filter(|g| g.topology_domain.ends_with("/nvl0") && g.nvlink_peers.is_empty())
            .map(|g| g.index)
            .collect();
        for gpu in devices.iter_mut().filter(|g| switched.contains(&g.index)) {
            gpu.nvlink_peers = switched.iter().copied().filter(|&p| p != gpu.index).collect();
        }
        Ok(devices)
    }

    fn sample(&self) -> Result<Vec<GpuSample>, BackendError> {
        let mut samples = Vec::with_capacity(self.count as usize);
        for index in 0..self.count {
            match self.sample_one(index) {
                Ok(sample) => samples.push(sample),
                Err(NvmlError::GpuLost) => self.report_lost(index),
                Err(e) => tracing::warn!(gpu = index, error = %e, "NVML sample failed"),
            }
        }
        Ok(samples)
    }

    fn watch_events(&self, events: mpsc::UnboundedSender<GpuEvent>) -> Result<(), BackendError> {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(events.clone());
        let nvml = Arc::clone(&self.nvml);
        let count = self.count;
        std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || event_loop(&nvml, count, &events))
            .map_err(|e| {
                BackendError::Unsupported(format!("spawning the NVML event thread: {e}"))
            })?;
        Ok(())
    }

    fn validate(&self, index: u32) -> Result<bool, BackendError> {
        if index >= self.count {
            return Err(BackendError::NoSuchGpu { index, count: self.count });
        }
        // A GPU passes when it answers NVML again, reports no uncorrected volatile ECC errors,
        // no pages pending retirement and no row-remap failure. (A burn-in kernel would be the
        // thorough check; it belongs to the worker image, not the agent.)
        match self.sample_one(index) {
            Ok(s) => {
                let ok = s.ecc_uncorrected_volatile == 0
                    && !s.retired_pages_pending
                    && !s.row_remap_failure;
                if ok {
                    self.lost.lock().unwrap_or_else(|e| e.into_inner()).remove(&index);
                }
                Ok(ok)
            }
            Err(_) => Ok(false),
        }
    }
}

fn event_loop(nvml: &Nvml, count: u32, events: &mpsc::UnboundedSender<GpuEvent>) {
    let Ok(mut set) = nvml.create_event_set() else {
        tracing::error!("NVML event set unavailable; XID events will not be seen");
        return;
    };
    let mut uuid_to_index = std::collections::HashMap::new();
    for index in 0..count {
        let Ok(dev) = nvml.device_by_index(index) else { continue };
        if let Ok(uuid) = dev.uuid() {
            uuid_to_index.insert(uuid, index);
        }
        let wanted = EventTypes::CRITICAL_XID_ERROR
            | EventTypes::DOUBLE_BIT_ECC_ERROR
            | EventTypes::SINGLE_BIT_ECC_ERROR;
        let supported = dev.supported_event_types().map(|s| s & wanted).unwrap_or(wanted);
        set = match dev.register_events(supported, set) {
            Ok(set) => set,
            Err(e) => {
                tracing::error!(gpu = index, error = %e.error, "NVML event registration failed");
                return;
            }
        };
    }
    loop {
        match set.wait(EVENT_WAIT_MS) {
            Ok(data) => {
                let Some(&index) =
                    data.device.uuid().ok().as_ref().and_then(|u| uuid_to_index.get(u))
                else {
                    continue;
                };
                let fault = if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    match data.event_data {
                        Some(XidError::Value(xid)) => {
                            Fault::Xid(u32::try_from(xid).unwrap_or(u32::MAX))
                        }
                        _ => Fault::Xid(0),
                    }
                } else if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    Fault::DoubleBitEcc
                } else {
                    // Single-bit errors are judged by rate in the samples, not one by one.
                    continue;
                };
                if events.send(GpuEvent { index, fault }).is_err() {
                    return;
                }
            }
            Err(NvmlError::Timeout) => {
                if events.is_closed() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "NVML event wait failed");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On machines without the NVIDIA driver, start-up fails with one clear sentence.
    #[test]
    fn missing_nvml_is_a_clear_error_not_a_panic() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            eprintln!("skipped: this machine has an NVIDIA driver");
            return;
        }
        let err = NvmlBackend::new("node-a").expect_err("NVML must be unavailable here");
        assert!(matches!(err, BackendError::NvmlUnavailable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("libnvidia-ml.so.1") && text.contains("--backend simulated"),
            "{text}"
        );
        assert!(!text.contains('\n'), "one sentence, one line: {text}");
    }
}
