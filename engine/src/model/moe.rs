//! The DeepSeek-V3 MoE block: a shared expert plus fine-grained routed SwiGLU experts behind a
//! sigmoid gate with group-limited routing and a selection bias.

use std::ops::Range;

use candle_core::{D, Result, Tensor, Var};

use super::ParamBuilder;
use super::expert_mix::ExpertMix;
use super::layers::{SwiGlu, linear, sigmoid, zeros};
use super::routing::{RoutingShape, expert_load, select_experts};
use crate::config::ModelConfig;

/// One MoE feed-forward block (Hugging Face name prefix `model.layers.{i}.mlp`).
pub struct MoeBlock {
    /// Router weight `[experts, width]` (`mlp.gate.weight`).
    pub(crate) gate: Var,
    /// Selection bias per expert (`mlp.gate.e_score_correction_bias`); never receives a gradient.
    pub bias: Vec<f32>,
    pub(crate) experts: Vec<SwiGlu>,
    pub(crate) shared: Option<SwiGlu>,
    shape: RoutingShape,
    route_scale: f64,
    aux_alpha: f64,
    /// Set on one rank of an expert-parallel group: only these experts are held and computed.
    pub(crate) shard: Option<ExpertShard>,
}

/// The routed experts one rank of an expert-parallel group holds: a contiguous block
/// `experts·rank/world .. experts·(rank+1)/world` (contiguous, so a routing group stays on few
/// ranks). Rank 0 also runs the shared expert; summing every rank's output gives the block's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
}

impl ExpertShard {
    /// The routed experts this rank holds, out of `experts`.
    pub fn experts(&self, experts: usize) -> Range<usize> {
        experts * self.rank / self.world..experts * (self.rank + 1) / self.world
    }
}

/// What one forward pass of a MoE block produced besides its output.
pub struct MoeStats {
    /// Sequence-wise balance loss (already scaled by α), a scalar tensor with gradient.
    pub aux_loss: Option<Tensor>,
    /// Selections per expert in this batch.
    pub load: Vec<f32>,
}

impl MoeBlock {
    pub(crate) fn new(p: &mut ParamBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let width = cfg.hidden_size as usize;
        let experts = cfg.num_routed_experts as usize;
        let inner = cfg.moe_intermediate_size as usize;
        let gate = p.normal(&format!("{prefix}.gate.weight"), (experts, width))?;
        let experts_mlp = (0..experts)
            .map(|i| SwiGlu::new(p, &format!("{prefix}.experts.{i}"), width, inner))
            .collect::<Result<Vec<_>>>()?;
        let shared = (cfg.num_shared_experts > 0)
            .then(|| {
                let shared_inner = inner * cfg.num_shared_experts as usize;
                SwiGlu::new(p, &format!("{prefix}.shared_experts"), width, shared_inner)
            })
            .transpose()?;
        Ok(Self {
            gate,
            bias: vec![0.0; experts],
            experts: experts_mlp,
            shared,
            shape: RoutingShape {
                experts,
                groups: cfg.num_expert_groups as usize,
                topk_groups: cfg.topk_groups as usize,
                top_k: cfg.experts_per_token as usize,
            },
            route_scale: cfg.route_scale,
            aux_alpha: cfg.aux_loss_alpha,
            shard: None,
        })
    }

    /// Routing shape of this block.
    pub fn shape(&self) -> RoutingShape {
        self.shape
    }

