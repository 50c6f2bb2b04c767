//! Simulated GPUs: believable, seeded telemetry and NVLink topology, with fault injection.
//!
//! The same seed and node name always give the same UUIDs and the same telemetry sequence, so
//! tests and benchmarks are repeatable.

use super::{BackendError, GpuBackend, GpuDevice, GpuEvent, GpuSample};
use crate::health::Fault;
use flotilla_contract::fnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// A GPU model the simulation knows.
#[derive(Clone, Copy, Debug)]
pub struct SimModel {
    /// Short name accepted on the command line ("H100").
    pub short: &'static str,
    /// Name as NVML reports it.
    pub name: &'static str,
    /// Memory, GiB.
    pub memory_gib: u64,
    /// Board power limit, watts.
    pub tdp_w: f32,
    /// Slowdown temperature, °C.
    pub slowdown_c: f32,
    /// Max SM clock, MHz.
    pub sm_clock_mhz: u32,
    /// Memory clock, MHz.
    pub mem_clock_mhz: u32,
}

/// Models known to the simulation.
pub const MODELS: &[SimModel] = &[
    SimModel {
        short: "H100",
        name: "NVIDIA H100 80GB HBM3",
        memory_gib: 80,
        tdp_w: 700.0,
        slowdown_c: 90.0,
        sm_clock_mhz: 1980,
        mem_clock_mhz: 2619,
    },
    SimModel {
        short: "H200",
        name: "NVIDIA H200",
        memory_gib: 141,
        tdp_w: 700.0,
        slowdown_c: 90.0,
        sm_clock_mhz: 1980,
        mem_clock_mhz: 3201,
    },
    SimModel {
        short: "A100",
        name: "NVIDIA A100-SXM4-80GB",
        memory_gib: 80,
        tdp_w: 400.0,
        slowdown_c: 88.0,
        sm_clock_mhz: 1410,
        mem_clock_mhz: 1593,
    },
    SimModel {
        short: "L40S",
        name: "NVIDIA L40S",
        memory_gib: 48,
        tdp_w: 350.0,
        slowdown_c: 88.0,
        sm_clock_mhz: 2520,
        mem_clock_mhz: 9001,
    },
];

/// Looks a model up by short or full name, case-insensitively.
pub fn find_model(name: &str) -> Result<SimModel, BackendError> {
    MODELS
        .iter()
        .find(|m| m.short.eq_ignore_ascii_case(name) || m.name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let known: Vec<_> = MODELS.iter().map(|m| m.short).collect();
            BackendError::Unsupported(format!(
                "--gpu-model: expected one of {known:?}, got {name:?}"
            ))
        })
}

/// A fault to inject into one simulated GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    /// Raise this XID.
    Xid(u32),
    /// Raise a double-bit ECC error.
    DoubleBitEcc,
    /// Corrected ECC errors at a storm rate until recovery.
    EccStorm,
    /// The GPU stops answering.
    GpuLost,
    /// The GPU runs above its slowdown temperature until recovery.
    Overheat,
    /// The hardware is fine again: telemetry normal, validation passes, no misbehaviour. Health
    /// itself only returns through validation or an admin clear.
    Recover,
    /// Workers on the GPU stop stepping but stay alive (a hang in compute), until recovery.
    Hang,
    /// Workers on the GPU enter the all-reduce and never send their data, until recovery.
    HangCollective,
    /// Workers on the GPU compute this many percent as slowly (`{"slow": 300}`: 3×), until
    /// recovery. Health and telemetry stay normal: only the step times tell.
    Slow(u32),
}

impl Injection {
    /// What the engine's `flotilla_engine::sim` reads from the GPU's misbehaviour file, for the
    /// injections that act through the workers.
    fn misbehaviour(self) -> Option<String> {
        match self {
            Injection::Hang => Some("hang".into()),
            Injection::HangCollective => Some("hang_collective".into()),
            Injection::Slow(percent) => Some(format!("slow {percent}")),
            _ => None,
        }
    }
}

/// GPUs per NVSwitch domain.
const DOMAIN_SIZE: u32 = 8;

#[derive(Debug)]
struct SimGpu {
    device: GpuDevice,
    util: f32,
    energy_mj: u64,
    ecc_corrected: u64,
    ecc_uncorrected: u64,
    pcie_replays: u64,
    lost: bool,
    overheating: bool,
    ecc_storm: bool,
    /// A hardware fault happened and no recovery has been injected: validation fails.
    broken: bool,
    /// Its workers hang or run slowly (an injected misbehaviour): validation, which measures
    /// the GPU, fails too.
    misbehaving: bool,
}

#[derive(Debug)]
struct SimState {
    gpus: Vec<SimGpu>,
    rng: StdRng,
}

