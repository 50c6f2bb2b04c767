//! The simulated GPUs behind the ABI: plain data, changed by [`Command`]s, read by `abi.rs`.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

/// A GPU model the stand-in can pretend to be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Short name used in the config file ("H100").
    pub short: &'static str,
    /// Name as NVML reports it (the same as the agent's simulated backend reports).
    pub name: &'static str,
    /// Memory, GiB.
    pub memory_gib: u64,
    /// Slowdown temperature, °C.
    pub slowdown_c: u32,
    /// Shutdown temperature, °C.
    pub shutdown_c: u32,
    /// Max SM clock, MHz.
    pub sm_clock_mhz: u32,
    /// Memory clock, MHz.
    pub mem_clock_mhz: u32,
    /// NVLinks per GPU (0: PCIe only, NVLink calls answer NOT_SUPPORTED).
    pub nvlinks: u32,
    /// PCI device id (vendor 0x10de in the low half).
    pub pci_device_id: u32,
}

/// Models known to the stand-in.
pub const MODELS: &[Model] = &[
    Model {
        short: "H100",
        name: "NVIDIA H100 80GB HBM3",
        memory_gib: 80,
        slowdown_c: 90,
        shutdown_c: 92,
        sm_clock_mhz: 1980,
        mem_clock_mhz: 2619,
        nvlinks: 18,
        pci_device_id: 0x2330_10de,
    },
    Model {
        short: "H200",
        name: "NVIDIA H200",
        memory_gib: 141,
        slowdown_c: 90,
        shutdown_c: 92,
        sm_clock_mhz: 1980,
        mem_clock_mhz: 3201,
        nvlinks: 18,
        pci_device_id: 0x2335_10de,
    },
    Model {
        short: "A100",
        name: "NVIDIA A100-SXM4-80GB",
        memory_gib: 80,
        slowdown_c: 88,
        shutdown_c: 92,
        sm_clock_mhz: 1410,
        mem_clock_mhz: 1593,
        nvlinks: 12,
        pci_device_id: 0x20b2_10de,
    },
    Model {
        short: "L40S",
        name: "NVIDIA L40S",
        memory_gib: 48,
        slowdown_c: 88,
        shutdown_c: 92,
        sm_clock_mhz: 2520,
        mem_clock_mhz: 9001,
        nvlinks: 0,
        pci_device_id: 0x26b9_10de,
    },
];

/// Bus numbers of the eight GPUs of an HGX H100 board, in NVML index order.
const HGX_BUSES: [u32; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];
/// NVSwitches of an HGX board; NVLink `l` of every GPU ends at switch `l % NVSWITCHES`.
pub const NVSWITCHES: u32 = 4;

/// How `nvmlInit_v2` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// Initialises.
    Ok,
    /// NVML_ERROR_DRIVER_NOT_LOADED: the library is there, the kernel module is not.
    DriverNotLoaded,
    /// NVML_ERROR_NO_PERMISSION: /dev/nvidia* not accessible.
    NoPermission,
}

/// The node the stand-in pretends to be: read from `<control dir>/config` at `nvmlInit_v2`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// GPUs on the node.
    pub gpus: u32,
    /// Their model.
    pub model: Model,
    /// Mixed into the UUIDs, so two stand-ins (two nodes) have different GPUs.
    pub seed: String,
    /// How initialisation answers.
    pub init: InitOutcome,
}

impl Default for Config {
    fn default() -> Self {
        Self { gpus: 8, model: MODELS[0], seed: String::new(), init: InitOutcome::Ok }
    }
}

impl Config {
    /// Parses `key value` lines (`gpus 8`, `model H200`, `seed node-a`,
    /// `init driver-not-loaded|no-permission|ok`); `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut config = Self::default();
        for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()) {
            let Some((key, value)) = line.split_once(char::is_whitespace) else {
                if line.is_empty() {
                    continue;
                }
                return Err(format!("config line {line:?}: expected `key value`"));
            };
            let value = value.trim();
            match key {
                "gpus" => {
                    config.gpus = value
                        .parse()
                        .map_err(|_| format!("config gpus: expected a count, got {value:?}"))?;
                }
                "model" => {
                    config.model = *MODELS
                        .iter()
                        .find(|m| m.short.eq_ignore_ascii_case(value))
                        .ok_or_else(|| format!("config model: unknown model {value:?}"))?;
                }
                "seed" => config.seed = value.to_owned(),
                "init" => {
                    config.init = match value {
                        "ok" => InitOutcome::Ok,
                        "driver-not-loaded" => InitOutcome::DriverNotLoaded,
                        "no-permission" => InitOutcome::NoPermission,
                        _ => return Err(format!("config init: unknown outcome {value:?}")),
                    };
                }
                _ => return Err(format!("config: unknown key {key:?}")),
            }
        }
        Ok(config)
    }
}

