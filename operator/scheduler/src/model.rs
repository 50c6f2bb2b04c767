//! Input domain types: the fleet, the jobs already running on it and the queue of requests.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Seconds on the caller's clock (Unix time, say); every time in one call shares that clock.
pub type Seconds = u64;

/// A job's unique identity, for a Kubernetes object its `namespace/name` or UID.
///
/// Shared, not copied: a pass hands ids out for every waiting job, and a clone is a counter bump.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Arc<str>);

impl JobId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for JobId {
    fn from(id: &str) -> Self {
        JobId(id.into())
    }
}

impl From<String> for JobId {
    fn from(id: String) -> Self {
        JobId(id.into())
    }
}

/// Health of one GPU as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuState {
    /// Fit for new work.
    #[default]
    Healthy,
    /// Degraded and draining: running work may finish, nothing new lands on it.
    Degraded,
    /// Failed: nothing runs on it until it is validated again.
    Failed,
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The GPU's index on its node (as NVML numbers it).
    pub index: u32,
    /// The NVLink domain the GPU belongs to; a worker's GPUs never cross domains.
    pub nvlink_domain: u32,
    /// Health as last reported.
    pub state: GpuState,
    /// Cordoned by an administrator: nothing new lands on it.
    pub cordoned: bool,
}

impl Gpu {
    /// Whether new work may be placed on this GPU (healthy and not cordoned).
    pub fn is_schedulable(&self) -> bool {
        self.state == GpuState::Healthy && !self.cordoned
    }
}

/// One GPU node: its GPUs, topology (zone and rack) and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's unique name.
    pub name: String,
    /// The zone the node sits in (the widest topology domain).
    pub zone: String,
    /// The rack the node sits in, unique within its zone.
    pub rack: String,
    /// Labels that jobs' node selectors match against.
    pub labels: BTreeMap<String, String>,
    /// Cordoned by an administrator: none of its GPUs takes new work.
    pub cordoned: bool,
    /// The node's GPUs.
    pub gpus: Vec<Gpu>,
}

impl Node {
    /// A node with `gpu_count` healthy GPUs in one NVLink domain, in an unnamed rack and zone.
    pub fn new(name: impl Into<String>, gpu_count: u32) -> Self {
        let gpus = (0..gpu_count)
            .map(|index| Gpu { index, nvlink_domain: 0, state: GpuState::Healthy, cordoned: false })
            .collect();
        Node {
            name: name.into(),
            zone: String::new(),
            rack: String::new(),
            labels: BTreeMap::new(),
            cordoned: false,
            gpus,
        }
    }

    /// Places the node in a zone and a rack.
    pub fn in_rack(mut self, zone: impl Into<String>, rack: impl Into<String>) -> Self {
        self.zone = zone.into();
        self.rack = rack.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Splits the GPUs, in index order, into `domains` NVLink domains of equal size.
    pub fn nvlink_domains(mut self, domains: u32) -> Self {
        let per_domain = (self.gpus.len() as u32).div_ceil(domains.max(1)).max(1);
        for (position, gpu) in self.gpus.iter_mut().enumerate() {
            gpu.nvlink_domain = position as u32 / per_domain;
        }
        self
    }

    /// Sets one GPU's health.
    pub fn gpu_state(mut self, index: u32, state: GpuState) -> Self {
        self.gpus.iter_mut().filter(|gpu| gpu.index == index).for_each(|gpu| gpu.state = state);
        self
    }

    /// Cordons one GPU.
    pub fn cordon_gpu(mut self, index: u32) -> Self {
        self.gpus.iter_mut().filter(|gpu| gpu.index == index).for_each(|gpu| gpu.cordoned = true);
        self
    }

    /// Cordons the whole node.
    pub fn cordon(mut self) -> Self {
        self.cordoned = true;
        self
    }
}

/// The fleet: every GPU node the scheduler may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// The nodes, in any order.
    pub nodes: Vec<Node>,
}

