//! The order a pass considers queued jobs in: strict priority between levels; within a level
//! the namespace with the least weighted usage goes next, FIFO within each namespace.

use std::cmp::Reverse;

use crate::fasthash::FastMap;
use crate::model::JobRequest;

/// One namespace's jobs at one priority level, oldest first, as queue positions.
#[derive(Debug)]
struct Lane {
    namespace: usize,
    jobs: Vec<usize>,
    next: usize,
}

/// Hands out queued jobs in decision order, consulting usage as it changes during the pass.
#[derive(Debug)]
pub(crate) struct FairOrder<'q> {
    queue: &'q [JobRequest],
    namespaces: Vec<&'q str>,
    /// Weighted usage per namespace, refreshed when marked stale.
    shares: Vec<f64>,
    stale: bool,
    /// Levels, highest priority first; each a set of namespace lanes.
    levels: Vec<Vec<Lane>>,
    current: usize,
}

impl<'q> FairOrder<'q> {
    /// Sorts the queue into levels and lanes (numeric keys: this runs on every pass).
    pub fn new(queue: &'q [JobRequest]) -> Self {
        let mut index: FastMap<&str, usize> = FastMap::default();
        let mut namespaces = Vec::new();
        let mut keys: Vec<(Reverse<i32>, usize, u64, usize)> = queue
            .iter()
            .enumerate()
            .map(|(position, job)| {
                let namespace = *index.entry(job.namespace.as_str()).or_insert_with(|| {
                    namespaces.push(job.namespace.as_str());
                    namespaces.len() - 1
                });
                (Reverse(job.priority), namespace, job.arrival, position)
            })
            .collect();
        keys.sort_unstable();
        let mut levels: Vec<Vec<Lane>> = Vec::new();
        let mut previous: Option<(Reverse<i32>, usize)> = None;
        for (priority, namespace, _, position) in keys {
            if previous.is_none_or(|(p, _)| p != priority) {
                levels.push(Vec::new());
            }
            let level = levels.last_mut().expect("a level was just pushed");
            if previous != Some((priority, namespace)) {
                level.push(Lane { namespace, jobs: Vec::new(), next: 0 });
            }
            level.last_mut().expect("a lane was just pushed").jobs.push(position);
            previous = Some((priority, namespace));
        }
        let shares = vec![0.0; namespaces.len()];
        FairOrder { queue, namespaces, shares, stale: true, levels, current: 0 }
    }

    /// Usage changed: shares are read again before the next pick.
    pub fn usage_changed(&mut self) {
        self.stale = true;
    }

    /// The next job: from the current level, the lane whose namespace has the least weighted
    /// usage (ties to the oldest head, then queue order); `share` gives a namespace's usage
    /// divided by its weight.
    pub fn next(&mut self, share: impl Fn(&str) -> f64) -> Option<&'q JobRequest> {
        if self.stale {
            for (slot, namespace) in self.shares.iter_mut().zip(&self.namespaces) {
                *slot = share(namespace);
            }
            self.stale = false;
        }
        loop {
            let level = self.levels.get_mut(self.current)?;
            let (queue, shares) = (self.queue, &self.shares);
            let lane =
                level.iter_mut().filter(|lane| lane.next < lane.jobs.len()).min_by(|a, b| {
                    let (head_a, head_b) = (a.jobs[a.next], b.jobs[b.next]);
                    shares[a.namespace]
                        .total_cmp(&shares[b.namespace])
                        .then(queue[head_a].arrival.cmp(&queue[head_b].arrival))
                        .then(head_a.cmp(&head_b))
                });
            match lane {
                Some(lane) => {
                    lane.next += 1;
                    return Some(&queue[lane.jobs[lane.next - 1]]);
                }
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
            std::iter::from_fn(|| order.next(|_| 0.0)).map(|j| j.id.as_str()).collect();
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
        assert_eq!(first.id.as_str(), "b1");
    }
}
