//! Mirrors the fleet state into `GpuNode` status: health changes at once, heartbeat time and
//! temperatures at most every `telemetry_every`. Creates a `GpuNode` for an agent that registers
//! without one.
//!
//! This writes the fields the agent link owns (`gpus`, `gpuModel`, `lastFault`,
//! `lastHeartbeatTime`) and refreshes the summary counts so `kubectl get gpunodes` is right
//! before the `GpuNode` controller's next pass; `assignedTo` is kept as it is.

use super::state::{GpuHealth, NodeRecord, NodeRegistry};
use crate::crd::gpu_node::{self as crd, GpuNode, GpuNodeSpec, GpuNodeStatus};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::AbortOnDropHandle;

fn timestamp(unix_nanos: i64) -> Option<Time> {
    Timestamp::from_nanosecond(i128::from(unix_nanos)).ok().map(Time)
}

fn crd_health(h: GpuHealth) -> crd::GpuHealth {
    match h {
        GpuHealth::Healthy => crd::GpuHealth::Healthy,
        GpuHealth::Degraded => crd::GpuHealth::Degraded,
        GpuHealth::Failed => crd::GpuHealth::Failed,
        GpuHealth::Unknown => crd::GpuHealth::Unknown,
    }
}

/// The status the fleet state implies for a node, given the object's current spec and status
/// (whose `assignedTo` and conditions are kept). `now_unix_nanos` dates the heartbeat.
pub fn desired_status(
    record: &NodeRecord,
    spec: &GpuNodeSpec,
    current: Option<&GpuNodeStatus>,
    now_unix_nanos: i64,
) -> GpuNodeStatus {
    let mut status = current.cloned().unwrap_or_default();
    let assigned: HashMap<i32, Option<String>> =
        status.gpus.iter().map(|g| (g.index, g.assigned_to.clone())).collect();
    status.gpus = record
        .gpus
        .iter()
        .map(|g| {
            let index = g.index as i32;
            crd::GpuState {
                index,
                uuid: g.uuid.clone(),
                health: if record.lost { crd::GpuHealth::Unknown } else { crd_health(g.health) },
                memory_mib: i64::try_from(g.memory_bytes >> 20).ok(),
                temperature_celsius: g.temperature_c.map(|t| t.round() as i32),
                assigned_to: assigned.get(&index).cloned().flatten(),
            }
        })
        .collect();
    status.gpu_model = record.gpus.first().map(|g| g.model.clone());
    status.last_fault = record.last_fault.as_ref().map(|f| crd::GpuFault {
        time: timestamp(f.observed_at_unix_nanos),
        gpu: f.gpu as i32,
        xid: f.xid.map(|x| x as i32),
        message: f.message.clone(),
        summary: format!("GPU {} {}", f.gpu, f.reason),
    });
    let silent = i64::try_from(record.last_heard.elapsed().as_nanos()).unwrap_or(i64::MAX);
    status.last_heartbeat_time = timestamp(now_unix_nanos.saturating_sub(silent));
    status.count_gpus(spec);
    status
}

/// What must be written at once when it changes: health, liveness, the last fault.
fn fingerprint(record: &NodeRecord) -> Fingerprint {
    (
        record.lost,
        record.gpus.iter().map(|g| (g.health, g.reason.clone())).collect(),
        record.last_fault.as_ref().map(|f| (f.gpu, f.observed_at_unix_nanos)),
    )
}

type Fingerprint = (bool, Vec<(GpuHealth, String)>, Option<(u32, i64)>);

/// The `GpuNode`s as last seen by this process's watch.
type Cache = Store<DeserializeGuard<GpuNode>>;

/// The object to build on: the watch's copy, else read from (or created in) the API server. A
/// fleet of a thousand nodes written every few seconds would otherwise cost a read per write.
async fn current(api: &Api<GpuNode>, cache: &Cache, node: &str) -> Result<GpuNode, kube::Error> {
    if let Some(guard) = cache.get(&ObjectRef::new(node))
        && let Ok(object) = &guard.0
    {
        return Ok(object.clone());
    }
    match api.get_opt(node).await? {
        Some(o) => Ok(o),
        None => {
            let fresh = GpuNode::new(node, GpuNodeSpec::default());
            match api.create(&PostParams::default(), &fresh).await {
                Ok(o) => Ok(o),
                // Created meanwhile by someone else: fine, read it.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(node).await,
                Err(e) => Err(e),
            }
        }
    }
}

