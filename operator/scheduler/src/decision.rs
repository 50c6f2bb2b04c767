//! Output domain types: placements, preemptions, reservations, reasons to wait, and errors.

use std::fmt;

use crate::model::{JobId, Seconds, WorkerPlacement};

/// A job placed in this decision: every worker at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The job placed.
    pub job: JobId,
    /// One entry per worker, in rank order.
    pub workers: Vec<WorkerPlacement>,
    /// Started while GPUs were held for an earlier job: a backfill around its reservation.
    pub backfill: bool,
    /// Started on loan: it uses GPUs held for that earlier job and is expected to run past its
    /// start, so the GPUs are taken back (a [`Preemption`] with `reclaim`) when that job can
    /// start.
    pub on_loan: bool,
}

impl Placement {
    /// The number of distinct nodes the gang uses.
    pub fn node_count(&self) -> usize {
        let mut nodes: Vec<&str> = self.workers.iter().map(|w| w.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes.len()
    }
}

/// A running job to stop so that a higher-priority job fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    /// The job to stop.
    pub victim: JobId,
    /// The job its GPUs go to.
    pub for_job: JobId,
    /// GPU-seconds of work the victim loses (GPUs × time since its last checkpoint).
    pub lost_gpu_seconds: u64,
    /// The victim ran on loan and its GPUs are taken back by a job ahead of it in line (its
    /// priority may be equal); otherwise it is outranked.
    pub reclaim: bool,
}

/// GPUs held back for the first waiting job that does not fit, so backfill cannot delay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The job the GPUs are held for.
    pub job: JobId,
    /// When it is expected to start; `None` if that waits on a job of unknown length.
    pub start: Option<Seconds>,
    /// The GPUs held, as the workers it is expected to get.
    pub workers: Vec<WorkerPlacement>,
    /// Held GPUs left idle after the pass (free, waiting for the start).
    pub idle: u64,
    /// Held GPUs lent to jobs behind it (see [`Placement::on_loan`]).
    pub lent: u64,
}

/// The topology scope a shortfall was measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole fleet (or the nodes the selector admits).
    Fleet,
    /// One zone.
    Zone,
    /// One rack.
    Rack,
}

/// Why a job is waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// The request asks for no GPUs (no workers, or none per worker); it is never placed.
    EmptyRequest,
    /// The job could not fit even on an empty fleet; it waits for the fleet to change.
    NeverFits(Shortfall),
    /// Not enough free GPUs in the right shape now.
    Insufficient(Shortfall),
    /// First in line: GPUs are reserved and it starts when running jobs end.
    Reserved {
        /// Expected start, if every job it waits on has a known end.
        start: Option<Seconds>,
        /// Reserved GPUs lent to jobs behind it until then.
        lent: u64,
    },
}

