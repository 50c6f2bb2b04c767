//! Expert-parallel serving: one replica as a group of `flotilla-worker serve` processes, each
//! holding a contiguous share of every MoE layer's routed experts ([`ExpertShard`]).
//!
//! Rank 0 (the [`GroupLeader`]) runs the HTTP server and the batcher; every other rank runs
//! [`follow`]. Each decode step rank 0 broadcasts the batch, every rank runs the same forward
//! pass (attention and routing are replicated, so every rank routes every token alike) computing
//! only its own experts, and each MoE block's output is summed over the ring
//! ([`Ring::all_reduce_sum`]). Broadcasts are all-reduces too: the leader contributes the values,
//! the others zeros (token ids are below 2^24, so they survive f32 exactly).
//!
//! Each round starts with a header `[kind, batch, width]`: a step, an idle heartbeat (sent while
//! no request is active, so followers' collective timeouts only fire on a lost leader) or stop.
//! A lost peer ends the group on every rank: the followers exit with an error and the leader's
//! decode thread stops, so the whole replica is replaced; a clean shutdown sends stop and the
//! followers exit 0.

use std::time::Duration;

use candle_core::{Device, Tensor};

use super::batcher::{DecodeError, Decoder};
use crate::collective::{CollectiveError, Ring};
use crate::model::Model;
use crate::model::moe::ExpertShard;

const IDLE: f32 = 0.0;
const STEP: f32 = 1.0;
const STOP: f32 = 2.0;
/// Widest batch a follower accepts from a header (anything larger is a protocol error).
const MAX_BATCH: usize = 1 << 16;

/// Rank 0 of an expert-parallel group, as the batcher's [`Decoder`].
pub struct GroupLeader {
    model: Model,
    ring: Ring,
    heartbeat: Duration,
}

impl GroupLeader {
    /// The leader over `model` (already [`Model::shard_experts`]ed to rank 0) and the formed
    /// `ring`; it sends heartbeats at a quarter of the ring's timeout.
    pub fn new(model: Model, ring: Ring) -> Self {
        let heartbeat = (ring.spec().timeout / 4).max(Duration::from_millis(50));
        Self { model, ring, heartbeat }
    }

    fn header(&mut self, kind: f32, batch: usize, width: usize) -> Result<(), CollectiveError> {
        let mut header = [kind, batch as f32, width as f32];
        self.ring.all_reduce_sum(&mut header)
    }
}

fn fatal(e: impl std::fmt::Display) -> DecodeError {
    DecodeError { fatal: true, message: format!("expert-parallel group: {e}") }
}

impl Decoder for GroupLeader {
    fn max_seq_len(&self) -> usize {
        self.model.config().max_seq_len as usize
    }

    fn logits(&mut self, ids: &Tensor, last: &[u32]) -> Result<Tensor, DecodeError> {
        let (batch, width) = ids.dims2()?;
        let mut payload: Vec<f32> =
            ids.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|t| t as f32).collect();
        payload.extend(last.iter().map(|&l| l as f32));
        self.header(STEP, batch, width).map_err(fatal)?;
        self.ring.all_reduce_sum(&mut payload).map_err(fatal)?;
        // Any failure mid-pass leaves the ranks out of step: it ends the group.
        sharded_logits(&self.model, &mut self.ring, ids, last).map_err(fatal)
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(self.heartbeat)
    }

    fn idle(&mut self) -> Result<(), DecodeError> {
        self.header(IDLE, 0, 0).map_err(fatal)
    }

    fn finish(&mut self) {
        if let Err(e) = self.header(STOP, 0, 0) {
            tracing::warn!(error = %e, "could not tell the expert-parallel group to stop");
        }
    }
}

/// Why a follower stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The ring broke.
    #[error(transparent)]
    Group(#[from] CollectiveError),
    /// The leader sent something this rank cannot run.
    #[error("expert-parallel group: {0}")]
    Protocol(String),
    /// The forward pass failed.
    #[error("expert-parallel group: forward pass failed: {0}")]
    Model(String),
}

/// A follower's life: run every step rank 0 broadcasts until it says stop (`Ok`) or the group
/// breaks (`Err`).
pub fn follow(model: &Model, ring: &mut Ring) -> Result<(), FollowError> {
    let max_width = model.config().max_seq_len as usize;
    loop {
        let mut header = [0f32; 3];
        ring.all_reduce_sum(&mut header)?;
        let [kind, batch, width] = header;
        if kind == IDLE {
            continue;
        }
        if kind == STOP {
            return Ok(());
        }
        let (batch, width) = (batch as usize, width as usize);
        if kind != STEP || batch == 0 || batch > MAX_BATCH || width == 0 || width > max_width {
            return Err(FollowError::Protocol(format!(
                "unexpected header kind {kind}, batch {batch}, width {width} (expected a step \
                 of 1..={MAX_BATCH} rows of 1..={max_width} tokens)"
            )));
        }
        let mut payload = vec![0f32; batch * width + batch];
        ring.all_reduce_sum(&mut payload)?;
        let ids: Vec<u32> = payload[..batch * width].iter().map(|&v| v as u32).collect();
        let last: Vec<u32> = payload[batch * width..].iter().map(|&v| v as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, width), &Device::Cpu)
            .map_err(|e| FollowError::Model(e.to_string()))?;
        sharded_logits(model, ring, &ids, &last).map_err(|e| match e {
            ShardedError::Group(e) => FollowError::Group(e),
            ShardedError::Model(e) => FollowError::Model(e.to_string()),
        })?;
    }
}

/// What failed in a sharded forward pass.
#[derive(Debug, thiserror::Error)]
enum ShardedError {
    #[error(transparent)]
    Group(CollectiveError),
    #[error(transparent)]
    Model(candle_core::Error),
}

/// The forward pass on one rank, each MoE block's share summed over the ring.
fn sharded_logits(
    model: &Model,
    ring: &mut Ring,
    ids: &Tensor,
    last: &[u32],
) -> Result<Tensor, ShardedError> {
    let mut lost = None;
    let result = model.next_token_logits_with(ids, last, &mut |share: Tensor| {
        let shape = share.shape().clone();
        let mut values: Vec<f32> = share.flatten_all()?.to_vec1()?;
        if let Err(e) = ring.all_reduce_sum(&mut values) {
            let message = e.to_string();
            lost = Some(e);
            candle_core::bail!("{message}");
        }
        Tensor::from_vec(values, shape, share.device())
    });
    match (result, lost) {
        (_, Some(e)) => Err(ShardedError::Group(e)),
        (Err(e), None) => Err(ShardedError::Model(e)),
        (Ok(logits), None) => Ok(logits),
    }
}

/// The experts `rank` of `world` holds in a model with `experts` routed experts, as text
/// (`experts 8..16 of 32`) for logs.
pub fn describe_shard(shard: ExpertShard, experts: usize) -> String {
    let range = shard.experts(experts);
    format!("experts {}..{} of {experts}", range.start, range.end)
}
