//! The tiny preset learns the synthetic task on CPU within its step budget.
#![cfg(feature = "runtime")]

use flotilla_engine::collective::Ring;
use flotilla_engine::config::EngineConfig;
use flotilla_engine::data::synthetic_loss_floor;
use flotilla_engine::train::Trainer;

#[test]
fn tiny_preset_reaches_its_target_loss() {
    let config = EngineConfig::preset("tiny").expect("tiny");
    let target = config.training.target_loss.expect("tiny has a target") as f32;
    let floor = synthetic_loss_floor(config.training.seq_len as usize) as f32;
    let steps = config.training.steps;
    let mut trainer = Trainer::new(config, Ring::single(), None, 0).expect("trainer");
    let mut max_violation = Vec::new();
    for _ in 0..steps {
        let report = trainer.train_step(false).expect("step");
        max_violation.push(report.max_violation[0]);
    }
    let losses = trainer.losses();
    let first = losses[0];
    let last: f32 = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    println!(
        "loss {first:.3} -> {last:.3} (target {target}, floor {floor:.3}); MaxVio last {:?}",
        max_violation.last()
    );
    assert!(first > 4.0, "an untrained byte model starts near ln 256, got {first}");
    assert!(last <= target, "mean of the last 5 losses {last} is above the target {target}");
    assert!(last >= floor, "loss {last} below the information-theoretic floor {floor}: data leak?");
}
