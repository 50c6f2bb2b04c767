//! Command line: `run` (the agent), `certs` (development certificates), `inject` and `clear`
//! (drive a running agent's admin endpoint). Every flag also reads an environment variable.

use crate::link::{Advertise, ClientTlsFiles, LinkConfig};
use crate::{AgentOptions, BackendChoice};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The Flotilla node agent.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version)]
pub struct Cli {
    /// Log filter, in `tracing-subscriber` env-filter syntax.
    #[arg(long, global = true, env = "FLOTILLA_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of plain text.
    #[arg(long, global = true, env = "FLOTILLA_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Installs the process's log subscriber as the flags say.
    pub fn init_logging(&self) {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Colours only on a terminal: a container's log is a file.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
        if self.log_json {
            builder.json().init();
        } else {
            builder.init();
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Generate a development CA, an operator certificate and per-node client certificates.
    Certs(CertsArgs),
    /// Inject a fault into a simulated GPU of a running agent.
    Inject(InjectArgs),
    /// Clear a GPU's Failed/Degraded state (admin override) on a running agent.
    Clear(ClearArgs),
}

/// GPU backend.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendKind {
    /// Real GPUs through NVML.
    Nvml,
    /// Simulated GPUs.
    Simulated,
}

/// `flotilla-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Node name; must match the client certificate.
    #[arg(long, env = "FLOTILLA_NODE_NAME")]
    pub node: String,
    /// Operator gRPC endpoint.
    #[arg(long, env = "FLOTILLA_OPERATOR_URL", default_value = "https://127.0.0.1:7443")]
    pub operator: String,
    /// GPU backend.
    #[arg(long, env = "FLOTILLA_BACKEND", value_enum, default_value = "simulated")]
    pub backend: BackendKind,
    /// Simulated GPUs per node.
    #[arg(long, env = "FLOTILLA_SIM_GPUS", default_value_t = 8)]
    pub gpus: u32,
    /// Simulated GPU model (H100, H200, A100, L40S).
    #[arg(long, env = "FLOTILLA_SIM_GPU_MODEL", default_value = "H100")]
    pub gpu_model: String,
    /// Simulated telemetry seed.
    #[arg(long, env = "FLOTILLA_SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Telemetry period, milliseconds.
    #[arg(long, env = "FLOTILLA_SAMPLE_INTERVAL_MS", default_value_t = 1000)]
    pub sample_interval_ms: u64,
    /// Admin server (metrics, health, injection) address.
    #[arg(long, env = "FLOTILLA_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:9400")]
    pub admin_addr: SocketAddr,
    /// CA certificate that signed the operator's certificate (PEM).
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This node's client certificate (PEM).
    #[arg(long, env = "FLOTILLA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's client key (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Name the operator's certificate must carry.
    #[arg(long, env = "FLOTILLA_TLS_SERVER_NAME", default_value = "localhost")]
    pub tls_server_name: String,
    /// File that keeps health verdicts and unacknowledged events across agent restarts (a
    /// hostPath in the DaemonSet); unset keeps them in memory only.
    #[arg(long, env = "FLOTILLA_AGENT_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Kill workers after this long without the operator, seconds (until the operator says).
    #[arg(long, env = "FLOTILLA_FENCE_TIMEOUT_S", default_value_t = 30)]
    pub fence_timeout_s: u64,
    /// Namespace of the node's Lease on the API server (the operator's lease namespace); the agent
    /// renews it so that an operator outage does not stop its workers. Credentials come from
    /// KUBECONFIG or the pod's ServiceAccount. Empty: no Lease (an operator outage longer than
    /// the fence timeout then stops the node's workers).
    #[arg(long, env = "FLOTILLA_AGENT_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Workers' stdout and stderr go to `<dir>/<job_uid>/attempt-<n>/rank-<r>.log`.
    #[arg(long, env = "FLOTILLA_WORKER_LOG_DIR", default_value = "/var/log/flotilla/workers")]
    pub worker_log_dir: PathBuf,
    /// Workers' progress sockets are created here (keep the path short).
    #[arg(long, env = "FLOTILLA_WORKER_SOCKET_DIR", default_value = "/run/flotilla")]
    pub worker_socket_dir: PathBuf,
    /// A worker's log is rotated at this many bytes (two files kept per worker).
    #[arg(long, env = "FLOTILLA_WORKER_LOG_MAX_BYTES", default_value_t = 64 << 20)]
    pub worker_log_max_bytes: u64,
    /// The admin server's URL as others reach it (reported to the operator, which shows it as
    /// the GpuNode's `status.adminUrl` for `kubectl flotilla`); default `http://<--admin-addr>`.
    #[arg(long, env = "FLOTILLA_AGENT_ADMIN_URL")]
    pub admin_advertise_url: Option<String>,
    /// The IP address workers on this node are reached at (rendezvous, serving endpoints);
    /// shown as the GpuNode's `status.address`. Default: the address the operator sees the
    /// agent's connection come from (unless that is a loopback address).
    #[arg(long, env = "FLOTILLA_NODE_ADDRESS", value_parser = parse_ip)]
    pub advertise_address: Option<std::net::IpAddr>,
}

