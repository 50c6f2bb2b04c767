//! Where a rig's agents get their GPUs: the simulated backend, or the NVML backend loading the
//! stand-in `libnvidia-ml.so.1` (`flotilla-nvml-mock`); and faults injected into either the same
//! way, so one scenario runs on both.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use flotilla_nvml_mock::{Command as NvmlCommand, MockNode};

use crate::binaries::binary;
use crate::wait::{WAIT, eventually};

/// The GPU backend of an agent (`flotilla-agent run --backend …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Simulated GPUs; faults through the agent's admin server.
    Simulated,
    /// NVML, on the stand-in library; faults through its control directory.
    Nvml,
}

impl Backend {
    /// The value of `FLOTILLA_BACKEND`.
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Simulated => "simulated",
            Backend::Nvml => "nvml",
        }
    }
}

/// A fault as a test names it; each backend is told in its own terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An XID, delivered as a critical XID event.
    Xid(u32),
    /// A double-bit (uncorrected) ECC error.
    DoubleBitEcc,
    /// Core temperature above the slowdown threshold.
    Overheat,
    /// The GPU fell off the bus: it answers nothing.
    Lost,
    /// The hardware is fine again (answers, cool, volatile ECC counters cleared).
    Recover,
    /// Simulated only: the GPU's workers stop stepping but stay alive.
    Hang,
    /// Simulated only: the GPU's workers enter the all-reduce and never send their data.
    HangCollective,
    /// Simulated only: the GPU's workers compute this many percent as slowly.
    Slow(u32),
}

/// Over the stand-in H100's 90 °C slowdown threshold.
const HOT_CELSIUS: u32 = 95;

impl Fault {
    /// The stand-in library's command for this fault on `gpu`.
    fn nvml_command(self, gpu: u32) -> NvmlCommand {
        match self {
            Fault::Xid(code) => NvmlCommand::Xid { gpu, code: u64::from(code) },
            Fault::DoubleBitEcc => NvmlCommand::EccDbe { gpu },
            Fault::Overheat => NvmlCommand::Temp { gpu, celsius: HOT_CELSIUS },
            Fault::Lost => NvmlCommand::Lost { gpu },
            Fault::Recover => NvmlCommand::Recover { gpu },
            Fault::Hang | Fault::HangCollective | Fault::Slow(_) => {
                panic!("{self:?} acts through the workers of simulated GPUs only")
            }
        }
    }

    /// `flotilla-agent inject` arguments for this fault.
    fn inject_args(self) -> Vec<String> {
        let fault = match self {
            Fault::Xid(xid) => return vec!["--xid".into(), xid.to_string()],
            Fault::DoubleBitEcc => "double_bit_ecc",
            Fault::Overheat => "overheat",
            Fault::Lost => "gpu_lost",
            Fault::Recover => "recover",
            Fault::Hang => "hang",
            Fault::HangCollective => "hang_collective",
            Fault::Slow(pct) => return vec!["--fault".into(), format!("slow={pct}")],
        };
        vec!["--fault".into(), fault.into()]
    }
}

/// The GPUs of one agent: simulated, or a stand-in NVML node of its own.
#[derive(Debug)]
pub enum AgentGpus {
    /// `--backend simulated`.
    Simulated,
    /// `--backend nvml` on this stand-in.
    Nvml(MockNode),
}

impl AgentGpus {
    /// `gpus` GPUs of `backend` for `node`; a stand-in keeps its files under `dir/nvml-<node>`
    /// and is seeded with the node name (so every node has GPUs of its own).
    pub fn new(backend: Backend, node: &str, gpus: u32, dir: &Path) -> AgentGpus {
        match backend {
            Backend::Simulated => AgentGpus::Simulated,
            Backend::Nvml => {
                let root = dir.join(format!("nvml-{node}"));
                std::fs::create_dir_all(&root).expect("stand-in NVML directory");
                let config = format!("gpus {gpus}\nseed {node}\n");
                AgentGpus::Nvml(MockNode::new(&root, &config).expect("stand-in NVML set up"))
            }
        }
    }

    /// Which backend.
    pub fn backend(&self) -> Backend {
        match self {
            AgentGpus::Simulated => Backend::Simulated,
            AgentGpus::Nvml(_) => Backend::Nvml,
        }
    }

    /// The agent's environment for this backend.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = vec![("FLOTILLA_BACKEND", OsString::from(self.backend().flag()))];
        if let AgentGpus::Nvml(mock) = self {
            env.extend(mock.env().map(|(k, v)| (k, v.into_os_string())));
        }
        env
    }

    /// Injects `fault` into GPU `gpu` of the agent whose admin server listens on `admin`.
    pub fn inject(&self, admin: u16, gpu: u32, fault: Fault) {
        match self {
            AgentGpus::Nvml(mock) => {
                mock.send(fault.nvml_command(gpu)).expect("command to the stand-in NVML")
            }
            AgentGpus::Simulated => {
                let out = Command::new(binary("flotilla-agent", "flotilla-agent"))
                    .args(["inject", "--agent", &format!("127.0.0.1:{admin}")])
                    .args(["--gpu", &gpu.to_string()])
                    .args(fault.inject_args())
                    .output()
                    .expect("flotilla-agent inject");
                assert!(out.status.success(), "inject: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    /// Waits until faults are seen: for NVML, until the agent's event loop registered `gpus`
    /// GPUs with the stand-in (an XID raised before that would wait in no event set); the
    /// simulated backend delivers at once.
    pub async fn armed(&self, gpus: usize) -> anyhow::Result<()> {
        let AgentGpus::Nvml(mock) = self else { return Ok(()) };
        eventually(WAIT, &format!("the NVML event loop registering {gpus} GPUs"), || async {
            (mock.log().matches("register gpu=").count() >= gpus).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; stand-in log:\n{}", mock.log()))
    }

    /// The stand-in, for NVML.
    pub fn stand_in(&self) -> Option<&MockNode> {
        match self {
            AgentGpus::Nvml(mock) => Some(mock),
            AgentGpus::Simulated => None,
        }
    }
}

/// `flotilla-agent clear`: an admin clears GPU `gpu` of the agent on `admin` (Failed/Degraded
/// lifted, as after a repair).
pub fn clear_at(admin: u16, gpu: u32) {
    let out = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .args(["clear", "--agent", &format!("127.0.0.1:{admin}"), "--gpu", &gpu.to_string()])
        .output()
        .expect("flotilla-agent clear");
    assert!(out.status.success(), "clear: {}", String::from_utf8_lossy(&out.stderr));
}
