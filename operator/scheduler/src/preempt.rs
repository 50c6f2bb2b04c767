//! Preemption and reservation: the two ways a job that does not fit now is served.
//!
//! Preemption tries victims, cheapest first (fewest GPU-seconds lost since their last
//! checkpoint, then lowest priority, then the youngest), until the job fits; then it puts back
//! every victim the job can do without, most expensive first. Each victim left is needed:
//! without its GPUs the job does not fit, so the job's placement uses some of them. If even
//! every candidate together does not make the job fit, nobody is preempted. Candidates are jobs
//! of strictly lower priority (when the policy allows preemption) and jobs on loan that are
//! behind the job in line: a loan is taken back as soon as someone ahead can start with it.
//!
//! A reservation counts the GPUs of loans behind the job as free (they are taken back when it
//! can start), then replays the expected ends of running jobs, earliest first (unknown ends
//! last), on a copy of the occupancy until the job fits; the GPUs it would get then are held
//! back from backfill for the rest of the pass, except for jobs expected to end before that
//! start, and lent to jobs that may borrow when the policy lends.

use std::cmp::Reverse;

use crate::decision::{Decision, Preemption};
use crate::model::{JobRequest, Seconds};
use crate::occupancy::Topology;
use crate::place::{Gang, Need, Search};
use crate::scheduler::{ActiveReservation, Scheduler};

impl Scheduler {
    /// Victims (job slots) whose GPUs make the job fit, and its gang on them; `None` if no set
    /// of lower-priority jobs would make it fit.
    pub(crate) fn plan_preemption(
        &mut self,
        job: &JobRequest,
        need: Need<'_>,
        now: Seconds,
    ) -> Option<(Vec<u32>, Gang)> {
        let simple = !need.spread && need.selector.is_empty();
        // A job no further ahead in line has no more candidates than one that missed.
        let ruled_out =
            |&(priority, arrival, workers, per_worker, locality): &(i32, Seconds, u32, u32, _)| {
                (job.priority < priority || (job.priority == priority && job.arrival >= arrival))
                    && need.workers >= workers
                    && need.per_worker >= per_worker
                    && need.locality == locality
            };
        if simple && self.preemption_misses.iter().any(ruled_out) {
            return None;
        }
        let plan = self.try_preemption(job, need, now);
        if plan.is_none() && simple {
            self.preemption_misses.push((
                job.priority,
                job.arrival,
                need.workers,
                need.per_worker,
                need.locality,
            ));
        }
        plan
    }

    fn try_preemption(
        &mut self,
        job: &JobRequest,
        need: Need<'_>,
        now: Seconds,
    ) -> Option<(Vec<u32>, Gang)> {
        let outranked = self.policy.preemption;
        let lower: u64 = if outranked {
            self.held_by_priority.range(..job.priority).map(|(_, held)| held).sum()
        } else {
            0
        };
        // An upper bound on what preemption could free: lower priorities and every loan.
        let freeable = lower + self.lent_gpus;
        if freeable == 0 || self.occ.fleet_free + freeable < need.total() {
            return None;
        }
        let mut candidates: Vec<(u64, i32, Reverse<Seconds>, u32)> = self
            .jobs
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| slot.as_ref().map(|slot| (index as u32, slot)))
            .filter(|(index, slot)| {
                ((outranked && slot.priority < job.priority) || slot.lent_to_one_behind(job))
                    && !self.started_this_pass.contains(index)
            })
            .map(|(index, slot)| {
                (slot.lost_work(now), slot.priority, Reverse(slot.started_at), index)
            })
            .collect();
        candidates.sort_unstable();
        let mut victims = Vec::new();
        let mut fits = false;
        for &(_, _, _, index) in &candidates {
            self.release_slot(index);
            victims.push(index);
            if self.occ.fleet_free >= need.total()
                && Search::new(&self.topo, &self.occ, need).fits()
            {
                fits = true;
                break;
            }
        }
        if !fits {
            victims.iter().for_each(|&index| self.retake_slot(index));
            return None;
        }
        // The last victim is needed (the job did not fit before it); try the others back.
        let last = victims.pop().expect("at least one victim");
        let mut needed = vec![last];
        for index in victims.into_iter().rev() {
            self.retake_slot(index);
            if !Search::new(&self.topo, &self.occ, need).fits() {
                self.release_slot(index);
                needed.push(index);
            }
        }
        let gang = Search::new(&self.topo, &self.occ, need).find().expect("fits after preemption");
        Some((needed, gang))
    }

    /// Stops the victims for good: they leave the job table and the unreserved view.
    pub(crate) fn evict(
        &mut self,
        victims: &[u32],
        job: &JobRequest,
        now: Seconds,
        decision: &mut Decision,
        reservation: &mut Option<ActiveReservation>,
    ) {
        for &index in victims {
            // Their GPUs are already released in the occupancy; take them back so that
            // `remove` releases them once, with every count in step.
            self.retake_slot(index);
            let slot = self.remove(index);
            if let Some(active) = reservation.as_mut() {
                slot.gpus.iter().for_each(|&gpu| active.lifted.release(&self.topo, gpu));
            }
            decision.preemptions.push(Preemption {
                victim: slot.id.clone(),
                for_job: job.id.clone(),
                lost_gpu_seconds: slot.lost_work(now),
                reclaim: slot.on_loan,
            });
        }
    }

    /// When the job could start and on which GPUs, replaying expected ends after taking back
    /// the loans behind it; `None` if it would not fit even with every running job gone.
    pub(crate) fn plan_reservation(
        &self,
        job: &JobRequest,
        need: Need<'_>,
        now: Seconds,
    ) -> Option<(Option<Seconds>, Gang)> {
        let mut trial = self.occ.clone();
        let mut took_back = false;
        for &index in &self.loans {
            if self.jobs[index as usize].as_ref().is_some_and(|slot| slot.lent_to_one_behind(job)) {
                for &gpu in self.gpus_of(index) {
                    trial.release(&self.topo, gpu);
                }
                took_back = true;
            }
        }
        if took_back && trial.fleet_free >= need.total() {
            let search = Search::new(&self.topo, &trial, need);
            if search.fits() {
                return search.find().map(|gang| (Some(now), gang));
            }
        }
        // Releasing a loan taken back above again changes nothing.
        for &(end, index) in &self.by_end {
            for &gpu in self.gpus_of(index) {
                trial.release(&self.topo, gpu);
            }
            if trial.fleet_free < need.total() {
                continue;
            }
            let search = Search::new(&self.topo, &trial, need);
            if search.fits() {
                let start = (end != u64::MAX).then_some(end);
                return search.find().map(|gang| (start, gang));
            }
        }
        None
    }

    fn gpus_of(&self, index: u32) -> &[u32] {
        self.jobs[index as usize].as_ref().map(|slot| slot.gpus.as_slice()).unwrap_or(&[])
    }

    /// Frees a running job's GPUs in the occupancy only (a trial; the job stays in the table).
    fn release_slot(&mut self, index: u32) {
        let topo: &Topology = &self.topo;
        let slot = self.jobs[index as usize].as_ref().expect("live slot");
        slot.gpus.iter().for_each(|&gpu| self.occ.release(topo, gpu));
    }

    /// Gives a running job back the GPUs a trial released.
    fn retake_slot(&mut self, index: u32) {
        let topo: &Topology = &self.topo;
        let slot = self.jobs[index as usize].as_ref().expect("live slot");
        slot.gpus.iter().for_each(|&gpu| self.occ.set_owner(topo, gpu, index));
    }
}
