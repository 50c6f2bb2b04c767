//! The data-parallel training loop: forward/backward on the local batch, one all-reduce of the
//! gradients (with the expert loads, loss and stop vote appended), clipping, AdamW, and the
//! global-load bias update. Every rank applies identical updates, so weights never diverge.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::checkpoint::{self, CheckpointError, Snapshot, TrainerState};
use crate::collective::{CollectiveError, Ring};
use crate::config::EngineConfig;
use crate::data::DataStream;
use crate::model::Model;
use crate::model::routing::{max_violation, update_bias};
use crate::optim::{AdamW, clip_global_norm, learning_rate};

/// Training failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Tensor maths failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A peer was lost or misbehaved.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A checkpoint's tensors do not fit the model.
    #[error("checkpoint {path} does not fit the model: {reason}")]
    Restore { path: PathBuf, reason: String },
    /// The ranks disagree about where they resume.
    #[error(
        "ranks resumed from different steps (this rank: {step}); every rank must see the same checkpoint directory"
    )]
    Diverged { step: u64 },
}

type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What one optimizer step produced (identical on every rank).
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Steps completed, including this one.
    pub step: u64,
    /// Mean next-token loss over the global batch.
    pub loss: f32,
    /// Tokens predicted in the global batch.
    pub tokens: usize,
    /// Wall time of the step, seconds.
    pub seconds: f64,
    /// Part of it spent in the gradient all-reduce, seconds.
    pub allreduce_seconds: f64,
    /// Global selections per expert, per MoE layer.
    pub expert_load: Vec<Vec<f32>>,
    /// MaxVio per MoE layer.
    pub max_violation: Vec<f32>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Some rank asked to stop (SIGTERM); all ranks see the same vote.
    pub stop: bool,
}

/// A rank's trainer.
pub struct Trainer {
    config: EngineConfig,
    model: Model,
    optimizer: AdamW,
    ring: Ring,
    data: DataStream,
    step: u64,
    losses: Vec<f32>,
    checkpoint_dir: Option<PathBuf>,
    attempt: u64,
    device: Device,
    /// Step of the last checkpoint written or resumed from.
    pub last_checkpoint_step: Option<u64>,
    /// Called with the compute time between a step's backward pass and its all-reduce.
    before_all_reduce: Option<Box<dyn FnMut(std::time::Duration) + Send>>,
}

impl Trainer {
    /// Builds the model and, when `checkpoint_dir` holds a checkpoint, resumes from it exactly.
    pub fn new(
        config: EngineConfig,
        ring: Ring,
        checkpoint_dir: Option<PathBuf>,
        attempt: u64,
    ) -> Result<Self> {
        let device = Device::Cpu;
        let model = Model::new(&config.model, config.training.seed, &device)?;
        let sizes: Vec<usize> = model.params().iter().map(|(_, v)| v.elem_count()).collect();
        let optimizer = AdamW::new(&config.training, &sizes);
        let rank = ring.spec().rank as u64;
        let data = DataStream::new(config.training.dataset, config.training.seed, rank, 0);
        let mut trainer = Self {
            config,
            model,
            optimizer,
            ring,
            data,
            step: 0,
            losses: Vec::new(),
            checkpoint_dir,
            attempt,
            device,
            last_checkpoint_step: None,
            before_all_reduce: None,
        };
        let found = match &trainer.checkpoint_dir {
            Some(dir) => checkpoint::load_latest(dir, &trainer.device)?,
            None => None,
        };
        if let Some((path, snapshot)) = found {
            trainer.restore(path, snapshot)?;
        }
        let mut agreed = [trainer.step as f32];
        trainer.ring.all_reduce_sum(&mut agreed)?;
        if agreed[0] != (trainer.step * trainer.ring.spec().world as u64) as f32 {
            return Err(TrainError::Diverged { step: trainer.step });
        }
        Ok(trainer)
    }

