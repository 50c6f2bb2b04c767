//! Finding a gang's GPUs in an [`Occupancy`]: feasibility, best-fit placement, shortfalls.
//!
//! Tiers, tightest first: one node, one rack, one zone, the fleet (a [`Locality`] requirement cuts
//! the list short). Within a tier the scope chosen is the one with the fewest free worker slots
//! that still suffice (best fit), so larger free blocks stay whole for larger jobs. Within a scope
//! the gang takes the nodes with the most slots first (fewest nodes), and the last, partial node
//! is the best fit for what remains; within a node each worker takes the tightest NVLink domain.

use std::collections::BTreeMap;

use crate::decision::{Scope, Shortfall};
use crate::model::{JobRequest, Locality, Spread};
use crate::occupancy::{FREE, Occupancy, Topology, slots_in};

/// How many nodes of one bucket are compared when choosing a single node.
const BUCKET_SCAN: usize = 64;

/// GPUs per worker, by worker: flat GPU ids.
pub(crate) type Gang = Vec<Vec<u32>>;

/// The shape a job asks for, borrowed from its request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need<'a> {
    pub workers: u32,
    pub per_worker: u32,
    pub spread: bool,
    pub locality: Locality,
    pub selector: &'a BTreeMap<String, String>,
}

impl<'a> Need<'a> {
    /// The shape of a request.
    pub fn of(job: &'a JobRequest) -> Self {
        Need {
            workers: job.workers,
            per_worker: job.gpus_per_worker.max(1),
            spread: job.spread == Spread::Spread,
            locality: job.locality,
            selector: &job.node_selector,
        }
    }

    /// All GPUs of the gang.
    pub fn total(&self) -> u64 {
        u64::from(self.workers) * u64::from(self.per_worker)
    }
}

/// Per-node worker capacities for needs the histograms cannot answer (selector or spread).
struct Filtered {
    node_cap: Vec<u32>,
    rack: Vec<u64>,
    zone: Vec<u64>,
    total: u64,
    largest_domain: u32,
    any_match: bool,
}

/// One search for one need over one occupancy.
pub(crate) struct Search<'a> {
    topo: &'a Topology,
    occ: &'a Occupancy,
    need: Need<'a>,
    filtered: Option<Filtered>,
}

impl<'a> Search<'a> {
    /// Prepares a search; needs with a selector or spread pay one pass over the nodes here.
    pub fn new(topo: &'a Topology, occ: &'a Occupancy, need: Need<'a>) -> Self {
        let mut search = Search { topo, occ, need, filtered: None };
        if need.spread || !need.selector.is_empty() {
            search.filtered = Some(search.filter());
        }
        search
    }

    fn filter(&self) -> Filtered {
        let topo = self.topo;
        let mut filtered = Filtered {
            node_cap: vec![0; topo.nodes.len()],
            rack: vec![0; topo.rack_nodes.len()],
            zone: vec![0; topo.zone_nodes.len()],
            total: 0,
            largest_domain: 0,
            any_match: false,
        };
        for (node, facts) in topo.nodes.iter().enumerate() {
            if !topo.node_matches(node as u32, self.need.selector) {
                continue;
            }
            let schedulable = facts.gpus.clone().any(|gpu| topo.gpus[gpu as usize].schedulable);
            if !schedulable {
                continue;
            }
            filtered.any_match = true;
            let widest = facts.domains.clone().map(|d| topo.domains[d as usize].len() as u32).max();
            filtered.largest_domain = filtered.largest_domain.max(widest.unwrap_or(0));
            let mut cap = self.occ.node_slots(topo, node as u32, self.need.per_worker);
            if self.need.spread {
                cap = cap.min(1);
            }
            filtered.node_cap[node] = cap;
            filtered.rack[facts.rack as usize] += u64::from(cap);
            filtered.zone[facts.zone as usize] += u64::from(cap);
            filtered.total += u64::from(cap);
        }
        filtered
    }

