//! Pure routing decisions of the DeepSeek-V3 gate: group-limited top-k selection on biased scores,
//! the auxiliary-loss-free bias update and the MaxVio balance metric.
//!
//! Selection is discrete and has no gradient, so it runs on plain host data; the routing weights are
//! gathered from the score tensor afterwards so the router still receives gradients.

use std::cmp::Ordering;

/// Shape of group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingShape {
    /// Routed experts.
    pub experts: usize,
    /// Expert groups; divides `experts`.
    pub groups: usize,
    /// Groups each token may use.
    pub topk_groups: usize,
    /// Experts per token.
    pub top_k: usize,
}

/// Descending by value, ascending by index on ties: deterministic order of candidates.
fn by_score_then_id(a: (usize, f32), b: (usize, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Chooses `top_k` experts for each token from `scores + bias` (`scores` is `[tokens, experts]`
/// row-major). Only the `topk_groups` groups with the highest sum of their two best biased scores
/// are eligible (the others are masked with −∞). Ties break towards the lower group or expert id.
/// Returns `[tokens, top_k]` expert ids, best first.
pub fn select_experts(scores: &[f32], bias: &[f32], shape: RoutingShape) -> Vec<u32> {
    let RoutingShape { experts, groups, topk_groups, top_k } = shape;
    let group_size = experts / groups;
    let mut chosen = Vec::with_capacity(scores.len() / experts * top_k);
    let mut biased = vec![0f32; experts];
    let mut group_scores: Vec<(usize, f32)> = Vec::with_capacity(groups);
    let mut candidates: Vec<(usize, f32)> = Vec::with_capacity(experts);
    for row in scores.chunks_exact(experts) {
        for (b, (&s, &bias)) in biased.iter_mut().zip(row.iter().zip(bias)) {
            *b = s + bias;
        }
        group_scores.clear();
        for (g, members) in biased.chunks_exact(group_size).enumerate() {
            let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in members {
                if v > first {
                    second = first;
                    first = v;
                } else if v > second {
                    second = v;
                }
            }
            let score = if group_size == 1 { first } else { first + second };
            group_scores.push((g, score));
        }
        group_scores.sort_by(|&a, &b| by_score_then_id(a, b));
        let mut masked = vec![f32::NEG_INFINITY; experts];
        for &(g, _) in &group_scores[..topk_groups] {
            let range = g * group_size..(g + 1) * group_size;
            masked[range.clone()].copy_from_slice(&biased[range]);
        }
        candidates.clear();
        candidates.extend(masked.iter().copied().enumerate());
        candidates.sort_by(|&a, &b| by_score_then_id(a, b));
        chosen.extend(candidates[..top_k].iter().map(|&(e, _)| e as u32));
    }
    chosen
}

/// Selections per expert.
pub fn expert_load(chosen: &[u32], experts: usize) -> Vec<f32> {
    let mut load = vec![0f32; experts];
    for &e in chosen {
        load[e as usize] += 1.0;
    }
    load
}

/// Auxiliary-loss-free balancing: `b_i += γ · sign(mean − c_i)` from the global batch load, so an
/// overloaded expert becomes less attractive and an idle one more.
pub fn update_bias(bias: &mut [f32], global_load: &[f32], gamma: f64) {
    let mean = global_load.iter().sum::<f32>() / global_load.len() as f32;
    for (b, &c) in bias.iter_mut().zip(global_load) {
        let sign = if mean > c {
            1.0
        } else if mean < c {
            -1.0
        } else {
            0.0
        };
        *b += (gamma * sign) as f32;
    }
}

/// MaxVio = (max load − mean load) / mean load; 0 is perfectly balanced.
pub fn max_violation(load: &[f32]) -> f32 {
    let mean = load.iter().sum::<f32>() / load.len() as f32;
    if mean <= 0.0 {
        return 0.0;
    }
    (load.iter().copied().fold(f32::MIN, f32::max) - mean) / mean
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RoutingShape = RoutingShape { experts: 8, groups: 4, topk_groups: 2, top_k: 2 };

    #[test]
    fn masked_groups_are_never_chosen_even_with_the_best_single_expert() {
        // Group 0 holds the single best expert (0.8) but a weak partner; groups 2 and 3 have the
        // best sums of their top two, so expert 0 must be masked out.
        let scores = [0.8, 0.0, 0.3, 0.3, 0.5, 0.5, 0.45, 0.45];
        let chosen = select_experts(&scores, &[0.0; 8], SHAPE);
        assert_eq!(chosen, [4, 5]);
        let ungrouped = RoutingShape { groups: 1, topk_groups: 1, ..SHAPE };
        assert_eq!(select_experts(&scores, &[0.0; 8], ungrouped), [0, 4]);
    }

    #[test]
    fn bias_steers_selection_but_not_by_accident() {
        let scores = [0.5; 8];
        assert_eq!(select_experts(&scores, &[0.0; 8], SHAPE), [0, 1], "ties go to lower ids");
        let mut bias = [0.0; 8];
        bias[6] = 0.1;
        bias[7] = 0.05;
        assert_eq!(select_experts(&scores, &bias, SHAPE), [6, 7]);
    }

    #[test]
    fn selection_is_per_token() {
        let mut scores = vec![0.1f32; 16];
        scores[3] = 0.9;
        scores[8 + 5] = 0.8;
        scores[8 + 4] = 0.7;
        let chosen = select_experts(&scores, &[0.0; 8], SHAPE);
        assert_eq!(chosen, [3, 0, 5, 4]);
        assert_eq!(expert_load(&chosen, 8), [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    proptest::proptest! {
        #[test]
        fn selection_respects_groups_and_is_the_best_within_them(
            scores in proptest::collection::vec(0.0f32..1.0, 16),
            bias in proptest::collection::vec(-0.05f32..0.05, 16),
        ) {
            let shape = RoutingShape { experts: 16, groups: 4, topk_groups: 2, top_k: 3 };
            let chosen = select_experts(&scores, &bias, shape);
            let mut distinct = chosen.clone();
            distinct.sort_unstable();
            distinct.dedup();
            proptest::prop_assert_eq!(distinct.len(), 3);
            let groups: std::collections::BTreeSet<u32> = chosen.iter().map(|e| e / 4).collect();
            proptest::prop_assert!(groups.len() <= 2);
            let biased = |e: u32| scores[e as usize] + bias[e as usize];
            // Every expert of an eligible group that was not chosen scores no higher than the
            // weakest chosen one.
            let weakest = chosen.iter().map(|&e| biased(e)).fold(f32::INFINITY, f32::min);
            for e in (0..16u32).filter(|e| groups.contains(&(e / 4)) && !chosen.contains(e)) {
                proptest::prop_assert!(biased(e) <= weakest);
            }
        }
    }

    #[test]
    fn bias_moves_against_the_load() {
        let mut bias = vec![0.0f32; 4];
        update_bias(&mut bias, &[8.0, 2.0, 5.0, 5.0], 0.001);
        assert_eq!(bias, [-0.001, 0.001, 0.0, 0.0]);
        assert!((max_violation(&[8.0, 2.0, 5.0, 5.0]) - 0.6).abs() < 1e-6);
        assert_eq!(max_violation(&[3.0; 4]), 0.0);
    }
}