/// The merge patch for one node's status: every field the agent link owns, without the
/// conditions and observed generation the `GpuNode` controller writes (a copy from the watch
/// may be a moment older than that controller's last write).
fn status_patch(status: &GpuNodeStatus) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(status)?;
    if let Some(fields) = value.as_object_mut() {
        fields.remove("conditions");
        fields.remove("observedGeneration");
        // A merge patch merges objects key by key: a fault without an XID (ECC, GPU lost) must
        // say so, or the XID of the fault before it stays on the new one.
        if let Some(fault) = fields.get_mut("lastFault").and_then(|f| f.as_object_mut()) {
            for key in ["time", "xid"] {
                fault.entry(key).or_insert(serde_json::Value::Null);
            }
        }
    }
    Ok(serde_json::json!({ "status": value }))
}

/// Writes one node's status, creating the `GpuNode` if it does not exist.
async fn write(
    api: &Api<GpuNode>,
    cache: &Cache,
    record: &NodeRecord,
    admin_url: Option<String>,
) -> Result<(), kube::Error> {
    let object = current(api, cache, &record.node).await?;
    let status = desired_status(
        record,
        &object.spec,
        object.status.as_ref(),
        flotilla_proto::now_unix_nanos(),
    );
    let mut status = status;
    status.admin_url = admin_url;
    status.address = record.address.clone();
    let patch = status_patch(&status).map_err(kube::Error::SerdeError)?;
    api.patch_status(&record.node, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Mirrors `fleet` into `GpuNode` status until the task is dropped. Run it only on the leader.
pub async fn run(client: Client, fleet: Arc<NodeRegistry>, telemetry_every: Duration) {
    let api: Api<GpuNode> = Api::all(client.clone());
    let (cache, writer) = reflector::store();
    let watch = reflector(
        writer,
        watcher(Api::<DeserializeGuard<GpuNode>>::all(client), watcher::Config::default())
            .default_backoff(),
    );
    // Ends with this task.
    let _watch = AbortOnDropHandle::new(tokio::spawn(watch.for_each(|_| std::future::ready(()))));
    let mut changed = fleet.changed();
    let mut written: HashMap<String, ((Fingerprint, Option<String>), Instant)> = HashMap::new();
    loop {
        for record in fleet.nodes() {
            let print = (fingerprint(&record), fleet.admin_url(&record.node));
            let due = match written.get(&record.node) {
                Some((last, at)) => *last != print || at.elapsed() >= telemetry_every,
                None => true,
            };
            if !due {
                continue;
            }
            match write(&api, &cache, &record, print.1.clone()).await {
                Ok(()) => {
                    written.insert(record.node.clone(), (print, Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(node = %record.node, error = %e, "mirroring GpuNode status failed; retrying")
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(telemetry_every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::state::{FaultRecord, GpuRecord};

    fn record() -> NodeRecord {
        let gpu = |index: u32, health: GpuHealth| GpuRecord {
            index,
            uuid: format!("GPU-{index}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: String::new(),
            nvlink_peers: vec![],
            topology_domain: String::new(),
            health,
            reason: String::new(),
            message: String::new(),
            last_xid: 0,
            temperature_c: Some(61.4),
            memory_used_bytes: None,
        };
        NodeRecord {
            node: "node-a".into(),
            agent_version: "0.1.0".into(),
            instance_id: "i".into(),
            process_id: "p".into(),
            backend: "simulated".into(),
            gpus: vec![
                gpu(0, GpuHealth::Healthy),
                gpu(1, GpuHealth::Failed),
                gpu(2, GpuHealth::Healthy),
            ],
            applied_seq: 1,
            connected: true,
            lost: false,
            last_heard: Instant::now(),
            last_fault: Some(FaultRecord {
                gpu: 1,
                xid: Some(79),
                reason: "Xid79".into(),
                message: "XID 79 is a fatal hardware error".into(),
                observed_at_unix_nanos: 1_700_000_000_000_000_000,
            }),
            workers: vec![],
            session: 1,
            address: None,
        }
    }

    #[test]
    fn status_mirrors_health_fault_and_counts_keeping_assignments() {
        let current = GpuNodeStatus {
            gpus: vec![crd::GpuState {
                index: 2,
                assigned_to: Some("default/job-a".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let spec = GpuNodeSpec { cordoned_gpus: vec![0], ..Default::default() };
        let s = desired_status(&record(), &spec, Some(&current), 1_700_000_001_000_000_000);
        assert_eq!(s.gpus.len(), 3);
        assert_eq!(s.gpus[1].health, crd::GpuHealth::Failed);
        assert_eq!(s.gpus[1].memory_mib, Some(80 * 1024));
        assert_eq!(s.gpus[0].temperature_celsius, Some(61));
        assert_eq!(s.gpus[2].assigned_to.as_deref(), Some("default/job-a"));
        assert_eq!(s.total_gpus, 3);
        assert_eq!(s.healthy_gpus, 1, "GPU 0 is cordoned, GPU 1 failed");
        assert_eq!(s.gpu_model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        let fault = s.last_fault.expect("fault");
        assert_eq!((fault.gpu, fault.xid, fault.summary.as_str()), (1, Some(79), "GPU 1 Xid79"));
        assert!(s.last_heartbeat_time.is_some());
    }

    #[test]
    fn a_lost_agent_makes_every_gpu_unknown() {
        let mut r = record();
        r.lost = true;
        let s = desired_status(&r, &GpuNodeSpec::default(), None, 1_700_000_001_000_000_000);
        assert!(s.gpus.iter().all(|g| g.health == crd::GpuHealth::Unknown));
        assert_eq!(s.healthy_gpus, 0);
    }

    #[test]
    fn the_patch_leaves_the_gpunode_controllers_fields_alone() {
        let current = GpuNodeStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "AgentReporting".into(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            observed_generation: Some(3),
            ..Default::default()
        };
        let s = desired_status(&record(), &GpuNodeSpec::default(), Some(&current), 1);
        let patch = status_patch(&s).expect("serialises");
        let status = patch["status"].as_object().expect("status");
        assert!(!status.contains_key("conditions"));
        assert!(!status.contains_key("observedGeneration"));
        assert_eq!(status["gpus"].as_array().map(Vec::len), Some(3));
        assert_eq!(status["healthyGpus"], 2);
        assert!(status.contains_key("lastHeartbeatTime"));
    }

    #[test]
    fn a_fault_without_an_xid_clears_the_xid_of_the_fault_before() {
        let mut r = record();
        r.last_fault = Some(FaultRecord {
            gpu: 2,
            xid: None,
            reason: "DoubleBitEcc".into(),
            message: "double-bit ECC error".into(),
            observed_at_unix_nanos: 1_700_000_002_000_000_000,
        });
        let s = desired_status(&r, &GpuNodeSpec::default(), None, 1);
        let patch = status_patch(&s).expect("serialises");
        let fault = patch["status"]["lastFault"].as_object().expect("lastFault");
        assert_eq!(fault.get("xid"), Some(&serde_json::Value::Null), "{fault:?}");
        assert_eq!(fault["gpu"], 2);
        let with_xid = status_patch(&desired_status(&record(), &GpuNodeSpec::default(), None, 1));
        assert_eq!(with_xid.expect("serialises")["status"]["lastFault"]["xid"], 79);
    }

    #[test]
    fn fingerprint_ignores_telemetry_but_not_health() {
        let a = record();
        let mut hotter = a.clone();
        hotter.gpus[0].temperature_c = Some(88.0);
        assert_eq!(fingerprint(&a), fingerprint(&hotter));
        let mut failed = a.clone();
        failed.gpus[2].health = GpuHealth::Failed;
        assert_ne!(fingerprint(&a), fingerprint(&failed));
    }
}
