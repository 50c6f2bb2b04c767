//! The agent-facing side of the operator: the `flotilla.agent.v1` gRPC server (mTLS, node name
//! bound to the client certificate), the in-memory fleet state it feeds, and the lost-agent
//! sweeper. Only this module touches proto types.
//!
//! Leader-only serving: pass a [`ServingGate`] and flip it from leader election.

pub mod args;
pub mod commands;
mod convert;
pub mod identity;
pub mod liveness;
pub mod mirror;
pub mod node_leases;
mod progress;
pub mod server;
pub mod state;

pub use args::{AgentLink, AgentLinkArgs};
pub use commands::WorkerLaunchSpec;
pub use progress::{Activity, RankPace};
pub use server::{
    AgentServer, AgentServerConfig, GpuAction, ServingGate, WorkerPhase, WorkerReport,
};
pub use state::{GpuHealth, GpuRecord, NodeRecord, NodeRegistry, RunningWorkerRecord};

use std::path::PathBuf;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Server certificate files and the CA that signs agents' client certificates.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// CA for client certificates (PEM).
    pub client_ca: PathBuf,
    /// Operator certificate (PEM).
    pub cert: PathBuf,
    /// Operator key (PEM).
    pub key: PathBuf,
}

/// Errors serving agents.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A certificate or key could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// tonic failed to configure or serve.
    #[error("agent gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path)
        .map_err(|source| ServeError::Read { path: path.display().to_string(), source })
}

/// Serves agents (and `grpc.health.v1`) on `listener` until `shutdown` completes; also runs the
/// lost-agent sweeper. `tls: None` is plaintext and for benchmarks only.
pub async fn serve(
    server: AgentServer,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)));
    if let Some(tls) = tls {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
            .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?));
        builder = builder.tls_config(config)?;
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<flotilla_proto::v1::agent_service_server::AgentServiceServer<AgentServer>>()
        .await;
    let sweeper = tokio::spawn(server.clone().sweep_lost_agents());
    // Open agent streams never end by themselves, and tonic's graceful shutdown waits for them:
    // closing the gate ends them (agents see UNAVAILABLE and reconnect elsewhere).
    let gate = server.gate().clone();
    let shutdown = async move {
        shutdown.await;
        gate.set(false);
    };
    let result = builder
        .add_service(health_service)
        .add_service(server.service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    sweeper.abort();
    Ok(result?)
}