    fn restore(&mut self, path: PathBuf, snapshot: Snapshot) -> Result<()> {
        let world = self.ring.spec().world;
        checkpoint::check_compatible(&path, &snapshot.trainer, &self.config, world)?;
        let restore_err = |reason: String| TrainError::Restore { path: path.clone(), reason };
        self.model.load_state(&snapshot.model).map_err(restore_err)?;
        for (i, (name, var)) in self.model.params().iter().enumerate() {
            let moments = &mut self.optimizer.moments[i];
            for (suffix, slot) in [("exp_avg", &mut moments.m), ("exp_avg_sq", &mut moments.v)] {
                let key = format!("{name}.{suffix}");
                let t = snapshot
                    .optimizer
                    .get(&key)
                    .ok_or_else(|| restore_err(format!("{key} is missing")))?;
                let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if values.len() != var.elem_count() {
                    return Err(restore_err(format!(
                        "{key} has {} values, expected {}",
                        values.len(),
                        var.elem_count()
                    )));
                }
                *slot = values;
            }
        }
        let state = snapshot.trainer;
        self.optimizer.step = state.optimizer_step;
        self.step = state.step;
        self.data.cursor = state.data_cursors[self.ring.spec().rank];
        self.losses = state.losses;
        self.last_checkpoint_step = Some(state.step);
        Ok(())
    }

    /// Calls `hook` in every step between the backward pass and the all-reduce, with the time
    /// the step has computed so far (the simulated GPU faults of [`crate::sim`] act there).
    pub fn before_all_reduce(&mut self, hook: Box<dyn FnMut(std::time::Duration) + Send>) {
        self.before_all_reduce = Some(hook);
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Loss of every completed step (including those before a resume).
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// The configuration being trained.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs one optimizer step. `stop` is this rank's vote to stop after it.
    pub fn train_step(&mut self, stop: bool) -> Result<StepReport> {
        let started = Instant::now();
        let training = &self.config.training;
        let (batch, seq) = (training.batch_size as usize, training.seq_len as usize);
        let tokens = self.data.next_batch(batch, seq);
        let tokens = Tensor::from_vec(tokens, (batch, seq), &self.device)?;
        let out = self.model.train_forward(&tokens)?;
        let grads = (&out.loss + &out.aux_loss)?.backward()?;

        let mut buffer = Vec::with_capacity(self.model.num_params() + 64);
        for (_, var) in self.model.params() {
            match grads.get(var.as_tensor()) {
                Some(g) => buffer.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => buffer.extend(std::iter::repeat_n(0.0, var.elem_count())),
            }
        }
        let grad_len = buffer.len();
        for load in &out.expert_load {
            buffer.extend_from_slice(load);
        }
        buffer.push(out.loss.to_scalar::<f32>()?);
        buffer.push(if stop { 1.0 } else { 0.0 });
        if let Some(hook) = self.before_all_reduce.as_mut() {
            hook(started.elapsed());
        }
        let reduce_started = Instant::now();
        self.ring.all_reduce_sum(&mut buffer)?;
        let allreduce_seconds = reduce_started.elapsed().as_secs_f64();

        let world = self.ring.spec().world as f32;
        let stop = buffer[buffer.len() - 1] > 0.0;
        let loss = buffer[buffer.len() - 2] / world;
        let (grads, rest) = buffer.split_at_mut(grad_len);
        grads.iter_mut().for_each(|g| *g /= world);
        let grad_norm = clip_global_norm(grads, training.grad_clip);
        let lr = learning_rate(training, self.step);
        self.optimizer.begin_step();
        let mut offset = 0;
        for (i, (_, var)) in self.model.params().iter().enumerate() {
            let n = var.elem_count();
            let mut values: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let decay = var.rank() >= 2;
            self.optimizer.update(i, &mut values, &grads[offset..offset + n], lr, decay);
            var.set(&Tensor::from_vec(values, var.shape(), &self.device)?)?;
            offset += n;
        }
        let experts = (self.config.model.num_routed_experts as usize).max(1);
        let expert_load: Vec<Vec<f32>> =
            rest.chunks_exact(experts).take(out.expert_load.len()).map(<[f32]>::to_vec).collect();
        let gamma = self.config.model.bias_update_speed;
        for (bias, load) in self.model.router_biases_mut().zip(&expert_load) {
            update_bias(bias, load, gamma);
        }
        self.step += 1;
        self.losses.push(loss);
        Ok(StepReport {
            step: self.step,
            loss,
            tokens: batch * (seq - 1) * self.ring.spec().world,
            seconds: started.elapsed().as_secs_f64(),
            allreduce_seconds,
            max_violation: expert_load.iter().map(|l| max_violation(l)).collect(),
            expert_load,
            grad_norm,
            learning_rate: lr,
            stop,
        })
    }

    /// Everything needed to continue from the current step.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut optimizer = std::collections::HashMap::new();
        for ((name, var), moments) in self.model.params().iter().zip(&self.optimizer.moments) {
            optimizer.insert(
                format!("{name}.exp_avg"),
                Tensor::from_slice(&moments.m, var.shape(), &self.device)?,
            );
            optimizer.insert(
                format!("{name}.exp_avg_sq"),
                Tensor::from_slice(&moments.v, var.shape(), &self.device)?,
            );
        }
        let world = self.ring.spec().world;
        let per_rank = self.data.cursor;
        Ok(Snapshot {
            model: self.model.state_tensors()?,
            optimizer,
            trainer: TrainerState {
                step: self.step,
                world_size: world,
                // Every rank consumes the same number of sequences per step.
                data_cursors: vec![per_rank; world],
                optimizer_step: self.optimizer.step,
                config_hash: checkpoint::config_hash(&self.config),
                config: self.config.clone(),
                attempt: self.attempt,
                losses: self.losses.clone(),
            },
        })
    }

