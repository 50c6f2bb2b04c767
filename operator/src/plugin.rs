//! `kubectl flotilla`: a kubectl plugin (the `kubectl-flotilla` binary on `PATH`).
//!
//! - `kubectl flotilla logs <job> [-n NS] [--rank N] [--attempt N | --previous] [-f]` streams a
//!   worker's log from the agent of the node that ran it (the node from the job's
//!   `status.attempt.placement`, the agent's URL from that `GpuNode`'s `status.adminUrl`).
//! - `kubectl flotilla inject <node> --gpu N (--xid N | --fault NAME | --clear)` drives the
//!   simulated backend's faults through the node's agent.
//!
//! The kubeconfig comes from `--kubeconfig`, else `KUBECONFIG` / `~/.kube/config`, like kubectl.

use crate::crd::{GpuNode, TrainingJob};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::io::Write;
use std::path::PathBuf;

/// Flotilla's kubectl plugin.
#[derive(Debug, Parser)]
#[command(name = "kubectl flotilla", bin_name = "kubectl flotilla", version)]
pub struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream a TrainingJob worker's log from its node's agent.
    Logs(LogsArgs),
    /// Inject a fault into (or clear) a simulated GPU of a node's agent.
    Inject(InjectArgs),
}

/// `kubectl flotilla logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// TrainingJob name.
    pub job: String,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Worker rank.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Attempt number (default: the current one).
    #[arg(long, conflicts_with = "previous")]
    pub attempt: Option<u64>,
    /// The attempt before the current one.
    #[arg(long, short = 'p')]
    pub previous: bool,
    /// Keep streaming until the worker has exited.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// `kubectl flotilla inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// GpuNode name.
    pub node: String,
    /// GPU index on the node.
    #[arg(long)]
    pub gpu: u32,
    /// Raise this NVIDIA XID (79: fallen off the bus).
    #[arg(long, conflicts_with_all = ["fault", "clear"])]
    pub xid: Option<u32>,
    /// Other faults: double_bit_ecc, ecc_storm, gpu_lost, overheat, recover; and, acting
    /// through the GPU's workers: hang, hang_collective, slow=PERCENT.
    #[arg(long, conflicts_with = "clear")]
    pub fault: Option<String>,
    /// Clear the GPU's Failed/Degraded state (admin override).
    #[arg(long)]
    pub clear: bool,
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<(kube::Client, String)> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig: reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: set KUBECONFIG, pass --kubeconfig or create ~/.kube/config")?,
    };
    let namespace = config.default_namespace.clone();
    Ok((kube::Client::try_from(config)?, namespace))
}

/// `http://host:port` → `host:port` (the agent's admin server speaks plain HTTP).
pub fn admin_authority(node: &str, url: &str) -> anyhow::Result<String> {
    match url.trim_end_matches('/').strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.contains('/') => Ok(rest.to_owned()),
        _ => bail!("GpuNode {node} status.adminUrl: expected http://HOST:PORT, got {url:?}"),
    }
}

async fn admin_of(nodes: &Api<GpuNode>, node: &str) -> anyhow::Result<String> {
    let object = nodes
        .get_opt(node)
        .await
        .with_context(|| format!("reading GpuNode {node}"))?
        .with_context(|| format!("GpuNode {node} not found"))?;
    let url = object.status.and_then(|s| s.admin_url).with_context(|| {
        format!("GpuNode {node} reports no adminUrl (is its agent connected and recent enough?)")
    })?;
    admin_authority(node, &url)
}

/// Runs the plugin (the binary's whole body).
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let (client, default_ns) = client(cli.kubeconfig.as_ref()).await?;
    match cli.command {
        Command::Logs(args) => logs(client, default_ns, args).await,
        Command::Inject(args) => inject(client, args).await,
    }
}

async fn logs(client: kube::Client, default_ns: String, args: LogsArgs) -> anyhow::Result<()> {
    let ns = args.namespace.clone().unwrap_or(default_ns);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<GpuNode> = Api::all(client);
    let job = jobs
        .get_opt(&args.job)
        .await
        .with_context(|| format!("reading TrainingJob {ns}/{}", args.job))?
        .with_context(|| format!("TrainingJob {} not found in namespace {ns}", args.job))?;
    let uid = job.metadata.uid.clone().context("TrainingJob has no metadata.uid")?;
    let status = job.status.unwrap_or_default();
    let current =
        status.attempt.with_context(|| format!("TrainingJob {} has no attempt yet", args.job))?;
    let wanted = match (args.attempt, args.previous) {
        (Some(n), _) => n,
        (None, true) => match u64::try_from(current.number - 1) {
            Ok(n) if n >= 1 => n,
            _ => bail!(
                "--previous: TrainingJob {} is on attempt {}, there is no earlier one",
                args.job,
                current.number
            ),
        },
        (None, false) => u64::try_from(current.number).unwrap_or_default(),
    };
    if wanted == 0 || wanted > u64::try_from(current.number).unwrap_or_default() {
        bail!(
            "--attempt: expected 1..={} (TrainingJob {} is on attempt {}), got {wanted}",
            current.number,
            args.job,
            current.number
        );
    }
    let world = current.placement.workers.len();
    let query = format!(
        "/v1/logs?job={uid}&attempt={wanted}&rank={}{}",
        args.rank,
        if args.follow { "&follow=true" } else { "" }
    );
    let mut out = std::io::stdout();
    let mut write = |chunk: &[u8]| {
        let _ = out.write_all(chunk);
        let _ = out.flush();
    };
    if wanted == u64::try_from(current.number).unwrap_or_default() {
        let seat = current
            .placement
            .workers
            .iter()
            .find(|w| u32::try_from(w.rank).ok() == Some(args.rank))
            .with_context(|| {
                format!(
                    "--rank: expected 0..{world} (TrainingJob {} attempt {} has {world} workers), \
                     got {}",
                    args.job, current.number, args.rank
                )
            })?;
        let admin = admin_of(&nodes, &seat.node).await?;
        return get_streaming(&admin, &query, &mut write)
            .await
            .map_err(|e| anyhow::anyhow!("agent of GpuNode {} ({admin}): {e}", seat.node));
    }
    // Status keeps only the current placement: ask the nodes the job is known to have used
    // (restart history, then the current placement), then every other node, for that log.
    let mut candidates: Vec<String> =
        status.restart_history.iter().filter_map(|r| r.node.clone()).collect();
    candidates.extend(current.placement.workers.iter().map(|w| w.node.clone()));
    let all = nodes.list(&Default::default()).await.context("listing GpuNodes")?;
    candidates.extend(all.items.iter().filter_map(|n| n.metadata.name.clone()));
    let mut asked = Vec::new();
    for node in candidates {
        if asked.contains(&node) {
            continue;
        }
        asked.push(node.clone());
        let Ok(admin) = admin_of(&nodes, &node).await else { continue };
        // Probe without following, so a 404 costs nothing; then stream from the one that has it.
        let probe = query.replace("&follow=true", "");
        if get_streaming(&admin, &probe, &mut |_| {}).await.is_ok() {
            eprintln!(
                "(status keeps no placement for attempt {wanted}; rank {} ran on GpuNode {node})",
                args.rank
            );
            return get_streaming(&admin, &query, &mut write)
                .await
                .map_err(|e| anyhow::anyhow!("agent of GpuNode {node} ({admin}): {e}"));
        }
    }
    bail!(
        "no agent has a log of TrainingJob {} attempt {wanted} rank {} (the job's status keeps \
         no placement for earlier attempts; asked GpuNodes: {})",
        args.job,
        args.rank,
        asked.join(", ")
    )
}

