//! The workloads: the jobs both schedulers are given, in order.

use crate::GPUS;
use crate::args::{Args, Variant};

/// One job: `workers` × `gpus` GPUs.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub(crate) name: String,
    pub(crate) workers: u32,
    pub(crate) gpus: u32,
}

/// The jobs of `variant`, the same for both schedulers.
pub(crate) fn workload(args: &Args, variant: Variant) -> Vec<Job> {
    let budget = (args.nodes as f64 * f64::from(GPUS) * args.fill).floor() as u64;
    let most = args.jobs.unwrap_or(usize::MAX);
    match variant {
        Variant::Single => (0..budget.min(most as u64))
            .map(|i| Job { name: format!("job-{i:05}"), workers: 1, gpus: 1 })
            .collect(),
        Variant::Mixed => {
            let mut rng = crate::workload::Rng::new(args.seed);
            let mut used = 0u64;
            let mut jobs = Vec::new();
            for arrival in crate::workload::jobs(&mut rng) {
                let (workers, gpus) = (arrival.request.workers, arrival.request.gpus_per_worker);
                let need = u64::from(workers * gpus);
                if used + need > budget {
                    continue;
                }
                used += need;
                jobs.push(Job { name: format!("job-{:05}", jobs.len()), workers, gpus });
                if jobs.len() == most || used == budget {
                    break;
                }
            }
            jobs
        }
    }
}

/// The check workload: one 8-GPU worker per node.
pub(crate) fn check_workload(nodes: usize) -> Vec<Job> {
    (0..nodes).map(|i| Job { name: format!("check-{i:05}"), workers: 1, gpus: GPUS }).collect()
}

pub(crate) fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}
