//! Ingest: how many agent streams one operator sustains on this machine.
//!
//! The operator's agent server runs in a child process (so its CPU and memory are measured
//! alone); this process opens synthetic agent streams on 127.0.0.1 (plaintext, one TCP
//! connection each), 8 GPUs per agent, a health report per second, a heartbeat and a critical
//! event every 5 s. Event-to-state latency is the time from sending a critical event to receiving
//! the operator's acknowledgement, which it sends only after applying the event to its state.
//! The ramp stops at the first level whose p99 reaches 100 ms.
//!
//! Run: `cargo run -p flotilla-agent --example ingest -- [--tls] [levels, e.g. 500 1000 2000 5000 10000]`
//! (`--tls`: mTLS with one client certificate per agent, as deployed).

use flotilla_operator::agents::{self, AgentServer, AgentServerConfig, NodeRegistry, ServingGate};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const GPUS: u32 = 8;
/// Tells the server child where the certificates are.
const CERTS_ENV: &str = "FLOTILLA_INGEST_CERTS";
const WINDOW: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Stats {
    rtts_us: Mutex<Vec<u32>>,
    ready: AtomicUsize,
    failed: AtomicUsize,
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss_kb)
}

async fn serve(certs: Option<PathBuf>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("ADDR {}", listener.local_addr()?);
    let tls = certs.map(|dir| agents::ServerTlsFiles {
        client_ca: dir.join("ca.pem"),
        cert: dir.join("operator.pem"),
        key: dir.join("operator-key.pem"),
    });
    let config = AgentServerConfig {
        require_client_identity: tls.is_some(),
        ..AgentServerConfig::default()
    };
    let server = AgentServer::new(NodeRegistry::new(), config, ServingGate::new(true));
    agents::serve(server, listener, tls, std::future::pending()).await?;
    Ok(())
}

/// Client TLS for synthetic agent `i` (its own node certificate), when benchmarking with mTLS.
fn client_tls(certs: &Path, i: usize) -> std::io::Result<ClientTlsConfig> {
    let read = |f: String| std::fs::read(certs.join(f));
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())?))
        .identity(Identity::from_pem(
            read(format!("node-{i}.pem"))?,
            read(format!("node-{i}-key.pem"))?,
        ))
        .domain_name("localhost"))
}

