//! Shared fixtures: an operator-side agent server and in-process agents on 127.0.0.1.

#![allow(dead_code)]

use flotilla_agent::link::{ClientTlsFiles, LinkConfig};
use flotilla_agent::supervisor::{NoWorkers, WorkerSupervisor};
use flotilla_agent::{AgentHandle, AgentOptions, BackendChoice};
use flotilla_operator::agents::{
    self, AgentServer, AgentServerConfig, NodeRegistry, ServerTlsFiles, ServingGate,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Generous bound for things that happen within milliseconds; only a hang trips it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Certificates for `nodes` in a temporary directory.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new(nodes: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        flotilla_agent::certs::generate(dir.path(), &["localhost".into()], &nodes).expect("certs");
        Self { dir }
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
    pub fn server(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            client_ca: self.path("ca.pem"),
            cert: self.path("operator.pem"),
            key: self.path("operator-key.pem"),
        }
    }
    /// Client files for `cert_node`'s certificate.
    pub fn client(&self, cert_node: &str) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.path("ca.pem"),
            cert: self.path(&format!("{cert_node}.pem")),
            key: self.path(&format!("{cert_node}-key.pem")),
            server_name: "localhost".into(),
        }
    }
}

/// A running operator-side agent server.
pub struct Operator {
    pub server: AgentServer,
    pub addr: SocketAddr,
    pub gate: ServingGate,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    pub fn registry(&self) -> &Arc<NodeRegistry> {
        self.server.registry()
    }

    /// Stops serving and waits until the port is free again.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("operator stops")
                .expect("serve task");
        }
    }
}

pub fn fast_config() -> AgentServerConfig {
    AgentServerConfig {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        fence_timeout: Duration::from_secs(30),
        ..AgentServerConfig::default()
    }
}

/// Starts a server on `addr` (port 0 for any) with mTLS from `certs`, or plaintext without.
pub async fn operator(
    addr: &str,
    fleet: Arc<NodeRegistry>,
    certs: Option<&Certs>,
    config: AgentServerConfig,
) -> Operator {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    let gate = ServingGate::new(true);
    let server = AgentServer::new(fleet, config, gate.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let tls = certs.map(Certs::server);
    let s = server.clone();
    let task = tokio::spawn(async move {
        agents::serve(s, listener, tls, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    Operator { server, addr, gate, stop: Some(stop), task: Some(task) }
}

pub fn agent_options(
    node: &str,
    operator: SocketAddr,
    tls: Option<ClientTlsFiles>,
    gpus: u32,
) -> AgentOptions {
    let scheme = if tls.is_some() { "https" } else { "http" };
    AgentOptions {
        node: node.into(),
        backend: BackendChoice::Simulated { gpus, model: "H100".into(), seed: 3 },
        link: LinkConfig {
            endpoint: format!("{scheme}://{operator}"),
            tls,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            fence_timeout: Duration::from_secs(30),
            advertise: Default::default(),
            lease: None,
        },
        sample_interval: Duration::from_millis(200),
        admin_addr: None,
        state_file: None,
        worker_logs: None,
    }
}

pub async fn agent(options: AgentOptions) -> AgentHandle {
    agent_with(options, Arc::new(NoWorkers)).await
}

pub async fn agent_with(
    options: AgentOptions,
    supervisor: Arc<dyn WorkerSupervisor>,
) -> AgentHandle {
    flotilla_agent::start(options, supervisor).await.expect("agent starts")
}

/// Waits until `node` is registered and connected.
pub async fn registered(fleet: &NodeRegistry, node: &str) {
    let ok = fleet.wait_for(PATIENCE, |f| f.node(node).is_some_and(|n| n.connected)).await;
    assert!(ok, "{node} did not register within {PATIENCE:?}");
}

/// Polls `cond` every 25 ms until it holds or [`PATIENCE`] passes; returns whether it held.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}
