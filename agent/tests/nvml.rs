//! The real `flotilla-agent` binary with `--backend nvml`, loading the stand-in NVML library
//! (`flotilla-nvml-mock`) as `libnvidia-ml.so.1` through `LD_LIBRARY_PATH`, against the
//! operator's agent server: inventory, samples, DCGM metrics, the event loop and every fault class,
//! compared with the simulated backend.

mod common;

use common::*;
use flotilla_agent::backend::simulated::Injection;
use flotilla_nvml_mock::{Command, MockNode, NvLinkCounter};
use flotilla_operator::agents::state::{GpuHealth, GpuRecord};
use flotilla_operator::agents::{GpuAction, NodeRegistry};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A `flotilla-agent run --backend nvml` process on the stand-in library.
struct NvmlAgent {
    mock: MockNode,
    _child: tokio::process::Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

/// `flotilla-agent run --backend nvml` with `env` (the stand-in's, or none), logs in `dir`.
fn agent_command(
    dir: &Path,
    node: &str,
    operator: &str,
    certs: Option<&Certs>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
    cmd.args(["run", "--node", node, "--backend", "nvml", "--sample-interval-ms", "200"])
        .args(["--operator", operator])
        .arg("--worker-log-dir")
        .arg(dir.join("logs"))
        .arg("--worker-socket-dir")
        .arg(dir.join("s"))
        .env("FLOTILLA_LOG", "info")
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(certs) = certs {
        let files = certs.client(node);
        cmd.arg("--tls-ca").arg(files.ca).arg("--tls-cert").arg(files.cert);
        cmd.arg("--tls-key").arg(files.key);
    }
    cmd
}

impl NvmlAgent {
    async fn start(node: &str, op: SocketAddr, certs: &Certs, config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mock = MockNode::new(dir.path(), config).expect("stand-in NVML set up");
        let admin = free_port();
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let mut cmd = agent_command(dir.path(), node, &format!("https://{op}"), Some(certs));
        cmd.envs(mock.env())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("agent starts");
        Self { mock, _child: child, admin, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        flotilla_agent::admin::get_text(&self.admin.to_string(), "/metrics")
            .await
            .unwrap_or_default()
    }

    fn send(&self, command: Command) {
        self.mock.send(command).expect("command written");
    }

    /// Waits until the event loop registered `gpus` GPUs (the stand-in logs each registration).
    async fn events_registered(&self, gpus: usize) {
        let ok = eventually(|| self.mock.log().matches("register gpu=").count() >= gpus).await;
        assert!(
            ok,
            "event registration not seen; stand-in log:\n{}\nagent log:\n{}",
            self.mock.log(),
            self.log()
        );
    }
}

async fn registered_or_log(fleet: &NodeRegistry, node: &str, agent: &NvmlAgent) {
    let ok = fleet.wait_for(PATIENCE, |f| f.node(node).is_some_and(|n| n.connected)).await;
    assert!(ok, "{node} did not register; agent log:\n{}", agent.log());
}

fn gpu(fleet: &NodeRegistry, node: &str, index: usize) -> Option<GpuRecord> {
    fleet.node(node).and_then(|n| n.gpus.get(index).cloned())
}

/// The value of `name{gpu="<gpu>",...}` in a Prometheus text page.
fn metric(page: &str, name: &str, gpu: u32) -> Option<f64> {
    let gpu = format!("gpu=\"{gpu}\"");
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&gpu))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

#[tokio::test]
async fn inventory_samples_and_dcgm_metrics_come_through_nvml() {
    let certs = Certs::new(&["nv-a"]);
    let fleet = NodeRegistry::new();
    let op = operator("127.0.0.1:0", fleet.clone(), Some(&certs), fast_config()).await;
    let agent = NvmlAgent::start("nv-a", op.addr, &certs, "gpus 8\nmodel H100\nseed nv-a\n").await;
    registered_or_log(&fleet, "nv-a", &agent).await;

    let node = fleet.node("nv-a").expect("node");
    assert_eq!(node.backend, "nvml");
    assert_eq!(node.gpus.len(), 8);
    let mut uuids: Vec<&str> = node.gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert!(uuids.iter().all(|u| u.starts_with("GPU-") && u.len() == 40), "{uuids:?}");
    uuids.dedup();
    assert_eq!(uuids.len(), 8, "UUIDs are distinct");
    let g0 = &node.gpus[0];
    assert_eq!(g0.model, "NVIDIA H100 80GB HBM3");
    assert_eq!(g0.memory_bytes, 80 << 30);
    assert_eq!(g0.pci_bus_id, "00000000:18:00.0");
    assert_eq!(node.gpus[7].pci_bus_id, "00000000:DB:00.0");
    // 18 links per GPU, all to NVSwitches: one switch domain, every GPU a peer of every other.
    assert_eq!(g0.nvlink_peers, (1..8).collect::<Vec<u32>>());
    assert_eq!(g0.topology_domain, "nv-a/nvl0");

    // Samples reach the operator with the stand-in's readings (GPU 0: 33 °C, 512 MiB used).
    let sampled = eventually(|| {
        gpu(&fleet, "nv-a", 0).is_some_and(|g| {
            g.temperature_c == Some(33.0) && g.memory_used_bytes == Some(512 << 20)
        })
    })
    .await;
    assert!(sampled, "samples: {:?}", gpu(&fleet, "nv-a", 0));

    // The event loop registered XID, double- and single-bit ECC on every GPU (0x1|0x2|0x8).
    agent.events_registered(8).await;
    for index in 0..8 {
        assert!(
            agent.mock.log().contains(&format!("register gpu={index} types=0xb")),
            "{}",
            agent.mock.log()
        );
    }

    // DCGM-named metrics carry what NVML returned, field values and NVLink counters included.
    agent.send(Command::NvLink { gpu: 3, counter: NvLinkCounter::CrcFlit, count: 7 });
    agent.send(Command::NvLink { gpu: 3, counter: NvLinkCounter::Replay, count: 2 });
    agent.send(Command::NvLink { gpu: 3, counter: NvLinkCounter::Recovery, count: 1 });
    agent.send(Command::NvLink { gpu: 3, counter: NvLinkCounter::CrcData, count: 5 });
    agent.send(Command::EccDbe { gpu: 6 });
    let mut page = String::new();
    let seen = tokio::time::timeout(PATIENCE, async {
        loop {
            page = agent.metrics().await;
            if metric(&page, "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 3) == Some(7.0)
                && metric(&page, "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 6) == Some(1.0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "NVLink / remapped-row counters not exported:\n{page}");
    let expected = [
        ("DCGM_FI_DEV_GPU_TEMP", 0, 33.0),
        ("DCGM_FI_DEV_MEMORY_TEMP", 0, 41.0),
        ("DCGM_FI_DEV_POWER_USAGE", 0, 69.0),
        ("DCGM_FI_DEV_FB_USED", 0, 512.0),
        ("DCGM_FI_DEV_FB_FREE", 0, (80 << 10) as f64 - 512.0 - 452.0),
        ("DCGM_FI_DEV_SM_CLOCK", 0, 1980.0),
        ("DCGM_FI_DEV_MEM_CLOCK", 0, 2619.0),
        ("DCGM_FI_DEV_GPU_UTIL", 0, 0.0),
        ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 0, 0.0),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", 0, 0.0),
        ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", 3, 5.0),
        ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", 3, 2.0),
        ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", 3, 1.0),
        ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 2, 0.0),
        ("flotilla_gpu_health_state", 6, 2.0),
    ];
    for (name, gpu, value) in expected {
        assert_eq!(metric(&page, name, gpu), Some(value), "{name} of GPU {gpu}:\n{page}");
    }
    let energy = metric(&page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0).expect("energy");
    assert!(energy >= 1e9, "energy counter from NVML, mJ: {energy}");
    op.stop().await;
}

/// One fault of the comparison: what the stand-in is told, what the simulation is told.
struct Case {
    gpu: u32,
    nvml: &'static [Command],
    sim: &'static [Injection],
    health: GpuHealth,
    reason: &'static str,
}

const CASES: &[Case] = &[
    Case {
        gpu: 0,
        nvml: &[Command::Xid { gpu: 0, code: 13 }],
        sim: &[Injection::Xid(13)],
        health: GpuHealth::Healthy,
        reason: "",
    },
    Case {
        gpu: 1,
        nvml: &[Command::Xid { gpu: 1, code: 79 }],
        sim: &[Injection::Xid(79)],
        health: GpuHealth::Failed,
        reason: "Xid79",
    },
    Case {
        gpu: 2,
        nvml: &[Command::EccDbe { gpu: 2 }],
        sim: &[Injection::DoubleBitEcc],
        health: GpuHealth::Failed,
        reason: "DoubleBitEcc",
    },
    Case {
        gpu: 3,
        nvml: &[Command::EccSbe { gpu: 3, count: 500 }],
        sim: &[Injection::EccStorm],
        health: GpuHealth::Degraded,
        reason: "SingleBitEccStorm",
    },
    Case {
        gpu: 4,
        nvml: &[Command::Temp { gpu: 4, celsius: 95 }],
        sim: &[Injection::Overheat],
        health: GpuHealth::Degraded,
        reason: "Overheating",
    },
    Case {
        gpu: 5,
        nvml: &[Command::Lost { gpu: 5 }],
        sim: &[Injection::GpuLost],
        health: GpuHealth::Failed,
        reason: "GpuLost",
    },
    Case {
        gpu: 6,
        nvml: &[Command::Xid { gpu: 6, code: 63 }],
        sim: &[Injection::Xid(63)],
        health: GpuHealth::Degraded,
        reason: "Xid63",
    },
];

/// (health, reason, message, last XID) of every GPU of `node`.
fn verdicts(fleet: &NodeRegistry, node: &str) -> Vec<(GpuHealth, String, String, u32)> {
    let gpus = fleet.node(node).map(|n| n.gpus).unwrap_or_default();
    gpus.into_iter().map(|g| (g.health, g.reason, g.message, g.last_xid)).collect()
}

async fn same_verdicts(fleet: &NodeRegistry, nvml: &NvmlAgent, what: &str) {
    let same = eventually(|| {
        let (n, s) = (verdicts(fleet, "nv-b"), verdicts(fleet, "sim-b"));
        n.len() == 8 && n == s
    })
    .await;
    assert!(
        same,
        "{what}: NVML and simulated verdicts differ\n nvml: {:#?}\n sim:  {:#?}\nstand-in log:\n{}",
        verdicts(fleet, "nv-b"),
        verdicts(fleet, "sim-b"),
        nvml.mock.log()
    );
}

#[tokio::test]
async fn every_fault_class_through_nvml_gives_the_simulated_backends_verdict_and_event() {
    let certs = Certs::new(&["nv-b", "sim-b"]);
    let fleet = NodeRegistry::new();
    let op = operator("127.0.0.1:0", fleet.clone(), Some(&certs), fast_config()).await;
    let nvml = NvmlAgent::start("nv-b", op.addr, &certs, "gpus 8\nseed nv-b\n").await;
    let mut options = agent_options("sim-b", op.addr, Some(certs.client("sim-b")), 8);
    options.sample_interval = Duration::from_millis(200);
    let sim_agent = agent(options).await;
    let sim = sim_agent.sim.clone().expect("simulated");
    registered_or_log(&fleet, "nv-b", &nvml).await;
    registered(&fleet, "sim-b").await;
    nvml.events_registered(8).await;

    for case in CASES {
        for &c in case.nvml {
            nvml.send(c);
        }
        for &i in case.sim {
            sim.inject(case.gpu, i).expect("inject");
        }
    }
    let reached = eventually(|| {
        CASES.iter().all(|c| {
            gpu(&fleet, "nv-b", c.gpu as usize)
                .is_some_and(|g| g.health == c.health && g.reason == c.reason)
        })
    })
    .await;
    assert!(
        reached,
        "NVML verdicts: {:#?}\nstand-in log:\n{}",
        verdicts(&fleet, "nv-b"),
        nvml.mock.log()
    );
    same_verdicts(&fleet, &nvml, "after the faults").await;
    assert_eq!(gpu(&fleet, "nv-b", 0).map(|g| g.last_xid), Some(13), "XID 13 recorded, GPU kept");
    assert_eq!(gpu(&fleet, "nv-b", 7).map(|g| g.health), Some(GpuHealth::Healthy));

    // Each XID is delivered once by the event set and reaches the operator as one event.
    let log = nvml.mock.log();
    assert_eq!(log.matches("deliver gpu=1 type=0x8 data=79").count(), 1, "{log}");
    let page = nvml.metrics().await;
    let xid79 = page
        .lines()
        .find(|l| l.starts_with("flotilla_gpu_xid_events_total{") && l.contains("xid=\"79\""));
    assert!(xid79.is_some(), "XID 79 counted:\n{page}");

    // Recovery: the hot GPU cools (the verdict lifts by itself); the lost GPU answers again and
    // passes validation; both backends end the same.
    nvml.send(Command::Temp { gpu: 4, celsius: 40 });
    sim.inject(4, Injection::Recover).expect("recover");
    nvml.send(Command::Recover { gpu: 5 });
    sim.inject(5, Injection::Recover).expect("recover");
    let cooled = eventually(|| {
        gpu(&fleet, "nv-b", 4).is_some_and(|g| g.health == GpuHealth::Healthy)
            && gpu(&fleet, "sim-b", 4).is_some_and(|g| g.health == GpuHealth::Healthy)
    })
    .await;
    assert!(cooled, "{:#?}", verdicts(&fleet, "nv-b"));
    tokio::time::sleep(Duration::from_millis(500)).await; // a sample of the recovered GPU
    for node in ["nv-b", "sim-b"] {
        let uuid = gpu(&fleet, node, 5).expect("gpu 5").uuid;
        let out = op.server.gpu_command(node, &uuid, GpuAction::Validate, PATIENCE).await;
        assert!(out.is_ok(), "{node}: validate {out:?}");
    }
    // A GPU still faulty fails validation through NVML (uncorrected ECC error pending).
    let uuid = gpu(&fleet, "nv-b", 2).expect("gpu 2").uuid;
    let out = op.server.gpu_command("nv-b", &uuid, GpuAction::Validate, PATIENCE).await;
    assert!(out.is_err(), "GPU 2 with an uncorrected ECC error passed validation: {out:?}");
    let revived = eventually(|| {
        gpu(&fleet, "nv-b", 5)
            .is_some_and(|g| g.health == GpuHealth::Healthy && g.reason == "Validated")
    })
    .await;
    assert!(revived, "{:#?}", verdicts(&fleet, "nv-b"));
    same_verdicts(&fleet, &nvml, "after recovery").await;
    drop(sim_agent);
    op.stop().await;
}

/// Runs the agent with `env` until it exits; returns (success, everything it printed).
async fn run_to_exit(env: &[(&str, PathBuf)]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = agent_command(dir.path(), "nv-c", "http://127.0.0.1:9", None);
    cmd.envs(env.iter().cloned()).arg("--admin-addr").arg(free_port().to_string());
    let out =
        tokio::time::timeout(PATIENCE, cmd.output()).await.expect("agent exits").expect("runs");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn error_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{text}"))
}

#[tokio::test]
async fn missing_library_and_unloaded_driver_each_fail_with_one_clear_sentence() {
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver, so the library is not missing");
        return;
    }
    let empty = tempfile::tempdir().expect("tempdir");
    let (ok, text) = run_to_exit(&[("LD_LIBRARY_PATH", empty.path().to_path_buf())]).await;
    assert!(!ok, "started without NVML:\n{text}");
    let line = error_line(&text);
    assert!(
        line.contains("the library could not be loaded") && line.contains("libnvidia-ml.so.1"),
        "{line}"
    );
    assert!(line.contains("--backend simulated"), "{line}");
    assert_eq!(text.matches("Error: ").count(), 1, "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockNode::new(dir.path(), "init driver-not-loaded\n").expect("stand-in");
    let (ok, text) = run_to_exit(&mock.env()).await;
    assert!(!ok, "started without a driver:\n{text}");
    let line = error_line(&text);
    assert!(line.contains("the NVIDIA kernel driver is not loaded"), "{line}");
    assert!(line.contains("--backend simulated"), "{line}");
    assert!(!text.contains("Caused by"), "one sentence, no chain:\n{text}");
}