async fn inject(client: kube::Client, args: InjectArgs) -> anyhow::Result<()> {
    let nodes: Api<GpuNode> = Api::all(client);
    let admin = admin_of(&nodes, &args.node).await?;
    let (path, body) = match (args.xid, args.fault.as_deref(), args.clear) {
        (Some(xid), None, false) => {
            ("/inject", serde_json::json!({ "gpu": args.gpu, "fault": { "xid": xid } }))
        }
        (None, Some(f), false) => {
            let fault = flotilla_contract::inject::fault_body(f).map_err(anyhow::Error::msg)?;
            ("/inject", serde_json::json!({ "gpu": args.gpu, "fault": fault }))
        }
        (None, None, true) => ("/clear", serde_json::json!({ "gpu": args.gpu })),
        _ => bail!("expected exactly one of --xid N, --fault NAME or --clear"),
    };
    let answer = post_json(&admin, path, &body)
        .await
        .map_err(|e| anyhow::anyhow!("agent of GpuNode {} ({admin}): {e}", args.node))?;
    println!("{}: {answer}", args.node);
    Ok(())
}

/// Send `request` to the agent at `addr`, handing each body chunk of a successful answer to
/// `on_chunk` as it arrives; an unsuccessful answer is an error with its status and body.
async fn send(
    addr: &str,
    request: reqwest::RequestBuilder,
    on_chunk: &mut dyn FnMut(&[u8]),
) -> Result<(), String> {
    let mut response = request.send().await.map_err(|e| crate::http::cause(&e))?;
    let status = response.status();
    let what = format!("{} {}", addr, response.url().path());
    let mut error = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| format!("{what}: {}", crate::http::cause(&e)))?
    {
        if status.is_success() {
            on_chunk(&chunk);
        } else {
            error.extend_from_slice(&chunk);
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&error).trim_end()))
    }
}

/// `GET path` from `addr`, handing each body chunk to `on_chunk` as it arrives.
pub async fn get_streaming(
    addr: &str,
    path: &str,
    on_chunk: &mut dyn FnMut(&[u8]),
) -> Result<(), String> {
    let request = crate::http::client().get(format!("http://{addr}{path}"));
    send(addr, request, on_chunk).await
}

/// `POST path` with a JSON body; returns the answer's text.
pub async fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> Result<String, String> {
    let request = crate::http::client().post(format!("http://{addr}{path}")).json(body);
    let mut out = Vec::new();
    send(addr, request, &mut |c| out.extend_from_slice(c)).await?;
    Ok(String::from_utf8_lossy(&out).trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_must_be_plain_http_host_port() {
        assert_eq!(admin_authority("n", "http://10.0.0.7:9400/").unwrap(), "10.0.0.7:9400");
        for bad in ["https://x:1", "10.0.0.7:9400", "http://", "http://x/y"] {
            let e = admin_authority("n1", bad).unwrap_err().to_string();
            assert!(e.contains("GpuNode n1 status.adminUrl") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn flags_parse_like_the_issue_says() {
        let cli = Cli::try_parse_from([
            "kubectl-flotilla",
            "logs",
            "j",
            "-n",
            "ns",
            "--rank",
            "1",
            "--previous",
            "-f",
        ])
        .unwrap();
        let Command::Logs(a) = cli.command else { panic!("logs") };
        assert_eq!((a.job.as_str(), a.namespace.as_deref(), a.rank), ("j", Some("ns"), 1));
        assert!(a.previous && a.follow && a.attempt.is_none());
        assert!(
            Cli::try_parse_from(["k", "logs", "j", "--attempt", "1", "--previous"]).is_err(),
            "--attempt and --previous conflict"
        );
        assert!(
            Cli::try_parse_from(["k", "inject", "n", "--gpu", "0", "--xid", "79", "--clear"])
                .is_err()
        );
    }
}