/// NVLink error counters, as `nvmlNvLinkErrorCounter_t` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvLinkCounter {
    /// NVML_NVLINK_ERROR_DL_REPLAY.
    Replay = 0,
    /// NVML_NVLINK_ERROR_DL_RECOVERY.
    Recovery = 1,
    /// NVML_NVLINK_ERROR_DL_CRC_FLIT.
    CrcFlit = 2,
    /// NVML_NVLINK_ERROR_DL_CRC_DATA.
    CrcData = 3,
}

impl NvLinkCounter {
    const ALL: [(NvLinkCounter, &'static str); 4] = [
        (NvLinkCounter::Replay, "replay"),
        (NvLinkCounter::Recovery, "recovery"),
        (NvLinkCounter::CrcFlit, "crc-flit"),
        (NvLinkCounter::CrcData, "crc-data"),
    ];
}

/// A change the tests make while the agent runs: one line of `<control dir>/commands`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `xid GPU CODE`: a critical XID event, delivered once by `nvmlEventSetWait_v2`.
    Xid { gpu: u32, code: u64 },
    /// `ecc-sbe GPU COUNT`: COUNT corrected errors (volatile and aggregate) and one
    /// single-bit ECC event.
    EccSbe { gpu: u32, count: u64 },
    /// `ecc-dbe GPU`: one uncorrected error, a row remapped for it, and a double-bit ECC event.
    EccDbe { gpu: u32 },
    /// `remap-failure GPU`: row remapping failed (NVML_FI_DEV_REMAPPED_FAILURE = 1).
    RemapFailure { gpu: u32 },
    /// `temp GPU CELSIUS`: the core temperature from now on.
    Temp { gpu: u32, celsius: u32 },
    /// `nvlink GPU COUNTER COUNT`: COUNT errors on link 0 (`replay`, `recovery`, `crc-flit`,
    /// `crc-data`).
    NvLink { gpu: u32, counter: NvLinkCounter, count: u64 },
    /// `lost GPU`: the GPU fell off the bus; every call about it answers GPU_IS_LOST.
    Lost { gpu: u32 },
    /// `recover GPU`: as after a GPU reset: answers again, cool, volatile ECC counters and
    /// remap failure cleared.
    Recover { gpu: u32 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Command::Xid { gpu, code } => write!(f, "xid {gpu} {code}"),
            Command::EccSbe { gpu, count } => write!(f, "ecc-sbe {gpu} {count}"),
            Command::EccDbe { gpu } => write!(f, "ecc-dbe {gpu}"),
            Command::RemapFailure { gpu } => write!(f, "remap-failure {gpu}"),
            Command::Temp { gpu, celsius } => write!(f, "temp {gpu} {celsius}"),
            Command::NvLink { gpu, counter, count } => {
                let name = NvLinkCounter::ALL.iter().find(|(c, _)| *c == counter).map(|p| p.1);
                write!(f, "nvlink {gpu} {} {count}", name.unwrap_or("?"))
            }
            Command::Lost { gpu } => write!(f, "lost {gpu}"),
            Command::Recover { gpu } => write!(f, "recover {gpu}"),
        }
    }
}

impl FromStr for Command {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("command {line:?}: expected a number as word {}", i + 1))
        };
        let gpu = || num(1).and_then(|g| u32::try_from(g).map_err(|e| e.to_string()));
        let command = match words.first().copied() {
            Some("xid") => Command::Xid { gpu: gpu()?, code: num(2)? },
            Some("ecc-sbe") => Command::EccSbe { gpu: gpu()?, count: num(2)? },
            Some("ecc-dbe") => Command::EccDbe { gpu: gpu()? },
            Some("remap-failure") => Command::RemapFailure { gpu: gpu()? },
            Some("temp") => Command::Temp {
                gpu: gpu()?,
                celsius: u32::try_from(num(2)?).map_err(|e| e.to_string())?,
            },
            Some("nvlink") => {
                let name = words.get(2).copied().unwrap_or("");
                let counter =
                    NvLinkCounter::ALL.iter().find(|(_, n)| *n == name).map(|p| p.0).ok_or_else(
                        || format!("command {line:?}: unknown NVLink counter {name:?}"),
                    )?;
                Command::NvLink { gpu: gpu()?, counter, count: num(3)? }
            }
            Some("lost") => Command::Lost { gpu: gpu()? },
            Some("recover") => Command::Recover { gpu: gpu()? },
            _ => return Err(format!("command {line:?}: unknown")),
        };
        Ok(command)
    }
}

