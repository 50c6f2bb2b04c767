//! The pure gang scheduler: no kube, no tonic, no tokio.
//!
//! Input is the fleet ([`Fleet`] of [`Node`]s and [`Gpu`]s with health, cordons, NVLink domains,
//! racks and zones), the jobs running on it ([`RunningJob`]) and the queue ([`JobRequest`]).
//! Output is a [`Decision`]: gangs to start ([`Placement`]), running jobs to stop first
//! ([`Preemption`]), GPUs held for the job first in line ([`Reservation`]), and a human reason
//! for every job that waits ([`WaitReason`]).
//!
//! Two entry points: [`schedule`], a pure function over plain data, and [`Scheduler`], which
//! indexes the fleet once and keeps running jobs between passes (what the benchmark drives).
//!
//! Rules, in the order a pass applies them:
//! - gangs are all or nothing: a job gets every GPU at once or none, and nothing is held in
//!   part, so two gangs can never deadlock;
//! - a worker's GPUs sit on one node inside one NVLink domain; a gang goes on one node, else one
//!   rack, else one zone, else anywhere (unless its [`Locality`] requires a rack or zone), and
//!   on the fullest scope and nodes that take it (best fit), keeping whole nodes free;
//! - strict priority between levels; within a level the namespace with the least GPUs per unit
//!   of weight goes first (weighted fair share), FIFO within a namespace;
//! - a job that does not fit may preempt jobs of strictly lower priority, those that lose the
//!   least work first, and only when the freed GPUs make it fit;
//! - the first job that still cannot start gets a reservation; later jobs backfill around the
//!   reserved GPUs, or onto them only if they are expected to end before its start, or *on
//!   loan* ([`Policy::lending`]) if they may borrow: a job ahead of a loan that can start with
//!   its GPUs takes them back, whatever the priorities, so no loan delays the reserved start;
//! - failed, degraded (draining) and cordoned GPUs are never chosen.
//!
//! ```
//! use flotilla_scheduler::{Fleet, JobRequest, Locality, Policy, RunningJob, WorkerPlacement};
//!
//! // Two zones, each one rack of two 8-GPU nodes; one node already busy.
//! let fleet = Fleet::uniform(2, 1, 2, 8);
//! let busy = WorkerPlacement { node: "z0-r0-n0".into(), gpus: (0..8).collect() };
//! let running = [RunningJob::new("busy", vec![busy])];
//! let queue = [
//!     JobRequest::new("train", 2, 8).locality(Locality::Zone),
//!     JobRequest::new("probe", 1, 1).arrival(5),
//!     JobRequest::new("wide", 3, 8).locality(Locality::Zone).arrival(9),
//! ];
//! let decision = flotilla_scheduler::schedule(&fleet, &running, &queue, &Policy::default(), 100)?;
//! assert_eq!(decision.placements[0].workers[0].node, "z1-r0-n0"); // the zone with room
//! assert_eq!(decision.placements[1].workers[0].node, "z0-r0-n1");
//! assert_eq!(
//!     decision.waiting[0].reason.to_string(),
//!     "can never fit this fleet: needs 24 GPUs in one zone (3 workers × 8); \
//!      largest free block is 16 (32 GPUs free in all)"
//! );
//! # Ok::<(), flotilla_scheduler::ScheduleError>(())
//! ```

#![forbid(unsafe_code)]

mod decision;
mod fairshare;
mod fasthash;
mod model;
mod occupancy;
mod place;
mod preempt;
mod scheduler;

pub use decision::{
    Decision, Placement, Preemption, Reservation, ScheduleError, Scope, Shortfall, WaitReason,
    Waiting,
};
pub use model::{
    DEFAULT_MIN_LOAN, Fleet, Gpu, GpuState, JobId, JobRequest, Locality, Node, Policy, RunningJob,
    Seconds, Spread, WorkerPlacement,
};
pub use scheduler::{FleetStats, Scheduler, schedule};
