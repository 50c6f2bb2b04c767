//! Domain types ⇄ `flotilla.agent.v1` messages. Only this module and `link` touch proto types.

use crate::backend::{GpuDevice, GpuSample};
use crate::health::{Fault, Health, HealthStatus};
use crate::outbox::{CriticalKind, CriticalRecord};
use crate::supervisor::{RunningWorker, WorkerId, WorkerLaunch, WorkerUpdate};
use flotilla_proto::v1 as pb;

/// Proto health enum.
pub fn health(h: Health) -> pb::GpuHealth {
    match h {
        Health::Healthy => pb::GpuHealth::Healthy,
        Health::Degraded => pb::GpuHealth::Degraded,
        Health::Failed => pb::GpuHealth::Failed,
    }
}

/// Proto health state of one GPU.
pub fn health_state(uuid: &str, s: &HealthStatus) -> pb::GpuHealthState {
    pb::GpuHealthState {
        gpu_uuid: uuid.to_owned(),
        health: health(s.health) as i32,
        reason: s.reason.clone(),
        message: s.message.clone(),
        last_xid: s.last_xid,
    }
}

/// Proto inventory entry.
pub fn gpu_info(d: &GpuDevice) -> pb::GpuInfo {
    pb::GpuInfo {
        index: d.index,
        uuid: d.uuid.clone(),
        model: d.model.clone(),
        memory_bytes: d.memory_bytes,
        pci_bus_id: d.pci_bus_id.clone(),
        nvlink_peers: d.nvlink_peers.clone(),
        topology_domain: d.topology_domain.clone(),
    }
}

/// Proto sample; `uuid` is the GPU's.
pub fn sample(uuid: &str, s: &GpuSample) -> pb::GpuSample {
    pb::GpuSample {
        gpu_uuid: uuid.to_owned(),
        temperature_c: s.temperature_c,
        memory_temperature_c: s.memory_temperature_c,
        power_w: s.power_w,
        energy_mj: s.energy_mj,
        gpu_util_pct: s.gpu_util_pct,
        mem_copy_util_pct: s.mem_copy_util_pct,
        memory_used_bytes: s.memory_used_bytes,
        memory_free_bytes: s.memory_free_bytes,
        sm_clock_mhz: s.sm_clock_mhz,
        mem_clock_mhz: s.mem_clock_mhz,
        ecc_corrected_volatile: s.ecc_corrected_volatile,
        ecc_uncorrected_volatile: s.ecc_uncorrected_volatile,
        retired_pages: s.retired_pages,
        retired_pages_pending: s.retired_pages_pending,
        remapped_rows_correctable: s.remapped_rows_correctable,
        remapped_rows_uncorrectable: s.remapped_rows_uncorrectable,
        row_remap_failure: s.row_remap_failure,
        throttle_reasons: s.throttle_reasons,
        pcie_replay_count: s.pcie_replay_count,
        slowdown_temperature_c: s.slowdown_temperature_c,
    }
}

/// Proto critical event.
pub fn critical(e: &CriticalRecord) -> pb::CriticalEvent {
    let (kind, xid) = match e.kind {
        CriticalKind::Fault(Fault::Xid(xid)) => (pb::FaultKind::Xid, xid),
        CriticalKind::Fault(Fault::DoubleBitEcc) => (pb::FaultKind::DoubleBitEcc, 0),
        CriticalKind::Fault(Fault::SingleBitEccStorm | Fault::MemoryWear) => {
            (pb::FaultKind::SingleBitEccStorm, 0)
        }
        CriticalKind::Fault(Fault::GpuLost) => (pb::FaultKind::GpuLost, 0),
        CriticalKind::Fault(Fault::Overheating) => (pb::FaultKind::Overheating, 0),
        CriticalKind::Fault(Fault::SlowSteps) => (pb::FaultKind::SlowSteps, 0),
        CriticalKind::Recovered => (pb::FaultKind::Recovered, 0),
    };
    pb::CriticalEvent {
        seq: e.seq,
        gpu_uuid: e.gpu_uuid.clone(),
        kind: kind as i32,
        xid,
        health: Some(health_state(&e.gpu_uuid, &e.health)),
        observed_at_unix_nanos: e.observed_at_unix_nanos,
    }
}