impl Fleet {
    /// A fleet of the given nodes.
    pub fn new(nodes: Vec<Node>) -> Self {
        Fleet { nodes }
    }

    /// A regular fleet: `zones` × `racks_per_zone` × `nodes_per_rack` nodes of `gpus_per_node`.
    ///
    /// Nodes are named `z{zone}-r{rack}-n{node}`.
    pub fn uniform(
        zones: u32,
        racks_per_zone: u32,
        nodes_per_rack: u32,
        gpus_per_node: u32,
    ) -> Self {
        let mut nodes = Vec::new();
        for zone in 0..zones {
            for rack in 0..racks_per_zone {
                for node in 0..nodes_per_rack {
                    let name = format!("z{zone}-r{rack}-n{node}");
                    nodes.push(
                        Node::new(name, gpus_per_node)
                            .in_rack(format!("z{zone}"), format!("r{rack}")),
                    );
                }
            }
        }
        Fleet { nodes }
    }
}

/// How a gang's workers share nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spread {
    /// Workers packed onto as few nodes as possible (training).
    #[default]
    Pack,
    /// At most one worker per node (replicas that should not fail together).
    Spread,
}

/// How tightly a gang must sit in the topology; it is always packed as tightly as it fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locality {
    /// One rack if it fits, else one zone, else anywhere.
    #[default]
    Preferred,
    /// The whole gang in one zone, or wait.
    Zone,
    /// The whole gang in one rack, or wait.
    Rack,
}

/// A job asking for GPUs: a gang of identical workers placed all at once or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The job's identity.
    pub id: JobId,
    /// The namespace (or queue) it is charged to for fair share.
    pub namespace: String,
    /// Priority level; higher goes first, and may preempt lower.
    pub priority: i32,
    /// When the job entered the queue; earlier goes first within a priority level.
    pub arrival: Seconds,
    /// How many workers the gang has.
    pub workers: u32,
    /// GPUs per worker, all on one node within one NVLink domain.
    pub gpus_per_worker: u32,
    /// How workers share nodes.
    pub spread: Spread,
    /// How tightly the gang must sit in the topology.
    pub locality: Locality,
    /// Labels a node must carry (all of them) to host a worker.
    pub node_selector: BTreeMap<String, String>,
    /// The job's expected run time, if known; lets it backfill ahead of a reservation.
    pub expected_duration: Option<Seconds>,
    /// Whether it may start on loan: on GPUs held for a job ahead of it, to be stopped when that
    /// job can start. For work that checkpoints; serving replicas and jobs without checkpoints
    /// should not.
    pub may_borrow: bool,
}

