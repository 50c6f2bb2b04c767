//! The agent's state: GPU inventory, per-GPU health, the latest samples and the critical-event
//! outbox. Backends feed it; the link reads it; the admin endpoint inspects it.

use crate::backend::{BackendError, GpuBackend, GpuDevice, GpuEvent, GpuSample};
use crate::health::{
    Fault, GpuHealthTracker, HealthStatus, SampleSignals, faults_from_sample, has_cooled,
};
use crate::metrics::AgentMetrics;
use crate::outbox::{CriticalKind, CriticalRecord, Outbox};
use crate::persist::{self, PersistedState};
use crate::supervisor::{AttemptFence, SupervisorError};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};

/// One GPU as the admin endpoint shows it.
#[derive(Clone, Debug, Serialize)]
pub struct GpuView {
    /// Inventory.
    pub device: GpuDevice,
    /// Health with reason.
    pub health: HealthStatus,
    /// Cordoned by the operator.
    pub cordoned: bool,
}

#[derive(Debug)]
struct State {
    trackers: Vec<GpuHealthTracker>,
    previous: Vec<Option<SampleSignals>>,
    cordoned: HashSet<u32>,
    outbox: Outbox,
    attempts: AttemptFence,
}

/// Shared agent state.
pub struct AgentCore {
    node: String,
    instance_id: String,
    process_id: String,
    state_file: Option<std::path::PathBuf>,
    backend: Arc<dyn GpuBackend>,
    devices: Vec<GpuDevice>,
    state: Mutex<State>,
    /// Woken whenever a critical event is raised.
    pub critical_raised: Notify,
    samples: watch::Sender<Arc<Vec<GpuSample>>>,
    /// The agent's metrics.
    pub metrics: AgentMetrics,
}

impl std::fmt::Debug for AgentCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCore")
            .field("node", &self.node)
            .field("gpus", &self.devices.len())
            .finish()
    }
}

impl AgentCore {
    /// Reads the inventory and starts from all-healthy, or — with a state file from an earlier
    /// run on this node — from the health and unacknowledged events it recorded.
    pub fn new(
        node: &str,
        backend: Arc<dyn GpuBackend>,
        state_file: Option<std::path::PathBuf>,
    ) -> Result<Arc<Self>, BackendError> {
        let devices = backend.inventory()?;
        let metrics = AgentMetrics::new(node)
            .map_err(|e| BackendError::Unsupported(format!("registering metrics: {e}")))?;
        let saved = match state_file.as_deref().map(persist::load).transpose() {
            Ok(saved) => saved.flatten().filter(|s| s.node == node),
            Err(e) => {
                tracing::error!(error = %e, "ignoring the agent state file");
                None
            }
        };
        let n = devices.len();
        let mut trackers = vec![GpuHealthTracker::default(); n];
        let (instance_id, outbox) = match saved {
            Some(saved) => {
                for (tracker, d) in trackers.iter_mut().zip(&devices) {
                    if let Some(status) = saved.health.get(&d.uuid) {
                        *tracker = GpuHealthTracker::from_status(status.clone());
                    }
                }
                tracing::info!(instance = %saved.instance_id, unacked = saved.outbox.len(), "restored agent state");
                (saved.instance_id, saved.outbox)
            }
            None => (uuid::Uuid::new_v4().to_string(), Outbox::default()),
        };
        for (d, t) in devices.iter().zip(&trackers) {
            metrics.observe_health(d, t.status().health);
        }
        metrics.unacked_events.set(outbox.len() as i64);
        let core = Arc::new(Self {
            node: node.to_owned(),
            instance_id,
            process_id: uuid::Uuid::new_v4().to_string(),
            state_file,
            backend,
            devices,
            state: Mutex::new(State {
                trackers,
                previous: vec![None; n],
                cordoned: HashSet::new(),
                outbox,
                attempts: AttemptFence::default(),
            }),
            critical_raised: Notify::new(),
            samples: watch::channel(Arc::new(Vec::new())).0,
            metrics,
        });
        core.persist(&core.lock());
        Ok(core)
    }

