//! Simulated GPU misbehaviour, for tests of hang and straggler detection without a GPU.
//!
//! The agent's simulated backend gives each worker `FLOTILLA_SIM_GPU_FAULTS`: the paths (joined
//! by `:`) of one small file per GPU of the worker, written when a fault is injected into that
//! GPU and removed when it recovers. The trainer reads them before each all-reduce and behaves
//! like a rank on a sick GPU:
//!
//! - `hang`: stops stepping but stays alive (computing forever);
//! - `hang_collective`: enters the gradient all-reduce and never sends its data;
//! - `slow <percent>`: each step's compute takes `percent`/100 times as long.
//!
//! Anything else in the file is ignored. Real GPUs never set the variable.

use std::path::PathBuf;
use std::time::Duration;

pub use flotilla_contract::worker_env::SIM_GPU_FAULTS;

/// What a simulated GPU does to the rank using it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Misbehaviour {
    /// Nothing.
    None,
    /// Never finishes computing the step.
    Hang,
    /// Never sends its part of the all-reduce.
    HangInCollective,
    /// Computes `factor` times slower.
    Slow(f64),
}

impl Misbehaviour {
    /// Parses one file's text.
    pub fn parse(text: &str) -> Self {
        let mut words = text.split_whitespace();
        match (words.next(), words.next().and_then(|p| p.parse::<f64>().ok())) {
            (Some("hang"), _) => Misbehaviour::Hang,
            (Some("hang_collective"), _) => Misbehaviour::HangInCollective,
            (Some("slow"), Some(pct)) if pct.is_finite() && pct > 100.0 => {
                Misbehaviour::Slow(pct / 100.0)
            }
            _ => Misbehaviour::None,
        }
    }
}

/// The files of this worker's GPUs.
#[derive(Clone, Debug, Default)]
pub struct SimFaults {
    files: Vec<PathBuf>,
}

impl SimFaults {
    /// From [`SIM_GPU_FAULTS`]; empty (never misbehaves) when unset.
    pub fn from_env() -> Self {
        let files = std::env::var_os(SIM_GPU_FAULTS)
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        Self { files }
    }

    /// True when no file is watched.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The worst misbehaviour any of the worker's GPUs has now.
    pub fn current(&self) -> Misbehaviour {
        let mut worst = Misbehaviour::None;
        for file in &self.files {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            worst = match (worst, Misbehaviour::parse(&text)) {
                (Misbehaviour::Hang | Misbehaviour::HangInCollective, _) => worst,
                (_, m @ (Misbehaviour::Hang | Misbehaviour::HangInCollective)) => m,
                (Misbehaviour::Slow(a), Misbehaviour::Slow(b)) => Misbehaviour::Slow(a.max(b)),
                (Misbehaviour::None, m) => m,
                (w, Misbehaviour::None) => w,
            };
        }
        worst
    }

    /// Called between a step's compute (which took `compute`) and its all-reduce: sleeps as the
    /// GPU's misbehaviour says. A hang lasts until the fault is cleared (or the process dies).
    pub fn before_all_reduce(&self, compute: Duration) {
        if self.files.is_empty() {
            return;
        }
        loop {
            match self.current() {
                Misbehaviour::None => return,
                Misbehaviour::Slow(factor) => {
                    return std::thread::sleep(compute.mul_f64(factor - 1.0));
                }
                Misbehaviour::Hang | Misbehaviour::HangInCollective => {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_say_how_the_gpu_misbehaves() {
        assert_eq!(Misbehaviour::parse("hang\n"), Misbehaviour::Hang);
        assert_eq!(Misbehaviour::parse("hang_collective"), Misbehaviour::HangInCollective);
        assert_eq!(Misbehaviour::parse("slow 300"), Misbehaviour::Slow(3.0));
        assert_eq!(Misbehaviour::parse("slow 50"), Misbehaviour::None);
        assert_eq!(Misbehaviour::parse("slow x"), Misbehaviour::None);
        assert_eq!(Misbehaviour::parse(""), Misbehaviour::None);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let faults = SimFaults { files: vec![a.clone(), b.clone()] };
        assert_eq!(faults.current(), Misbehaviour::None);
        std::fs::write(&a, "slow 200").unwrap();
        std::fs::write(&b, "slow 400").unwrap();
        assert_eq!(faults.current(), Misbehaviour::Slow(4.0));
        std::fs::write(&a, "hang").unwrap();
        assert_eq!(faults.current(), Misbehaviour::Hang);
    }
}
