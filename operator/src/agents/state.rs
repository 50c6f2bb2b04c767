//! The operator's in-memory view of every agent and GPU, fed by the agent streams.
//!
//! Plain domain types (no proto): the controllers and the `GpuNode` mirror read this. Health
//! changes bump a version that [`NodeRegistry::changed`] watchers see at once; telemetry does not
//! (it arrives at 1 Hz per GPU and nobody waits on it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Health of one GPU as reported by its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GpuHealth {
    /// Schedulable.
    Healthy,
    /// Usable; drain and validate.
    Degraded,
    /// Not schedulable until validated or cleared.
    Failed,
    /// The agent is lost, so nothing is known.
    Unknown,
}

/// One GPU of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuRecord {
    /// NVML index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Model.
    pub model: String,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// PCI bus id.
    pub pci_bus_id: String,
    /// NVLink peers (indices).
    pub nvlink_peers: Vec<u32>,
    /// NVLink domain.
    pub topology_domain: String,
    /// Health as the agent classified it.
    pub health: GpuHealth,
    /// Reason for the health ("Xid79").
    pub reason: String,
    /// Explanation.
    pub message: String,
    /// Last XID (0 if none).
    pub last_xid: u32,
    /// Latest temperature, °C.
    pub temperature_c: Option<f32>,
    /// Latest memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
}

/// A fault the operator learned about.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRecord {
    /// GPU index.
    pub gpu: u32,
    /// XID, if it was one.
    pub xid: Option<u32>,
    /// Short reason.
    pub reason: String,
    /// Explanation.
    pub message: String,
    /// When the agent saw it, Unix nanoseconds.
    pub observed_at_unix_nanos: i64,
}

/// A worker an agent runs, as listed in its registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningWorkerRecord {
    /// Job UID.
    pub job_uid: String,
    /// Attempt.
    pub attempt: u64,
    /// Global rank.
    pub rank: u32,
    /// Process-group leader pid on the node.
    pub pid: u32,
    /// GPUs it holds.
    pub gpu_uuids: Vec<String>,
}

/// Everything the operator knows about one node's agent.
#[derive(Clone, Debug)]
pub struct NodeRecord {
    /// Node name (bound to the agent's certificate).
    pub node: String,
    /// Agent version.
    pub agent_version: String,
    /// The agent's critical-event stream (kept across agent restarts in its state file); a new
    /// one restarts sequence numbers.
    pub instance_id: String,
    /// The agent process (random, new at every start): workers die with the process that
    /// started them.
    pub process_id: String,
    /// "nvml" or "simulated".
    pub backend: String,
    /// GPUs by index.
    pub gpus: Vec<GpuRecord>,
    /// Highest critical-event sequence number applied for `instance_id`.
    pub applied_seq: u64,
    /// A stream is open now.
    pub connected: bool,
    /// Silent past the heartbeat timeout: its GPUs are out of the pool.
    pub lost: bool,
    /// Last message of any kind.
    pub last_heard: Instant,
    /// Most recent fault.
    pub last_fault: Option<FaultRecord>,
    /// Workers the agent said it runs when it registered (for adoption after an operator restart).
    pub workers: Vec<RunningWorkerRecord>,
    /// Stream generation; a newer stream for the node supersedes older ones.
    pub session: u64,
    /// Where the node's workers are reached: what the agent reported, else the address its
    /// connection came from unless that is loopback; `None` when neither is known.
    pub address: Option<String>,
}

impl NodeRecord {
    /// A record of `node` with nothing known yet (for tests).
    #[cfg(test)]
    pub fn named(node: &str) -> Self {
        NodeRecord {
            node: node.to_owned(),
            agent_version: String::new(),
            instance_id: String::new(),
            process_id: String::new(),
            backend: String::new(),
            gpus: Vec::new(),
            applied_seq: 0,
            connected: false,
            lost: false,
            last_heard: Instant::now(),
            last_fault: None,
            workers: Vec::new(),
            session: 0,
            address: None,
        }
    }

    /// GPUs that may be scheduled: healthy, on an agent that is not lost.
    pub fn schedulable_gpus(&self) -> impl Iterator<Item = &GpuRecord> {
        self.gpus.iter().filter(move |g| !self.lost && g.health == GpuHealth::Healthy)
    }

    /// The GPU with this UUID.
    pub fn gpu_mut(&mut self, uuid: &str) -> Option<&mut GpuRecord> {
        self.gpus.iter_mut().find(|g| g.uuid == uuid)
    }
}

