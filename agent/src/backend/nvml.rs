//! Real GPUs through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time).
//!
//! Polling gives telemetry; a blocking thread waits on the NVML event set for XID and ECC events,
//! as NVIDIA's device plugin does (5 s wait, then again).

use super::{BackendError, GpuBackend, GpuDevice, GpuEvent, GpuSample, NvLinkErrors};
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
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL, NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
    NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL, NVML_FI_DEV_REMAPPED_COR,
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_UNC,
};
use nvml_wrapper::{Device, EventSet, Nvml};
use std::collections::{HashMap, HashSet};
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

/// Why NVML could not start, in words an operator of the node acts on.
fn unavailable(e: NvmlError) -> BackendError {
    let detail = match e {
        NvmlError::LibloadingError(e) => format!("the library could not be loaded: {e}"),
        NvmlError::DriverNotLoaded => {
            "the library loaded, but the NVIDIA kernel driver is not loaded".to_owned()
        }
        NvmlError::NoPermission => "no permission to open the NVIDIA devices".to_owned(),
        e => e.to_string(),
    };
    BackendError::NvmlUnavailable { detail }
}

impl NvmlBackend {
    /// Loads NVML. Fails with [`BackendError::NvmlUnavailable`] when the library is missing or the
    /// driver is not loaded.
    pub fn new(node: &str) -> Result<Self, BackendError> {
        let nvml = Nvml::init().map_err(unavailable)?;
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
        let fields = FieldReadings::read(&dev);
        Ok(GpuSample {
            index,
            temperature_c: temperature as f32,
            memory_temperature_c: fields.memory_temperature_c,
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
            remapped_rows_correctable: fields.remapped_rows_correctable,
            remapped_rows_uncorrectable: fields.remapped_rows_uncorrectable,
            row_remap_failure: fields.row_remap_failure,
            throttle_reasons: dev.current_throttle_reasons().map(|r| r.bits()).unwrap_or(0),
            pcie_replay_count: dev.pcie_replay_counter().map(u64::from).unwrap_or(0),
            slowdown_temperature_c: dev
                .temperature_threshold(TemperatureThreshold::Slowdown)
                .map(|t| t as f32)
                .unwrap_or(0.0),
            nvlink_errors: fields.nvlink_errors,
        })
    }
}

/// The readings that come as NVML field values, in one `nvmlDeviceGetFieldValues` call (what
/// DCGM does): HBM temperature, remapped rows, NVLink error totals. A field the GPU does not
/// support (NVLink on a PCIe board, say) reads zero.
#[derive(Debug, Default, PartialEq)]
struct FieldReadings {
    memory_temperature_c: f32,
    remapped_rows_correctable: u64,
    remapped_rows_uncorrectable: u64,
    row_remap_failure: bool,
    nvlink_errors: NvLinkErrors,
}

/// The fields asked for, in the order [`FieldReadings::from_values`] reads them.
const FIELDS: [u32; 8] = [
    NVML_FI_DEV_MEMORY_TEMP,
    NVML_FI_DEV_REMAPPED_COR,
    NVML_FI_DEV_REMAPPED_UNC,
    NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
];

impl FieldReadings {
    fn read(dev: &Device<'_>) -> Self {
        let ids = FIELDS.map(FieldId);
        let Ok(values) = dev.field_values_for(&ids) else { return Self::default() };
        let values: Vec<u64> = values
            .into_iter()
            .map(|value| match value.map(|s| s.value) {
                Ok(Ok(SampleValue::U32(v))) => u64::from(v),
                Ok(Ok(SampleValue::U64(v))) => v,
                Ok(Ok(SampleValue::I64(v))) => u64::try_from(v).unwrap_or(0),
                Ok(Ok(SampleValue::F64(v))) => v as u64,
                _ => 0,
            })
            .collect();
        Self::from_values(&values)
    }

