//! `flotilla.agent.v1` messages → fleet state, with validation that names the offending field.

use super::state::{FaultRecord, GpuHealth, GpuRecord, NodeRecord, RunningWorkerRecord};
use flotilla_proto::v1 as pb;
use std::collections::HashSet;
use std::time::Instant;

/// Most GPUs one registration may list: a bound on the message, well above any real node
/// (the API's limit on one worker, [`crate::crd::training_job::MAX_GPUS_PER_NODE`], is 16), so a
/// node larger than the scheduler plans for still registers and reports its health.
pub const MAX_REGISTERED_GPUS: usize = 64;

fn health(value: i32, field: &str) -> Result<GpuHealth, String> {
    match pb::GpuHealth::try_from(value) {
        Ok(pb::GpuHealth::Healthy) => Ok(GpuHealth::Healthy),
        Ok(pb::GpuHealth::Degraded) => Ok(GpuHealth::Degraded),
        Ok(pb::GpuHealth::Failed) => Ok(GpuHealth::Failed),
        _ => Err(format!("{field}: expected HEALTHY, DEGRADED or FAILED, got {value}")),
    }
}

/// Validates a registration and turns it into a node record.
pub fn register(r: &pb::Register) -> Result<NodeRecord, String> {
    if r.node_name.is_empty() {
        return Err("register.node_name: expected a node name, got an empty string".into());
    }
    if r.instance_id.is_empty() {
        return Err("register.instance_id: expected an id, got an empty string".into());
    }
    if r.gpus.len() > MAX_REGISTERED_GPUS {
        return Err(format!(
            "register.gpus: expected at most {MAX_REGISTERED_GPUS}, got {}",
            r.gpus.len()
        ));
    }
    let mut uuids = HashSet::new();
    let mut gpus = Vec::with_capacity(r.gpus.len());
    for (i, g) in r.gpus.iter().enumerate() {
        if g.index as usize != i {
            return Err(format!(
                "register.gpus[{i}].index: expected {i} (ordered by index), got {}",
                g.index
            ));
        }
        if g.uuid.is_empty() || !uuids.insert(g.uuid.as_str()) {
            return Err(format!(
                "register.gpus[{i}].uuid: expected a unique non-empty UUID, got {:?}",
                g.uuid
            ));
        }
        gpus.push(GpuRecord {
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_bytes: g.memory_bytes,
            pci_bus_id: g.pci_bus_id.clone(),
            nvlink_peers: g.nvlink_peers.clone(),
            topology_domain: g.topology_domain.clone(),
            health: GpuHealth::Healthy,
            reason: String::new(),
            message: String::new(),
            last_xid: 0,
            temperature_c: None,
            memory_used_bytes: None,
        });
    }
    for (i, h) in r.health.iter().enumerate() {
        let field = format!("register.health[{i}]");
        let Some(gpu) = gpus.iter_mut().find(|g| g.uuid == h.gpu_uuid) else {
            return Err(format!(
                "{field}.gpu_uuid: expected a UUID from register.gpus, got {:?}",
                h.gpu_uuid
            ));
        };
        gpu.health = health(h.health, &format!("{field}.health"))?;
        gpu.reason = h.reason.clone();
        gpu.message = h.message.clone();
        gpu.last_xid = h.last_xid;
    }
    let mut workers = Vec::with_capacity(r.workers.len());
    for (i, w) in r.workers.iter().enumerate() {
        let Some(id) = w.worker.as_ref().filter(|id| !id.job_uid.is_empty()) else {
            return Err(format!(
                "register.workers[{i}].worker.job_uid: expected a job UID, got none"
            ));
        };
        workers.push(RunningWorkerRecord {
            job_uid: id.job_uid.clone(),
            attempt: id.attempt,
            rank: id.rank,
            pid: w.pid,
            gpu_uuids: w.gpu_uuids.clone(),
        });
    }
    Ok(NodeRecord {
        node: r.node_name.clone(),
        agent_version: r.agent_version.clone(),
        instance_id: r.instance_id.clone(),
        process_id: match r.process_id.trim() {
            "" => r.instance_id.clone(),
            p => p.to_owned(),
        },
        address: match r.address.trim() {
            "" => None,
            a => Some(
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| {
                        format!("register.address: expected an IP address or nothing, got {a:?}")
                    })?
                    .to_string(),
            ),
        },
        backend: r.backend.clone(),
        gpus,
        applied_seq: 0,
        connected: true,
        lost: false,
        last_heard: Instant::now(),
        last_fault: None,
        workers,
        session: 0,
    })
}

/// Applies a critical event to the node. Returns `Ok(true)` when it was new (and applied),
/// `Ok(false)` when it was a resend of one already applied.
pub fn apply_critical(node: &mut NodeRecord, e: &pb::CriticalEvent) -> Result<bool, String> {
    if e.seq == 0 {
        return Err("critical.seq: expected >= 1, got 0".into());
    }
    let kind = pb::FaultKind::try_from(e.kind)
        .ok()
        .filter(|k| *k != pb::FaultKind::Unspecified)
        .ok_or_else(|| format!("critical.kind: expected a FaultKind, got {}", e.kind))?;
    let state = e.health.as_ref().ok_or("critical.health: expected the GPU's health, got none")?;
    let new_health = health(state.health, "critical.health.health")?;
    if e.seq <= node.applied_seq {
        return Ok(false);
    }
    let Some(gpu) = node.gpu_mut(&e.gpu_uuid) else {
        return Err(format!(
            "critical.gpu_uuid: expected a GPU of node {}, got {:?}",
            node.node, e.gpu_uuid
        ));
    };
    gpu.health = new_health;
    gpu.reason = state.reason.clone();
    gpu.message = state.message.clone();
    if kind == pb::FaultKind::Xid {
        gpu.last_xid = e.xid;
    }
    let index = gpu.index;
    if kind != pb::FaultKind::Recovered {
        node.last_fault = Some(FaultRecord {
            gpu: index,
            xid: (kind == pb::FaultKind::Xid).then_some(e.xid),
            reason: state.reason.clone(),
            message: state.message.clone(),
            observed_at_unix_nanos: e.observed_at_unix_nanos,
        });
    }
    node.applied_seq = e.seq;
    Ok(true)
}

/// Stores the telemetry the operator keeps (temperature and memory; the rest is for metrics).
pub fn apply_health(node: &mut NodeRecord, report: &pb::HealthReport) {
    for s in &report.samples {
        if let Some(gpu) = node.gpu_mut(&s.gpu_uuid) {
            gpu.temperature_c = Some(s.temperature_c);
            gpu.memory_used_bytes = Some(s.memory_used_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(address: &str) -> pb::Register {
        pb::Register {
            node_name: "node-a".into(),
            instance_id: "i".into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_reported_address_must_be_an_ip_and_is_kept_normalised() {
        assert_eq!(register(&registration("")).expect("none").address, None);
        let v6 = register(&registration(" 2001:DB8::7 ")).expect("IPv6");
        assert_eq!(v6.address.as_deref(), Some("2001:db8::7"));
        let err = register(&registration("node-a.example")).expect_err("a name");
        assert!(err.starts_with("register.address: expected an IP address"), "{err}");
        assert!(err.contains("node-a.example"), "{err}");
    }
}
