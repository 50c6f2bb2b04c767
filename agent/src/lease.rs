//! The node's Lease on the API server: the agent's second way of knowing that it may keep its
//! workers running, and the operator's way to tell it that it may not.
//!
//! The agent renews the `coordination.k8s.io/v1` Lease `flotilla-agent-<node>` a few times per
//! fence timeout. A successful renewal counts as contact, exactly like an acknowledged heartbeat
//! to the operator: the fence watchdog ([`crate::link`]) kills the node's workers only when
//! *neither* the operator nor the API server has been reached for the fence timeout. So an
//! operator crash, restart or upgrade — however long — stops no training, as the kubelet's pods
//! keep running while the control plane is away.
//!
//! The operator in turn restarts a node's jobs elsewhere only once it knows the node's workers
//! are gone: the agent re-registered without them, or the Lease has not changed for the fence
//! timeout plus a margin (the agent, cut off from both, has fenced itself), or the agent has
//! acknowledged the operator's verdict. The verdict is for an agent that still reaches the API
//! server but not the operator: the operator writes the annotation [`VERDICT`] (a fresh id) on
//! the Lease; the agent, on its next renewal, kills its workers and writes the same id to
//! [`FENCED`]. Each verdict is acted on once.

use crate::core::AgentCore;
use crate::link::Contact;
use crate::supervisor::WorkerSupervisor;
use flotilla_contract::node_lease::{FENCED, LABEL, VERDICT, lease_name};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where the node's Lease lives.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's namespace).
    pub namespace: String,
}

/// What one renewal found.
#[derive(Debug, PartialEq, Eq)]
enum Renewed {
    /// Nothing to do.
    Quiet,
    /// The operator declared the node lost with this verdict id, not yet acted on.
    Verdict(String),
}

/// How often to renew, for a fence timeout: six times per fence (at least every second, at most
/// every ten), so that a few failed renewals in a row do not fence.
pub fn renew_interval(fence: Duration) -> Duration {
    (fence / 6).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Renews the Lease until `shutdown`; touches `contact` with each renewal's send instant and
/// fences on a new verdict.
pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    core: Arc<AgentCore>,
    supervisor: Arc<dyn WorkerSupervisor>,
    contact: Contact,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(core.node());
    // The verdict acted on (killed for); written to FENCED on every renewal after.
    let mut fenced: Option<String> = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        let fence = contact.fence();
        let sent = Instant::now();
        match renew(&api, &name, core.process_id(), fence, fenced.as_deref()).await {
            Ok(renewed) => {
                contact.touch_at(sent);
                core.metrics.lease_renewals.with_label_values(&["ok"]).inc();
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), lease = %name, "Lease renewed again");
                }
                if let Renewed::Verdict(id) = renewed {
                    let reason = format!(
                        "the operator declared node {} lost (verdict {id} on Lease {}/{name})",
                        core.node(),
                        config.namespace
                    );
                    tracing::error!(%reason, "killing every worker");
                    core.metrics.fence_kills.inc();
                    supervisor.kill_all(&reason);
                    fenced = Some(id);
                    // Acknowledge at once rather than at the next renewal.
                    continue;
                }
            }
            Err(e) => {
                core.metrics.lease_renewals.with_label_values(&["error"]).inc();
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(error = %e, lease = %name, "renewing the node's Lease failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(renew_interval(fence)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One renewal: reads the Lease (creating it if missing), writes holder, duration, renew time
/// and the acknowledged verdict, with the read's resourceVersion (a concurrent verdict makes it
/// fail, and the next renewal sees the verdict).
async fn renew(
    api: &Api<Lease>,
    name: &str,
    process: &str,
    fence: Duration,
    fenced: Option<&str>,
) -> Result<Renewed, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let spec = |acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(process.to_owned()),
        lease_duration_seconds: Some(fence.as_secs().max(1) as i32),
        renew_time: Some(now.clone()),
        acquire_time: acquired.or_else(|| Some(now.clone())),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(LABEL.0.to_owned(), LABEL.1.to_owned())])),
                ..Default::default()
            },
            spec: Some(spec(None)),
        };
        api.create(&PostParams::default(), &lease).await?;
        return Ok(Renewed::Quiet);
    };
    let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let verdict = annotations.get(VERDICT).cloned();
    if let Some(id) = fenced {
        annotations.insert(FENCED.to_owned(), id.to_owned());
    }
    let labels = lease.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL.0.to_owned(), LABEL.1.to_owned());
    let old = lease.spec.take().unwrap_or_default();
    let same_holder = old.holder_identity.as_deref() == Some(process);
    lease.spec = Some(spec(if same_holder { old.acquire_time } else { None }));
    api.replace(name, &PostParams::default(), &lease).await?;
    Ok(match verdict {
        Some(id) if !id.is_empty() && fenced != Some(id.as_str()) => Renewed::Verdict(id),
        _ => Renewed::Quiet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_six_times_per_fence_within_bounds() {
        assert_eq!(renew_interval(Duration::from_secs(30)), Duration::from_secs(5));
        assert_eq!(renew_interval(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(renew_interval(Duration::from_secs(600)), Duration::from_secs(10));
    }
}