    fn node_cap(&self, node: u32) -> u32 {
        match &self.filtered {
            Some(filtered) => filtered.node_cap[node as usize],
            None => self.occ.node_slots(self.topo, node, self.need.per_worker),
        }
    }

    fn rack_slots(&self, rack: u32) -> u64 {
        match &self.filtered {
            Some(filtered) => filtered.rack[rack as usize],
            None => slots_in(self.occ.rack_bins(rack), self.need.per_worker),
        }
    }

    fn zone_slots(&self, zone: u32) -> u64 {
        match &self.filtered {
            Some(filtered) => filtered.zone[zone as usize],
            None => slots_in(self.occ.zone_bins(zone), self.need.per_worker),
        }
    }

    fn total_slots(&self) -> u64 {
        match &self.filtered {
            Some(filtered) => filtered.total,
            None => slots_in(&self.occ.fleet_hist, self.need.per_worker),
        }
    }

    /// The scope a locality requirement confines the gang to.
    fn scope(&self) -> Scope {
        match self.need.locality {
            Locality::Preferred => Scope::Fleet,
            Locality::Zone => Scope::Zone,
            Locality::Rack => Scope::Rack,
        }
    }

    /// The most worker slots one group of the scope offers.
    fn best_block(&self) -> u64 {
        match self.scope() {
            Scope::Fleet => self.total_slots(),
            Scope::Zone => (0..self.topo.zone_nodes.len() as u32)
                .map(|zone| self.zone_slots(zone))
                .max()
                .unwrap_or(0),
            Scope::Rack => (0..self.topo.rack_nodes.len() as u32)
                .map(|rack| self.rack_slots(rack))
                .max()
                .unwrap_or(0),
        }
    }

    /// Whether the gang fits at all.
    pub fn fits(&self) -> bool {
        let workers = u64::from(self.need.workers);
        if self.need.total() > self.occ.fleet_free || self.total_slots() < workers {
            return false;
        }
        self.scope() == Scope::Fleet || self.best_block() >= workers
    }

    /// What the gang needs against what is on offer, for a reason to wait.
    pub fn shortfall(&self) -> Shortfall {
        let (largest_domain, selector_matches) = match &self.filtered {
            Some(filtered) => (filtered.largest_domain, filtered.any_match),
            None => (self.topo.max_domain, self.topo.max_domain > 0),
        };
        Shortfall {
            workers: self.need.workers,
            gpus_per_worker: self.need.per_worker,
            scope: self.scope(),
            largest_block: self.best_block() * u64::from(self.need.per_worker),
            free: self.occ.fleet_free,
            largest_domain,
            selector_matches,
            reserved_for: None,
        }
    }

    /// The gang's GPUs, tightest tier first; `None` if it does not fit.
    pub fn find(&self) -> Option<Gang> {
        if !self.fits() {
            return None;
        }
        let workers = self.need.workers;
        if !self.need.spread
            && let Some(node) = self.single_node()
        {
            return Some(self.fill(&[(node, workers)]));
        }
        let topo = self.topo;
        let rack = best_group(topo.rack_nodes.len(), workers, |r| {
            (self.rack_slots(r), self.occ.rack_free[r as usize])
        });
        if let Some(rack) = rack {
            return self.pick_nodes(&topo.rack_nodes[rack as usize]).map(|nodes| self.fill(&nodes));
        }
        if self.need.locality == Locality::Rack {
            return None;
        }
        let zone = best_group(topo.zone_nodes.len(), workers, |z| {
            (self.zone_slots(z), self.occ.zone_free[z as usize])
        });
        if let Some(zone) = zone {
            return self.pick_nodes(&topo.zone_nodes[zone as usize]).map(|nodes| self.fill(&nodes));
        }
        if self.need.locality == Locality::Zone {
            return None;
        }
        let all: Vec<u32> = (0..topo.nodes.len() as u32).collect();
        self.pick_nodes(&all).map(|nodes| self.fill(&nodes))
    }