/// N simulated GPUs of one model.
#[derive(Debug)]
pub struct SimulatedBackend {
    model: SimModel,
    state: Mutex<SimState>,
    events: Mutex<Option<mpsc::UnboundedSender<GpuEvent>>>,
    /// Where each GPU's misbehaviour file goes (`<dir>/<uuid>`), read by its workers.
    misbehaviour_dir: Mutex<Option<std::path::PathBuf>>,
}

impl SimulatedBackend {
    /// `count` GPUs of `model` on `node`, telemetry seeded by `seed`.
    pub fn new(node: &str, count: u32, model: SimModel, seed: u64) -> Self {
        let node_seed = fnv::fnv1a_64_from(seed ^ fnv::OFFSET_BASIS_64, node.as_bytes());
        let mut rng = StdRng::seed_from_u64(node_seed);
        let gpus = (0..count)
            .map(|index| {
                let domain = index / DOMAIN_SIZE;
                let peers = (domain * DOMAIN_SIZE..((domain + 1) * DOMAIN_SIZE).min(count))
                    .filter(|&p| p != index)
                    .collect();
                let uuid = format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    rng.random::<u32>(),
                    rng.random::<u16>(),
                    rng.random::<u16>(),
                    rng.random::<u16>(),
                    rng.random::<u64>() & 0xffff_ffff_ffff
                );
                SimGpu {
                    device: GpuDevice {
                        index,
                        uuid,
                        model: model.name.to_owned(),
                        memory_bytes: model.memory_gib << 30,
                        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
                        nvlink_peers: peers,
                        topology_domain: format!("{node}/nvl{domain}"),
                    },
                    util: rng.random_range(40.0..95.0),
                    energy_mj: 0,
                    ecc_corrected: 0,
                    ecc_uncorrected: 0,
                    pcie_replays: 0,
                    lost: false,
                    overheating: false,
                    ecc_storm: false,
                    broken: false,
                    misbehaving: false,
                }
            })
            .collect();
        Self {
            model,
            state: Mutex::new(SimState { gpus, rng }),
            events: Mutex::new(None),
            misbehaviour_dir: Mutex::new(None),
        }
    }

    /// Makes hangs and slowness injectable: each GPU's misbehaviour is written to
    /// `<dir>/<uuid>`, which its workers read (`flotilla_engine::sim`; the supervisor names the
    /// files in their environment).
    pub fn misbehave_through(&self, dir: std::path::PathBuf) {
        *self.misbehaviour_dir.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
    }

    /// Writes (or, on recovery, removes) GPU `uuid`'s misbehaviour file.
    fn write_misbehaviour(&self, uuid: &str, injection: Injection) -> Result<(), BackendError> {
        let dir = self.misbehaviour_dir.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let file = dir.as_ref().map(|d| d.join(uuid));
        let result = match (injection.misbehaviour(), &file) {
            (Some(_), None) => {
                return Err(BackendError::Unsupported(format!(
                    "injecting {injection:?} needs an agent that runs workers (flotilla-agent run)"
                )));
            }
            (Some(text), Some(file)) => {
                std::fs::create_dir_all(file.parent().unwrap_or(file)).and_then(|()| {
                    // Written whole, then renamed: a worker never reads half a file.
                    let tmp = file.with_extension("tmp");
                    std::fs::write(&tmp, text)?;
                    std::fs::rename(&tmp, file)
                })
            }
            (None, Some(file)) if injection == Injection::Recover => {
                match std::fs::remove_file(file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            }
            (None, _) => Ok(()),
        };
        result.map_err(|e| {
            BackendError::Unsupported(format!(
                "writing the misbehaviour file {}: {e}",
                file.as_ref().map(|f| f.display().to_string()).unwrap_or_default()
            ))
        })
    }

    /// Injects a fault into GPU `index`; events are raised at once through the event channel.
    pub fn inject(&self, index: u32, injection: Injection) -> Result<(), BackendError> {
        let fault = {
            let mut state = self.lock_state();
            let count = state.gpus.len() as u32;
            let gpu = state
                .gpus
                .get_mut(index as usize)
                .ok_or(BackendError::NoSuchGpu { index, count })?;
            let uuid = gpu.device.uuid.clone();
            drop(state);
            self.write_misbehaviour(&uuid, injection)?;
            let mut state = self.lock_state();
            let gpu = &mut state.gpus[index as usize];
            match injection {
                Injection::Hang | Injection::HangCollective | Injection::Slow(_) => {
                    gpu.misbehaving = true;
                    None
                }
                Injection::Xid(xid) => {
                    gpu.broken |=
                        Fault::Xid(xid).implied_health() != crate::health::Health::Healthy;
                    if xid == 79 {
                        gpu.lost = true;
                    }
                    Some(Fault::Xid(xid))
                }
                Injection::DoubleBitEcc => {
                    gpu.broken = true;
                    gpu.ecc_uncorrected += 1;
                    Some(Fault::DoubleBitEcc)
                }
                Injection::EccStorm => {
                    gpu.broken = true;
                    gpu.ecc_storm = true;
                    None // seen by the next sample
                }
                Injection::GpuLost => {
                    gpu.broken = true;
                    gpu.lost = true;
                    Some(Fault::GpuLost)
                }
                Injection::Overheat => {
                    gpu.overheating = true;
                    None // seen by the next sample
                }
                Injection::Recover => {
                    gpu.misbehaving = false;
                    gpu.broken = false;
                    gpu.lost = false;
                    gpu.overheating = false;
                    gpu.ecc_storm = false;
                    None
                }
            }
        };
        if let Some(fault) = fault
            && let Some(tx) = self.events.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            // A closed channel means the agent is shutting down; nothing left to tell.
            let _ = tx.send(GpuEvent { index, fault });
        }
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GpuBackend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn inventory(&self) -> Result<Vec<GpuDevice>, BackendError> {
        Ok(self.lock_state().gpus.iter().map(|g| g.device.clone()).collect())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, BackendError> {
        let model = self.model;
        let mut state = self.lock_state();
        let SimState { gpus, rng } = &mut *state;
        let mut samples = Vec::with_capacity(gpus.len());
        for gpu in gpus.iter_mut().filter(|g| !g.lost) {
            // Utilisation drifts like a training job's: high, with dips at step boundaries.
            gpu.util = (gpu.util + rng.random_range(-6.0..6.0)).clamp(20.0, 100.0);
            let idle_w = model.tdp_w * 0.12;
            let power =
                idle_w + (model.tdp_w - idle_w) * gpu.util / 100.0 + rng.random_range(-8.0..8.0);
            let mut temp = 32.0 + 48.0 * power / model.tdp_w + rng.random_range(-1.0..1.0);
            if gpu.overheating {
                temp = model.slowdown_c + rng.random_range(1.0..6.0);
            }
            gpu.energy_mj += (power * 1000.0) as u64; // one second at this power
            if gpu.ecc_storm {
                gpu.ecc_corrected += rng.random_range(500..2000);
            } else if rng.random_bool(0.01) {
                gpu.ecc_corrected += 1;
            }
            if rng.random_bool(0.002) {
                gpu.pcie_replays += 1;
            }
            let used = (gpu.device.memory_bytes as f64 * f64::from(gpu.util) / 110.0) as u64;
            samples.push(GpuSample {
                index: gpu.device.index,
                temperature_c: temp,
                memory_temperature_c: temp + 6.0,
                power_w: power,
                energy_mj: gpu.energy_mj,
                gpu_util_pct: gpu.util,
                mem_copy_util_pct: gpu.util * 0.45,
                memory_used_bytes: used,
                memory_free_bytes: gpu.device.memory_bytes - used,
                sm_clock_mhz: if gpu.overheating {
                    model.sm_clock_mhz * 6 / 10
                } else {
                    model.sm_clock_mhz
                },
                mem_clock_mhz: model.mem_clock_mhz,
                ecc_corrected_volatile: gpu.ecc_corrected,
                ecc_uncorrected_volatile: gpu.ecc_uncorrected,
                retired_pages: 0,
                retired_pages_pending: false,
                remapped_rows_correctable: 0,
                remapped_rows_uncorrectable: 0,
                row_remap_failure: false,
                // 0x20 = SW thermal slowdown, as NVML reports it.
                throttle_reasons: if gpu.overheating { 0x20 } else { 0 },
                pcie_replay_count: gpu.pcie_replays,
                slowdown_temperature_c: model.slowdown_c,
                nvlink_errors: Default::default(),
            });
        }
        Ok(samples)
    }

    fn watch_events(&self, events: mpsc::UnboundedSender<GpuEvent>) -> Result<(), BackendError> {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
        Ok(())
    }

    fn validate(&self, index: u32) -> Result<bool, BackendError> {
        let state = self.lock_state();
        let count = state.gpus.len() as u32;
        let gpu = state.gpus.get(index as usize).ok_or(BackendError::NoSuchGpu { index, count })?;
        Ok(!gpu.broken && !gpu.lost && !gpu.overheating && !gpu.ecc_storm && !gpu.misbehaving)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::faults_from_sample;

    fn h100(node: &str, n: u32) -> SimulatedBackend {
        SimulatedBackend::new(node, n, find_model("h100").expect("known model"), 7)
    }

    #[test]
    fn inventory_is_seeded_and_distinct_per_node() {
        let a = h100("node-a", 8).inventory().expect("inventory");
        let again = h100("node-a", 8).inventory().expect("inventory");
        let b = h100("node-b", 8).inventory().expect("inventory");
        assert_eq!(a, again);
        assert_ne!(a[0].uuid, b[0].uuid);
        let uuids: std::collections::HashSet<_> = a.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 8);
        assert_eq!(a[3].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(a[3].memory_bytes, 80 << 30);
    }

    #[test]
    fn nvlink_domains_group_eight_gpus() {
        let inv = h100("n", 12).inventory().expect("inventory");
        assert_eq!(inv[0].nvlink_peers, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(inv[0].topology_domain, "n/nvl0");
        assert_eq!(inv[9].nvlink_peers, vec![8, 10, 11]);
        assert_eq!(inv[9].topology_domain, "n/nvl1");
    }

    #[test]
    fn telemetry_is_believable() {
        let sim = h100("n", 4);
        for _ in 0..50 {
            for s in sim.sample().expect("sample") {
                assert!((20.0..=100.0).contains(&s.gpu_util_pct), "{s:?}");
                assert!(s.power_w > 0.0 && s.power_w < 760.0, "{s:?}");
                assert!(s.temperature_c > 25.0 && s.temperature_c < 90.0, "{s:?}");
                assert_eq!(s.memory_used_bytes + s.memory_free_bytes, 80 << 30);
            }
        }
    }

    #[test]
    fn unknown_model_is_a_clear_error() {
        let err = find_model("V99").expect_err("unknown model").to_string();
        assert!(err.contains("--gpu-model") && err.contains("V99"), "{err}");
    }

    #[test]
    fn injected_xid_is_delivered_and_validation_waits_for_recovery() {
        let sim = h100("n", 4);
        let (tx, mut rx) = mpsc::unbounded_channel();
        sim.watch_events(tx).expect("watch");
        sim.inject(2, Injection::Xid(79)).expect("inject");
        assert_eq!(rx.try_recv().expect("event"), GpuEvent { index: 2, fault: Fault::Xid(79) });
        assert_eq!(sim.sample().expect("sample").len(), 3, "lost GPU must not answer");
        assert!(!sim.validate(2).expect("validate"));
        sim.inject(2, Injection::Recover).expect("recover");
        assert!(sim.validate(2).expect("validate"));
        assert_eq!(sim.sample().expect("sample").len(), 4);
    }

    #[test]
    fn hangs_and_slowness_are_written_for_the_workers_and_fail_validation() {
        let sim = h100("n", 2);
        let err = sim.inject(0, Injection::Hang).expect_err("no directory yet");
        assert!(err.to_string().contains("needs an agent that runs workers"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        sim.misbehave_through(dir.path().join("sim"));
        let uuid = sim.inventory().expect("inventory")[1].uuid.clone();
        let file = dir.path().join("sim").join(&uuid);
        sim.inject(1, Injection::Slow(300)).expect("slow");
        assert_eq!(std::fs::read_to_string(&file).expect("file"), "slow 300");
        assert!(!sim.validate(1).expect("validate"), "a slow GPU fails validation");
        sim.inject(1, Injection::HangCollective).expect("hang");
        assert_eq!(std::fs::read_to_string(&file).expect("file"), "hang_collective");
        sim.inject(1, Injection::Recover).expect("recover");
        assert!(!file.exists(), "recovery removes the file");
        assert!(sim.validate(1).expect("validate"));
        let parsed: Injection = serde_json::from_str(r#"{"slow": 250}"#).expect("json");
        assert_eq!(parsed, Injection::Slow(250));
    }

    #[test]
    fn application_xid_leaves_validation_passing() {
        let sim = h100("n", 2);
        sim.inject(1, Injection::Xid(13)).expect("inject");
        assert!(sim.validate(1).expect("validate"));
    }

    #[test]
    fn storm_and_heat_show_in_samples() {
        let sim = h100("n", 2);
        let before = sim.sample().expect("sample");
        sim.inject(0, Injection::EccStorm).expect("inject");
        sim.inject(1, Injection::Overheat).expect("inject");
        let after = sim.sample().expect("sample");
        let storm = faults_from_sample(Some(&before[0].signals()), &after[0].signals());
        assert_eq!(storm, vec![Fault::SingleBitEccStorm]);
        let heat = faults_from_sample(Some(&before[1].signals()), &after[1].signals());
        assert_eq!(heat, vec![Fault::Overheating]);
    }

    #[test]
    fn out_of_range_gpu_is_refused() {
        let err = h100("n", 2).inject(5, Injection::GpuLost).expect_err("index 5 of 2");
        assert_eq!(err.to_string(), "gpu index 5 out of range: expected 0..2");
    }
}
