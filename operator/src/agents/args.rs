//! Flags of the agent link, to `#[command(flatten)]` into the operator's `run` flags, and the
//! one call that starts it.

use super::{
    AgentServer, AgentServerConfig, NodeRegistry, ServeError, ServerTlsFiles, ServingGate,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where and how agents connect.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentLinkArgs {
    /// Address agents dial (gRPC over mTLS).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN", default_value = "127.0.0.1:7443")]
    pub agent_listen: SocketAddr,
    /// CA that signs agents' client certificates (PEM).
    #[arg(long, env = "FLOTILLA_AGENT_TLS_CA")]
    pub agent_tls_ca: Option<PathBuf>,
    /// The operator's server certificate for agents (PEM).
    #[arg(long, env = "FLOTILLA_AGENT_TLS_CERT")]
    pub agent_tls_cert: Option<PathBuf>,
    /// The key of that certificate (PEM).
    #[arg(long, env = "FLOTILLA_AGENT_TLS_KEY")]
    pub agent_tls_key: Option<PathBuf>,
    /// Serve agents in plaintext without checking node identity (benchmarks only).
    #[arg(long, env = "FLOTILLA_AGENT_INSECURE", default_value_t = false)]
    pub agent_insecure: bool,
    /// How often agents send heartbeats, seconds.
    #[arg(long, env = "FLOTILLA_AGENT_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub agent_heartbeat_seconds: u64,
    /// An agent silent this long is lost and its GPUs leave the pool, seconds.
    #[arg(long, env = "FLOTILLA_AGENT_HEARTBEAT_TIMEOUT_SECONDS", default_value_t = 20)]
    pub agent_heartbeat_timeout_seconds: u64,
    /// Telemetry (temperatures, heartbeat time) is written to `GpuNode` status at most this
    /// often, seconds; health changes are written at once.
    #[arg(long, env = "FLOTILLA_GPUNODE_TELEMETRY_SECONDS", default_value_t = 5)]
    pub gpunode_telemetry_seconds: u64,
}

impl AgentLinkArgs {
    /// The TLS files, all three or (only with `--agent-insecure`) none.
    pub fn tls(&self) -> Result<Option<ServerTlsFiles>, String> {
        match (&self.agent_tls_ca, &self.agent_tls_cert, &self.agent_tls_key, self.agent_insecure) {
            (Some(ca), Some(cert), Some(key), false) => Ok(Some(ServerTlsFiles {
                client_ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None, None, true) => Ok(None),
            _ => Err(format!(
                "--agent-tls-ca, --agent-tls-cert, --agent-tls-key: expected all three (or none with \
                 --agent-insecure), got ca={:?} cert={:?} key={:?} insecure={}",
                self.agent_tls_ca, self.agent_tls_cert, self.agent_tls_key, self.agent_insecure
            )),
        }
    }

    /// Server configuration; `fence_timeout` is the operator's own.
    pub fn config(&self, fence_timeout: Duration) -> AgentServerConfig {
        AgentServerConfig {
            heartbeat_interval: Duration::from_secs(self.agent_heartbeat_seconds.max(1)),
            heartbeat_timeout: Duration::from_secs(self.agent_heartbeat_timeout_seconds.max(1)),
            fence_timeout,
            require_client_identity: !self.agent_insecure,
            ..AgentServerConfig::default()
        }
    }
}

/// A started agent link.
#[derive(Debug)]
pub struct AgentLink {
    /// The server (commands to agents, worker reports).
    pub server: AgentServer,
    /// Closed until this replica leads; open it with `gate.set(true)`.
    pub gate: ServingGate,
    /// The serving task.
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Binds and starts serving agents, gate closed. Mirror with [`super::mirror::run`] once leading.
pub async fn start(
    args: &AgentLinkArgs,
    registry: std::sync::Arc<NodeRegistry>,
    fence_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<AgentLink, String> {
    let tls = args.tls()?;
    let listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .map_err(|e| format!("--agent-listen {}: {e}", args.agent_listen))?;
    let gate = ServingGate::new(false);
    let server = AgentServer::new(registry, args.config(fence_timeout), gate.clone());
    let task = tokio::spawn(super::serve(server.clone(), listener, tls, shutdown));
    Ok(AgentLink { server, gate, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        link: AgentLinkArgs,
    }

    #[test]
    fn tls_needs_all_three_files_or_explicit_insecurity() {
        let parse =
            |a: &[&str]| Cli::parse_from(std::iter::once("x").chain(a.iter().copied())).link;
        assert!(parse(&[]).tls().is_err(), "no TLS without saying so");
        assert!(parse(&["--agent-insecure"]).tls().expect("insecure").is_none());
        let partial = parse(&["--agent-tls-ca", "ca.pem"]).tls().expect_err("partial");
        assert!(partial.contains("--agent-tls-cert"), "{partial}");
        let full = parse(&["--agent-tls-ca", "a", "--agent-tls-cert", "b", "--agent-tls-key", "c"]);
        assert_eq!(full.tls().expect("tls").map(|t| t.key), Some(PathBuf::from("c")));
        assert!(full.config(Duration::from_secs(60)).require_client_identity);
    }
}
