//! The fleet as indexed arrays: a static [`Topology`] and a cheap-to-clone [`Occupancy`].
//!
//! GPUs get flat ids, numbered node by node and, within a node, NVLink domain by domain, so a
//! domain's GPUs are a contiguous range. Occupancy keeps, for every rack, zone and the fleet, a
//! histogram of NVLink domains by free GPUs; "how many workers of g GPUs fit here" is then a sum
//! over at most one histogram, and every change of one GPU updates a handful of counters.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use crate::decision::ScheduleError;
use crate::model::{Fleet, GpuState, Node};

/// Owner value of a free, schedulable GPU.
pub(crate) const FREE: u32 = u32::MAX;
/// Owner value of a GPU that is unhealthy or cordoned and held by nobody.
pub(crate) const BLOCKED: u32 = u32::MAX - 1;
/// Owner value of a free GPU held back for the job first in line.
pub(crate) const RESERVED: u32 = u32::MAX - 2;

/// A node's static facts.
#[derive(Debug, Clone)]
pub(crate) struct NodeTopo {
    pub name: String,
    pub rack: u32,
    pub zone: u32,
    pub labels: BTreeMap<String, String>,
    pub cordoned: bool,
    pub domains: Range<u32>,
    pub gpus: Range<u32>,
}

/// A GPU's static facts.
#[derive(Debug, Clone)]
pub(crate) struct GpuTopo {
    pub node: u32,
    pub domain: u32,
    pub index: u32,
    pub schedulable: bool,
    /// Reported health.
    pub state: GpuState,
    /// Cordoned on its own (the node's cordon is kept on the node).
    pub cordoned: bool,
}

/// The fleet's shape, fixed for the scheduler's life.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub nodes: Vec<NodeTopo>,
    /// GPU range of each NVLink domain.
    pub domains: Vec<Range<u32>>,
    pub domain_node: Vec<u32>,
    pub gpus: Vec<GpuTopo>,
    pub rack_nodes: Vec<Vec<u32>>,
    pub rack_zone: Vec<u32>,
    pub zone_nodes: Vec<Vec<u32>>,
    pub node_by_name: HashMap<String, u32>,
    /// The most GPUs any NVLink domain has.
    pub max_domain: u32,
    /// The most GPUs any node has.
    pub max_node: u32,
}

impl Topology {
    /// Indexes a fleet, refusing duplicate nodes or GPUs.
    pub fn new(fleet: &Fleet) -> Result<Self, ScheduleError> {
        let mut topo = Topology {
            nodes: Vec::new(),
            domains: Vec::new(),
            domain_node: Vec::new(),
            gpus: Vec::new(),
            rack_nodes: Vec::new(),
            rack_zone: Vec::new(),
            zone_nodes: Vec::new(),
            node_by_name: HashMap::new(),
            max_domain: 0,
            max_node: 0,
        };
        let mut zone_ids: HashMap<&str, u32> = HashMap::new();
        let mut rack_ids: HashMap<(&str, &str), u32> = HashMap::new();
        for node in &fleet.nodes {
            let node_id = topo.nodes.len() as u32;
            if topo.node_by_name.insert(node.name.clone(), node_id).is_some() {
                return Err(ScheduleError::DuplicateNode(node.name.clone()));
            }
            let zone_count = zone_ids.len() as u32;
            let zone = *zone_ids.entry(node.zone.as_str()).or_insert(zone_count);
            if zone as usize == topo.zone_nodes.len() {
                topo.zone_nodes.push(Vec::new());
            }
            let rack_count = rack_ids.len() as u32;
            let rack =
                *rack_ids.entry((node.zone.as_str(), node.rack.as_str())).or_insert(rack_count);
            if rack as usize == topo.rack_nodes.len() {
                topo.rack_nodes.push(Vec::new());
                topo.rack_zone.push(zone);
            }
            topo.zone_nodes[zone as usize].push(node_id);
            topo.rack_nodes[rack as usize].push(node_id);

            let (domains, gpus) = topo.add_gpus(node, node_id)?;
            topo.max_node = topo.max_node.max(node.gpus.len() as u32);
            topo.nodes.push(NodeTopo {
                name: node.name.clone(),
                rack,
                zone,
                labels: node.labels.clone(),
                cordoned: node.cordoned,
                domains,
                gpus,
            });
        }
        topo.max_domain = topo.domains.iter().map(|d| d.len() as u32).max().unwrap_or(0);
        Ok(topo)
    }

