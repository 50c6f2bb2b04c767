//! STAND-IN placement: a trivial first-fit gang placement used until the scheduler crate
//! (`flotilla-scheduler`) provides the real one. Replace [`StandInPlacement`] there; the
//! controller only depends on [`PlacementRequest`] and the `place` signature.

use crate::crd::gpu_node::{GpuHealth, GpuNode};
use crate::crd::training_job::PlacementStrategy;
use crate::crd::{Placement, WorkerPlacement};
use crate::lifecycle::Unschedulable;
use std::collections::{BTreeMap, BTreeSet};

/// What one gang needs.
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    /// Worker count.
    pub workers: i32,
    /// GPUs per worker; every worker's GPUs are on one node.
    pub gpus_per_worker: i32,
    /// Pack or spread.
    pub strategy: PlacementStrategy,
    /// Labels a node must carry.
    pub node_selector: &'a BTreeMap<String, String>,
}

/// First-fit over nodes sorted by name, lowest free GPU indices first. Not topology-aware, no
/// preemption, no fairness: a stand-in, clearly named as such.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandInPlacement;

impl StandInPlacement {
    /// Place a gang on healthy, uncordoned GPUs not in `in_use` (`node → GPU indices`).
    pub fn place(
        &self,
        req: &PlacementRequest<'_>,
        nodes: &[GpuNode],
        in_use: &BTreeMap<String, BTreeSet<i32>>,
    ) -> Result<Placement, Unschedulable> {
        let mut free: Vec<(String, Vec<i32>)> = nodes
            .iter()
            .filter(|n| !n.spec.cordoned && matches_selector(n, req.node_selector))
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                let status = n.status.as_ref()?;
                let used = in_use.get(&name);
                let gpus: Vec<i32> = status
                    .gpus
                    .iter()
                    .filter(|g| g.health == GpuHealth::Healthy)
                    .map(|g| g.index)
                    .filter(|i| {
                        !n.spec.cordoned_gpus.contains(i) && !used.is_some_and(|u| u.contains(i))
                    })
                    .collect();
                Some((name, gpus))
            })
            .collect();
        free.sort_by(|a, b| a.0.cmp(&b.0));
        let per = req.gpus_per_worker as usize;
        let mut workers = Vec::with_capacity(req.workers as usize);
        let mut cursor = 0usize;
        for rank in 0..req.workers {
            let fits = |(_, gpus): &(String, Vec<i32>)| gpus.len() >= per;
            let chosen = match req.strategy {
                PlacementStrategy::Pack => free.iter().position(fits),
                PlacementStrategy::Spread => {
                    (0..free.len()).map(|k| (cursor + k) % free.len()).find(|&i| fits(&free[i]))
                }
            };
            let Some(i) = chosen else {
                let capable = free.iter().filter(|n| fits(n)).count();
                return Err(Unschedulable {
                    message: format!(
                        "needs {} workers × {} GPUs on healthy, uncordoned, free GPUs{}; only {rank} workers fit ({} matching nodes, {capable} with {} free GPUs left)",
                        req.workers,
                        req.gpus_per_worker,
                        if req.node_selector.is_empty() {
                            ""
                        } else {
                            " of nodes matching spec.scheduling.nodeSelector"
                        },
                        free.len(),
                        req.gpus_per_worker,
                    ),
                });
            };
            cursor = i + 1;
            let (node, gpus) = &mut free[i];
            let taken: Vec<i32> = gpus.drain(..per).collect();
            workers.push(WorkerPlacement { rank, node: node.clone(), gpus: taken });
        }
        Ok(Placement { workers })
    }
}

fn matches_selector(node: &GpuNode, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gpu_node::{GpuNodeSpec, GpuNodeStatus, GpuState};

    fn node(name: &str, gpus: i32, failed: &[i32]) -> GpuNode {
        let mut n = GpuNode::new(name, GpuNodeSpec::default());
        n.status = Some(GpuNodeStatus {
            gpus: (0..gpus)
                .map(|index| GpuState {
                    index,
                    health: if failed.contains(&index) {
                        GpuHealth::Failed
                    } else {
                        GpuHealth::Healthy
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        n
    }

    fn req(
        workers: i32,
        gpus: i32,
        strategy: PlacementStrategy,
        sel: &BTreeMap<String, String>,
    ) -> PlacementRequest<'_> {
        PlacementRequest { workers, gpus_per_worker: gpus, strategy, node_selector: sel }
    }

    #[test]
    fn pack_fills_the_first_node_and_skips_failed_gpus() {
        let sel = BTreeMap::new();
        let nodes = [node("b", 4, &[]), node("a", 4, &[1])];
        let p = StandInPlacement
            .place(&req(3, 1, PlacementStrategy::Pack, &sel), &nodes, &BTreeMap::new())
            .unwrap();
        let seats: Vec<(&str, Vec<i32>)> =
            p.workers.iter().map(|w| (w.node.as_str(), w.gpus.clone())).collect();
        assert_eq!(seats, vec![("a", vec![0]), ("a", vec![2]), ("a", vec![3])]);
    }

    #[test]
    fn spread_rotates_over_nodes() {
        let sel = BTreeMap::new();
        let nodes = [node("a", 4, &[]), node("b", 4, &[])];
        let p = StandInPlacement
            .place(&req(2, 2, PlacementStrategy::Spread, &sel), &nodes, &BTreeMap::new())
            .unwrap();
        assert_eq!(p.nodes(), vec!["a", "b"]);
    }

    #[test]
    fn in_use_cordoned_and_unselected_gpus_are_not_placed() {
        let mut sel = BTreeMap::new();
        sel.insert("zone".to_string(), "x".to_string());
        let mut a = node("a", 2, &[]);
        a.metadata.labels = Some(sel.clone());
        let mut b = node("b", 8, &[]);
        b.metadata.labels = Some([("zone".to_string(), "y".to_string())].into());
        let mut in_use = BTreeMap::new();
        in_use.insert("a".to_string(), BTreeSet::from([0]));
        let err = StandInPlacement
            .place(&req(1, 2, PlacementStrategy::Pack, &sel), &[a.clone(), b], &in_use)
            .unwrap_err();
        assert!(err.message.contains("only 0 workers fit"), "{}", err.message);
        a.spec.cordoned_gpus = vec![1];
        let err = StandInPlacement.place(&req(1, 1, PlacementStrategy::Pack, &sel), &[a], &in_use);
        assert!(err.is_err());
    }
}