    /// Writes a checkpoint on rank 0 (weights are identical on every rank). Returns the seconds it
    /// took, or `None` when this rank does not write or no directory is configured.
    pub fn checkpoint(&mut self) -> Result<Option<f64>> {
        let Some(dir) = self.checkpoint_dir.clone() else { return Ok(None) };
        self.last_checkpoint_step = Some(self.step);
        if self.ring.spec().rank != 0 {
            return Ok(None);
        }
        let started = Instant::now();
        checkpoint::save(&dir, &self.snapshot()?, |_| Ok(()))?;
        checkpoint::prune(&dir, 3)?;
        Ok(Some(started.elapsed().as_secs_f64()))
    }
}

/// The attempt ledger's file name, in the checkpoint directory.
pub const LEDGER_FILE: &str = "attempts.ledger";

/// One worker's entry in the attempt ledger: a `start` line when created, an `end` line when
/// dropped (a normal return, an error or a caught signal; a SIGKILLed worker writes none).
///
/// Each line is `job<TAB>attempt<TAB>rank<TAB>start|end<TAB>unix nanoseconds<TAB>pid`, written
/// with one `write` to a file opened with `O_APPEND` and then fsynced, so lines from every
/// worker sharing the directory never interleave and survive a crash. Tests read it to check
/// that no two attempts of a job ever ran at the same time.
#[derive(Debug)]
pub struct LedgerEntry {
    path: PathBuf,
    job: String,
    attempt: u64,
    rank: usize,
}

impl LedgerEntry {
    /// Appends this worker's `start` line to `<dir>/attempts.ledger`.
    pub fn start(
        dir: &std::path::Path,
        job: &str,
        attempt: u64,
        rank: usize,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let entry = Self { path: dir.join(LEDGER_FILE), job: job.to_string(), attempt, rank };
        entry.append("start")?;
        Ok(entry)
    }

    fn append(&self, event: &str) -> std::io::Result<()> {
        use std::io::Write;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // Tabs and newlines in the job name would break the line format.
        let job: String =
            self.job.chars().map(|c| if c.is_whitespace() { '_' } else { c }).collect();
        let line = format!(
            "{job}\t{}\t{}\t{event}\t{nanos}\t{}\n",
            self.attempt,
            self.rank,
            std::process::id()
        );
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        file.write_all(line.as_bytes())?;
        file.sync_all()
    }
}

impl Drop for LedgerEntry {
    fn drop(&mut self) {
        if let Err(e) = self.append("end") {
            tracing::warn!(path = %self.path.display(), error = %e, "attempt ledger: no end line");
        }
    }
}

#[cfg(test)]
mod ledger_tests {
    use super::*;

    #[test]
    fn a_ledger_entry_appends_start_then_end_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = LedgerEntry::start(dir.path(), "job 1", 2, 0).unwrap();
        let b = LedgerEntry::start(dir.path(), "job 1", 2, 1).unwrap();
        drop(a);
        drop(b);
        let text = std::fs::read_to_string(dir.path().join(LEDGER_FILE)).unwrap();
        let events: Vec<Vec<&str>> =
            text.lines().map(|l| l.split('\t').take(4).collect()).collect();
        assert_eq!(
            events,
            vec![
                vec!["job_1", "2", "0", "start"],
                vec!["job_1", "2", "1", "start"],
                vec!["job_1", "2", "0", "end"],
                vec!["job_1", "2", "1", "end"],
            ]
        );
        let times: Vec<u128> =
            text.lines().map(|l| l.split('\t').nth(4).unwrap().parse().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }
}
