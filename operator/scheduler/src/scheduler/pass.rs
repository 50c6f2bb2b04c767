//! One scheduling pass over the queue: place what fits, hold GPUs for the job first in line,
//! lend held GPUs, take loans back.

use crate::decision::{Decision, Placement, Reservation, Shortfall, WaitReason, Waiting};
use crate::fairshare::FairOrder;
use crate::model::{JobRequest, Seconds, WorkerPlacement};
use crate::occupancy::{FREE, RESERVED};
use crate::place::{Gang, Need, Search};

use super::{ActiveReservation, Scheduler, Slot, behind};

impl Scheduler {
    /// One pass over the queue at time `now`: places what fits, preempts where a higher
    /// priority needs it, reserves GPUs for the first job that waits, and says why each waits.
    /// Jobs already running are skipped. Placements and preemptions are applied at once.
    pub fn schedule(&mut self, queue: &[JobRequest], now: Seconds) -> Decision {
        let mut decision = Decision::default();
        decision.waiting.reserve(queue.len());
        let mut reservation: Option<ActiveReservation> = None;
        self.preemption_misses.clear();
        self.started_this_pass.clear();
        let mut order = FairOrder::new(queue);
        loop {
            let job = {
                let (usage, policy) = (&self.usage, &self.policy);
                order.next(|ns| usage.get(ns).copied().unwrap_or(0) as f64 / policy.weight_of(ns))
            };
            let Some(job) = job else { break };
            if self.by_id.contains_key(&job.id) {
                continue;
            }
            let (placed, preempted) = (decision.placements.len(), decision.preemptions.len());
            if let Some(reason) = self.attempt(job, now, &mut decision, &mut reservation) {
                decision.waiting.push(Waiting { job: job.id.clone(), reason });
            }
            if (placed, preempted) != (decision.placements.len(), decision.preemptions.len()) {
                order.usage_changed();
            }
        }
        if let Some(active) = reservation {
            let owners = active.gpus.iter().map(|&gpu| self.occ.owner[gpu as usize]);
            let idle = owners.clone().filter(|&owner| owner == RESERVED).count() as u64;
            let lent = owners
                .filter(|owner| *owner < RESERVED && self.loans.contains(owner))
                .count() as u64;
            if let Some(WaitReason::Reserved { lent: count, .. }) =
                decision.waiting.iter_mut().find(|w| w.job == active.job).map(|w| &mut w.reason)
            {
                *count = lent;
            }
            decision.reservation = Some(Reservation {
                job: active.job.clone(),
                start: active.start,
                workers: active.workers.clone(),
                idle,
                lent,
            });
            self.lift(&active);
        }
        decision
    }

    /// Tries every way to start one job; the reason it waits if none works.
    fn attempt(
        &mut self,
        job: &JobRequest,
        now: Seconds,
        decision: &mut Decision,
        reservation: &mut Option<ActiveReservation>,
    ) -> Option<WaitReason> {
        let need = Need::of(job);
        if job.workers == 0 || job.gpus_per_worker == 0 {
            return Some(WaitReason::EmptyRequest);
        }
        if let Some(gang) = Search::new(&self.topo, &self.occ, need).find() {
            self.start(job, gang, now, false, decision, reservation);
            return None;
        }
        if let Some(active) = reservation.as_ref() {
            let ends_in_time = match (active.start, job.expected_duration) {
                (Some(start), Some(duration)) => now.saturating_add(duration) <= start,
                _ => false,
            };
            // A loan the reserved start would end within a checkpoint interval buys nothing.
            let worth_a_loan = self.policy.lending
                && job.may_borrow
                && behind((job.priority, job.arrival), (active.priority, active.arrival))
                && active
                    .start
                    .is_none_or(|start| start >= now.saturating_add(self.policy.min_loan));
            if (ends_in_time || worth_a_loan)
                && let Some(gang) = Search::new(&self.topo, &active.lifted, need).find()
            {
                self.start(job, gang, now, !ends_in_time, decision, reservation);
                return None;
            }
        }
        if (self.policy.preemption || self.lent_gpus > 0)
            && let Some((victims, gang)) = self.plan_preemption(job, need, now)
        {
            self.evict(&victims, job, now, decision, reservation);
            self.start(job, gang, now, false, decision, reservation);
            return None;
        }
        if !Search::new(&self.topo, &self.empty, need).fits() {
            return Some(WaitReason::NeverFits(
                Search::new(&self.topo, &self.empty, need).shortfall(),
            ));
        }
        if reservation.is_none()
            && let Some((start, gang)) = self.plan_reservation(job, need, now)
        {
            let start = start.map(|at| at.max(now));
            *reservation = Some(self.hold(job, start, gang));
            return Some(WaitReason::Reserved { start, lent: 0 });
        }
        let mut short: Shortfall = Search::new(&self.topo, &self.occ, need).shortfall();
        // Name the reservation only where it is what stands in the way.
        if let Some(active) = reservation.as_ref()
            && short.free + active.gpus.len() as u64 >= need.total()
        {
            short.reserved_for = Some((active.job.clone(), active.gpus.len() as u64));
        }
        Some(WaitReason::Insufficient(short))
    }

