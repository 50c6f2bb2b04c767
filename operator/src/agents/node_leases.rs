//! The leader's side of the node Leases ([`flotilla_contract::node_lease`]): it watches them
//! into the registry ([`super::liveness`]) and writes the verdict that tells an agent it reaches
//! the API server but not the operator to stop its workers.
//!
//! A verdict goes to every node the operator has lost (silent past the heartbeat timeout) and to
//! every node with a Lease that has not registered with this leader within [`registration_window`]
//! of its watch starting; it is taken back when the node's agent is connected again. The
//! agent acts on each verdict once, kills its workers and acknowledges it on the Lease: that
//! acknowledgement is the fast way for the node's jobs to restart elsewhere; the slow way is
//! both channels staying quiet for the fence timeout plus the margin.

use super::NodeRegistry;
use super::liveness::LeaseObservation;
use flotilla_contract::node_lease::{
    FENCED, LABEL, RECONNECT_MAX_DELAY_S, VERDICT, lease_name, node_of,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the registry keeps of one Lease; `None` when it is no node Lease.
fn observation(lease: &Lease) -> Option<(String, LeaseObservation)> {
    let node = node_of(lease.metadata.name.as_deref()?)?.to_owned();
    let spec = lease.spec.as_ref();
    let annotation = |key: &str| {
        lease.metadata.annotations.as_ref().and_then(|a| a.get(key)).filter(|v| !v.is_empty())
    };
    Some((
        node,
        LeaseObservation {
            holder: spec.and_then(|s| s.holder_identity.clone()).unwrap_or_default(),
            renew_time: spec
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            verdict: annotation(VERDICT).cloned(),
            fenced: annotation(FENCED).cloned(),
        },
    ))
}

/// Watches the node Leases in `namespace` into `registry` until the task is dropped. Start it
/// when this process begins to lead: the registry concludes nothing about agents that have not
/// registered until the watch has run for a fence timeout and margin.
pub async fn watch(client: kube::Client, namespace: String, registry: Arc<NodeRegistry>) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{}={}", LABEL.0, LABEL.1));
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                if let Some((node, seen)) = observation(&lease)
                    && registry.leases.observe(&node, seen)
                {
                    registry.bump();
                }
            }
            Ok(watcher::Event::Delete(lease)) => {
                if let Some(node) = lease.metadata.name.as_deref().and_then(node_of) {
                    registry.leases.forget(node);
                }
            }
            Ok(watcher::Event::InitDone) => {
                registry.leases.synced();
                registry.bump();
            }
            Ok(watcher::Event::Init) => {}
            Err(e) => {
                tracing::warn!(error = %e, %namespace, "watching node Leases failed; retrying")
            }
        }
    }
}

/// What to write on one node's Lease, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// Declare the node lost.
    Verdict,
    /// Take the verdict back: the agent is connected again.
    TakeBack,
}

/// How long a new leader waits for an agent with a Lease to register before it declares the node
/// lost: the heartbeat timeout, plus twice the agent's longest reconnect delay (with its jitter).
pub fn registration_window(heartbeat_timeout: Duration) -> Duration {
    heartbeat_timeout + 2 * Duration::from_secs(RECONNECT_MAX_DELAY_S)
}

/// The verdict writes due now, by node.
fn due(registry: &NodeRegistry, heartbeat_timeout: Duration) -> BTreeMap<String, Write> {
    let mut writes = BTreeMap::new();
    let watched_long_enough =
        registry.leases.watched_for().is_some_and(|w| w > registration_window(heartbeat_timeout));
    for node in registry.leases.nodes() {
        let Some(lease) = registry.leases.get(&node) else { continue };
        let rec = registry.node(&node);
        let unreachable = match &rec {
            Some(r) => r.lost,
            None => watched_long_enough,
        };
        let connected = rec.as_ref().is_some_and(|r| r.connected && !r.lost);
        match (&lease.verdict, unreachable, connected) {
            (None, true, _) => {
                writes.insert(node, Write::Verdict);
            }
            (Some(_), _, true) => {
                writes.insert(node, Write::TakeBack);
            }
            _ => {}
        }
    }
    writes
}

/// Writes and takes back verdicts until the task is dropped. Run it only on the leader.
pub async fn verdicts(
    client: kube::Client,
    namespace: String,
    registry: Arc<NodeRegistry>,
    heartbeat_timeout: Duration,
    identity: String,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut changed = registry.changed();
    let recheck = (heartbeat_timeout / 4).max(Duration::from_millis(250));
    // Writes that landed but that the watch has not shown yet: not repeated meanwhile (a
    // repeated verdict would get a new id and ask the agent for a second acknowledgement).
    let mut written: BTreeMap<String, Write> = BTreeMap::new();
    loop {
        let writes = due(&registry, heartbeat_timeout);
        written.retain(|node, write| writes.get(node) == Some(write));
        for (node, write) in writes {
            if written.get(&node) == Some(&write) {
                continue;
            }
            let value = match write {
                Write::Verdict => {
                    let id = format!("{identity}/{}", flotilla_proto::now_unix_nanos());
                    tracing::warn!(%node, verdict = %id, "node lost: telling its agent to stop its workers through its Lease");
                    serde_json::Value::String(id)
                }
                Write::TakeBack => {
                    tracing::info!(%node, "agent connected again: taking the verdict back");
                    serde_json::Value::Null
                }
            };
            let patch = serde_json::json!({ "metadata": { "annotations": { VERDICT: value } } });
            let name = lease_name(&node);
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    written.insert(node, write);
                }
                Err(e) => {
                    tracing::warn!(%node, lease = %name, error = %e, "writing the verdict failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(recheck) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn a_node_lease_is_observed_with_its_annotations_and_others_are_ignored() {
        let lease = |name: &str| Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(BTreeMap::from([
                    (VERDICT.to_owned(), "op/1".to_owned()),
                    (FENCED.to_owned(), String::new()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some("i1".into()), ..Default::default() }),
        };
        let (node, seen) = observation(&lease("flotilla-agent-n1")).expect("a node Lease");
        assert_eq!(node, "n1");
        assert_eq!(seen.holder, "i1");
        assert_eq!(seen.verdict.as_deref(), Some("op/1"));
        assert_eq!(seen.fenced, None, "an empty annotation is none");
        assert!(observation(&lease("flotilla-operator")).is_none());
    }

    #[test]
    fn verdicts_go_to_lost_and_unregistered_nodes_and_are_taken_back_on_reconnect() {
        let registry = NodeRegistry::new();
        let timeout = Duration::ZERO;
        registry.leases.observe("never-registered", LeaseObservation::default());
        registry
            .leases
            .observe("back", LeaseObservation { verdict: Some("v".into()), ..Default::default() });
        registry.register(crate::agents::NodeRecord::named("back"));
        // Before the watch has run for the heartbeat timeout, nobody unregistered is judged.
        assert_eq!(due(&registry, timeout), BTreeMap::from([("back".into(), Write::TakeBack)]));
        registry.leases.synced();
        assert_eq!(due(&registry, timeout).len(), 1, "within the registration window");
        // Watched for longer than the window: as if synced that long ago.
        registry.leases.backdate_sync(registration_window(timeout) + Duration::from_secs(1));
        assert_eq!(
            due(&registry, timeout),
            BTreeMap::from([
                ("back".into(), Write::TakeBack),
                ("never-registered".into(), Write::Verdict),
            ])
        );
    }
}
