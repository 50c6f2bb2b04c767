//! The stateful scheduler: the fleet indexed once, running jobs kept, passes over the queue.

mod pass;

use std::collections::{BTreeMap, BTreeSet};

use crate::decision::{Decision, ScheduleError};
use crate::fasthash::FastMap;
use crate::model::{
    Fleet, GpuState, JobId, JobRequest, Locality, Policy, RunningJob, Seconds, WorkerPlacement,
};
use crate::occupancy::{Occupancy, RESERVED, Topology};

/// Sort key for a running job whose end is unknown: after every known end.
const UNKNOWN_END: u64 = u64::MAX;

/// A running job as the scheduler keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub id: JobId,
    pub namespace: String,
    pub priority: i32,
    pub gpus: Vec<u32>,
    pub workers: Vec<WorkerPlacement>,
    pub started_at: Seconds,
    pub expected_end: Option<Seconds>,
    pub last_checkpoint: Option<Seconds>,
    pub on_loan: bool,
    pub arrival: Seconds,
}

impl Slot {
    /// GPU-seconds lost if the job stops now.
    pub fn lost_work(&self, now: Seconds) -> u64 {
        let since = self.last_checkpoint.unwrap_or(self.started_at);
        self.gpus.len() as u64 * now.saturating_sub(since)
    }

    /// Whether `job` may take this slot's GPUs back: it runs on loan and `job` is ahead of it
    /// in line.
    pub fn lent_to_one_behind(&self, job: &JobRequest) -> bool {
        self.on_loan && behind((self.priority, self.arrival), (job.priority, job.arrival))
    }
}

/// Whether a place in line `(priority, arrival)` is behind `other`: lower priority, or equal
/// priority and a later arrival. Loans go only to jobs behind the holder, and only jobs ahead of
/// a loan take it back.
pub(crate) fn behind(place: (i32, Seconds), other: (i32, Seconds)) -> bool {
    place.0 < other.0 || (place.0 == other.0 && place.1 > other.1)
}

/// The reservation in force during one pass.
pub(crate) struct ActiveReservation {
    pub job: JobId,
    /// The holder's place in line: only jobs behind it borrow, so it can take every loan back.
    pub priority: i32,
    pub arrival: Seconds,
    pub start: Option<Seconds>,
    pub gpus: Vec<u32>,
    /// The same GPUs as the workers the job is expected to get.
    pub workers: Vec<WorkerPlacement>,
    /// The occupancy as if nothing were reserved, for jobs that end before the start.
    pub lifted: Occupancy,
}

/// Fill levels of the fleet, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetStats {
    /// GPUs new work may use or that jobs hold (healthy, not cordoned).
    pub schedulable: u64,
    /// Schedulable GPUs held by jobs.
    pub allocated: u64,
    /// Schedulable GPUs free.
    pub free: u64,
    /// Free GPUs on nodes whose schedulable GPUs are all free.
    pub free_on_whole_nodes: u64,
}

impl FleetStats {
    /// Allocated share of the schedulable GPUs, 0 to 1.
    pub fn allocation(&self) -> f64 {
        self.allocated as f64 / self.schedulable.max(1) as f64
    }

    /// Share of free GPUs stranded on partly used nodes, 0 (none) to 1 (all).
    pub fn fragmentation(&self) -> f64 {
        if self.free == 0 { 0.0 } else { 1.0 - self.free_on_whole_nodes as f64 / self.free as f64 }
    }
}

/// The gang scheduler over one fleet; decisions it returns are already applied to its state.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub(crate) topo: Topology,
    pub(crate) occ: Occupancy,
    /// Every schedulable GPU free: tells "never fits" from "not now".
    pub(crate) empty: Occupancy,
    pub(crate) jobs: Vec<Option<Slot>>,
    pub(crate) by_id: FastMap<JobId, u32>,
    /// Running jobs by expected end (unknown last).
    pub(crate) by_end: BTreeSet<(u64, u32)>,
    pub(crate) usage: FastMap<String, u64>,
    /// GPUs held by running jobs, per priority level: bounds what preemption could free.
    pub(crate) held_by_priority: BTreeMap<i32, u64>,
    /// Slots running on loan, and the GPUs they hold.
    pub(crate) loans: BTreeSet<u32>,
    pub(crate) lent_gpus: u64,
    /// Slots started in the current pass: none of them is stopped again in the same pass.
    pub(crate) started_this_pass: Vec<u32>,
    pub(crate) policy: Policy,
    /// Shapes (priority, arrival, workers, GPUs per worker, locality) that preemption could
    /// not serve in this pass; a job no easier and no further ahead in line cannot be either.
    pub(crate) preemption_misses: Vec<(i32, Seconds, u32, u32, Locality)>,
    vacant: Vec<u32>,
}

