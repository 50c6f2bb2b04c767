//! Command line, configuration and the process's lifecycle: sign-in, election, controllers,
//! admin server, shutdown. Every flag has an environment variable; `--help` lists them all.

use crate::admin::{AdminState, router};
use crate::agents::{AgentLinkArgs, NodeRegistry, ServingGate};
use crate::controller::{Caches, Context, Settings, gpu_node, inference_service, training_job};
use crate::crd::{self, GpuNode, TrainingJob};
use crate::ids::WorkloadKind;
use crate::leader::{LeaderElector, LeaseSettings};
use crate::metrics::Metrics;
use crate::workers::{AgentWorkers, WorkerLaunchArgs, Workers};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::jiff::SignedDuration;
use kube::core::DeserializeGuard;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The Flotilla operator.
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-operator",
    version,
    about = "The Flotilla operator: GPU gang jobs on Kubernetes"
)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the controllers (the default).
    Run(Box<RunArgs>),
}

/// Flags of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the admin server (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "FLOTILLA_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    pub admin_addr: SocketAddr,
    /// Log filter, in `tracing-subscriber` env-filter syntax.
    #[arg(long, env = "FLOTILLA_LOG", default_value = "info,kube=warn")]
    pub log: String,
    /// Log as JSON lines instead of plain text.
    #[arg(long, env = "FLOTILLA_LOG_JSON")]
    pub log_json: bool,
    /// Seconds an agent keeps its workers while it reaches neither the operator nor the API
    /// server (its fence); its node's jobs restart elsewhere only after this plus a margin.
    #[arg(long, env = "FLOTILLA_FENCE_TIMEOUT_SECONDS", default_value_t = 30)]
    pub fence_timeout_seconds: u64,
    /// Seconds the leader keeps leading while it cannot renew its lease because the API server
    /// does not answer (agents stay connected and keep their workers). A replica that takes
    /// over a lease its holder did not release waits this long, on top of the fence, before it
    /// takes unheard nodes for fenced.
    #[arg(long, env = "FLOTILLA_API_OUTAGE_TOLERANCE_SECONDS", default_value_t = 300)]
    pub api_outage_tolerance_seconds: u64,
    /// Lend GPUs held for the job first in line to queued jobs behind it that checkpoint, until
    /// it can start; the loans are then taken back (the borrowers checkpoint and requeue).
    #[arg(long, env = "FLOTILLA_LEND_RESERVED_GPUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub lend_reserved_gpus: bool,
    /// Lend only while the first job's expected start is unknown or at least this many seconds
    /// away (a shorter loan buys less than the restart costs).
    #[arg(long, env = "FLOTILLA_MIN_LOAN_SECONDS", default_value_t = flotilla_scheduler::DEFAULT_MIN_LOAN)]
    pub min_loan_seconds: u64,
    /// Leader election.
    #[command(flatten)]
    pub lease: LeaseArgs,
    /// The agent link; agents are served only when its TLS files (or `--agent-insecure`) are
    /// given.
    #[command(flatten)]
    pub agents: AgentLinkArgs,
    /// How workers are launched through agents.
    #[command(flatten)]
    pub workers: WorkerLaunchArgs,
}

/// Leader election flags.
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// Namespace of the leader Lease.
    #[arg(long, env = "FLOTILLA_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "FLOTILLA_LEASE_NAME", default_value = "flotilla-operator")]
    pub lease_name: String,
    /// This replica's identity (the pod name in a cluster); defaults to `<host>-<pid>`.
    #[arg(long, env = "FLOTILLA_IDENTITY")]
    pub identity: Option<String>,
    /// Seconds a lease stays valid without renewal; a standby takes over after this.
    #[arg(long, env = "FLOTILLA_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds between renewals (and between a standby's tries).
    #[arg(long, env = "FLOTILLA_LEASE_RENEW_SECONDS", default_value_t = 5)]
    pub lease_renew_seconds: u64,
}

/// Parse the command line and run.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd { out_dir }) => print_crds(out_dir),
        Some(Command::Run(args)) => run_blocking(*args),
        None => run_blocking(RunArgs::parse_from_env()),
    }
}

impl RunArgs {
    fn parse_from_env() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: RunArgs,
        }
        Only::parse_from(["flotilla-operator"]).args
    }
}