    /// Gives a job its gang and records the placement (`on_loan`: on GPUs held for another).
    fn start(
        &mut self,
        job: &JobRequest,
        gang: Gang,
        now: Seconds,
        on_loan: bool,
        decision: &mut Decision,
        reservation: &mut Option<ActiveReservation>,
    ) {
        let workers = self.workers_of(&gang);
        let gpus: Vec<u32> = gang.into_iter().flatten().collect();
        let slot = Slot {
            id: job.id.clone(),
            namespace: job.namespace.clone(),
            priority: job.priority,
            gpus,
            workers: workers.clone(),
            started_at: now,
            expected_end: job.expected_duration.map(|d| now.saturating_add(d)),
            last_checkpoint: None,
            on_loan,
            arrival: job.arrival,
        };
        let index = self.insert(slot);
        self.started_this_pass.push(index);
        if let Some(active) = reservation.as_mut() {
            let slot = self.jobs[index as usize].as_ref().expect("just inserted");
            for &gpu in &slot.gpus {
                active.lifted.set_owner(&self.topo, gpu, index);
            }
        }
        let backfill = reservation.is_some();
        decision.placements.push(Placement { job: job.id.clone(), workers, backfill, on_loan });
    }

    /// Marks a reservation's free GPUs as held, keeping an unreserved view beside them.
    fn hold(&mut self, job: &JobRequest, start: Option<Seconds>, gang: Gang) -> ActiveReservation {
        let lifted = self.occ.clone();
        let workers = self.workers_of(&gang);
        let gpus: Vec<u32> = gang.into_iter().flatten().collect();
        for &gpu in &gpus {
            self.occ.reserved[gpu as usize] = true;
            if self.occ.owner[gpu as usize] == FREE {
                self.occ.set_owner(&self.topo, gpu, RESERVED);
            }
        }
        ActiveReservation {
            job: job.id.clone(),
            priority: job.priority,
            arrival: job.arrival,
            start,
            gpus,
            workers,
            lifted,
        }
    }

    /// Ends a pass's reservation: held GPUs that are still free become plainly free.
    fn lift(&mut self, active: &ActiveReservation) {
        for &gpu in &active.gpus {
            self.occ.reserved[gpu as usize] = false;
            if self.occ.owner[gpu as usize] == RESERVED {
                self.occ.set_owner(&self.topo, gpu, FREE);
            }
        }
    }

    /// Node names and GPU indices for flat GPU ids, worker by worker.
    fn workers_of(&self, gang: &[Vec<u32>]) -> Vec<WorkerPlacement> {
        gang.iter()
            .filter(|gpus| !gpus.is_empty())
            .map(|gpus| {
                let node = self.topo.gpus[gpus[0] as usize].node;
                let mut indices: Vec<u32> =
                    gpus.iter().map(|&gpu| self.topo.gpus[gpu as usize].index).collect();
                indices.sort_unstable();
                WorkerPlacement { node: self.topo.nodes[node as usize].name.clone(), gpus: indices }
            })
            .collect()
    }
}
