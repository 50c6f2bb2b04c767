//! Agent footprint: the real `flotilla-agent` binary with 8 GPUs at 1 Hz, connected to an
//! in-process operator on 127.0.0.1 (plaintext). Prints RSS and CPU share over a window.
//!
//! Run: `cargo build -p flotilla-agent && cargo run -p flotilla-agent --example footprint --
//! [seconds] [simulated|nvml|nvml-driver]` (default 30 s after a 5 s warm-up, simulated GPUs).
//! `nvml` runs the NVML backend on the stand-in library (`flotilla-nvml-mock`, 8 H100s);
//! `nvml-driver` on the machine's own `libnvidia-ml.so.1` (a GPU node).

use flotilla_operator::agents::{self, AgentServer, AgentServerConfig, NodeRegistry, ServingGate};
use std::time::{Duration, Instant};

fn proc_stat(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?; // utime + stime
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .map(str::parse::<u64>)
        .transpose()?
        .unwrap_or(0);
    Ok((ticks, rss_kb))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let backend = std::env::args().nth(2).unwrap_or_else(|| "simulated".to_owned());
    let scratch = tempfile::tempdir()?;
    let mock = match backend.as_str() {
        "simulated" | "nvml-driver" => None,
        "nvml" => Some(
            flotilla_nvml_mock::MockNode::new(scratch.path(), "gpus 8\nmodel H100\n")
                .map_err(anyhow::Error::msg)?,
        ),
        other => anyhow::bail!("backend: expected simulated, nvml or nvml-driver, got {other:?}"),
    };
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("flotilla-agent"))
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    anyhow::ensure!(
        bin.exists(),
        "{} missing: run `cargo build -p flotilla-agent` first",
        bin.display()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let fleet = NodeRegistry::new();
    let config =
        AgentServerConfig { require_client_identity: false, ..AgentServerConfig::default() };
    let server = AgentServer::new(fleet.clone(), config, ServingGate::new(true));
    tokio::spawn(agents::serve(server, listener, None, std::future::pending()));

    let mut command = tokio::process::Command::new(&bin);
    command
        .args(["run", "--node", "node-a", "--gpus", "8", "--sample-interval-ms", "1000"])
        .args(["--backend", if backend == "simulated" { "simulated" } else { "nvml" }])
        .args(["--operator", &format!("http://{addr}"), "--admin-addr", "127.0.0.1:0"])
        .arg("--worker-log-dir")
        .arg(scratch.path().join("logs"))
        .arg("--worker-socket-dir")
        .arg(scratch.path().join("s"))
        .env("FLOTILLA_LOG", "warn")
        .kill_on_drop(true);
    if let Some(mock) = &mock {
        command.envs(mock.env());
    }
    let mut child = command.spawn()?;
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("agent exited at once"))?;
    anyhow::ensure!(
        fleet
            .wait_for(Duration::from_secs(20), |f| f.node("node-a").is_some_and(|n| n.connected))
            .await,
        "agent did not register"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    let hz = 100.0; // USER_HZ on Linux
    let (t0, _) = proc_stat(pid)?;
    let start = Instant::now();
    let mut peak_rss = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(proc_stat(pid)?.1);
    }
    let (t1, rss) = proc_stat(pid)?;
    let cpu = (t1 - t0) as f64 / hz / start.elapsed().as_secs_f64() * 100.0;
    let gpus = match backend.as_str() {
        "simulated" => "8 simulated GPUs",
        "nvml" => "NVML backend on the stand-in library, 8 H100s",
        _ => "NVML backend on the machine's driver",
    };
    println!("agent footprint: {gpus}, 1 Hz telemetry, {seconds} s window ({})", bin.display());
    println!(
        "  RSS now {:.1} MB, peak {:.1} MB; CPU {cpu:.2}% of one core",
        rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    child.kill().await?;
    Ok(())
}