fn print_crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    for c in crd::all() {
        let yaml = crd::to_yaml(&c)?;
        match &out_dir {
            Some(dir) => {
                let path = dir.join(crd::file_name(&c));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

fn run_blocking(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    if args.log_json {
        builder.json().init()
    } else {
        builder.init()
    }
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// Run the operator, serving agents, until shutdown or until the lease is lost (an error: the
/// process must restart as a standby). The agent link must be configured: its TLS files, or
/// `--agent-insecure` for a one-machine demo; an operator that launched nothing would only
/// look healthy.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let a = &args.agents;
    anyhow::ensure!(
        a.agent_tls_ca.is_some()
            || a.agent_tls_cert.is_some()
            || a.agent_tls_key.is_some()
            || a.agent_insecure,
        "the agent link is not configured: expected --agent-tls-ca, --agent-tls-cert and \
         --agent-tls-key (FLOTILLA_AGENT_TLS_CA/_CERT/_KEY), or --agent-insecure for a local \
         demo; got none of them"
    );
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    let fence = Duration::from_secs(args.fence_timeout_seconds);
    let state = NodeRegistry::new();
    let stop_link = shutdown.clone();
    let link = crate::agents::args::start(&args.agents, state.clone(), fence, async move {
        stop_link.cancelled().await
    })
    .await
    .map_err(anyhow::Error::msg)?;
    tracing::info!(addr = %args.agents.agent_listen, "agent server listening (closed until leader)");
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let workers = AgentWorkers::start(link.server.clone(), args.workers.clone(), fence);
    let leading = Leading {
        gate: link.gate.clone(),
        heartbeat_timeout: Duration::from_secs(args.agents.agent_heartbeat_timeout_seconds.max(1)),
        state,
        telemetry_every: Duration::from_secs(args.agents.gpunode_telemetry_seconds.max(1)),
    };
    run_until(args, client, Arc::new(workers), leading, shutdown).await
}

/// What starts once this replica leads: agents are served and mirrored into `GpuNode`s.
struct Leading {
    gate: ServingGate,
    /// Silent this long, an agent is lost (and gets a verdict on its Lease).
    heartbeat_timeout: Duration,
    state: Arc<NodeRegistry>,
    telemetry_every: Duration,
}

/// Cancel `token` on the first SIGTERM or Ctrl-C; exit at once on the second.
fn watch_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n == 0 {
                tracing::info!("shutdown signal: draining");
                token.cancel();
            } else {
                tracing::warn!("second shutdown signal: aborting");
                std::process::exit(130);
            }
        }
    });
}

async fn run_until(
    args: RunArgs,
    client: Client,
    workers: Arc<dyn Workers>,
    leading: Leading,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = Settings {
        policy: flotilla_scheduler::Policy {
            lending: args.lend_reserved_gpus,
            min_loan: args.min_loan_seconds,
            ..flotilla_scheduler::Policy::default()
        },
        fence_timeout: SignedDuration::from_secs(args.fence_timeout_seconds as i64),
    };
    let (duration_s, renew_s) = (args.lease.lease_duration_seconds, args.lease.lease_renew_seconds);
    anyhow::ensure!(
        renew_s >= 1 && renew_s * 3 <= duration_s * 2,
        "--lease-renew-seconds: expected at least 1 and at most two thirds of \
         --lease-duration-seconds ({duration_s}), got {renew_s}"
    );
    let metrics = Metrics::new();
    let admin = AdminState { ready: Arc::default(), metrics: metrics.clone() };
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding {}", args.admin_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "admin server listening");
    let stop_admin = shutdown.clone();
    let admin_for_server = admin.clone();
    tokio::spawn(async move {
        let serve = axum::serve(listener, router(admin_for_server));
        if let Err(e) =
            serve.with_graceful_shutdown(async move { stop_admin.cancelled().await }).await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    });

    let identity = args.lease.identity.clone().unwrap_or_else(default_identity);
    let duration = SignedDuration::from_secs(args.lease.lease_duration_seconds as i64);
    let elector = LeaderElector::new(
        client.clone(),
        LeaseSettings {
            namespace: args.lease.lease_namespace.clone(),
            name: args.lease.lease_name.clone(),
            identity: identity.clone(),
            duration,
        },
    );
    let renew = Duration::from_secs(args.lease.lease_renew_seconds.max(1));
    admin.ready.store(true, Ordering::Relaxed); // a connected standby is ready
    tracing::info!(%identity, "waiting for the leader lease");
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease check failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(renew) => {}
        }
    }
    let outage_tolerance = Duration::from_secs(args.api_outage_tolerance_seconds);
    let grace = match elector.took_over_from() {
        Some(previous) => {
            tracing::warn!(%previous, grace = ?outage_tolerance, "took over a lease that was not released: unheard agents count as fenced only after the outage tolerance too");
            outage_tolerance
        }
        None => Duration::ZERO,
    };
    leading.state.leases.set_grace(grace);
    tracing::info!(%identity, "became leader");
    leading.gate.set(true);
    tokio::spawn(crate::metrics_collect::nodes(leading.state.clone(), metrics.clone()));
    tokio::spawn(crate::agents::node_leases::watch(
        client.clone(),
        args.lease.lease_namespace.clone(),
        leading.state.clone(),
    ));
    tokio::spawn(crate::agents::node_leases::verdicts(
        client.clone(),
        args.lease.lease_namespace.clone(),
        leading.state.clone(),
        leading.heartbeat_timeout,
        identity.clone(),
    ));
    tokio::spawn(crate::agents::mirror::run(
        client.clone(),
        leading.state,
        leading.telemetry_every,
    ));
    metrics.is_leader.set(1);
    admin.ready.store(false, Ordering::Relaxed);

    let controllers_stop = CancellationToken::new();
    let reporter =
        Reporter { controller: "flotilla-operator".into(), instance: Some(identity.clone()) };
    let mut controllers = tokio::spawn(run_controllers(
        Shared { client: client.clone(), reporter, workers, metrics: metrics.clone(), settings },
        admin.clone(),
        args.workers.worker_master_addr.clone(),
        controllers_stop.clone(),
    ));

    // An API server that does not answer is no reason to stop: no replica can take the lease
    // through it, the agents keep their workers while they reach this one, and controllers
    // cannot act without it anyway. Another replica that reaches it takes the lease once it
    // expires, and then waits out this tolerance before it relies on unheard agents having
    // fenced themselves (the grace above); so lead on without renewing for that long at most.
    let renew_deadline = outage_tolerance
        .max(Duration::from_secs((args.lease.lease_duration_seconds * 2 / 3).max(1)));
    let mut last_renewed = tokio::time::Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            done = &mut controllers => break Err(anyhow::anyhow!("controllers ended unexpectedly: {done:?}")),
            _ = tokio::time::sleep(renew) => {}
        }
        match elector.try_acquire_or_renew().await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => break Err(anyhow::anyhow!("lost the leader lease to another replica")),
            Err(e) => tracing::warn!(error = %e, "renewing the lease failed"),
        }
        if last_renewed.elapsed() > renew_deadline {
            break Err(anyhow::anyhow!("could not renew the leader lease for {renew_deadline:?}"));
        }
    };
    metrics.is_leader.set(0);
    match outcome {
        Ok(()) => {
            controllers_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(20), controllers).await;
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "releasing the lease failed");
            }
            tracing::info!("shut down cleanly");
            Ok(())
        }
        Err(e) => {
            // A leader that lost its lease stops acting at once.
            controllers.abort();
            tracing::error!(error = %e, "stepping down");
            Err(e)
        }
    }
}