    /// Sigmoid affinities `[tokens, experts]` in f32, with gradient to the router.
    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        sigmoid(&linear(x, &self.gate)?)
    }

    /// Routes `x` (`[tokens, width]`) and returns the chosen experts `[tokens, top_k]` and their
    /// weights: the unbiased scores of the chosen experts normalised to 1 and scaled.
    pub fn route(&self, scores: &Tensor) -> Result<(Vec<u32>, Tensor)> {
        let tokens = scores.dim(0)?;
        let host: Vec<f32> = scores.flatten_all()?.to_vec1()?;
        let chosen = select_experts(&host, &self.bias, self.shape);
        let index = Tensor::from_slice(&chosen, (tokens, self.shape.top_k), scores.device())?;
        let picked = scores.gather(&index, 1)?;
        let weights = (picked.broadcast_div(&picked.sum_keepdim(D::Minus1)?)? * self.route_scale)?;
        Ok((chosen, weights))
    }

    /// Applies the block to `x` (`[batch·seq, width]`); `seq` is used by the sequence-wise loss.
    ///
    /// On a rank of an expert-parallel group ([`MoeBlock::shard`]) the output is this rank's
    /// share, to be summed across the group (see `MoeBlock::expert_mix`); such a block does
    /// not train.
    pub fn forward(&self, x: &Tensor, seq: usize, train: bool) -> Result<(Tensor, MoeStats)> {
        if self.shard.is_some() && train {
            candle_core::bail!("an expert-parallel shard of a MoE block serves only");
        }
        let width = x.dim(1)?;
        let scores = self.scores(x)?;
        let (chosen, weights) = self.route(&scores)?;

        let (mix, carrier) = self.expert_mix(&chosen, width)?;
        let out = x.contiguous()?.apply_op3(&weights.contiguous()?, &carrier, mix)?;
        let aux_loss = if train && self.aux_alpha > 0.0 {
            Some(self.sequence_balance_loss(&scores, &chosen, seq)?)
        } else {
            None
        };
        Ok((out, MoeStats { aux_loss, load: expert_load(&chosen, self.shape.experts) }))
    }

    /// The expert-parallel group this block is a shard of, if any.
    pub fn shard(&self) -> Option<ExpertShard> {
        self.shard
    }

    /// The experts' output through candle autograd, one `index_select`/`index_add` per expert:
    /// the reference [`MoeBlock::forward`]'s hand-written pass is tested and benchmarked against.
    pub fn experts_autograd(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, width) = x.dims2()?;
        let top_k = self.shape.top_k;
        let (chosen, weights) = self.route(&self.scores(x)?)?;
        let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); self.shape.experts];
        for (slot, &e) in chosen.iter().enumerate() {
            by_expert[e as usize].push(slot as u32);
        }
        let slots: Vec<u32> = by_expert.iter().flatten().copied().collect();
        let rows: Vec<u32> = slots.iter().map(|&s| s / top_k as u32).collect();
        let device = x.device();
        let rows_t = Tensor::from_slice(&rows, rows.len(), device)?;
        let mut outputs = Vec::new();
        let mut start = 0;
        for (expert, members) in self.experts.iter().zip(&by_expert) {
            if !members.is_empty() {
                let expert_rows = rows_t.narrow(0, start, members.len())?;
                outputs.push(expert.forward(&x.index_select(&expert_rows, 0)?)?);
                start += members.len();
            }
        }
        let expert_out = Tensor::cat(&outputs, 0)?;
        let slot_t = Tensor::from_slice(&slots, slots.len(), device)?;
        let slot_weights = weights.flatten_all()?.index_select(&slot_t, 0)?.unsqueeze(1)?;
        let weighted = expert_out.broadcast_mul(&slot_weights)?;
        let mut out = zeros(tokens, width, device)?.index_add(&rows_t, &weighted, 0)?;
        if let Some(shared) = &self.shared {
            out = (out + shared.forward(x)?)?;
        }
        Ok(out)
    }

    /// The experts' hand-written forward/backward over their weights (routed experts in order,
    /// then the shared one; gate, up, down each), and the carrier tensor to pass it.
    ///
    /// On a shard, the experts of other ranks have empty weights (inner width 0), so their
    /// slots add nothing, and only rank 0 runs the shared expert: the output is this rank's
    /// share, and the shares sum to the block's output.
    fn expert_mix(&self, chosen: &[u32], width: usize) -> Result<(ExpertMix, Tensor)> {
        let shared = self.shared.as_ref().filter(|_| self.shard.is_none_or(|s| s.rank == 0));
        let weights = self
            .experts
            .iter()
            .chain(shared)
            .flat_map(|mlp| [&mlp.gate, &mlp.up, &mlp.down])
            .map(|w| w.as_tensor().clone())
            .collect();
        ExpertMix::new(chosen, self.shape.top_k, width, weights, shared.is_some())
    }

    /// `α · mean over sequences of Σ_i f_i · P_i`, where `f_i = E/(K·T) · count_i` (no gradient)
    /// and `P_i` is the mean normalised affinity of expert i within the sequence.
    fn sequence_balance_loss(&self, scores: &Tensor, chosen: &[u32], seq: usize) -> Result<Tensor> {
        let experts = self.shape.experts;
        let top_k = self.shape.top_k;
        let batch = scores.dim(0)? / seq;
        let scale = experts as f32 / (top_k * seq) as f32;
        let mut freq = vec![0f32; batch * experts];
        for (slot, &e) in chosen.iter().enumerate() {
            let b = slot / top_k / seq;
            freq[b * experts + e as usize] += scale;
        }
        let freq = Tensor::from_vec(freq, (batch, experts), scores.device())?;
        let normalised = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?;
        let affinity = normalised.reshape((batch, seq, experts))?.mean(1)?;
        (affinity * freq)?.sum_all()? * (self.aux_alpha / batch as f64)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::config::EngineConfig;
    use crate::model::Model;

    fn tiny_model() -> Model {
        let mut config = EngineConfig::preset("tiny").expect("tiny").model;
        config.route_scale = 2.5;
        Model::new(&config, 3, &Device::Cpu).expect("model")
    }

    #[test]
    fn weights_use_unbiased_scores_normalised_and_scaled() {
        let mut model = tiny_model();
        for bias in model.router_biases_mut() {
            bias[7] = 10.0; // forces expert 7 into every selection without changing its weight
        }
        let (_, block) = model.moe_blocks().next().expect("a MoE layer");
        let x =
            Tensor::from_vec(crate::rng::normal_init(1, "x", 5 * 64, 1.0), (5, 64), &Device::Cpu)
                .unwrap();
        let scores = block.scores(&x).unwrap();
        let (chosen, weights) = block.route(&scores).unwrap();
        let scores: Vec<Vec<f32>> = scores.to_vec2().unwrap();
        let weights: Vec<Vec<f32>> = weights.to_vec2().unwrap();
        for (t, row) in weights.iter().enumerate() {
            let picked = &chosen[t * 2..t * 2 + 2];
            assert_eq!(picked[0], 7);
            let total: f32 = picked.iter().map(|&e| scores[t][e as usize]).sum();
            for (k, &e) in picked.iter().enumerate() {
                let expected = scores[t][e as usize] / total * 2.5;
                assert!(
                    (row[k] - expected).abs() < 1e-5,
                    "token {t} slot {k}: {} vs {expected}",
                    row[k]
                );
            }
            assert!((row.iter().sum::<f32>() - 2.5).abs() < 1e-5);
        }
    }

    #[test]
    fn router_receives_gradients_through_weights_and_balance_loss() {
        let model = tiny_model();
        let tokens = Tensor::from_vec(
            (0..48u32).map(|i| 97 + i % 7).collect::<Vec<_>>(),
            (2, 24),
            &Device::Cpu,
        )
        .unwrap();
        let out = model.train_forward(&tokens).unwrap();
        let gate_name = "model.layers.1.mlp.gate.weight";
        let gate = &model.params().iter().find(|(n, _)| n == gate_name).expect("gate").1;
        for (what, loss) in [("lm loss", &out.loss), ("balance loss", &out.aux_loss)] {
            let grads = loss.backward().unwrap();
            let g =
                grads.get(gate.as_tensor()).unwrap_or_else(|| panic!("{what}: no router gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{what}: router gradient is zero");
        }
        let load: f32 = out.expert_load.iter().flatten().sum();
        assert_eq!(load, (2 * 23 * 2) as f32, "each of the 46 tokens picks 2 experts");
    }
}
