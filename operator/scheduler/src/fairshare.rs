//! The order a pass considers queued jobs in: strict priority between levels; within a level
//! the namespace with the least weighted usage goes next, FIFO within each namespace.

use std::collections::VecDeque;

use crate::model::JobRequest;

/// One namespace's jobs at one priority level, oldest first.
#[derive(Debug)]
struct Lane<'q> {
    namespace: &'q str,
    jobs: VecDeque<&'q JobRequest>,
}

/// Hands out queued jobs in decision order, consulting usage as it changes during the pass.
#[derive(Debug)]
pub(crate) struct FairOrder<'q> {
    /// Levels, highest priority first; each a set of namespace lanes.
    levels: Vec<Vec<Lane<'q>>>,
    current: usize,
}

impl<'q> FairOrder<'q> {
    /// Sorts the queue into levels and lanes.
    pub fn new(queue: &'q [JobRequest]) -> Self {
        let mut jobs: Vec<&JobRequest> = queue.iter().collect();
        jobs.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.namespace.cmp(&b.namespace))
                .then(a.arrival.cmp(&b.arrival))
                .then_with(|| a.id.cmp(&b.id))
        });
        let mut levels: Vec<Vec<Lane<'q>>> = Vec::new();
        let mut previous: Option<(i32, &str)> = None;
        for job in jobs {
            match previous {
                Some((priority, _)) if priority != job.priority => levels.push(Vec::new()),
                None => levels.push(Vec::new()),
                _ => {}
            }
            let level = levels.last_mut().expect("a level was just pushed");
            if previous != Some((job.priority, job.namespace.as_str())) {
                level.push(Lane { namespace: &job.namespace, jobs: VecDeque::new() });
            }
            level.last_mut().expect("a lane was just pushed").jobs.push_back(job);
            previous = Some((job.priority, &job.namespace));
        }
        FairOrder { levels, current: 0 }
    }

    /// The next job: from the current level, the lane whose namespace has the least weighted
    /// usage (ties to the oldest head); `share` gives a namespace's usage divided by its weight.
    pub fn next(&mut self, share: impl Fn(&str) -> f64) -> Option<&'q JobRequest> {
        loop {
            let level = self.levels.get_mut(self.current)?;
            let lane = level.iter_mut().filter(|lane| !lane.jobs.is_empty()).min_by(|a, b| {
                let (head_a, head_b) = (a.jobs[0], b.jobs[0]);
                share(a.namespace)
                    .total_cmp(&share(b.namespace))
                    .then(head_a.arrival.cmp(&head_b.arrival))
                    .then_with(|| head_a.id.cmp(&head_b.id))
            });
            match lane {
                Some(lane) => return lane.jobs.pop_front(),
                None => self.current += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_priority_then_fifo() {
        let queue = vec![
            JobRequest::new("late-low", 1, 1).arrival(1),
            JobRequest::new("high", 1, 1).priority(5).arrival(9),
            JobRequest::new("early-low", 1, 1).arrival(0),
        ];
        let mut order = FairOrder::new(&queue);
        let ids: Vec<_> =
            std::iter::from_fn(|| order.next(|_| 0.0)).map(|j| j.id.0.as_str()).collect();
        assert_eq!(ids, ["high", "early-low", "late-low"]);
    }

    #[test]
    fn least_served_namespace_goes_first() {
        let queue = vec![
            JobRequest::new("a1", 1, 1).namespace("a").arrival(0),
            JobRequest::new("b1", 1, 1).namespace("b").arrival(5),
        ];
        let mut order = FairOrder::new(&queue);
        let first = order.next(|ns| if ns == "a" { 10.0 } else { 1.0 }).unwrap();
        assert_eq!(first.id.0, "b1");
    }
}