impl JobRequest {
    /// A request for `workers` × `gpus_per_worker` GPUs, priority 0, namespace `default`.
    pub fn new(id: impl Into<String>, workers: u32, gpus_per_worker: u32) -> Self {
        JobRequest {
            id: JobId::from(id.into()),
            namespace: "default".to_owned(),
            priority: 0,
            arrival: 0,
            workers,
            gpus_per_worker,
            spread: Spread::Pack,
            locality: Locality::Preferred,
            node_selector: BTreeMap::new(),
            expected_duration: None,
            may_borrow: true,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the arrival time.
    pub fn arrival(mut self, arrival: Seconds) -> Self {
        self.arrival = arrival;
        self
    }

    /// Sets the spread policy.
    pub fn spread(mut self, spread: Spread) -> Self {
        self.spread = spread;
        self
    }

    /// Sets the locality requirement.
    pub fn locality(mut self, locality: Locality) -> Self {
        self.locality = locality;
        self
    }

    /// Adds a node-selector label.
    pub fn select(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_selector.insert(key.into(), value.into());
        self
    }

    /// Sets the expected run time.
    pub fn expected_duration(mut self, duration: Seconds) -> Self {
        self.expected_duration = Some(duration);
        self
    }

    /// Sets whether it may start on loan (see [`JobRequest::may_borrow`]).
    pub fn may_borrow(mut self, may: bool) -> Self {
        self.may_borrow = may;
        self
    }

    /// The total number of GPUs the gang needs.
    pub fn total_gpus(&self) -> u64 {
        u64::from(self.workers) * u64::from(self.gpus_per_worker)
    }
}

/// One worker's share of a placement: a node and GPU indices on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkerPlacement {
    /// The node's name.
    pub node: String,
    /// GPU indices on that node, ascending.
    pub gpus: Vec<u32>,
}

/// A job that holds GPUs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    /// The job's identity.
    pub id: JobId,
    /// The namespace it is charged to.
    pub namespace: String,
    /// Its priority level.
    pub priority: i32,
    /// Where its workers run.
    pub workers: Vec<WorkerPlacement>,
    /// When it started.
    pub started_at: Seconds,
    /// When it is expected to end, if known (used to reserve a start for the first waiting job).
    pub expected_end: Option<Seconds>,
    /// When it last wrote a complete checkpoint, if ever (work since then is lost on preemption).
    pub last_checkpoint: Option<Seconds>,
    /// Started on loan, ahead of its turn, on GPUs held for another job: any job ahead of it in
    /// the queue (higher priority, or equal and earlier [`RunningJob::arrival`]) may take them
    /// back when that lets it start.
    pub on_loan: bool,
    /// When it entered the queue (its place in line, for loans).
    pub arrival: Seconds,
}

impl RunningJob {
    /// A running job of priority 0 in namespace `default`, started at 0, with no estimates.
    pub fn new(id: impl Into<String>, workers: Vec<WorkerPlacement>) -> Self {
        RunningJob {
            id: JobId::from(id.into()),
            namespace: "default".to_owned(),
            priority: 0,
            workers,
            started_at: 0,
            expected_end: None,
            last_checkpoint: None,
            on_loan: false,
            arrival: 0,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the start time.
    pub fn started_at(mut self, at: Seconds) -> Self {
        self.started_at = at;
        self
    }

    /// Sets the expected end time.
    pub fn expected_end(mut self, at: Seconds) -> Self {
        self.expected_end = Some(at);
        self
    }

    /// Sets the time of the last complete checkpoint.
    pub fn last_checkpoint(mut self, at: Seconds) -> Self {
        self.last_checkpoint = Some(at);
        self
    }

    /// Marks it as running on loan, with its place in line (see [`RunningJob::on_loan`]).
    pub fn on_loan(mut self, arrival: Seconds) -> Self {
        self.on_loan = true;
        self.arrival = arrival;
        self
    }
}

/// Knobs that shape decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Fair-share weight per namespace; a namespace not listed weighs 1.
    pub namespace_weights: BTreeMap<String, f64>,
    /// Whether higher-priority jobs may preempt lower-priority ones.
    pub preemption: bool,
    /// Whether GPUs held for the first waiting job are lent to jobs behind it until it can
    /// start; the loans are taken back then (the borrowers checkpoint and requeue), so the
    /// reserved start is never delayed.
    pub lending: bool,
    /// Lend only when the reserved start is unknown or at least this far away: a loan shorter
    /// than a checkpoint interval and a restart buys nothing.
    pub min_loan: Seconds,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            namespace_weights: BTreeMap::new(),
            preemption: true,
            lending: true,
            min_loan: DEFAULT_MIN_LOAN,
        }
    }
}

/// The default [`Policy::min_loan`]: 15 minutes.
pub const DEFAULT_MIN_LOAN: Seconds = 900;

impl Policy {
    /// Sets one namespace's fair-share weight.
    pub fn weight(mut self, namespace: impl Into<String>, weight: f64) -> Self {
        self.namespace_weights.insert(namespace.into(), weight);
        self
    }

    /// The weight of a namespace (1 unless set; never below a tiny positive floor).
    pub fn weight_of(&self, namespace: &str) -> f64 {
        self.namespace_weights.get(namespace).copied().unwrap_or(1.0).max(1e-9)
    }
}