/// What a job needs and the most the fleet offers in the shape it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Workers in the gang.
    pub workers: u32,
    /// GPUs per worker.
    pub gpus_per_worker: u32,
    /// The scope the gang must fit in.
    pub scope: Scope,
    /// GPUs usable by this job's workers in the best single scope (whole workers only).
    pub largest_block: u64,
    /// Free schedulable GPUs in the fleet.
    pub free: u64,
    /// The largest NVLink domain on any admitted node.
    pub largest_domain: u32,
    /// Whether any node satisfies the selector at all.
    pub selector_matches: bool,
    /// GPUs held for the job first in line, not offered to this one.
    pub reserved_for: Option<(JobId, u64)>,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = u64::from(self.workers) * u64::from(self.gpus_per_worker);
        if !self.selector_matches {
            return write!(f, "needs {total} GPUs; no schedulable node matches its node selector");
        }
        if self.gpus_per_worker > self.largest_domain {
            return write!(
                f,
                "needs {} GPUs per worker in one NVLink domain; the largest domain has {}",
                self.gpus_per_worker, self.largest_domain
            );
        }
        let place = match self.scope {
            Scope::Fleet => "",
            Scope::Zone => " in one zone",
            Scope::Rack => " in one rack",
        };
        write!(f, "needs {total} GPUs{place}")?;
        if self.workers > 1 {
            write!(f, " ({} workers × {})", self.workers, self.gpus_per_worker)?;
        }
        write!(f, "; largest free block is {}", self.largest_block)?;
        if self.largest_block != self.free {
            write!(f, " ({} GPUs free in all)", self.free)?;
        }
        if let Some((job, gpus)) = &self.reserved_for {
            write!(f, "; {gpus} more are held for {job}, first in line")?;
        }
        Ok(())
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::EmptyRequest => {
                f.write_str("asks for no GPUs: workers and GPUs per worker must both be positive")
            }
            WaitReason::NeverFits(short) => write!(f, "can never fit this fleet: {short}"),
            WaitReason::Insufficient(short) => short.fmt(f),
            WaitReason::Reserved { start, lent } => {
                match start {
                    Some(at) => {
                        write!(f, "first in line; GPUs reserved, expected to start at {at}")?
                    }
                    None => write!(
                        f,
                        "first in line; GPUs reserved, starts when jobs of unknown length end"
                    )?,
                }
                if *lent > 0 {
                    write!(f, "; {lent} of them lent to jobs behind it until then")?;
                }
                Ok(())
            }
        }
    }
}

/// A job left waiting, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The job.
    pub job: JobId,
    /// Why it waits.
    pub reason: WaitReason,
}

/// Everything one scheduling pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Jobs to start now, in decision order.
    pub placements: Vec<Placement>,
    /// Running jobs to stop first; their preemptors are among `placements`.
    pub preemptions: Vec<Preemption>,
    /// Queued jobs that wait, each with its reason.
    pub waiting: Vec<Waiting>,
    /// The GPUs held for the first waiting job, if any.
    pub reservation: Option<Reservation>,
}

/// Input the scheduler refuses: it names what was expected and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// Two nodes share a name.
    DuplicateNode(String),
    /// A node lists the same GPU index twice.
    DuplicateGpu {
        /// The node.
        node: String,
        /// The repeated index.
        index: u32,
    },
    /// A running job names a node the fleet does not have.
    UnknownNode {
        /// The job.
        job: JobId,
        /// The node it names.
        node: String,
    },
    /// A running job names a GPU its node does not have.
    UnknownGpu {
        /// The job.
        job: JobId,
        /// The node.
        node: String,
        /// The GPU index it names.
        index: u32,
    },
    /// Two running jobs (or one twice) hold the same GPU.
    GpuHeldTwice {
        /// The second holder.
        job: JobId,
        /// The node.
        node: String,
        /// The GPU index.
        index: u32,
    },
    /// Two running jobs share an id.
    DuplicateJob(JobId),
    /// An update names a node or GPU the fleet does not have.
    NoSuchGpu {
        /// The node named.
        node: String,
        /// The GPU index named, if any.
        index: Option<u32>,
    },
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::DuplicateNode(node) => {
                write!(f, "node {node} appears twice in the fleet")
            }
            ScheduleError::DuplicateGpu { node, index } => {
                write!(f, "node {node} lists GPU {index} twice")
            }
            ScheduleError::UnknownNode { job, node } => {
                write!(f, "running job {job} names node {node}, which the fleet does not have")
            }
            ScheduleError::UnknownGpu { job, node, index } => {
                write!(
                    f,
                    "running job {job} names GPU {index} on node {node}, which has no such GPU"
                )
            }
            ScheduleError::GpuHeldTwice { job, node, index } => write!(
                f,
                "running job {job} holds GPU {index} on node {node}, already held by another job"
            ),
            ScheduleError::DuplicateJob(job) => write!(f, "running job {job} appears twice"),
            ScheduleError::NoSuchGpu { node, index: Some(index) } => {
                write!(f, "the fleet has no GPU {index} on node {node}")
            }
            ScheduleError::NoSuchGpu { node, index: None } => {
                write!(f, "the fleet has no node {node}")
            }
        }
    }
}

impl std::error::Error for ScheduleError {}
