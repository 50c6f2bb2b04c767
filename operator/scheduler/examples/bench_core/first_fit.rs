//! The naive baseline: strict arrival order by priority, first nodes that fit, no topology,
//! no reservation, no preemption; a gang still starts whole or not at all.

use std::collections::HashMap;

use flotilla_scheduler::{Fleet, JobId, JobRequest};

/// First-fit over nodes in index order.
#[derive(Debug, Clone)]
pub struct FirstFit {
    node_free: Vec<u32>,
    node_size: Vec<u32>,
    free: u64,
    held: HashMap<JobId, Vec<(usize, u32)>>,
}

impl FirstFit {
    /// Every GPU of the fleet free.
    pub fn new(fleet: &Fleet) -> Self {
        let node_size: Vec<u32> = fleet.nodes.iter().map(|n| n.gpus.len() as u32).collect();
        FirstFit {
            free: node_size.iter().map(|&n| u64::from(n)).sum(),
            node_free: node_size.clone(),
            node_size,
            held: HashMap::new(),
        }
    }

    /// Starts every job that fits, in priority then arrival order; returns those started.
    pub fn schedule(&mut self, queue: &[JobRequest]) -> Vec<JobId> {
        let mut order: Vec<&JobRequest> = queue.iter().collect();
        order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.arrival.cmp(&b.arrival)));
        let mut started = Vec::new();
        for job in order {
            // Even the naive baseline skips the node scan when the fleet is short of GPUs.
            if job.total_gpus() > self.free {
                continue;
            }
            let mut take = Vec::new();
            let mut left = job.workers;
            for (node, &free) in self.node_free.iter().enumerate() {
                let fit = (free / job.gpus_per_worker).min(left);
                if fit > 0 {
                    take.push((node, fit * job.gpus_per_worker));
                    left -= fit;
                    if left == 0 {
                        break;
                    }
                }
            }
            if left > 0 {
                continue;
            }
            for &(node, gpus) in &take {
                self.node_free[node] -= gpus;
                self.free -= u64::from(gpus);
            }
            self.held.insert(job.id.clone(), take);
            started.push(job.id.clone());
        }
        started
    }

    /// A job ended.
    pub fn finish(&mut self, job: &JobId) {
        for (node, gpus) in self.held.remove(job).unwrap_or_default() {
            self.node_free[node] += gpus;
            self.free += u64::from(gpus);
        }
    }

    /// Allocated share and fragmentation (free GPUs on partly used nodes / free GPUs).
    pub fn fill(&self) -> (f64, f64) {
        let total: u64 = self.node_size.iter().map(|&n| u64::from(n)).sum();
        let whole: u64 = self
            .node_free
            .iter()
            .zip(&self.node_size)
            .filter(|(free, size)| free == size)
            .map(|(&free, _)| u64::from(free))
            .sum();
        let fragmentation =
            if self.free == 0 { 0.0 } else { 1.0 - whole as f64 / self.free as f64 };
        (1.0 - self.free as f64 / total as f64, fragmentation)
    }
}
