//! AdamW over flat host buffers, the learning-rate schedule and global-norm gradient clipping.
//!
//! The state is plain `Vec<f32>` per parameter so it can be checkpointed and restored bit-exactly
//! (candle's optimiser keeps its moments private).

use crate::config::{LrSchedule, TrainingConfig};

/// AdamW moments of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// First moment (`exp_avg`).
    pub m: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub v: Vec<f32>,
}

/// AdamW with decoupled weight decay.
#[derive(Clone, Debug)]
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Updates applied so far (for bias correction).
    pub step: u64,
    /// Moments per parameter, in the model's parameter order.
    pub moments: Vec<Moments>,
}

impl AdamW {
    /// Fresh state for parameters of the given sizes.
    pub fn new(config: &TrainingConfig, sizes: &[usize]) -> Self {
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
            step: 0,
            moments: sizes.iter().map(|&n| Moments { m: vec![0.0; n], v: vec![0.0; n] }).collect(),
        }
    }

    /// Updates `param` (index `i`) in place from `grad`. `decay` is false for norms and biases.
    /// Call [`AdamW::begin_step`] once before the updates of a step.
    pub fn update(&mut self, i: usize, param: &mut [f32], grad: &[f32], lr: f64, decay: bool) {
        let t = self.step as i32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        let step_size = (lr / c1) as f32;
        let c2_sqrt = c2.sqrt() as f32;
        let eps = self.eps as f32;
        let shrink = if decay { (1.0 - lr * self.weight_decay) as f32 } else { 1.0 };
        let Moments { m, v } = &mut self.moments[i];
        for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p = *p * shrink - step_size * *m / (v.sqrt() / c2_sqrt + eps);
        }
    }

    /// Advances the step counter used for bias correction.
    pub fn begin_step(&mut self) {
        self.step += 1;
    }
}

/// Learning rate at `step` (0-based): linear warm-up, then the configured decay.
pub fn learning_rate(config: &TrainingConfig, step: u64) -> f64 {
    let peak = config.learning_rate;
    if step < config.warmup_steps {
        return peak * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let span = config.steps.saturating_sub(config.warmup_steps).max(1) as f64;
    let progress = ((step - config.warmup_steps) as f64 / span).min(1.0);
    let floor = config.min_learning_rate;
    match config.schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Linear => peak + (floor - peak) * progress,
        LrSchedule::Cosine => {
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (0 = no clipping).
/// Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grads.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / norm) as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr_against_its_gradient() {
        let config = TrainingConfig { weight_decay: 0.0, ..TrainingConfig::default() };
        let mut opt = AdamW::new(&config, &[3]);
        let mut p = vec![1.0f32, 1.0, 1.0];
        opt.begin_step();
        opt.update(0, &mut p, &[0.5, -2.0, 0.0], 0.1, true);
        assert!((p[0] - 0.9).abs() < 1e-5 && (p[1] - 1.1).abs() < 1e-5 && p[2] == 1.0, "{p:?}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let config = TrainingConfig { steps: 110, warmup_steps: 10, ..TrainingConfig::default() };
        assert!((learning_rate(&config, 0) - config.learning_rate / 10.0).abs() < 1e-12);
        assert!((learning_rate(&config, 10) - config.learning_rate).abs() < 1e-12);
        assert!((learning_rate(&config, 110) - config.min_learning_rate).abs() < 1e-12);
        assert!(learning_rate(&config, 60) < config.learning_rate);
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small, [0.3, 0.4]);
    }
}
