//! Expert balance with the auxiliary-loss-free bias update on versus off (prints figures).
//!
//! Trains the same model on the shipped corpus twice, once with `biasUpdateSpeed` = 1e-3 and
//! once with 0 (the tiny sequence-wise loss stays on in both), and prints the mean MaxVio of the
//! last 20 steps per MoE layer and the final loss.
//!
//! `cargo run --release -p flotilla-engine --example balance_bench [-- STEPS]`

use flotilla_engine::collective::Ring;
use flotilla_engine::config::{Dataset, EngineConfig};
use flotilla_engine::train::Trainer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    for gamma in [1e-3, 0.0] {
        let mut config = EngineConfig::preset("tiny").ok_or("tiny")?;
        config.model.num_layers = 3;
        config.model.num_routed_experts = 16;
        config.model.experts_per_token = 4;
        config.model.bias_update_speed = gamma;
        config.training.dataset = Dataset::Corpus;
        config.training.seq_len = 64;
        config.training.steps = steps;
        config.validate()?;
        let mut trainer = Trainer::new(config, Ring::single(), None, 0)?;
        let mut tail: Vec<Vec<f32>> = Vec::new();
        for _ in 0..steps {
            let report = trainer.train_step(false)?;
            if report.step + 20 > steps {
                tail.push(report.max_violation);
            }
        }
        let layers = tail[0].len();
        let mean: Vec<String> = (0..layers)
            .map(|l| format!("{:.3}", tail.iter().map(|v| v[l]).sum::<f32>() / tail.len() as f32))
            .collect();
        let losses = trainer.losses();
        let final_loss = losses[losses.len() - 20..].iter().sum::<f32>() / 20.0;
        println!(
            "bias update {}: MaxVio (mean of last 20 steps) per MoE layer [{}], loss (mean of last 20) {final_loss:.4}",
            if gamma > 0.0 { "on (γ=1e-3)" } else { "off        " },
            mean.join(", ")
        );
    }
    Ok(())
}