fn parse_ip(value: &str) -> Result<std::net::IpAddr, String> {
    value.parse().map_err(|_| format!("expected an IPv4 or IPv6 address, got {value:?}"))
}

impl RunArgs {
    /// The admin URL to report: `--admin-advertise-url`, else `http://<--admin-addr>`.
    pub fn admin_url(&self) -> anyhow::Result<String> {
        match &self.admin_advertise_url {
            Some(url) => {
                let url = url.trim_end_matches('/');
                let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
                match rest {
                    Some(host) if !host.is_empty() && !host.contains('/') => Ok(url.to_owned()),
                    _ => anyhow::bail!(
                        "--admin-advertise-url: expected http://HOST:PORT or https://HOST:PORT, \
                         got {url:?}"
                    ),
                }
            }
            None => Ok(format!("http://{}", self.admin_addr)),
        }
    }

    /// Where the worker supervisor keeps logs and sockets.
    pub fn worker_files(&self) -> crate::workers::WorkerFiles {
        crate::workers::WorkerFiles {
            log_dir: self.worker_log_dir.clone(),
            socket_dir: self.worker_socket_dir.clone(),
            max_log_bytes: self.worker_log_max_bytes,
            sim_misbehaviour_dir: self.sim_misbehaviour_dir(),
        }
    }

    /// With simulated GPUs, where injected hangs and slowness are written for the workers.
    pub fn sim_misbehaviour_dir(&self) -> Option<PathBuf> {
        matches!(self.backend, BackendKind::Simulated)
            .then(|| self.worker_socket_dir.join("sim-gpus"))
    }

    /// Agent options; TLS needs all three files or none (plaintext only for `http://`). No
    /// worker logs are served until the caller gives the options its supervisor's.
    pub fn options(&self) -> anyhow::Result<AgentOptions> {
        let tls = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClientTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.tls_server_name.clone(),
            }),
            (None, None, None) if self.operator.starts_with("http://") => None,
            _ => anyhow::bail!(
                "--tls-ca, --tls-cert and --tls-key: expected all three for an https:// operator \
                 (got ca={:?}, cert={:?}, key={:?}, operator={})",
                self.tls_ca,
                self.tls_cert,
                self.tls_key,
                self.operator
            ),
        };
        let backend = match self.backend {
            BackendKind::Nvml => BackendChoice::Nvml,
            BackendKind::Simulated => BackendChoice::Simulated {
                gpus: self.gpus,
                model: self.gpu_model.clone(),
                seed: self.seed,
            },
        };
        Ok(AgentOptions {
            node: self.node.clone(),
            backend,
            link: LinkConfig {
                endpoint: self.operator.clone(),
                tls,
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(
                    flotilla_contract::node_lease::RECONNECT_MAX_DELAY_S,
                ),
                fence_timeout: Duration::from_secs(self.fence_timeout_s),
                lease: (!self.lease_namespace.is_empty())
                    .then(|| crate::lease::LeaseConfig { namespace: self.lease_namespace.clone() }),
                advertise: Advertise {
                    admin_url: self.admin_url()?,
                    node_address: self.advertise_address.map(|a| a.to_string()).unwrap_or_default(),
                },
            },
            sample_interval: Duration::from_millis(self.sample_interval_ms.max(50)),
            admin_addr: Some(self.admin_addr),
            state_file: self.state_file.clone(),
            worker_logs: None,
        })
    }
}