fn worker_ref(id: &WorkerId) -> pb::WorkerRef {
    pb::WorkerRef { job_uid: id.job_uid.clone(), attempt: id.attempt, rank: id.rank }
}

/// Proto worker status for the registration.
pub fn running_worker(w: &RunningWorker) -> pb::WorkerStatus {
    pb::WorkerStatus {
        worker: Some(worker_ref(&w.id)),
        pid: w.pid,
        gpu_uuids: w.gpu_uuids.clone(),
        started_at_unix_nanos: w.started_at_unix_nanos,
    }
}

fn worker_activity(a: flotilla_contract::progress::Activity) -> pb::WorkerActivity {
    use flotilla_contract::progress::Activity;
    match a {
        Activity::Training => pb::WorkerActivity::Training,
        Activity::Starting => pb::WorkerActivity::Starting,
        Activity::Checkpointing => pb::WorkerActivity::Checkpointing,
        Activity::Waiting => pb::WorkerActivity::Waiting,
        Activity::PeerLost => pb::WorkerActivity::PeerLost,
    }
}

/// Proto worker event.
pub fn worker_event(u: &WorkerUpdate) -> pb::WorkerEvent {
    let mut ev =
        pb::WorkerEvent { at_unix_nanos: flotilla_proto::now_unix_nanos(), ..Default::default() };
    match u {
        WorkerUpdate::Started(id) => {
            ev.worker = Some(worker_ref(id));
            ev.phase = pb::WorkerPhase::Started as i32;
        }
        WorkerUpdate::Progress(id, p) => {
            ev.worker = Some(worker_ref(id));
            ev.phase = pb::WorkerPhase::Progress as i32;
            ev.progress = Some(pb::WorkerProgress {
                step: p.step,
                total_steps: p.total_steps,
                loss: p.loss,
                tokens_per_second: p.tokens_per_second,
                last_checkpoint_step: p.last_checkpoint_step,
                step_seconds: p.step_seconds,
                compute_seconds: p.compute_seconds,
                activity: worker_activity(p.activity) as i32,
                waiting_on_rank: p.waiting_on_rank,
            });
        }
        WorkerUpdate::Exited { id, code, signal } => {
            ev.worker = Some(worker_ref(id));
            ev.phase = pb::WorkerPhase::Exited as i32;
            ev.exit_code = *code;
            ev.signal = *signal;
        }
        WorkerUpdate::FailedToStart(id, message) => {
            ev.worker = Some(worker_ref(id));
            ev.phase = pb::WorkerPhase::FailedToStart as i32;
            ev.message = message.clone();
        }
    }
    ev
}

/// Domain worker identity from a command; names the missing field.
pub fn worker_id(r: Option<&pb::WorkerRef>, command: &str) -> Result<WorkerId, String> {
    let r = r.ok_or_else(|| format!("{command}.worker: expected a WorkerRef, got none"))?;
    if r.job_uid.is_empty() {
        return Err(format!("{command}.worker.job_uid: expected a job UID, got an empty string"));
    }
    Ok(WorkerId { job_uid: r.job_uid.clone(), attempt: r.attempt, rank: r.rank })
}

/// Domain launch from the command.
pub fn launch(l: &pb::LaunchWorker) -> Result<WorkerLaunch, String> {
    Ok(WorkerLaunch {
        id: worker_id(l.worker.as_ref(), "launch_worker")?,
        local_rank: l.local_rank,
        world_size: l.world_size,
        gpu_uuids: l.gpu_uuids.clone(),
        command: l.command.clone(),
        args: l.args.clone(),
        env: l.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        checkpoint_dir: l.checkpoint_dir.clone(),
        master_addr: l.master_addr.clone(),
        master_port: l.master_port,
    })
}
