//! Detection latency: XID 79 injected into a simulated GPU → that GPU Failed in the operator's
//! fleet state, over mTLS on 127.0.0.1, one agent with 8 GPUs at 1 Hz telemetry. Prints p50/p99.
//!
//! Run: `cargo run -p flotilla-agent --example detection -- [trials]` (default 200).

use flotilla_agent::backend::simulated::Injection;
use flotilla_agent::link::{ClientTlsFiles, LinkConfig};
use flotilla_agent::{AgentOptions, BackendChoice};
use flotilla_operator::agents::{
    self, AgentServer, AgentServerConfig, GpuAction, GpuHealth, NodeRegistry, ServerTlsFiles,
    ServingGate,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let trials: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let dir = tempfile::tempdir()?;
    flotilla_agent::certs::generate(dir.path(), &["localhost".into()], &["node-a".into()])?;
    let p = |f: &str| dir.path().join(f);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let fleet = NodeRegistry::new();
    let server =
        AgentServer::new(fleet.clone(), AgentServerConfig::default(), ServingGate::new(true));
    let tls = ServerTlsFiles {
        client_ca: p("ca.pem"),
        cert: p("operator.pem"),
        key: p("operator-key.pem"),
    };
    tokio::spawn(agents::serve(server.clone(), listener, Some(tls), std::future::pending()));

    let options = AgentOptions {
        node: "node-a".into(),
        backend: BackendChoice::Simulated { gpus: 8, model: "H100".into(), seed: 1 },
        link: LinkConfig {
            endpoint: format!("https://{addr}"),
            tls: Some(ClientTlsFiles {
                ca: p("ca.pem"),
                cert: p("node-a.pem"),
                key: p("node-a-key.pem"),
                server_name: "localhost".into(),
            }),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            fence_timeout: Duration::from_secs(60),
            advertise: Default::default(),
            lease: None,
        },
        sample_interval: Duration::from_secs(1),
        admin_addr: None,
        state_file: None,
        worker_logs: None,
    };
    let agent =
        flotilla_agent::start(options, Arc::new(flotilla_agent::supervisor::NoWorkers)).await?;
    let sim = agent.sim.clone().ok_or_else(|| anyhow::anyhow!("simulated backend expected"))?;
    anyhow::ensure!(
        fleet
            .wait_for(Duration::from_secs(20), |f| f.node("node-a").is_some_and(|n| n.connected))
            .await,
        "agent did not register"
    );

    let mut latencies = Vec::with_capacity(trials);
    for trial in 0..trials {
        let gpu = (trial % 8) as u32;
        let uuid = agent.core.devices()[gpu as usize].uuid.clone();
        let t0 = Instant::now();
        sim.inject(gpu, Injection::Xid(79))?;
        let failed = fleet
            .wait_for(Duration::from_secs(10), |f| {
                f.gpu_health("node-a", gpu) == Some(GpuHealth::Failed)
            })
            .await;
        let dt = t0.elapsed();
        anyhow::ensure!(failed, "trial {trial}: GPU {gpu} not Failed after 10 s");
        latencies.push(dt);
        sim.inject(gpu, Injection::Recover)?;
        server
            .gpu_command("node-a", &uuid, GpuAction::Validate, Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            fleet
                .wait_for(Duration::from_secs(10), |f| f.gpu_health("node-a", gpu)
                    == Some(GpuHealth::Healthy))
                .await,
            "trial {trial}: did not heal"
        );
    }
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "detection latency (inject XID 79 -> Failed in operator state), mTLS loopback, {trials} trials"
    );
    println!(
        "  p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    Ok(())
}
