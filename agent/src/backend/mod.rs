//! GPU backends: where inventory, telemetry and fault events come from.
//!
//! [`GpuBackend`] is the one seam; [`simulated::SimulatedBackend`] drives tests, the demo and
//! benchmarks, [`nvml::NvmlBackend`] reads real GPUs.

pub mod nvml;
pub mod simulated;

use crate::health::{Fault, SampleSignals};
use serde::Serialize;
use tokio::sync::mpsc;

/// Errors of a GPU backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The NVML library could not be loaded or initialised.
    #[error(
        "NVML is unavailable ({detail}): libnvidia-ml.so.1 must be installed (NVIDIA driver) and \
         visible to the agent, or run with --backend simulated"
    )]
    NvmlUnavailable {
        /// What NVML reported.
        detail: String,
    },
    /// An NVML call failed.
    #[error("NVML call {call} failed for GPU {gpu}: {detail}")]
    Nvml {
        /// The call, e.g. "temperature".
        call: &'static str,
        /// GPU index, or "-" for node-wide calls.
        gpu: String,
        /// What NVML reported.
        detail: String,
    },
    /// A GPU index that the backend does not have.
    #[error("gpu index {index} out of range: expected 0..{count}")]
    NoSuchGpu {
        /// The index asked for.
        index: u32,
        /// GPUs on the node.
        count: u32,
    },
    /// The operation makes no sense on this backend.
    #[error("{0}")]
    Unsupported(String),
}

/// One GPU of the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuDevice {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// PCI bus id.
    pub pci_bus_id: String,
    /// Indices reachable over NVLink.
    pub nvlink_peers: Vec<u32>,
    /// NVLink/NVSwitch domain shared by peers.
    pub topology_domain: String,
}

/// One telemetry sample of one GPU; field meanings as in `agent.proto`'s `GpuSample`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct GpuSample {
    pub index: u32,
    pub temperature_c: f32,
    pub memory_temperature_c: f32,
    pub power_w: f32,
    pub energy_mj: u64,
    pub gpu_util_pct: f32,
    pub mem_copy_util_pct: f32,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub ecc_corrected_volatile: u64,
    pub ecc_uncorrected_volatile: u64,
    pub retired_pages: u64,
    pub retired_pages_pending: bool,
    pub remapped_rows_correctable: u64,
    pub remapped_rows_uncorrectable: u64,
    pub row_remap_failure: bool,
    pub throttle_reasons: u64,
    pub pcie_replay_count: u64,
    pub slowdown_temperature_c: f32,
    pub nvlink_errors: NvLinkErrors,
}

/// NVLink error counters of one GPU, summed over its links (NVML's `*_ERROR_COUNT_TOTAL` fields,
/// DCGM's `DCGM_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL`); zeros where the GPU has no NVLink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NvLinkErrors {
    /// Flow-control digit CRC errors.
    pub crc_flit: u64,
    /// Data CRC errors.
    pub crc_data: u64,
    /// Replays after a CRC error.
    pub replay: u64,
    /// Link recoveries (the link retrained).
    pub recovery: u64,
}

impl GpuSample {
    /// The fields health classification looks at.
    pub fn signals(&self) -> SampleSignals {
        SampleSignals {
            temperature_c: self.temperature_c,
            slowdown_temperature_c: self.slowdown_temperature_c,
            ecc_corrected: self.ecc_corrected_volatile,
            retired_pages_pending: self.retired_pages_pending,
            row_remap_failure: self.row_remap_failure,
        }
    }
}

/// A fault the backend observed on one GPU, delivered as soon as it is seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuEvent {
    /// GPU index.
    pub index: u32,
    /// What happened.
    pub fault: Fault,
}

/// Where GPU facts come from. Implementations are cheap to call from a blocking thread.
pub trait GpuBackend: Send + Sync + 'static {
    /// "nvml" or "simulated".
    fn name(&self) -> &'static str;
    /// Every GPU of the node, ordered by index.
    fn inventory(&self) -> Result<Vec<GpuDevice>, BackendError>;
    /// One sample per GPU that still answers; a GPU that stopped answering is reported through
    /// the event channel as [`Fault::GpuLost`] instead.
    fn sample(&self) -> Result<Vec<GpuSample>, BackendError>;
    /// Starts delivering fault events to `events` (XID, ECC, lost GPUs). Called once.
    fn watch_events(&self, events: mpsc::UnboundedSender<GpuEvent>) -> Result<(), BackendError>;
    /// Runs the validation of one GPU: `Ok(true)` when it passed.
    fn validate(&self, index: u32) -> Result<bool, BackendError>;
}
