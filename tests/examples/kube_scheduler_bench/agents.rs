//! Synthetic agents: one gRPC stream each, acknowledging every launch and stop.

use crate::GPUS;
use crate::jobs::node_name;
use anyhow::bail;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub(crate) fn gpu_uuid(i: usize, g: u32) -> String {
    format!("GPU-bench-{i:05}-{g}")
}

/// Workers a synthetic agent "runs": (job UID, attempt) → (rank, GPU UUIDs).
pub(crate) type Running = HashMap<(String, u64), Vec<(u32, Vec<String>)>>;

/// Agent `i`: registers `node-i` with 8 GPUs, heartbeats, acknowledges launches with a started
/// worker and stops with an exited one; reconnects whenever its stream ends.
pub(crate) async fn synthetic_agent(i: usize, addr: String, registered: Arc<AtomicUsize>) {
    let mut running = Running::new();
    let mut counted = false;
    loop {
        let _ = agent_session(i, &addr, &mut running, &mut counted, &registered).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn agent_session(
    i: usize,
    addr: &str,
    running: &mut Running,
    counted: &mut bool,
    registered: &AtomicUsize,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    let gpus = (0..GPUS)
        .map(|g| pb::GpuInfo {
            index: g,
            uuid: gpu_uuid(i, g),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: format!("00000000:{:02X}:00.0", g + 1),
            nvlink_peers: (0..GPUS).filter(|&p| p != g).collect(),
            topology_domain: format!("{}/nvl0", node_name(i)),
        })
        .collect();
    let workers = running
        .iter()
        .flat_map(|((uid, attempt), ranks)| {
            ranks.iter().map(move |(rank, uuids)| pb::WorkerStatus {
                worker: Some(pb::WorkerRef {
                    job_uid: uid.clone(),
                    attempt: *attempt,
                    rank: *rank,
                }),
                pid: 1,
                gpu_uuids: uuids.clone(),
                started_at_unix_nanos: flotilla_proto::now_unix_nanos(),
            })
        })
        .collect();
    let register = pb::Register {
        node_name: node_name(i),
        agent_version: "kube-scheduler-bench".into(),
        instance_id: format!("kbench-{i}"),
        backend: "simulated".into(),
        gpus,
        workers,
        ..pb::Register::default()
    };
    tx.send(pb::AgentMessage { body: Some(Up::Register(register)) }).await?;
    let mut inbound = client.link(ReceiverStream::new(rx)).await?.into_inner();
    let heartbeat_ms = match inbound.message().await? {
        Some(pb::OperatorMessage { body: Some(Down::Registered(r)) }) => r.heartbeat_interval_ms,
        other => bail!("expected Registered, got {other:?}"),
    };
    if !std::mem::replace(counted, true) {
        registered.fetch_add(1, Ordering::Relaxed);
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(100)));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message? else { bail!("the operator closed the stream") };
                for reply in answer(message, running) {
                    tx.send(reply).await?;
                }
            }
            _ = heartbeat.tick() => {
                let beat = pb::Heartbeat {
                    sent_at_unix_nanos: flotilla_proto::now_unix_nanos(),
                    last_critical_seq: 0,
                };
                tx.send(pb::AgentMessage { body: Some(Up::Heartbeat(beat)) }).await?;
            }
        }
    }
}

/// What a synthetic agent sends back for one command.
pub(crate) fn answer(message: pb::OperatorMessage, running: &mut Running) -> Vec<pb::AgentMessage> {
    let result = |command_id, message: &str| pb::AgentMessage {
        body: Some(Up::CommandResult(pb::CommandResult {
            command_id,
            ok: true,
            message: message.into(),
        })),
    };
    let event =
        |worker: pb::WorkerRef, phase: pb::WorkerPhase, signal: Option<i32>| pb::AgentMessage {
            body: Some(Up::Worker(pb::WorkerEvent {
                worker: Some(worker),
                phase: phase as i32,
                signal,
                at_unix_nanos: flotilla_proto::now_unix_nanos(),
                ..pb::WorkerEvent::default()
            })),
        };
    match message.body {
        Some(Down::LaunchWorker(launch)) => {
            let worker = launch.worker.unwrap_or_default();
            running
                .entry((worker.job_uid.clone(), worker.attempt))
                .or_default()
                .push((worker.rank, launch.gpu_uuids));
            vec![
                result(launch.command_id, "launched"),
                event(worker, pb::WorkerPhase::Started, None),
            ]
        }
        Some(Down::StopWorker(stop)) => {
            let worker = stop.worker.unwrap_or_default();
            let key = (worker.job_uid.clone(), worker.attempt);
            let ranks = running.remove(&key).unwrap_or_default();
            let (stopped, kept): (Vec<_>, Vec<_>) =
                ranks.into_iter().partition(|(rank, _)| stop.all_ranks || *rank == worker.rank);
            if !kept.is_empty() {
                running.insert(key, kept);
            }
            let mut replies = vec![result(stop.command_id, "stopping")];
            for (rank, _) in stopped {
                let r = pb::WorkerRef { rank, ..worker.clone() };
                replies.push(event(r, pb::WorkerPhase::Exited, Some(15)));
            }
            replies
        }
        Some(Down::GpuCommand(c)) => vec![result(c.command_id, "done")],
        _ => Vec::new(),
    }
}
