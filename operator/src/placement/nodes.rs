//! The fleet as the scheduler sees it, from `GpuNode`s, and its placements as the API's.

use super::{NVLINK_DOMAINS_LABEL, RACK_LABEL, ZONE_LABEL};
use crate::crd::gpu_node::{GpuHealth, GpuNode};
use crate::crd::{Placement, WorkerPlacement};
use flotilla_scheduler as sched;
use std::collections::{BTreeSet, HashSet};

/// The scheduler's fleet: every named `GpuNode` once, its GPUs from status with health and
/// cordons, its zone, rack and NVLink domains from labels. Failed, validating and unknown GPUs
/// count as failed; degraded ones drain.
pub fn scheduler_fleet(nodes: &[&GpuNode]) -> sched::Fleet {
    let mut names = HashSet::new();
    let nodes = nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            if !names.insert(name.clone()) {
                return None;
            }
            let labels = n.metadata.labels.clone().unwrap_or_default();
            let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
            let mut node = sched::Node::new(name, 0).in_rack(label(ZONE_LABEL), label(RACK_LABEL));
            node.cordoned = n.spec.cordoned;
            let mut seen = BTreeSet::new();
            let mut gpus: Vec<sched::Gpu> = n
                .status
                .iter()
                .flat_map(|s| &s.gpus)
                .filter_map(|g| {
                    let index = u32::try_from(g.index).ok().filter(|i| seen.insert(*i))?;
                    Some(sched::Gpu {
                        index,
                        nvlink_domain: 0,
                        state: match g.health {
                            GpuHealth::Healthy => sched::GpuState::Healthy,
                            GpuHealth::Degraded => sched::GpuState::Degraded,
                            GpuHealth::Failed | GpuHealth::Validating | GpuHealth::Unknown => {
                                sched::GpuState::Failed
                            }
                        },
                        cordoned: n.spec.cordoned_gpus.contains(&g.index),
                    })
                })
                .collect();
            gpus.sort_by_key(|g| g.index);
            node.gpus = gpus;
            if let Some(domains) = labels.get(NVLINK_DOMAINS_LABEL).and_then(|v| v.parse().ok()) {
                node = node.nvlink_domains(domains);
            }
            node.labels = labels;
            Some(node)
        })
        .collect();
    sched::Fleet::new(nodes)
}

pub(super) fn placement(p: &sched::Placement) -> Placement {
    Placement {
        workers: p
            .workers
            .iter()
            .enumerate()
            .map(|(rank, w)| WorkerPlacement {
                rank: rank as i32,
                node: w.node.clone(),
                gpus: w.gpus.iter().map(|&g| g as i32).collect(),
            })
            .collect(),
    }
}