fn default_identity() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "operator".into());
    format!("{}-{}", host.trim(), std::process::id())
}

/// What the controllers share, before their caches exist.
struct Shared {
    client: Client,
    reporter: Reporter,
    workers: Arc<dyn Workers>,
    metrics: Metrics,
    settings: Settings,
}

async fn run_controllers(
    shared: Shared,
    admin: AdminState,
    fallback_address: Option<String>,
    stop: CancellationToken,
) {
    let Shared { client, reporter, workers, metrics, settings } = shared;
    let cfg = watcher::Config::default().any_semantic();
    let jobs =
        Controller::new(Api::<DeserializeGuard<TrainingJob>>::all(client.clone()), cfg.clone());
    let services = inference_service::controller(&client, cfg.clone());
    let nodes = Controller::new(Api::<DeserializeGuard<GpuNode>>::all(client.clone()), cfg);
    // Worker events (started, exited) wake their job at once instead of at the next poll.
    let (job_changes, service_changes) = inference_service::split_changes(workers.changes());
    let reported = job_changes.map(|keys| {
        keys.filter(|k| std::future::ready(k.kind() == WorkloadKind::TrainingJob))
            .map(|k| ObjectRef::<DeserializeGuard<TrainingJob>>::new(&k.name).within(&k.namespace))
    });
    let jobs = match reported {
        Some(refs) => jobs.reconcile_on(refs),
        None => jobs,
    };
    let (job_store, node_store) = (jobs.store(), nodes.store());
    let caches =
        Caches { nodes: node_store.clone(), jobs: job_store.clone(), services: services.store() };
    let ctx = Arc::new(Context::new(client, reporter, workers, metrics, caches, settings));
    tokio::spawn(crate::metrics_collect::objects(ctx.clone(), stop.clone()));
    let ready = admin.ready.clone();
    tokio::spawn(async move {
        if synced(&job_store).await && synced(&node_store).await {
            ready.store(true, Ordering::Relaxed);
            tracing::info!("caches synced; ready");
        }
    });
    let s = stop.clone();
    let jobs = jobs.graceful_shutdown_on(async move { s.cancelled().await }).run(
        training_job::reconcile,
        training_job::error_policy,
        ctx.clone(),
    );
    let s = stop.clone();
    let services = inference_service::run(
        services,
        ctx.clone(),
        service_changes,
        fallback_address,
        async move { s.cancelled().await },
    )
    .map(Ok::<(), std::convert::Infallible>);
    let s = stop.clone();
    let nodes = nodes.graceful_shutdown_on(async move { s.cancelled().await }).run(
        gpu_node::reconcile,
        gpu_node::error_policy,
        ctx,
    );
    futures::join!(
        drain("TrainingJob", jobs),
        drain("InferenceService", services),
        drain("GpuNode", nodes)
    );
}

/// Wait for a store's first full list. Polled again every half second because a store wakes
/// only the most recent of several concurrent waiters (the controller itself also waits), so a
/// single long wait can miss the wake-up.
async fn synced<K: kube::runtime::reflector::Lookup + Clone + 'static>(
    store: &kube::runtime::reflector::Store<K>,
) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready()).await
        {
            return result.is_ok();
        }
    }
}

/// Run a controller's stream to its end, logging what went wrong (the error policy already
/// decided what to do about it).
async fn drain<T, E: std::fmt::Display>(
    kind: &'static str,
    stream: impl futures::Stream<Item = Result<T, E>>,
) {
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(kind, error = %e, "controller event");
            }
        })
        .await;
}