    fn from_values(v: &[u64]) -> Self {
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Self {
            memory_temperature_c: at(0) as f32,
            remapped_rows_correctable: at(1),
            remapped_rows_uncorrectable: at(2),
            row_remap_failure: at(3) != 0,
            nvlink_errors: NvLinkErrors {
                crc_flit: at(4),
                crc_data: at(5),
                replay: at(6),
                recovery: at(7),
            },
        }
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<Vec<GpuDevice>, BackendError> {
        let mut devices = Vec::with_capacity(self.count as usize);
        let mut bus_to_index = HashMap::new();
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
                Ok(sample) => {
                    // It answers again (reset, or back on the bus): losing it again is news.
                    self.lost.lock().unwrap_or_else(|e| e.into_inner()).remove(&index);
                    samples.push(sample);
                }
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

/// Events the loop listens for.
fn wanted_events() -> EventTypes {
    EventTypes::CRITICAL_XID_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR
}

/// An event set with every GPU that answers registered for the wanted events it supports, and
/// the registered GPUs by UUID. `nvml-wrapper` frees the set when a registration fails, so a GPU
/// that fails is left out and the set built again without it: one lost GPU must not blind the
/// loop to the others.
fn event_set(nvml: &Nvml, count: u32) -> Result<(EventSet<'_>, HashMap<String, u32>), NvmlError> {
    let mut plan = Vec::new();
    for index in 0..count {
        let answer = nvml.device_by_index(index).and_then(|dev| {
            let supported = dev.supported_event_types()? & wanted_events();
            Ok((dev.uuid()?, supported))
        });
        match answer {
            Ok((uuid, types)) if !types.is_empty() => plan.push((index, uuid, types)),
            Ok(_) => tracing::warn!(gpu = index, "GPU supports none of the XID/ECC events"),
            Err(e) => tracing::warn!(gpu = index, error = %e, "no NVML events from this GPU"),
        }
    }
    'build: loop {
        let mut set = nvml.create_event_set()?;
        for (i, (index, _, types)) in plan.iter().enumerate() {
            let registered = nvml
                .device_by_index(*index)
                .map_err(Into::into)
                .and_then(|dev| dev.register_events(*types, set));
            match registered {
                Ok(next) => set = next,
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e.error, "NVML event registration failed");
                    plan.remove(i);
                    continue 'build;
                }
            }
        }
        for (index, uuid, types) in &plan {
            tracing::info!(gpu = index, %uuid, ?types, "NVML events registered");
        }
        return Ok((set, plan.into_iter().map(|(index, uuid, _)| (uuid, index)).collect()));
    }
}

/// The fault an NVML event means, if any. Single-bit errors are judged by rate in the samples,
/// not one by one.
fn fault_of(event_type: EventTypes, data: Option<XidError>) -> Option<Fault> {
    if event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
        Some(match data {
            Some(XidError::Value(xid)) => Fault::Xid(u32::try_from(xid).unwrap_or(u32::MAX)),
            _ => Fault::Xid(0),
        })
    } else if event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        Some(Fault::DoubleBitEcc)
    } else {
        None
    }
}

fn event_loop(nvml: &Nvml, count: u32, events: &mpsc::UnboundedSender<GpuEvent>) {
    let (set, uuid_to_index) = match event_set(nvml, count) {
        Ok(built) => built,
        Err(e) => {
            tracing::error!(error = %e, "NVML event set unavailable; XID events will not be seen");
            return;
        }
    };
    loop {
        match set.wait(EVENT_WAIT_MS) {
            Ok(data) => {
                let Some(fault) = fault_of(data.event_type, data.event_data) else { continue };
                // The UUID names the GPU; a GPU that just fell off the bus (XID 79) may no longer
                // answer it, so its index is asked next.
                let index = match data.device.uuid() {
                    Ok(uuid) => uuid_to_index.get(&uuid).copied(),
                    Err(_) => data.device.index().ok(),
                };
                let Some(index) = index else {
                    tracing::error!(?fault, "NVML event from a GPU that cannot be identified");
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

    #[test]
    fn xid_and_double_bit_events_are_faults_single_bit_ones_are_not() {
        let xid = EventTypes::CRITICAL_XID_ERROR;
        assert_eq!(fault_of(xid, Some(XidError::Value(79))), Some(Fault::Xid(79)));
        assert_eq!(fault_of(xid, Some(XidError::Unknown)), Some(Fault::Xid(0)));
        assert_eq!(fault_of(EventTypes::DOUBLE_BIT_ECC_ERROR, None), Some(Fault::DoubleBitEcc));
        assert_eq!(fault_of(EventTypes::SINGLE_BIT_ECC_ERROR, None), None);
    }

    #[test]
    fn field_values_land_in_their_readings_and_missing_ones_read_zero() {
        let r = FieldReadings::from_values(&[71, 2, 3, 1, 10, 11, 12, 13]);
        assert_eq!(r.memory_temperature_c, 71.0);
        assert_eq!((r.remapped_rows_correctable, r.remapped_rows_uncorrectable), (2, 3));
        assert!(r.row_remap_failure);
        let nvlink = NvLinkErrors { crc_flit: 10, crc_data: 11, replay: 12, recovery: 13 };
        assert_eq!(r.nvlink_errors, nvlink);
        assert_eq!(FieldReadings::from_values(&[]), FieldReadings::default());
    }

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