fn register(i: usize) -> pb::AgentMessage {
    let gpus = (0..GPUS)
        .map(|g| pb::GpuInfo {
            index: g,
            uuid: format!("GPU-{i:08x}-{g}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: format!("00000000:{:02X}:00.0", g),
            nvlink_peers: (0..GPUS).filter(|&p| p != g).collect(),
            topology_domain: format!("node-{i}/nvl0"),
        })
        .collect();
    pb::AgentMessage {
        body: Some(Up::Register(pb::Register {
            node_name: format!("node-{i}"),
            agent_version: "bench".into(),
            instance_id: format!("bench-{i}"),
            backend: "simulated".into(),
            gpus,
            ..Default::default()
        })),
    }
}

async fn synthetic_agent(i: usize, addr: String, certs: Option<PathBuf>, stats: Arc<Stats>) {
    let scheme = if certs.is_some() { "https" } else { "http" };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map(|e| e.tcp_nodelay(true))
        .map_err(|e| e.to_string())
        .and_then(|ep| match &certs {
            Some(dir) => client_tls(dir, i)
                .map_err(|e| e.to_string())
                .and_then(|tls| ep.tls_config(tls).map_err(|e| e.to_string())),
            None => Ok(ep),
        });
    let channel = match endpoint {
        Ok(ep) => ep.connect().await,
        Err(e) => {
            eprintln!("agent {i}: {e}");
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Ok(channel) = channel else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let _ = tx.send(register(i)).await;
    let Ok(response) = client.link(ReceiverStream::new(rx)).await else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut inbound = response.into_inner();
    if !matches!(
        inbound.message().await,
        Ok(Some(pb::OperatorMessage { body: Some(Down::Registered(_)) }))
    ) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.ready.fetch_add(1, Ordering::Relaxed);
    let sent: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
    let (sent_r, stats_r) = (sent.clone(), stats.clone());
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if let Some(Down::Ack(ack)) = m.body {
                let now = Instant::now();
                let mut q = sent_r.lock().unwrap_or_else(|e| e.into_inner());
                while q.front().is_some_and(|(s, _)| *s <= ack.critical_seq) {
                    if let Some((_, t)) = q.pop_front() {
                        let us =
                            u32::try_from(now.duration_since(t).as_micros()).unwrap_or(u32::MAX);
                        stats_r.rtts_us.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                    }
                }
            }
        }
        stats_r.failed.fetch_add(1, Ordering::Relaxed);
    });
    // Spread the agents' ticks over the second.
    tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 1000)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0u64;
    // Built once; each report sends a copy, as an agent re-sending fresh values would.
    let samples: Vec<pb::GpuSample> = (0..GPUS)
        .map(|g| pb::GpuSample {
            gpu_uuid: format!("GPU-{i:08x}-{g}"),
            temperature_c: 60.0 + g as f32,
            power_w: 500.0,
            gpu_util_pct: 90.0,
            memory_used_bytes: 60 << 30,
            memory_free_bytes: 20 << 30,
            sm_clock_mhz: 1980,
            slowdown_temperature_c: 90.0,
            ..Default::default()
        })
        .collect();
    for n in 0u64.. {
        tick.tick().await;
        let samples = samples.clone();
        let report =
            pb::HealthReport { sampled_at_unix_nanos: flotilla_proto::now_unix_nanos(), samples };
        if tx.send(pb::AgentMessage { body: Some(Up::Health(report)) }).await.is_err() {
            return;
        }
        if n % 5 == (i as u64 % 5) {
            seq += 1;
            let health = pb::GpuHealthState {
                gpu_uuid: format!("GPU-{i:08x}-0"),
                health: pb::GpuHealth::Healthy as i32,
                reason: String::new(),
                message: String::new(),
                last_xid: 13,
            };
            let event = pb::CriticalEvent {
                seq,
                gpu_uuid: health.gpu_uuid.clone(),
                kind: pb::FaultKind::Xid as i32,
                xid: 13,
                health: Some(health),
                observed_at_unix_nanos: flotilla_proto::now_unix_nanos(),
            };
            sent.lock().unwrap_or_else(|e| e.into_inner()).push_back((seq, Instant::now()));
            let hb = pb::Heartbeat {
                sent_at_unix_nanos: flotilla_proto::now_unix_nanos(),
                last_critical_seq: seq,
            };
            if tx.send(pb::AgentMessage { body: Some(Up::Critical(event)) }).await.is_err()
                || tx.send(pb::AgentMessage { body: Some(Up::Heartbeat(hb)) }).await.is_err()
            {
                return;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        return serve(std::env::var_os(CERTS_ENV).map(PathBuf::from)).await;
    }
    let tls = args.first().map(String::as_str) == Some("--tls");
    if tls {
        args.remove(0);
    }
    let levels: Vec<usize> = if args.is_empty() {
        vec![500, 1000, 2000, 4000, 7000, 10000]
    } else {
        args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?
    };
    // With --tls every synthetic agent gets its own node certificate, as in production.
    let cert_dir = tempfile::tempdir()?;
    let certs = if tls {
        let most = levels.iter().copied().max().unwrap_or(0);
        let nodes: Vec<String> = (0..most).map(|i| format!("node-{i}")).collect();
        flotilla_agent::certs::generate(cert_dir.path(), &["localhost".into()], &nodes)?;
        Some(cert_dir.path().to_path_buf())
    } else {
        None
    };
    let mut server = tokio::process::Command::new(std::env::current_exe()?);
    if let Some(dir) = &certs {
        server.env(CERTS_ENV, dir);
    }
    let mut child = server
        .arg("--serve")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("server exited"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("server ended"))?;
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_owned();
        }
    };
    let stats = Arc::new(Stats::default());
    let mut started = 0;
    println!(
        "ingest: operator agent server in a child process, synthetic agents (8 GPUs, 1 Hz reports, event every 5 s) on 127.0.0.1, {}",
        if tls { "mTLS, one client certificate per agent" } else { "plaintext" }
    );
    println!(
        "{:>7} {:>7} {:>8} {:>9} {:>9} {:>9} {:>10} {:>9} {:>13}",
        "agents",
        "gpus",
        "events",
        "p50 ms",
        "p99 ms",
        "max ms",
        "op CPU %",
        "op RSS MB",
        "loadgen CPU %"
    );
    let mut best = None;
    for level in levels {
        while started < level {
            tokio::spawn(synthetic_agent(started, addr.clone(), certs.clone(), stats.clone()));
            started += 1;
            if started % 200 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while stats.ready.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed) < level
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        stats.rtts_us.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let (t0, _) = proc_stat(pid);
        let (g0, _) = proc_stat(std::process::id());
        let start = Instant::now();
        tokio::time::sleep(WINDOW).await;
        let (t1, rss) = proc_stat(pid);
        let (g1, _) = proc_stat(std::process::id());
        let secs = start.elapsed().as_secs_f64();
        let cpu = (t1 - t0) as f64 / 100.0 / secs * 100.0;
        let loadgen_cpu = (g1 - g0) as f64 / 100.0 / secs * 100.0;
        let mut rtts =
            std::mem::take(&mut *stats.rtts_us.lock().unwrap_or_else(|e| e.into_inner()));
        rtts.sort_unstable();
        let pct = |q: f64| {
            rtts.get(((rtts.len().max(1) - 1) as f64 * q) as usize)
                .map_or(f64::NAN, |&us| f64::from(us) / 1000.0)
        };
        let failed = stats.failed.load(Ordering::Relaxed);
        println!(
            "{:>7} {:>7} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>10.1} {:>9.1} {:>13.1}{}",
            stats.ready.load(Ordering::Relaxed),
            level * GPUS as usize,
            rtts.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            cpu,
            rss as f64 / 1024.0,
            loadgen_cpu,
            if failed > 0 { format!("  ({failed} streams failed)") } else { String::new() }
        );
        if pct(0.99) >= 100.0 || failed > 0 || rtts.is_empty() {
            break;
        }
        best = Some(level);
    }
    match best {
        Some(n) => println!(
            "largest level sustained with event-to-state p99 < 100 ms: {n} agents ({} GPUs)",
            n * GPUS as usize
        ),
        None => println!("no level sustained p99 < 100 ms"),
    }
    child.kill().await?;
    Ok(())
}