/// A node's record, shared between its stream task and readers.
pub type NodeCell = Arc<Mutex<NodeRecord>>;

/// Every agent's node as the operator knows it: one record per node that ever registered.
#[derive(Debug)]
pub struct NodeRegistry {
    nodes: RwLock<HashMap<String, NodeCell>>,
    /// What this process has seen of the nodes' Leases on the API server.
    pub leases: super::liveness::Leases,
    version: watch::Sender<u64>,
    next_session: Mutex<u64>,
    admin_urls: RwLock<HashMap<String, String>>,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        Self {
            nodes: RwLock::default(),
            leases: Default::default(),
            version: watch::channel(0).0,
            next_session: Mutex::new(0),
            admin_urls: RwLock::default(),
        }
    }
}

/// Locks a node record, surviving a poisoned lock (a panicking stream task must not wedge the
/// whole fleet).
pub fn lock(cell: &NodeCell) -> MutexGuard<'_, NodeRecord> {
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a (re)registration changed.
#[derive(Debug)]
pub struct Registration {
    /// The node's record.
    pub cell: NodeCell,
    /// This stream's generation.
    pub session: u64,
    /// Highest sequence number already applied for this agent instance.
    pub applied_seq: u64,
}

impl NodeRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Tells watchers something health-related changed.
    pub fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever health, membership or liveness changes.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Records the admin URL a node's agent reported at registration (empty: it runs none).
    pub fn set_admin_url(&self, node: &str, url: &str) {
        let mut urls = self.admin_urls.write().unwrap_or_else(|e| e.into_inner());
        if url.is_empty() {
            urls.remove(node);
        } else {
            urls.insert(node.to_owned(), url.to_owned());
        }
    }

    /// The admin URL the node's agent last reported.
    pub fn admin_url(&self, node: &str) -> Option<String> {
        self.admin_urls.read().unwrap_or_else(|e| e.into_inner()).get(node).cloned()
    }

    /// Records a registration. A new `instance_id` resets the applied sequence number; the same
    /// one (a reconnect) keeps it so resent events are not applied twice.
    pub fn register(&self, mut record: NodeRecord) -> Registration {
        let session = {
            let mut next = self.next_session.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        record.session = session;
        record.connected = true;
        record.lost = false;
        record.last_heard = Instant::now();
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let (cell, applied_seq) = match nodes.get(&record.node) {
            Some(cell) => {
                let mut existing = lock(cell);
                if existing.instance_id == record.instance_id {
                    record.applied_seq = existing.applied_seq;
                    if record.last_fault.is_none() {
                        record.last_fault = existing.last_fault.take();
                    }
                }
                let applied = record.applied_seq;
                *existing = record;
                (cell.clone(), applied)
            }
            None => {
                let applied = record.applied_seq;
                let name = record.node.clone();
                let cell = Arc::new(Mutex::new(record));
                nodes.insert(name, cell.clone());
                (cell, applied)
            }
        };
        drop(nodes);
        self.bump();
        Registration { cell, session, applied_seq }
    }

    /// The stream of `session` ended; the node stays known until the heartbeat timeout.
    pub fn disconnected(&self, node: &str, session: u64) {
        if let Some(cell) = self.cell(node) {
            let mut rec = lock(&cell);
            if rec.session == session {
                rec.connected = false;
                drop(rec);
                self.bump();
            }
        }
    }

    /// Marks agents silent for longer than `timeout` as lost; returns the newly lost node names.
    pub fn sweep(&self, timeout: Duration) -> Vec<String> {
        let cells: Vec<NodeCell> =
            self.nodes.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut lost = Vec::new();
        for cell in cells {
            let mut rec = lock(&cell);
            if !rec.lost && rec.last_heard.elapsed() > timeout {
                rec.lost = true;
                rec.connected = false;
                lost.push(rec.node.clone());
            }
        }
        if !lost.is_empty() {
            self.bump();
        }
        lost
    }

    /// Whether the workers of `node` are certainly gone ([`super::liveness::fenced`]): its agent
    /// acknowledged a verdict, or has been quiet on its stream and its Lease for `quiet`.
    pub fn fenced(&self, node: &str, quiet: Duration) -> bool {
        let last_heard = self.cell(node).map(|c| lock(&c).last_heard);
        super::liveness::fenced(&self.leases, node, last_heard, quiet)
    }

    /// Whether every node that may run workers unknown to this process is accounted for: the
    /// Leases have been watched for `quiet` (an agent without one has fenced itself by then if
    /// it could not register), and every node with a Lease has registered here or is fenced.
    /// Until then, an attempt this process did not launch may have workers it has not heard of.
    pub fn all_accounted(&self, quiet: Duration) -> bool {
        self.unaccounted(quiet).is_empty() && self.leases.watched_past(quiet)
    }

    /// Nodes with a Lease that never registered with this process and are not fenced.
    pub fn unaccounted(&self, quiet: Duration) -> Vec<String> {
        self.leases
            .nodes()
            .into_iter()
            .filter(|n| self.cell(n).is_none() && !self.fenced(n, quiet))
            .collect()
    }

    /// The shared record of one node.
    pub fn cell(&self, node: &str) -> Option<NodeCell> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(node).cloned()
    }

    /// A copy of one node's record.
    pub fn node(&self, node: &str) -> Option<NodeRecord> {
        self.cell(node).map(|c| lock(&c).clone())
    }

    /// Copies of every node's record, sorted by name.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes_where(|_| true)
    }

    /// Copies of the records `keep` accepts, sorted by name; cheaper than [`Self::nodes`] when
    /// a caller needs a few of many (each record holds every GPU's state).
    pub fn nodes_where(&self, keep: impl Fn(&NodeRecord) -> bool) -> Vec<NodeRecord> {
        let cells: Vec<NodeCell> =
            self.nodes.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut out: Vec<NodeRecord> = cells
            .iter()
            .filter_map(|c| {
                let rec = lock(c);
                keep(&rec).then(|| rec.clone())
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// Health of one GPU, by node and index.
    pub fn gpu_health(&self, node: &str, index: u32) -> Option<GpuHealth> {
        let cell = self.cell(node)?;
        let rec = lock(&cell);
        if rec.lost {
            return Some(GpuHealth::Unknown);
        }
        rec.gpus.get(index as usize).map(|g| g.health)
    }

    /// Waits until `pred` holds over the fleet or `timeout` passes; returns whether it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&NodeRegistry) -> bool,
    ) -> bool {
        let mut rx = self.changed();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return pred(self),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, instance: &str) -> NodeRecord {
        NodeRecord {
            agent_version: "0.1.0".into(),
            instance_id: instance.into(),
            process_id: instance.into(),
            backend: "simulated".into(),
            gpus: vec![GpuRecord {
                index: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_bytes: 1,
                pci_bus_id: String::new(),
                nvlink_peers: vec![],
                topology_domain: String::new(),
                health: GpuHealth::Healthy,
                reason: String::new(),
                message: String::new(),
                last_xid: 0,
                temperature_c: None,
                memory_used_bytes: None,
            }],
            ..NodeRecord::named(node)
        }
    }

    #[test]
    fn reconnect_of_same_instance_keeps_applied_seq_new_instance_resets_it() {
        let fleet = NodeRegistry::new();
        let r = fleet.register(record("a", "i1"));
        lock(&r.cell).applied_seq = 7;
        assert_eq!(fleet.register(record("a", "i1")).applied_seq, 7);
        assert_eq!(fleet.register(record("a", "i2")).applied_seq, 0);
    }

    #[test]
    fn old_sessions_cannot_mark_a_newer_stream_disconnected() {
        let fleet = NodeRegistry::new();
        let first = fleet.register(record("a", "i1"));
        let second = fleet.register(record("a", "i1"));
        fleet.disconnected("a", first.session);
        assert!(fleet.node("a").expect("known").connected);
        fleet.disconnected("a", second.session);
        assert!(!fleet.node("a").expect("known").connected);
    }

    #[test]
    fn silent_agents_are_lost_and_leave_the_pool() {
        let fleet = NodeRegistry::new();
        let r = fleet.register(record("a", "i1"));
        assert_eq!(fleet.node("a").expect("known").schedulable_gpus().count(), 1);
        lock(&r.cell).last_heard = Instant::now() - Duration::from_secs(60);
        assert_eq!(fleet.sweep(Duration::from_secs(30)), vec!["a".to_owned()]);
        assert!(fleet.sweep(Duration::from_secs(30)).is_empty(), "reported once");
        let rec = fleet.node("a").expect("known");
        assert!(rec.lost);
        assert_eq!(rec.schedulable_gpus().count(), 0);
        assert_eq!(fleet.gpu_health("a", 0), Some(GpuHealth::Unknown));
    }
}