    /// Writes health and the outbox to the state file, if there is one.
    fn persist(&self, state: &State) {
        let Some(path) = &self.state_file else { return };
        let saved = PersistedState {
            node: self.node.clone(),
            instance_id: self.instance_id.clone(),
            health: self
                .devices
                .iter()
                .zip(&state.trackers)
                .map(|(d, t)| (d.uuid.clone(), t.status().clone()))
                .collect(),
            outbox: state.outbox.clone(),
        };
        if let Err(e) = persist::save(path, &saved) {
            tracing::error!(error = %e, "could not save the agent state");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Id of this agent's critical-event stream: kept across restarts in the state file, so
    /// sequence numbers continue and the operator drops resends it has applied.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Random id of this agent process, new at every start: the workers it started die with it.
    pub fn process_id(&self) -> &str {
        &self.process_id
    }

    /// Backend name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Inventory.
    pub fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    /// Index of the GPU with this UUID.
    pub fn index_of(&self, uuid: &str) -> Option<u32> {
        self.devices.iter().find(|d| d.uuid == uuid).map(|d| d.index)
    }

    /// Applies a fault from the backend; raises a critical event for every XID and for every
    /// health change.
    pub fn handle_event(&self, event: GpuEvent) {
        let Some(device) = self.devices.get(event.index as usize) else {
            tracing::warn!(gpu = event.index, "event for a GPU outside the inventory");
            return;
        };
        if let Fault::Xid(xid) = event.fault {
            self.metrics.observe_xid(device, xid);
        }
        let mut state = self.lock();
        let tracker = &mut state.trackers[event.index as usize];
        let changed = tracker.apply(event.fault);
        let status = tracker.status().clone();
        if changed || matches!(event.fault, Fault::Xid(_)) {
            self.raise(&mut state, device, CriticalKind::Fault(event.fault), status);
        }
    }

    fn raise(
        &self,
        state: &mut State,
        device: &GpuDevice,
        kind: CriticalKind,
        status: HealthStatus,
    ) {
        tracing::info!(gpu = device.index, uuid = %device.uuid, ?kind, health = ?status.health, reason = %status.reason, "critical event");
        self.metrics.observe_health(device, status.health);
        state.outbox.push(&device.uuid, kind, status, flotilla_proto::now_unix_nanos());
        self.metrics.unacked_events.set(state.outbox.len() as i64);
        self.persist(state);
        self.critical_raised.notify_one();
    }

    /// Records one round of samples: metrics, faults implied by them, and the latest-sample slot.
    pub fn record_samples(&self, samples: Vec<GpuSample>) {
        self.metrics.samples.inc();
        let mut state = self.lock();
        for s in &samples {
            let i = s.index as usize;
            let Some(device) = self.devices.get(i) else { continue };
            self.metrics.observe_sample(device, s);
            let signals = s.signals();
            for fault in faults_from_sample(state.previous[i].as_ref(), &signals) {
                let changed = state.trackers[i].apply(fault);
                if changed {
                    let status = state.trackers[i].status().clone();
                    self.raise(&mut state, device, CriticalKind::Fault(fault), status);
                }
            }
            if has_cooled(&signals) && state.trackers[i].cooled_down() {
                let status = state.trackers[i].status().clone();
                self.raise(&mut state, device, CriticalKind::Recovered, status);
            }
            state.previous[i] = Some(signals);
        }
        drop(state);
        self.samples.send_replace(Arc::new(samples));
    }

    /// Latest samples, and a receiver that changes with every round.
    pub fn subscribe_samples(&self) -> watch::Receiver<Arc<Vec<GpuSample>>> {
        self.samples.subscribe()
    }

    /// Runs the backend's validation of one GPU; on success a Failed/Degraded GPU turns Healthy
    /// and a Recovered event is raised. Returns whether validation passed.
    pub fn validate(&self, index: u32) -> Result<bool, BackendError> {
        let passed = self.backend.validate(index)?;
        if passed {
            self.heal(index, GpuHealthTracker::validation_passed);
        }
        Ok(passed)
    }

    /// The operator suspects GPU `index` of slowing its gang: Degraded (`SlowSteps`) with
    /// `evidence`, until validation passes.
    pub fn suspect(&self, index: u32, evidence: &str) -> Result<(), BackendError> {
        let count = self.devices.len() as u32;
        let device =
            self.devices.get(index as usize).ok_or(BackendError::NoSuchGpu { index, count })?;
        let mut state = self.lock();
        if state.trackers[index as usize].suspect(evidence) {
            let status = state.trackers[index as usize].status().clone();
            self.raise(&mut state, device, CriticalKind::Fault(Fault::SlowSteps), status);
        }
        Ok(())
    }

    /// An admin cleared the GPU.
    pub fn admin_clear(&self, index: u32) -> Result<(), BackendError> {
        let count = self.devices.len() as u32;
        if index >= count {
            return Err(BackendError::NoSuchGpu { index, count });
        }
        self.heal(index, GpuHealthTracker::admin_clear);
        Ok(())
    }

    fn heal(&self, index: u32, how: fn(&mut GpuHealthTracker) -> bool) {
        let device = &self.devices[index as usize];
        let mut state = self.lock();
        if how(&mut state.trackers[index as usize]) {
            let status = state.trackers[index as usize].status().clone();
            self.raise(&mut state, device, CriticalKind::Recovered, status);
        }
    }

    /// Cordons or uncordons a GPU locally (launches onto it are refused while cordoned).
    pub fn set_cordoned(&self, index: u32, cordoned: bool) {
        let mut state = self.lock();
        if cordoned {
            state.cordoned.insert(index);
        } else {
            state.cordoned.remove(&index);
        }
    }

    /// Checks a launch against the attempt fence and cordons.
    pub fn admit_launch(
        &self,
        job_uid: &str,
        attempt: u64,
        gpu_uuids: &[String],
    ) -> Result<(), SupervisorError> {
        let mut state = self.lock();
        for uuid in gpu_uuids {
            let Some(index) = self.index_of(uuid) else {
                return Err(SupervisorError::Failed(format!(
                    "gpu_uuids: {uuid} is not on node {}",
                    self.node
                )));
            };
            if state.cordoned.contains(&index) {
                return Err(SupervisorError::Failed(format!("gpu_uuids: {uuid} is cordoned")));
            }
        }
        state.attempts.admit(job_uid, attempt)
    }

    /// Checks a stop command against the attempt fence.
    pub fn admit_stop(&self, job_uid: &str, attempt: u64) -> Result<(), SupervisorError> {
        self.lock().attempts.admit(job_uid, attempt)
    }

    /// Health of every GPU, in index order.
    pub fn health(&self) -> Vec<HealthStatus> {
        self.lock().trackers.iter().map(|t| t.status().clone()).collect()
    }

    /// Inventory, health and cordons for the admin endpoint.
    pub fn view(&self) -> Vec<GpuView> {
        let state = self.lock();
        self.devices
            .iter()
            .zip(&state.trackers)
            .map(|(d, t)| GpuView {
                device: d.clone(),
                health: t.status().clone(),
                cordoned: state.cordoned.contains(&d.index),
            })
            .collect()
    }

    /// Unacknowledged events above `after`, and the highest sequence number raised.
    pub fn critical_after(&self, after: u64) -> (Vec<CriticalRecord>, u64) {
        let state = self.lock();
        (state.outbox.after(after).cloned().collect(), state.outbox.last_seq())
    }

    /// The operator applied every event up to `upto`.
    pub fn ack(&self, upto: u64) {
        let mut state = self.lock();
        let before = state.outbox.acked();
        state.outbox.ack(upto);
        self.metrics.unacked_events.set(state.outbox.len() as i64);
        if state.outbox.acked() != before {
            self.persist(&state);
        }
    }

    /// Highest sequence number raised and acknowledged.
    pub fn seqs(&self) -> (u64, u64) {
        let state = self.lock();
        (state.outbox.last_seq(), state.outbox.acked())
    }

    /// Starts the backend's event watch and the sampling loop; both run until the process ends.
    pub fn start(self: &Arc<Self>, sample_interval: Duration) -> Result<(), BackendError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.backend.watch_events(tx)?;
        let core = Arc::clone(self);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                core.handle_event(event);
            }
        });
        let core = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sample_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let backend = Arc::clone(&core.backend);
                match tokio::task::spawn_blocking(move || backend.sample()).await {
                    Ok(Ok(samples)) => core.record_samples(samples),
                    Ok(Err(e)) => tracing::warn!(error = %e, "sampling failed"),
                    Err(e) => tracing::warn!(error = %e, "sampling task failed"),
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::simulated::{Injection, SimulatedBackend, find_model};
    use crate::health::Health;

    fn core_with(n: u32) -> (Arc<AgentCore>, Arc<SimulatedBackend>) {
        let sim =
            Arc::new(SimulatedBackend::new("node-a", n, find_model("H100").expect("model"), 1));
        let core = AgentCore::new("node-a", sim.clone(), None).expect("core");
        (core, sim)
    }

    #[test]
    fn xid_79_fails_the_gpu_and_raises_one_event() {
        let (core, _) = core_with(4);
        core.handle_event(GpuEvent { index: 2, fault: Fault::Xid(79) });
        assert_eq!(core.health()[2].health, Health::Failed);
        let (events, last) = core.critical_after(0);
        assert_eq!(last, 1);
        assert_eq!(events[0].gpu_uuid, core.devices()[2].uuid);
        assert_eq!(events[0].kind, CriticalKind::Fault(Fault::Xid(79)));
    }

    #[test]
    fn xid_13_is_reported_but_the_gpu_stays_healthy() {
        let (core, _) = core_with(2);
        core.handle_event(GpuEvent { index: 1, fault: Fault::Xid(13) });
        assert_eq!(core.health()[1].health, Health::Healthy);
        assert_eq!(core.critical_after(0).0.len(), 1, "application XIDs still reach the operator");
    }

    #[test]
    fn validation_heals_only_after_recovery() {
        let (core, sim) = core_with(2);
        sim.inject(0, Injection::GpuLost).expect("inject");
        core.handle_event(GpuEvent { index: 0, fault: Fault::GpuLost });
        assert!(!core.validate(0).expect("validate"));
        assert_eq!(core.health()[0].health, Health::Failed);
        sim.inject(0, Injection::Recover).expect("recover");
        assert!(core.validate(0).expect("validate"));
        assert_eq!(core.health()[0].health, Health::Healthy);
        let (events, _) = core.critical_after(0);
        assert_eq!(events.last().map(|e| e.kind), Some(CriticalKind::Recovered));
    }

    #[test]
    fn overheating_degrades_then_lifts_when_cool() {
        let (core, sim) = core_with(1);
        sim.inject(0, Injection::Overheat).expect("inject");
        core.record_samples(sim.sample().expect("sample"));
        assert_eq!(core.health()[0].health, Health::Degraded);
        sim.inject(0, Injection::Recover).expect("recover");
        core.record_samples(sim.sample().expect("sample"));
        assert_eq!(core.health()[0].health, Health::Healthy);
    }

    #[test]
    fn a_restart_keeps_failed_gpus_failed_and_unacked_events_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("state.json");
        let sim =
            || Arc::new(SimulatedBackend::new("node-a", 4, find_model("H100").expect("model"), 1));
        let first = AgentCore::new("node-a", sim(), Some(file.clone())).expect("core");
        first.handle_event(GpuEvent { index: 1, fault: Fault::Xid(79) });
        first.handle_event(GpuEvent { index: 2, fault: Fault::Xid(13) });
        first.ack(1);
        let instance = first.instance_id().to_owned();
        let process = first.process_id().to_owned();
        drop(first);

        let second = AgentCore::new("node-a", sim(), Some(file.clone())).expect("core");
        assert_eq!(second.instance_id(), instance, "same instance: the operator dedups resends");
        assert_ne!(second.process_id(), process, "a new process: its workers are not the old ones");
        assert_eq!(second.health()[1].health, Health::Failed);
        assert_eq!(second.seqs(), (2, 1));
        let pending: Vec<u64> = second.critical_after(1).0.iter().map(|e| e.seq).collect();
        assert_eq!(pending, vec![2]);

        let other_node = AgentCore::new("node-b", sim(), Some(file)).expect("core");
        assert_ne!(other_node.instance_id(), instance, "a file from another node is ignored");
        assert_eq!(other_node.health()[1].health, Health::Healthy);
    }

    #[test]
    fn launches_onto_cordoned_or_foreign_gpus_or_stale_attempts_are_refused() {
        let (core, _) = core_with(2);
        let gpu0 = vec![core.devices()[0].uuid.clone()];
        core.admit_launch("job", 2, &gpu0).expect("fine");
        assert!(core.admit_launch("job", 1, &gpu0).is_err(), "stale attempt");
        core.set_cordoned(0, true);
        let err = core.admit_launch("job", 3, &gpu0).expect_err("cordoned");
        assert!(err.to_string().contains("cordoned"), "{err}");
        let err = core.admit_launch("job", 3, &["GPU-nope".to_owned()]).expect_err("foreign");
        assert!(err.to_string().contains("GPU-nope"), "{err}");
    }
}
