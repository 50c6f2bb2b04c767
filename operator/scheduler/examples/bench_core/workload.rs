//! The benchmark's fleet and job stream, from a fixed seed.

use flotilla_scheduler::{Fleet, JobRequest, Node};

/// Nodes in the fleet.
pub const NODES: u32 = 1_250;
/// GPUs per node (one NVLink domain, as on NVSwitch machines).
pub const GPUS_PER_NODE: u32 = 8;
/// Nodes per rack.
pub const RACK: u32 = 16;
/// Racks per zone.
pub const ZONE: u32 = 8;
/// Jobs in the stream.
pub const JOBS: usize = 5_000;
/// Namespaces and their fair-share weights.
pub const NAMESPACES: [(&str, f64); 4] =
    [("research", 1.0), ("vision", 1.0), ("llm", 2.0), ("prod", 4.0)];

/// A small deterministic generator (SplitMix64); the benchmark needs no crate for this.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// 1,250 nodes × 8 GPUs, racks of 16 nodes, zones of 8 racks.
pub fn fleet() -> Fleet {
    let nodes = (0..NODES)
        .map(|i| {
            let rack = i / RACK;
            Node::new(format!("node-{i:04}"), GPUS_PER_NODE)
                .in_rack(format!("zone-{}", rack / ZONE), format!("rack-{rack:03}"))
        })
        .collect();
    Fleet::new(nodes)
}

/// A queued job with what only the simulation knows: how long it really runs.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The request as the scheduler sees it.
    pub request: JobRequest,
    /// Its true run time.
    pub duration: u64,
}

/// The job stream: about 60% 1 GPU, 20% 8 GPUs, 15% 16–64, 5% 128–512, arriving faster than
/// the fleet can serve them (about 1.5× its capacity), so the queue saturates.
pub fn jobs(rng: &mut Rng) -> Vec<Arrival> {
    let mut now = 0u64;
    (0..JOBS)
        .map(|i| {
            let class = rng.unit();
            let (workers, per_worker) = if class < 0.60 {
                (1, 1)
            } else if class < 0.80 {
                (1, 8)
            } else if class < 0.95 {
                (rng.between(2, 8) as u32, 8)
            } else {
                (rng.between(16, 64) as u32, 8)
            };
            let duration = rng.between(1_800, 4 * 3_600);
            let priority = match rng.unit() {
                p if p < 0.70 => 0,
                p if p < 0.95 => 1,
                _ => 2,
            };
            let (namespace, _) = NAMESPACES[rng.between(0, 3) as usize];
            now += (rng.unit() * 2.0 * 11.0) as u64;
            let mut request = JobRequest::new(format!("job-{i:05}"), workers, per_worker)
                .priority(priority)
                .namespace(namespace)
                .arrival(now);
            // Four in five users give an estimate, padded by up to half; the rest give none.
            if rng.unit() < 0.8 {
                request = request
                    .expected_duration(duration + (duration as f64 * rng.unit() * 0.5) as u64);
            }
            Arrival { request, duration }
        })
        .collect()
}