/// `flotilla-agent certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Output directory.
    #[arg(long, env = "FLOTILLA_CERTS_OUT", default_value = "certs")]
    pub out: PathBuf,
    /// Node names, one client certificate each.
    #[arg(long = "node", env = "FLOTILLA_CERTS_NODES", value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// Names (DNS or IP) the operator's certificate is valid for.
    #[arg(long = "operator-name", env = "FLOTILLA_CERTS_OPERATOR_NAMES", value_delimiter = ',', default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub operator_names: Vec<String>,
}

/// `flotilla-agent inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Agent admin address.
    #[arg(long, env = "FLOTILLA_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:9400")]
    pub agent: String,
    /// GPU index.
    #[arg(long)]
    pub gpu: u32,
    /// Raise this XID.
    #[arg(long, conflicts_with = "fault")]
    pub xid: Option<u32>,
    /// Other faults: double_bit_ecc, ecc_storm, gpu_lost, overheat, recover; and, acting
    /// through the GPU's workers: hang, hang_collective, slow=PERCENT (steps take PERCENT/100
    /// times as long).
    #[arg(long)]
    pub fault: Option<String>,
}

/// `flotilla-agent clear`.
#[derive(Debug, Args)]
pub struct ClearArgs {
    /// Agent admin address.
    #[arg(long, env = "FLOTILLA_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:9400")]
    pub agent: String,
    /// GPU index.
    #[arg(long)]
    pub gpu: u32,
}

/// Runs the parsed command (the binary's whole body).
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let supervisor = crate::workers::ProcessSupervisor::new(args.worker_files())?;
            let options = AgentOptions { worker_logs: Some(supervisor.clone()), ..args.options()? };
            let handle = crate::start(options, supervisor.clone()).await?;
            if let (Some(sim), Some(dir)) = (&handle.sim, args.sim_misbehaviour_dir()) {
                sim.misbehave_through(dir);
            }
            supervisor.attach(handle.worker_updates.clone());
            tracing::info!(node = %args.node, admin = ?handle.admin_addr, "agent started");
            stop_signal().await?;
            tracing::info!(
                "stopping: closing the operator link (workers are left to the supervisor)"
            );
            let _ = handle.shutdown.send(true);
            tokio::select! {
                done = handle.link => done??,
                _ = stop_signal() => anyhow::bail!("second stop signal: exiting at once"),
            }
        }
        Command::Certs(args) => {
            let files = crate::certs::generate(&args.out, &args.operator_names, &args.nodes)?;
            println!(
                "wrote {} (CA), {} (operator), {} node certificates",
                files.ca.display(),
                files.operator.0.display(),
                files.nodes.len()
            );
        }
        Command::Inject(args) => {
            let fault = match (args.xid, args.fault.as_deref()) {
                (Some(xid), None) => serde_json::json!({ "xid": xid }),
                (None, Some(f)) => {
                    flotilla_contract::inject::fault_body(f).map_err(anyhow::Error::msg)?
                }
                _ => anyhow::bail!("--xid or --fault: expected exactly one"),
            };
            let body = serde_json::json!({ "gpu": args.gpu, "fault": fault });
            println!(
                "{}",
                crate::admin::post_json(&args.agent, "/inject", &body)
                    .await
                    .map_err(anyhow::Error::msg)?
            );
        }
        Command::Clear(args) => {
            let body = serde_json::json!({ "gpu": args.gpu });
            println!(
                "{}",
                crate::admin::post_json(&args.agent, "/clear", &body)
                    .await
                    .map_err(anyhow::Error::msg)?
            );
        }
    }
    Ok(())
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