/// nvmlEventType bits the stand-in delivers.
pub mod event_type {
    /// nvmlEventTypeSingleBitEccError.
    pub const SINGLE_BIT_ECC: u64 = 1;
    /// nvmlEventTypeDoubleBitEccError.
    pub const DOUBLE_BIT_ECC: u64 = 2;
    /// nvmlEventTypeXidCriticalError.
    pub const XID_CRITICAL: u64 = 8;
    /// Every type a GPU of the stand-in supports.
    pub const SUPPORTED: u64 = SINGLE_BIT_ECC | DOUBLE_BIT_ECC | XID_CRITICAL;
}

/// One simulated GPU.
#[derive(Clone, Debug)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// "GPU-…".
    pub uuid: String,
    /// PCI bus number.
    pub bus: u32,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Used memory, bytes.
    pub memory_used: u64,
    /// Core temperature, °C.
    pub temperature_c: u32,
    /// Memory (HBM) temperature, °C.
    pub memory_temperature_c: u32,
    /// Power draw, mW.
    pub power_mw: u32,
    /// GPU and memory-copy utilisation, %.
    pub util: (u32, u32),
    /// Corrected ECC errors (volatile, aggregate).
    pub ecc_corrected: (u64, u64),
    /// Uncorrected ECC errors (volatile, aggregate).
    pub ecc_uncorrected: (u64, u64),
    /// Rows remapped for correctable / uncorrectable errors.
    pub remapped_rows: (u64, u64),
    /// Row remapping failed.
    pub remap_failure: bool,
    /// NVLink error counters on link 0, indexed by [`NvLinkCounter`].
    pub nvlink_errors: [u64; 4],
    /// Fell off the bus.
    pub lost: bool,
}

/// An event waiting in an event set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    /// GPU index.
    pub gpu: u32,
    /// nvmlEventType bit.
    pub event_type: u64,
    /// The XID for XID events, 0 otherwise.
    pub data: u64,
}

/// An event set: what is registered on it and what waits to be delivered.
#[derive(Debug, Default)]
pub struct EventSet {
    /// Registered event types per GPU index.
    pub registered: Vec<(u32, u64)>,
    /// Events not yet delivered, oldest first.
    pub pending: VecDeque<PendingEvent>,
}

/// Every GPU of the node and the event sets.
#[derive(Debug)]
pub struct Node {
    /// The configuration it was built from.
    pub config: Config,
    /// GPUs by index.
    pub gpus: Vec<Gpu>,
    /// Event sets by id (`None` once freed).
    pub sets: Vec<Option<EventSet>>,
    /// When initialised; energy counters grow from here.
    pub started: Instant,
}

fn fnv(text: &str, salt: u64) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325 ^ salt, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Config {
    /// The UUID GPU `index` of this node reports: derived from the seed, so a test knows it.
    pub fn uuid(&self, index: u32) -> String {
        let h = fnv(&self.seed, u64::from(index) + 1);
        format!(
            "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            h >> 32,
            (h >> 16) & 0xffff,
            h & 0xffff,
            index,
            h & 0xffff_ffff_ffff
        )
    }
}

impl Node {
    /// GPUs as `config` describes them, idle and healthy.
    pub fn new(config: Config) -> Self {
        let m = config.model;
        let gpus = (0..config.gpus)
            .map(|index| {
                let bus = HGX_BUSES
                    .get(index as usize)
                    .copied()
                    .unwrap_or(0xe0 + index - HGX_BUSES.len() as u32)
                    & 0xff;
                Gpu {
                    index,
                    uuid: config.uuid(index),
                    bus,
                    memory_total: m.memory_gib << 30,
                    memory_used: 512 << 20,
                    temperature_c: 33 + index % 4,
                    memory_temperature_c: 41 + index % 3,
                    power_mw: 69_000 + 1_000 * (index % 5),
                    util: (0, 0),
                    ecc_corrected: (0, 0),
                    ecc_uncorrected: (0, 0),
                    remapped_rows: (0, 0),
                    remap_failure: false,
                    nvlink_errors: [0; 4],
                    lost: false,
                }
            })
            .collect();
        Self { config, gpus, sets: Vec::new(), started: Instant::now() }
    }

    /// Energy since initialisation plus a per-GPU offset, mJ (power × time).
    pub fn energy_mj(&self, gpu: &Gpu) -> u64 {
        let ms = self.started.elapsed().as_millis() as u64;
        1_000_000_000 + u64::from(gpu.index) * 1_000_000 + u64::from(gpu.power_mw) * ms / 1000
    }

    /// Queues an event on every set where `gpu` registered for its type.
    fn raise(&mut self, event: PendingEvent) {
        for set in self.sets.iter_mut().flatten() {
            let wanted = set
                .registered
                .iter()
                .any(|&(g, mask)| g == event.gpu && mask & event.event_type != 0);
            if wanted {
                set.pending.push_back(event);
            }
        }
    }