impl Scheduler {
    /// Indexes the fleet and the jobs running on it; refuses inconsistent input.
    pub fn new(
        fleet: &Fleet,
        running: &[RunningJob],
        policy: Policy,
    ) -> Result<Self, ScheduleError> {
        let topo = Topology::new(fleet)?;
        let occ = Occupancy::new(&topo);
        let empty = occ.clone();
        let mut scheduler = Scheduler {
            topo,
            occ,
            empty,
            jobs: Vec::new(),
            by_id: FastMap::default(),
            by_end: BTreeSet::new(),
            usage: FastMap::default(),
            held_by_priority: BTreeMap::new(),
            loans: BTreeSet::new(),
            lent_gpus: 0,
            started_this_pass: Vec::new(),
            policy,
            preemption_misses: Vec::new(),
            vacant: Vec::new(),
        };
        for job in running {
            scheduler.admit_running(job)?;
        }
        Ok(scheduler)
    }

    fn admit_running(&mut self, job: &RunningJob) -> Result<(), ScheduleError> {
        if self.by_id.contains_key(&job.id) {
            return Err(ScheduleError::DuplicateJob(job.id.clone()));
        }
        let mut gpus = Vec::new();
        for worker in &job.workers {
            let unknown_node =
                || ScheduleError::UnknownNode { job: job.id.clone(), node: worker.node.clone() };
            let node = *self.topo.node_by_name.get(&worker.node).ok_or_else(unknown_node)?;
            for &index in &worker.gpus {
                let gpu =
                    self.topo.gpu_id(node, index).ok_or_else(|| ScheduleError::UnknownGpu {
                        job: job.id.clone(),
                        node: worker.node.clone(),
                        index,
                    })?;
                let owner = self.occ.owner[gpu as usize];
                // Below the sentinels an owner is a job slot: someone holds it already.
                if owner < RESERVED || gpus.contains(&gpu) {
                    return Err(ScheduleError::GpuHeldTwice {
                        job: job.id.clone(),
                        node: worker.node.clone(),
                        index,
                    });
                }
                gpus.push(gpu);
            }
        }
        self.insert(Slot {
            id: job.id.clone(),
            namespace: job.namespace.clone(),
            priority: job.priority,
            gpus,
            workers: job.workers.clone(),
            started_at: job.started_at,
            expected_end: job.expected_end,
            last_checkpoint: job.last_checkpoint,
            on_loan: job.on_loan,
            arrival: job.arrival,
        });
        Ok(())
    }

    /// Records a slot as running and gives it its GPUs.
    fn insert(&mut self, slot: Slot) -> u32 {
        let index = self.vacant.pop().unwrap_or(self.jobs.len() as u32);
        for &gpu in &slot.gpus {
            self.occ.set_owner(&self.topo, gpu, index);
        }
        *self.usage.entry(slot.namespace.clone()).or_default() += slot.gpus.len() as u64;
        *self.held_by_priority.entry(slot.priority).or_default() += slot.gpus.len() as u64;
        self.by_id.insert(slot.id.clone(), index);
        self.by_end.insert((slot.expected_end.unwrap_or(UNKNOWN_END), index));
        if slot.on_loan {
            self.loans.insert(index);
            self.lent_gpus += slot.gpus.len() as u64;
        }
        if index as usize == self.jobs.len() {
            self.jobs.push(Some(slot));
        } else {
            self.jobs[index as usize] = Some(slot);
        }
        index
    }

    /// Forgets a running job and frees its GPUs; returns it.
    pub(crate) fn remove(&mut self, index: u32) -> Slot {
        let slot = self.jobs[index as usize].take().expect("removing a live slot");
        for &gpu in &slot.gpus {
            self.occ.release(&self.topo, gpu);
        }
        if let Some(used) = self.usage.get_mut(&slot.namespace) {
            *used -= slot.gpus.len() as u64;
        }
        if let Some(held) = self.held_by_priority.get_mut(&slot.priority) {
            *held -= slot.gpus.len() as u64;
        }
        self.by_id.remove(&slot.id);
        self.by_end.remove(&(slot.expected_end.unwrap_or(UNKNOWN_END), index));
        if self.loans.remove(&index) {
            self.lent_gpus -= slot.gpus.len() as u64;
        }
        self.vacant.push(index);
        slot
    }

