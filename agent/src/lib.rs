//! The Flotilla node agent: reads GPU health through NVML or a simulation, classifies it, streams
//! it to the operator over mTLS gRPC, exports DCGM-compatible metrics, and (issue 7) supervises
//! workers.

pub mod admin;
pub mod backend;
pub mod certs;
pub mod cli;
mod convert;
pub mod core;
pub mod health;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod persist;
pub mod supervisor;
pub mod workers;

use backend::GpuBackend;
use backend::simulated::SimulatedBackend;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use supervisor::{WorkerSupervisor, WorkerUpdate};
use tokio::sync::{mpsc, watch};

/// Which GPUs the agent reads.
#[derive(Clone, Debug)]
pub enum BackendChoice {
    /// Real GPUs through NVML.
    Nvml,
    /// Simulated GPUs.
    Simulated {
        /// How many.
        gpus: u32,
        /// Model short name ("H100").
        model: String,
        /// Telemetry seed.
        seed: u64,
    },
}

/// Everything needed to start an agent in this process.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Node name (must match the client certificate).
    pub node: String,
    /// GPU backend.
    pub backend: BackendChoice,
    /// Operator link.
    pub link: link::LinkConfig,
    /// Telemetry period.
    pub sample_interval: Duration,
    /// Admin server address (`None`: no admin server).
    pub admin_addr: Option<SocketAddr>,
    /// Where health verdicts and unacknowledged events survive restarts (`None`: memory only).
    pub state_file: Option<std::path::PathBuf>,
    /// Where the admin server's `GET /v1/logs` finds workers' logs (`None`: it answers 503).
    pub worker_logs: Option<Arc<dyn admin::WorkerLogSource>>,
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// Shared state.
    pub core: Arc<core::AgentCore>,
    /// The simulated backend, when that is the backend.
    pub sim: Option<Arc<SimulatedBackend>>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// Sends true to stop the link.
    pub shutdown: watch::Sender<bool>,
    /// Sender the worker supervisor reports through.
    pub worker_updates: mpsc::UnboundedSender<WorkerUpdate>,
    /// The link task.
    pub link: tokio::task::JoinHandle<Result<(), link::LinkError>>,
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The GPU backend failed.
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    /// The link configuration is invalid.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// The admin server could not bind.
    #[error("binding the admin server to {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Starts backend, sampling, admin server and operator link. `supervisor` runs workers.
pub async fn start(
    options: AgentOptions,
    supervisor: Arc<dyn WorkerSupervisor>,
) -> Result<AgentHandle, StartError> {
    let (backend, sim): (Arc<dyn GpuBackend>, _) = match &options.backend {
        BackendChoice::Nvml => (Arc::new(backend::nvml::NvmlBackend::new(&options.node)?), None),
        BackendChoice::Simulated { gpus, model, seed } => {
            let model = backend::simulated::find_model(model)?;
            let sim = Arc::new(SimulatedBackend::new(&options.node, *gpus, model, *seed));
            (sim.clone(), Some(sim))
        }
    };
    let core = core::AgentCore::new(&options.node, backend, options.state_file.clone())?;
    core.start(options.sample_interval)?;
    core.metrics.label_gpus_with_workers_of(supervisor.clone());
    link::endpoint(&options.link)?; // fail now, not in the background, on a bad endpoint or files
    let admin_addr = match options.admin_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Admin { addr, source })?;
            let bound =
                listener.local_addr().map_err(|source| StartError::Admin { addr, source })?;
            let app = admin::router(core.clone(), sim.clone(), options.worker_logs.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "admin server stopped");
                }
            });
            Some(bound)
        }
        None => None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (worker_updates, updates_rx) = mpsc::unbounded_channel();
    let link =
        tokio::spawn(link::run(core.clone(), supervisor, updates_rx, options.link, shutdown_rx));
    Ok(AgentHandle { core, sim, admin_addr, shutdown, worker_updates, link })
}