    /// Applies one command; an unknown GPU is an error.
    pub fn apply(&mut self, command: Command) -> Result<(), String> {
        let index = match command {
            Command::Xid { gpu, .. }
            | Command::EccSbe { gpu, .. }
            | Command::EccDbe { gpu }
            | Command::RemapFailure { gpu }
            | Command::Temp { gpu, .. }
            | Command::NvLink { gpu, .. }
            | Command::Lost { gpu }
            | Command::Recover { gpu } => gpu,
        };
        let count = self.gpus.len();
        let gpu = self
            .gpus
            .get_mut(index as usize)
            .ok_or_else(|| format!("{command}: GPU {index} out of range 0..{count}"))?;
        let event = |event_type, data| PendingEvent { gpu: index, event_type, data };
        match command {
            Command::Xid { code, .. } => self.raise(event(event_type::XID_CRITICAL, code)),
            Command::EccSbe { count, .. } => {
                gpu.ecc_corrected.0 += count;
                gpu.ecc_corrected.1 += count;
                self.raise(event(event_type::SINGLE_BIT_ECC, 0));
            }
            Command::EccDbe { .. } => {
                gpu.ecc_uncorrected.0 += 1;
                gpu.ecc_uncorrected.1 += 1;
                gpu.remapped_rows.1 += 1;
                self.raise(event(event_type::DOUBLE_BIT_ECC, 0));
            }
            Command::RemapFailure { .. } => gpu.remap_failure = true,
            Command::Temp { celsius, .. } => gpu.temperature_c = celsius,
            Command::NvLink { counter, count, .. } => gpu.nvlink_errors[counter as usize] += count,
            Command::Lost { .. } => gpu.lost = true,
            Command::Recover { .. } => {
                gpu.lost = false;
                gpu.temperature_c = 33 + index % 4;
                gpu.ecc_corrected.0 = 0;
                gpu.ecc_uncorrected.0 = 0;
                gpu.remap_failure = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_print_as_they_parse() {
        let all = [
            Command::Xid { gpu: 2, code: 79 },
            Command::EccSbe { gpu: 0, count: 500 },
            Command::EccDbe { gpu: 1 },
            Command::RemapFailure { gpu: 3 },
            Command::Temp { gpu: 0, celsius: 95 },
            Command::NvLink { gpu: 4, counter: NvLinkCounter::CrcFlit, count: 7 },
            Command::Lost { gpu: 5 },
            Command::Recover { gpu: 5 },
        ];
        for c in all {
            assert_eq!(c.to_string().parse::<Command>(), Ok(c), "{c}");
        }
        assert!("xid two 79".parse::<Command>().is_err());
        assert!("explode 1".parse::<Command>().is_err());
    }

    #[test]
    fn config_parses_and_rejects_unknown_keys() {
        let c =
            Config::parse("gpus 4\nmodel h200 # comment\nseed node-b\ninit driver-not-loaded\n")
                .expect("parses");
        assert_eq!((c.gpus, c.model.short, c.seed.as_str()), (4, "H200", "node-b"));
        assert_eq!(c.init, InitOutcome::DriverNotLoaded);
        assert!(Config::parse("colour blue").is_err());
        assert_eq!(Config::parse("").expect("empty is default"), Config::default());
    }

    #[test]
    fn events_reach_only_sets_registered_for_their_gpu_and_type() {
        let mut node = Node::new(Config::default());
        node.sets.push(Some(EventSet {
            registered: vec![(2, event_type::XID_CRITICAL)],
            ..Default::default()
        }));
        node.apply(Command::Xid { gpu: 1, code: 79 }).expect("gpu 1");
        node.apply(Command::EccDbe { gpu: 2 }).expect("gpu 2");
        node.apply(Command::Xid { gpu: 2, code: 79 }).expect("gpu 2");
        let set = node.sets[0].as_ref().expect("set");
        assert_eq!(
            set.pending.iter().copied().collect::<Vec<_>>(),
            vec![PendingEvent { gpu: 2, event_type: event_type::XID_CRITICAL, data: 79 }]
        );
        assert!(node.apply(Command::Lost { gpu: 8 }).is_err());
    }

    #[test]
    fn uuids_differ_between_gpus_and_seeds() {
        let a = Node::new(Config { seed: "a".into(), ..Config::default() });
        let b = Node::new(Config { seed: "b".into(), ..Config::default() });
        let mut uuids: Vec<&str> = a.gpus.iter().chain(&b.gpus).map(|g| g.uuid.as_str()).collect();
        uuids.sort_unstable();
        uuids.dedup();
        assert_eq!(uuids.len(), 16);
        assert!(
            a.gpus[0].uuid.starts_with("GPU-") && a.gpus[0].uuid.len() == 40,
            "{}",
            a.gpus[0].uuid
        );
    }
}