    /// A running job ended (or was stopped): its GPUs are free again. False if unknown.
    pub fn finish(&mut self, job: &JobId) -> bool {
        match self.by_id.get(job) {
            Some(&index) => {
                self.remove(index);
                true
            }
            None => false,
        }
    }

    /// A running job wrote a complete checkpoint at `at`. False if unknown.
    pub fn record_checkpoint(&mut self, job: &JobId, at: Seconds) -> bool {
        let Some(&index) = self.by_id.get(job) else { return false };
        if let Some(slot) = self.jobs[index as usize].as_mut() {
            slot.last_checkpoint = Some(at);
        }
        true
    }

    /// A GPU's health or cordon changed: a free GPU leaves or rejoins the pool at once, a held
    /// one stays with its job (the operator decides about the job) and is blocked once freed.
    pub fn update_gpu(
        &mut self,
        node: &str,
        index: u32,
        state: GpuState,
        cordoned: bool,
    ) -> Result<(), ScheduleError> {
        let missing = || ScheduleError::NoSuchGpu { node: node.to_owned(), index: Some(index) };
        let node_id = *self.topo.node_by_name.get(node).ok_or_else(missing)?;
        let gpu = self.topo.gpu_id(node_id, index).ok_or_else(missing)?;
        let facts = &mut self.topo.gpus[gpu as usize];
        (facts.state, facts.cordoned) = (state, cordoned);
        self.refresh_node(node_id);
        Ok(())
    }

    /// A node was cordoned or uncordoned: none of its GPUs takes new work while cordoned.
    pub fn cordon_node(&mut self, node: &str, cordoned: bool) -> Result<(), ScheduleError> {
        let missing = || ScheduleError::NoSuchGpu { node: node.to_owned(), index: None };
        let node_id = *self.topo.node_by_name.get(node).ok_or_else(missing)?;
        self.topo.nodes[node_id as usize].cordoned = cordoned;
        self.refresh_node(node_id);
        Ok(())
    }

    fn refresh_node(&mut self, node: u32) {
        for gpu in self.topo.refresh_node(node) {
            self.occ.refresh(&self.topo, gpu);
            self.empty.refresh(&self.topo, gpu);
        }
    }

    /// Whether a job holds GPUs now.
    pub fn is_running(&self, job: &JobId) -> bool {
        self.by_id.contains_key(job)
    }

    /// The jobs running now, as the scheduler sees them.
    pub fn running(&self) -> Vec<RunningJob> {
        self.jobs
            .iter()
            .flatten()
            .map(|slot| RunningJob {
                id: slot.id.clone(),
                namespace: slot.namespace.clone(),
                priority: slot.priority,
                workers: slot.workers.clone(),
                started_at: slot.started_at,
                expected_end: slot.expected_end,
                last_checkpoint: slot.last_checkpoint,
                on_loan: slot.on_loan,
                arrival: slot.arrival,
            })
            .collect()
    }

    /// How full and how fragmented the fleet is.
    pub fn stats(&self) -> FleetStats {
        let mut stats =
            FleetStats { schedulable: 0, allocated: 0, free: 0, free_on_whole_nodes: 0 };
        for (node, facts) in self.topo.nodes.iter().enumerate() {
            let schedulable =
                facts.gpus.clone().filter(|&g| self.topo.gpus[g as usize].schedulable).count()
                    as u64;
            let free = u64::from(self.occ.node_free[node]);
            stats.schedulable += schedulable;
            stats.free += free;
            if free == schedulable {
                stats.free_on_whole_nodes += free;
            }
        }
        stats.allocated = stats.schedulable - stats.free;
        stats
    }
}

/// One pass over a fleet as plain data: the pure entry point for callers without state.
pub fn schedule(
    fleet: &Fleet,
    running: &[RunningJob],
    queue: &[JobRequest],
    policy: &Policy,
    now: Seconds,
) -> Result<Decision, ScheduleError> {
    let mut scheduler = Scheduler::new(fleet, running, policy.clone())?;
    Ok(scheduler.schedule(queue, now))
}