    /// The node with the fewest free GPUs that takes the whole gang, preferring fuller racks.
    fn single_node(&self) -> Option<u32> {
        let (topo, occ, workers) = (self.topo, self.occ, self.need.workers);
        let least = u64::from(workers) * u64::from(self.need.per_worker);
        if least > u64::from(topo.max_node) {
            return None;
        }
        let rack_free = |node: u32| occ.rack_free[topo.nodes[node as usize].rack as usize];
        if self.filtered.is_some() {
            return (0..topo.nodes.len() as u32)
                .filter(|&node| self.node_cap(node) >= workers)
                .min_by_key(|&node| (occ.node_free[node as usize], rack_free(node), node));
        }
        for bucket in &occ.buckets[least as usize..] {
            let best = bucket
                .iter()
                .take(BUCKET_SCAN)
                .copied()
                .filter(|&node| self.node_cap(node) >= workers)
                .min_by_key(|&node| (rack_free(node), node));
            if best.is_some() {
                return best;
            }
        }
        None
    }

    /// Nodes and workers per node: most slots first, the last node the best fit for the rest.
    fn pick_nodes(&self, nodes: &[u32]) -> Option<Vec<(u32, u32)>> {
        let mut candidates: Vec<(u32, u32, u32)> = nodes
            .iter()
            .map(|&node| (self.node_cap(node), self.occ.node_free[node as usize], node))
            .filter(|&(cap, _, _)| cap > 0)
            .collect();
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut chosen = Vec::new();
        let mut remaining = self.need.workers;
        let mut next = 0;
        while remaining > 0 {
            let &(cap, _, node) = candidates.get(next)?;
            if cap < remaining {
                chosen.push((node, cap));
                remaining -= cap;
                next += 1;
                continue;
            }
            // The smallest capacity that still covers the rest, first (least free) of its run.
            let mut last = next;
            while candidates.get(last + 1).is_some_and(|c| c.0 >= remaining) {
                last += 1;
            }
            while last > next && candidates[last - 1].0 == candidates[last].0 {
                last -= 1;
            }
            chosen.push((candidates[last].2, remaining));
            remaining = 0;
        }
        Some(chosen)
    }

    /// Concrete GPUs for `workers` workers on each chosen node.
    fn fill(&self, nodes: &[(u32, u32)]) -> Gang {
        let mut gang = Vec::new();
        for &(node, workers) in nodes {
            self.fill_node(node, workers, &mut gang);
        }
        gang
    }

    /// Each worker takes the NVLink domain with the fewest free GPUs that still hold it.
    fn fill_node(&self, node: u32, workers: u32, gang: &mut Gang) {
        let (topo, occ, per_worker) = (self.topo, self.occ, self.need.per_worker);
        let domains = topo.nodes[node as usize].domains.clone();
        let mut left: Vec<(u32, u32)> =
            domains.map(|domain| (domain, occ.domain_free[domain as usize])).collect();
        let mut used = vec![0u32; left.len()];
        for _ in 0..workers {
            let Some(slot) = (0..left.len())
                .filter(|&i| left[i].1 >= per_worker)
                .min_by_key(|&i| (left[i].1, left[i].0))
            else {
                return;
            };
            let range = topo.domains[left[slot].0 as usize].clone();
            let worker: Vec<u32> = range
                .filter(|&gpu| occ.owner[gpu as usize] == FREE)
                .skip(used[slot] as usize)
                .take(per_worker as usize)
                .collect();
            used[slot] += per_worker;
            left[slot].1 -= per_worker;
            gang.push(worker);
        }
    }
}

/// The group with the fewest slots that still hold `workers`, ties to the least free GPUs.
fn best_group(groups: usize, workers: u32, slots: impl Fn(u32) -> (u64, u64)) -> Option<u32> {
    (0..groups as u32)
        .map(|group| (slots(group), group))
        .filter(|&((count, _), _)| count >= u64::from(workers))
        .min_by_key(|&((count, free), group)| (count, free, group))
        .map(|(_, group)| group)
}