    /// Gives a node's GPUs flat ids, domain by domain; returns its domain and GPU ranges.
    fn add_gpus(
        &mut self,
        node: &Node,
        node_id: u32,
    ) -> Result<(Range<u32>, Range<u32>), ScheduleError> {
        let mut gpus: Vec<_> = node.gpus.iter().collect();
        gpus.sort_by_key(|gpu| (gpu.nvlink_domain, gpu.index));
        let mut indices: Vec<u32> = gpus.iter().map(|gpu| gpu.index).collect();
        indices.sort_unstable();
        if let Some(pair) = indices.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(ScheduleError::DuplicateGpu { node: node.name.clone(), index: pair[0] });
        }
        let first_domain = self.domains.len() as u32;
        let first_gpu = self.gpus.len() as u32;
        let mut previous_domain = None;
        for gpu in gpus {
            if previous_domain != Some(gpu.nvlink_domain) {
                previous_domain = Some(gpu.nvlink_domain);
                let start = self.gpus.len() as u32;
                self.domains.push(start..start);
                self.domain_node.push(node_id);
            }
            let domain = self.domains.len() as u32 - 1;
            self.domains[domain as usize].end += 1;
            self.gpus.push(GpuTopo {
                node: node_id,
                domain,
                index: gpu.index,
                schedulable: gpu.is_schedulable() && !node.cordoned,
                state: gpu.state,
                cordoned: gpu.cordoned,
            });
        }
        Ok((first_domain..self.domains.len() as u32, first_gpu..self.gpus.len() as u32))
    }

    /// The flat id of GPU `index` on `node`, if it exists.
    pub fn gpu_id(&self, node: u32, index: u32) -> Option<u32> {
        self.nodes[node as usize].gpus.clone().find(|&gpu| self.gpus[gpu as usize].index == index)
    }

    /// Recomputes whether each GPU of a node takes new work; returns the GPUs that changed.
    pub fn refresh_node(&mut self, node: u32) -> Vec<u32> {
        let cordoned = self.nodes[node as usize].cordoned;
        let mut changed = Vec::new();
        for gpu in self.nodes[node as usize].gpus.clone() {
            let facts = &mut self.gpus[gpu as usize];
            let schedulable = facts.state == GpuState::Healthy && !facts.cordoned && !cordoned;
            if schedulable != facts.schedulable {
                facts.schedulable = schedulable;
                changed.push(gpu);
            }
        }
        changed
    }

    /// Whether a node carries every label of a selector.
    pub fn node_matches(&self, node: u32, selector: &BTreeMap<String, String>) -> bool {
        let labels = &self.nodes[node as usize].labels;
        selector.iter().all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// Who holds each GPU, with free counts aggregated per domain, node, rack, zone and fleet.
#[derive(Debug, Clone)]
pub(crate) struct Occupancy {
    /// Holder of each GPU: a running-job slot, or [`FREE`], [`BLOCKED`], [`RESERVED`].
    pub owner: Vec<u32>,
    /// GPUs that go to [`RESERVED`] rather than [`FREE`] when released.
    pub reserved: Vec<bool>,
    pub domain_free: Vec<u32>,
    pub node_free: Vec<u32>,
    /// Histogram stride: `max_domain + 1` bins, domains counted by free GPUs.
    stride: usize,
    pub rack_hist: Vec<u32>,
    pub zone_hist: Vec<u32>,
    pub fleet_hist: Vec<u32>,
    pub rack_free: Vec<u64>,
    pub zone_free: Vec<u64>,
    pub fleet_free: u64,
    /// Nodes bucketed by free GPUs, and each node's position in its bucket.
    pub buckets: Vec<Vec<u32>>,
    bucket_pos: Vec<u32>,
}

impl Occupancy {
    /// Every schedulable GPU free, everything else blocked.
    pub fn new(topo: &Topology) -> Self {
        let stride = topo.max_domain as usize + 1;
        let mut occ = Occupancy {
            owner: vec![BLOCKED; topo.gpus.len()],
            reserved: vec![false; topo.gpus.len()],
            domain_free: vec![0; topo.domains.len()],
            node_free: vec![0; topo.nodes.len()],
            stride,
            rack_hist: vec![0; topo.rack_nodes.len() * stride],
            zone_hist: vec![0; topo.zone_nodes.len() * stride],
            fleet_hist: vec![0; stride],
            rack_free: vec![0; topo.rack_nodes.len()],
            zone_free: vec![0; topo.zone_nodes.len()],
            fleet_free: 0,
            buckets: vec![Vec::new(); topo.max_node as usize + 1],
            bucket_pos: vec![0; topo.nodes.len()],
        };
        for &node in &topo.domain_node {
            let node = &topo.nodes[node as usize];
            occ.rack_hist[node.rack as usize * stride] += 1;
            occ.zone_hist[node.zone as usize * stride] += 1;
            occ.fleet_hist[0] += 1;
        }
        for node in 0..topo.nodes.len() as u32 {
            occ.bucket_pos[node as usize] = occ.buckets[0].len() as u32;
            occ.buckets[0].push(node);
        }
        for (gpu, facts) in topo.gpus.iter().enumerate() {
            if facts.schedulable {
                occ.set_owner(topo, gpu as u32, FREE);
            }
        }
        occ
    }

    /// Histogram bins of one rack.
    pub fn rack_bins(&self, rack: u32) -> &[u32] {
        &self.rack_hist[rack as usize * self.stride..][..self.stride]
    }

    /// Histogram bins of one zone.
    pub fn zone_bins(&self, zone: u32) -> &[u32] {
        &self.zone_hist[zone as usize * self.stride..][..self.stride]
    }

    /// Workers of `per_worker` GPUs that fit on one node.
    pub fn node_slots(&self, topo: &Topology, node: u32, per_worker: u32) -> u32 {
        topo.nodes[node as usize]
            .domains
            .clone()
            .map(|domain| self.domain_free[domain as usize] / per_worker)
            .sum()
    }

    /// Gives a GPU to `owner` (a job slot or a sentinel), keeping every count in step.
    pub fn set_owner(&mut self, topo: &Topology, gpu: u32, owner: u32) {
        let old = std::mem::replace(&mut self.owner[gpu as usize], owner);
        let (was_free, is_free) = (old == FREE, owner == FREE);
        if was_free != is_free {
            self.shift(topo, topo.gpus[gpu as usize].domain, is_free);
        }
    }

    /// Brings a GPU whose schedulability changed in line: a free one is blocked or unblocked;
    /// one held by a job stays with it and is blocked when released.
    pub fn refresh(&mut self, topo: &Topology, gpu: u32) {
        let owner = self.owner[gpu as usize];
        if owner == FREE || owner == BLOCKED || owner == RESERVED {
            self.release(topo, gpu);
        }
    }

    /// Frees a GPU: blocked if it is not schedulable, reserved if it is held for the first job.
    pub fn release(&mut self, topo: &Topology, gpu: u32) {
        let owner = if !topo.gpus[gpu as usize].schedulable {
            BLOCKED
        } else if self.reserved[gpu as usize] {
            RESERVED
        } else {
            FREE
        };
        self.set_owner(topo, gpu, owner);
    }

    /// Moves one domain's free count up or down by one and updates every aggregate.
    fn shift(&mut self, topo: &Topology, domain: u32, up: bool) {
        let node = topo.domain_node[domain as usize];
        let facts = &topo.nodes[node as usize];
        let before = self.domain_free[domain as usize] as usize;
        let after = if up { before + 1 } else { before - 1 };
        self.domain_free[domain as usize] = after as u32;
        for (hist, group) in [
            (&mut self.rack_hist, facts.rack as usize),
            (&mut self.zone_hist, facts.zone as usize),
            (&mut self.fleet_hist, 0),
        ] {
            hist[group * self.stride + before] -= 1;
            hist[group * self.stride + after] += 1;
        }
        let sign = |count: &mut u64| if up { *count += 1 } else { *count -= 1 };
        sign(&mut self.rack_free[facts.rack as usize]);
        sign(&mut self.zone_free[facts.zone as usize]);
        sign(&mut self.fleet_free);
        let old_free = self.node_free[node as usize];
        let new_free = if up { old_free + 1 } else { old_free - 1 };
        self.node_free[node as usize] = new_free;
        self.move_bucket(node, old_free, new_free);
    }

    fn move_bucket(&mut self, node: u32, from: u32, to: u32) {
        let position = self.bucket_pos[node as usize] as usize;
        let bucket = &mut self.buckets[from as usize];
        bucket.swap_remove(position);
        if let Some(&moved) = bucket.get(position) {
            self.bucket_pos[moved as usize] = position as u32;
        }
        let target = &mut self.buckets[to as usize];
        self.bucket_pos[node as usize] = target.len() as u32;
        target.push(node);
    }
}

/// Workers of `per_worker` GPUs that fit in the domains a histogram counts.
pub(crate) fn slots_in(bins: &[u32], per_worker: u32) -> u64 {
    let per_worker = per_worker.max(1) as usize;
    bins.iter()
        .enumerate()
        .skip(per_worker)
        .map(|(free, &count)| u64::from(count) * (free / per_worker) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_every_change() {
        let fleet = Fleet::new(vec![
            Node::new("a", 4).in_rack("z", "r1").nvlink_domains(2),
            Node::new("b", 4).in_rack("z", "r2").gpu_state(3, GpuState::Failed),
        ]);
        let topo = Topology::new(&fleet).unwrap();
        let mut occ = Occupancy::new(&topo);
        assert_eq!(occ.fleet_free, 7);
        assert_eq!(slots_in(&occ.fleet_hist, 2), 3);
        assert_eq!(slots_in(&occ.fleet_hist, 3), 1);
        occ.set_owner(&topo, 0, 5);
        assert_eq!((occ.node_free[0], occ.rack_free[0], occ.fleet_free), (3, 3, 6));
        assert_eq!(slots_in(occ.rack_bins(0), 2), 1);
        assert_eq!(occ.buckets[3], vec![1, 0], "b has three schedulable GPUs");
        occ.release(&topo, 0);
        assert_eq!(occ.fleet_free, 7);
        assert_eq!(occ.buckets[4], vec![0]);
        let failed = topo.gpu_id(1, 3).unwrap();
        occ.release(&topo, failed);
        assert_eq!(occ.owner[failed as usize], BLOCKED);
        assert_eq!(occ.fleet_free, 7);
    }

    /// Every aggregate recomputed from the owners alone.
    fn recount(topo: &Topology, occ: &Occupancy) -> Occupancy {
        let mut fresh = Occupancy::new(topo);
        for (gpu, &owner) in occ.owner.iter().enumerate() {
            fresh.set_owner(topo, gpu as u32, owner);
        }
        fresh
    }

    proptest::proptest! {
        #[test]
        fn incremental_counts_match_a_recount(
            steps in proptest::collection::vec((0u32..24, 0u32..4), 1..200)
        ) {
            let fleet = Fleet::new(vec![
                Node::new("a", 8).in_rack("z1", "r1").nvlink_domains(2),
                Node::new("b", 8).in_rack("z1", "r2").gpu_state(5, GpuState::Failed),
                Node::new("c", 8).in_rack("z2", "r1"),
            ]);
            let topo = Topology::new(&fleet).unwrap();
            let mut occ = Occupancy::new(&topo);
            for (gpu, action) in steps {
                match action {
                    0 => occ.release(&topo, gpu),
                    1 => occ.reserved[gpu as usize] = !occ.reserved[gpu as usize],
                    job => occ.set_owner(&topo, gpu, job),
                }
            }
            let fresh = recount(&topo, &occ);
            proptest::prop_assert_eq!(&occ.domain_free, &fresh.domain_free);
            proptest::prop_assert_eq!(&occ.node_free, &fresh.node_free);
            proptest::prop_assert_eq!(&occ.rack_hist, &fresh.rack_hist);
            proptest::prop_assert_eq!(&occ.zone_hist, &fresh.zone_hist);
            proptest::prop_assert_eq!(&occ.fleet_hist, &fresh.fleet_hist);
            proptest::prop_assert_eq!((&occ.rack_free, &occ.zone_free), (&fresh.rack_free, &fresh.zone_free));
            proptest::prop_assert_eq!(occ.fleet_free, fresh.fleet_free);
            for (free, bucket) in occ.buckets.iter().enumerate() {
                for &node in bucket {
                    proptest::prop_assert_eq!(occ.node_free[node as usize], free as u32);
                    proptest::prop_assert_eq!(occ.buckets[free][occ.bucket_pos[node as usize] as usize], node);
                }
            }
            proptest::prop_assert_eq!(occ.buckets.iter().map(Vec::len).sum::<usize>(), 3);
        }
    }

    #[test]
    fn refuses_duplicate_gpus() {
        let mut node = Node::new("a", 2);
        node.gpus[1].index = 0;
        let err = Topology::new(&Fleet::new(vec![node])).unwrap_err();
        assert_eq!(err, ScheduleError::DuplicateGpu { node: "a".into(), index: 0 });
    }
}
