//! Checkpoints: atomic writes, refusal of corrupt or mismatched ones, and exact resume.
#![cfg(feature = "runtime")]

use std::io;
use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use flotilla_engine::checkpoint::{self, CheckpointError};
use flotilla_engine::collective::Ring;
use flotilla_engine::config::EngineConfig;
use flotilla_engine::train::{TrainError, Trainer};

mod common;
use common::with_group;

fn tiny() -> EngineConfig {
    let mut config = EngineConfig::preset("tiny").expect("tiny");
    config.training.steps = 6;
    config.training.warmup_steps = 2;
    config
}

/// Trains `steps` steps on one rank from whatever `dir` holds, checkpointing at the end.
fn train_single(config: &EngineConfig, dir: &Path, steps: u64) -> Trainer {
    let mut trainer =
        Trainer::new(config.clone(), Ring::single(), Some(dir.to_owned()), 0).expect("trainer");
    for _ in 0..steps {
        trainer.train_step(false).expect("step");
    }
    trainer.checkpoint().expect("checkpoint");
    trainer
}

fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut state: Vec<_> = trainer
        .model()
        .state_tensors()
        .expect("state")
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().and_then(|t| t.to_vec1()).expect("values")))
        .collect();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    state
}

#[test]
fn a_crash_mid_write_leaves_the_previous_checkpoint_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trainer = train_single(&tiny(), dir.path(), 2);
    let mut snapshot = trainer.snapshot().expect("snapshot");
    snapshot.trainer.step = 4;
    let crash = checkpoint::save(dir.path(), &snapshot, |file| {
        if file == "optimizer.safetensors" {
            Err(io::Error::other("simulated crash"))
        } else {
            Ok(())
        }
    });
    assert!(crash.is_err());
    let (path, loaded) =
        checkpoint::load_latest(dir.path(), &Device::Cpu).expect("load").expect("present");
    assert!(path.ends_with("step-00000002"), "{}", path.display());
    assert_eq!(loaded.trainer.step, 2);
    // A new trainer resumes from it.
    let resumed =
        Trainer::new(tiny(), Ring::single(), Some(dir.path().to_owned()), 1).expect("resume");
    assert_eq!(resumed.step(), 2);
}

#[test]
fn corrupt_and_mismatched_checkpoints_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    train_single(&tiny(), dir.path(), 1);
    let mut other = tiny();
    other.training.learning_rate *= 2.0;
    match Trainer::new(other, Ring::single(), Some(dir.path().to_owned()), 0) {
        Err(TrainError::Checkpoint(CheckpointError::Mismatch { field, .. })) => {
            assert_eq!(field, "config hash")
        }
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
    let weights_file = dir.path().join("step-00000001/model.safetensors");
    let mut bytes = std::fs::read(&weights_file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&weights_file, bytes).expect("write");
    match Trainer::new(tiny(), Ring::single(), Some(dir.path().to_owned()), 0) {
        Err(TrainError::Checkpoint(CheckpointError::Corrupt { reason, .. })) => {
            assert!(reason.contains("model.safetensors has sha256"), "{reason}");
        }
        other => panic!("expected corruption to be refused, got {:?}", other.err()),
    }
}

#[test]
fn checkpoints_use_hugging_face_deepseek_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    train_single(&tiny(), dir.path(), 1);
    let snapshot = checkpoint::load(&dir.path().join("step-00000001"), &Device::Cpu).expect("load");
    for name in [
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ] {
        assert!(snapshot.model.contains_key(name), "{name} missing");
    }
    assert!(snapshot.optimizer.contains_key("model.layers.1.mlp.gate.weight.exp_avg_sq"));
}

#[test]
fn resume_is_exact_with_two_ranks() {
    let straight = tempfile::tempdir().expect("tempdir");
    let interrupted = tempfile::tempdir().expect("tempdir");
    let run = |dir: std::path::PathBuf, steps: u64| {
        with_group(2, Duration::from_secs(30), move |ring| {
            let mut trainer = Trainer::new(tiny(), ring, Some(dir.clone()), 0).expect("trainer");
            for _ in 0..steps {
                trainer.train_step(false).expect("step");
            }
            trainer.checkpoint().expect("checkpoint");
            (trainer.losses().to_vec(), weights(&trainer))
        })
    };
    let full = run(straight.path().to_owned(), 6);
    let first = run(interrupted.path().to_owned(), 3);
    let second = run(interrupted.path().to_owned(), 3);
    assert_eq!(first[0].0.len(), 3);
    assert_eq!(second[0].0, full[0].0, "loss sequence differs after resume");
    assert_eq!(second[0].1, full[0].1, "weights differ after resume");
    assert_eq!(second[1].1, full[0].1, "ranks hold different weights");
    assert_ne!(first[0].1, full[0].1, "training must change the weights");
}
