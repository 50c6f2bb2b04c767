//! Stragglers: a rank whose compute time per step stays above its gang's (pure).
//!
//! Data-parallel ranks do the same work each step, so their compute times (the engine reports
//! each step's time without the waits in collectives) should match. Each rank's score is the
//! best rank's median compute time over the last [`WINDOW`] reports divided by its own: 1.0 for
//! the fastest, 0.5 for a rank twice as slow. A rank scoring below the threshold (NVIDIA's
//! straggler detection uses 0.7) over a full window is a straggler: its whole gang runs at its
//! pace. Medians over half a minute of reports keep one slow step, a checkpoint or a noisy
//! neighbour from counting.
//!
//! Whether to move the job off it is a cost/benefit rule ([`move_rule`]): the time the gang
//! would save over its remaining steps against what a restart costs.

use super::fold::{AttemptSeen, RankState};
use std::collections::VecDeque;

/// Reports of compute time kept per rank: about half a minute at one report a second.
pub const WINDOW: usize = 30;

/// A rank is judged only once its window is full.
pub const MIN_SAMPLES: usize = WINDOW;

/// A rank slower than its gang.
#[derive(Clone, Debug, PartialEq)]
pub struct Straggler {
    /// The rank.
    pub rank: u32,
    /// Its node.
    pub node: String,
    /// Its GPUs.
    pub gpu_uuids: Vec<String>,
    /// Best rank's median compute time over its own (0..1).
    pub score: f64,
    /// Its median compute time per step, seconds.
    pub median: f64,
    /// The fastest rank's median compute time per step, seconds.
    pub best: f64,
}

impl Straggler {
    /// The evidence, in one sentence.
    pub fn evidence(&self) -> String {
        format!(
            "rank {} on {} computes each step in {:.3}s (median of its last {WINDOW} reports) \
             against {:.3}s for the fastest rank of its gang: {:.2} of its speed",
            self.rank, self.node, self.median, self.best, self.score
        )
    }
}

/// The median of `v` (the upper one of an even count), if any.
pub fn median(v: &VecDeque<f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = v.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// The slowest running rank of `seen` when it scores below `threshold`.
pub fn find(seen: &AttemptSeen, threshold: f64) -> Option<Straggler> {
    let medians: Vec<(u32, f64)> = seen
        .compute
        .iter()
        .filter(|(rank, v)| {
            v.len() >= MIN_SAMPLES
                && seen.ranks.get(rank).is_some_and(|r| r.state == RankState::Running)
        })
        .filter_map(|(rank, v)| Some((*rank, median(v)?)))
        .collect();
    if medians.len() < 2 {
        return None;
    }
    let best = medians.iter().map(|(_, m)| *m).fold(f64::INFINITY, f64::min);
    let (rank, slowest) = medians.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
    if !(best > 0.0 && slowest > 0.0) {
        return None;
    }
    let score = best / slowest;
    if score >= threshold {
        return None;
    }
    let r = seen.ranks.get(&rank)?;
    Some(Straggler {
        rank,
        node: r.node.clone(),
        gpu_uuids: r.gpu_uuids.clone(),
        score,
        median: slowest,
        best,
    })
}

/// What moving the job off a straggler would save and cost, and whether it is worth it.
#[derive(Clone, Debug, PartialEq)]
pub struct MoveRule {
    /// Seconds saved over the remaining steps.
    pub saving: f64,
    /// Seconds a restart costs: start-up plus the steps since the last checkpoint, redone.
    pub cost: f64,
    /// Move when the saving is more than twice the cost.
    pub worth_it: bool,
}

/// The rule: the gang steps at the straggler's pace, `step_seconds` a step; without it each
/// step's compute would take `score` of what it takes now, so moving saves about
/// `remaining × step_seconds × (1 − score)`. A move costs a restart (`restart_seconds`: this
/// job's own start-up time, measured) plus the steps since the last checkpoint, done again.
/// It is worth it when the saving is more than twice the cost — so a move never costs more than
/// it saves even if the estimate is off by half.
pub fn move_rule(
    straggler: &Straggler,
    remaining_steps: i64,
    step_seconds: f64,
    steps_since_checkpoint: i64,
    restart_seconds: f64,
) -> MoveRule {
    let saving = remaining_steps.max(0) as f64 * step_seconds * (1.0 - straggler.score);
    let cost = restart_seconds + steps_since_checkpoint.max(0) as f64 * step_seconds;
    MoveRule { saving, cost, worth_it: saving > 2.0 * cost }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::fold::RankSeen;

    fn seen(samples: &[(u32, &str, f64, usize)]) -> AttemptSeen {
        let mut seen = AttemptSeen::default();
        for &(rank, node, value, n) in samples {
            seen.ranks.insert(
                rank,
                RankSeen {
                    node: node.into(),
                    gpu_uuids: vec![format!("GPU-{rank}")],
                    state: RankState::Running,
                    process: String::new(),
                    pace: None,
                },
            );
            // A noisy series around `value`: every third sample twice as long.
            let series = (0..n).map(|i| if i % 3 == 0 { value * 2.0 } else { value });
            seen.compute.insert(rank, series.collect());
        }
        seen
    }

    #[test]
    fn a_persistently_slow_rank_is_found_and_noise_is_not() {
        let even = seen(&[(0, "a", 0.10, 30), (1, "a", 0.11, 30), (2, "b", 0.12, 30)]);
        assert_eq!(find(&even, 0.7), None, "within 0.7 of the best");
        let slow = seen(&[(0, "a", 0.10, 30), (1, "b", 0.40, 30), (2, "b", 0.11, 30)]);
        let s = find(&slow, 0.7).expect("straggler");
        assert_eq!(
            (s.rank, s.node.as_str(), s.gpu_uuids.clone()),
            (1, "b", vec!["GPU-1".to_string()])
        );
        assert!((s.score - 0.25).abs() < 1e-9, "{s:?}");
        assert!(
            s.evidence().starts_with("rank 1 on b computes each step in 0.400s"),
            "{}",
            s.evidence()
        );
        let young = seen(&[(0, "a", 0.10, 30), (1, "b", 0.40, 29)]);
        assert_eq!(find(&young, 0.7), None, "a window not yet full is not judged");
        let alone = seen(&[(0, "a", 0.40, 30)]);
        assert_eq!(find(&alone, 0.7), None, "one rank has nobody to be slower than");
    }

    #[test]
    fn a_move_must_save_more_than_twice_what_it_costs() {
        let s = seen(&[(0, "a", 0.1, 30), (1, "b", 0.4, 30)]);
        let s = find(&s, 0.7).expect("straggler");
        // 1,000 steps left at 0.5 s, score 0.25: saves 375 s; a 20 s restart plus 10 steps: 25 s.
        let rule = move_rule(&s, 1000, 0.5, 10, 20.0);
        assert!((rule.saving - 375.0).abs() < 1e-6 && (rule.cost - 25.0).abs() < 1e-6, "{rule:?}");
        assert!(rule.worth_it);
        // Near the end of the run it is not worth it.
        assert!(!move_rule(&s, 60, 0.5, 10, 20.0).worth_it);
    }
}
