//! The DeepSeek-V3-style decoder: embeddings, `numDenseLayers` dense layers, then MoE layers,
//! final RMSNorm and the LM head. Parameter names follow the Hugging Face DeepSeek-V3 checkpoints.

mod expert_mix;
mod kernels;
pub mod layers;
pub mod moe;
pub mod routing;
mod scratch;

use std::collections::HashMap;

/// Set to `1` to run the experts on the portable kernels (the `gemm` crate and the baseline
/// element-wise passes) even on a CPU with AVX-512: an escape hatch, and how tests exercise the
/// fallback on machines that have AVX-512.
pub const PORTABLE_KERNELS_ENV: &str = "FLOTILLA_ENGINE_PORTABLE";

/// Whether the AVX-512 kernels run: the CPU has AVX-512F and [`PORTABLE_KERNELS_ENV`] is not
/// `1`. Decided once per process.
pub fn avx512_kernels() -> bool {
    static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        let portable = std::env::var(PORTABLE_KERNELS_ENV).is_ok_and(|v| v == "1");
        #[cfg(target_arch = "x86_64")]
        let cpu = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        cpu && !portable
    });
    *ON
}

use candle_core::{DType, Device, Result, Shape, Tensor, Var};

use crate::config::ModelConfig;
use crate::rng::normal_init;
use layers::{Attention, RmsNorm, Rope, SwiGlu, cross_entropy, linear};
use moe::{ExpertShard, MoeBlock};

/// Creates parameters with seeded, name-keyed values and records them in creation order.
pub struct ParamBuilder {
    seed: u64,
    std: f64,
    device: Device,
    params: Vec<(String, Var)>,
}

impl ParamBuilder {
    fn normal<S: Into<Shape>>(&mut self, name: &str, shape: S) -> Result<Var> {
        let shape = shape.into();
        let values = normal_init(self.seed, name, shape.elem_count(), self.std);
        self.push(name, Tensor::from_vec(values, shape, &self.device)?)
    }

    fn ones(&mut self, name: &str, width: usize) -> Result<Var> {
        self.push(name, Tensor::ones(width, DType::F32, &self.device)?)
    }

    fn push(&mut self, name: &str, value: Tensor) -> Result<Var> {
        let var = Var::from_tensor(&value)?;
        self.params.push((name.to_owned(), var.clone()));
        Ok(var)
    }
}

enum FeedForward {
    Dense(SwiGlu),
    Moe(MoeBlock),
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    post_norm: RmsNorm,
    ffn: FeedForward,
}

/// A lone MoE block with seeded weights (benchmarks and tests), with its parameters.
pub fn standalone_moe_block(
    config: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<(MoeBlock, Vec<(String, Var)>)> {
    let mut p =
        ParamBuilder { seed, std: config.init_std, device: device.clone(), params: Vec::new() };
    let block = MoeBlock::new(&mut p, "mlp", config)?;
    Ok((block, p.params))
}

/// The whole model. Cheap to share read-only; training mutates it through [`Model::params`].
pub struct Model {
    config: ModelConfig,
    embed: Var,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Var,
    rope: Rope,
    params: Vec<(String, Var)>,
}

/// Result of a training forward pass.
pub struct TrainOutput {
    /// Mean next-token cross-entropy.
    pub loss: Tensor,
    /// Sum of the MoE blocks' sequence-wise balance losses (zero when disabled).
    pub aux_loss: Tensor,
    /// Expert selections of each MoE layer, in layer order.
    pub expert_load: Vec<Vec<f32>>,
}

impl Model {
    /// A freshly initialised model; every tensor is a pure function of `(seed, name)`.
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let width = config.hidden_size as usize;
        let mut p =
            ParamBuilder { seed, std: config.init_std, device: device.clone(), params: Vec::new() };
        let embed = p.normal("model.embed_tokens.weight", (config.vocab_size as usize, width))?;
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let prefix = format!("model.layers.{i}");
            let input_norm = RmsNorm::new(
                &mut p,
                &format!("{prefix}.input_layernorm.weight"),
                width,
                config.rms_norm_eps,
            )?;
            let attention = Attention::new(
                &mut p,
                &format!("{prefix}.self_attn"),
                width,
                config.num_heads as usize,
            )?;
            let post_norm = RmsNorm::new(
                &mut p,
                &format!("{prefix}.post_attention_layernorm.weight"),
                width,
                config.rms_norm_eps,
            )?;
            let ffn = if i < config.num_dense_layers {
                FeedForward::Dense(SwiGlu::new(
                    &mut p,
                    &format!("{prefix}.mlp"),
                    width,
                    config.intermediate_size as usize,
                )?)
            } else {
                FeedForward::Moe(MoeBlock::new(&mut p, &format!("{prefix}.mlp"), config)?)
            };
            layers.push(DecoderLayer { input_norm, attention, post_norm, ffn });
        }
        let norm = RmsNorm::new(&mut p, "model.norm.weight", width, config.rms_norm_eps)?;
        let lm_head = p.normal("lm_head.weight", (config.vocab_size as usize, width))?;
        let rope =
            Rope::new(config.head_dim(), config.max_seq_len as usize, config.rope_theta, device)?;
        Ok(Self { config: config.clone(), embed, layers, norm, lm_head, rope, params: p.params })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Trainable parameters with their Hugging Face names, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Total trainable values.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The MoE blocks in layer order, with their Hugging Face layer index.
    pub fn moe_blocks(&self) -> impl Iterator<Item = (usize, &MoeBlock)> {
        self.layers.iter().enumerate().filter_map(|(i, l)| match &l.ffn {
            FeedForward::Moe(m) => Some((i, m)),
            FeedForward::Dense(_) => None,
        })
    }

    /// Mutable access to the MoE blocks' selection biases, in layer order.
    pub fn router_biases_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.layers.iter_mut().filter_map(|l| match &mut l.ffn {
            FeedForward::Moe(m) => Some(&mut m.bias),
            FeedForward::Dense(_) => None,
        })
    }

    /// Keeps only the routed experts `shard` holds, in every MoE layer, and frees the others'
    /// weights: this model becomes one rank of an expert-parallel group, which serves (see
    /// [`Model::next_token_logits_with`]) and does not train or checkpoint.
    pub fn shard_experts(&mut self, shard: ExpertShard) -> std::result::Result<(), String> {
        let experts = self.config.num_routed_experts as usize;
        if shard.world == 0 || shard.world > experts || shard.rank >= shard.world {
            return Err(format!(
                "expert parallelism: rank {} of {} ranks cannot hold a share of {experts} routed \
                 experts (expected 1 ≤ ranks ≤ {experts} and rank < ranks)",
                shard.rank, shard.world
            ));
        }
        let keep = shard.experts(experts);
        let width = self.config.hidden_size as usize;
        let device = self.embed.device().clone();
        let empty = |rows, cols| {
            Tensor::zeros((rows, cols), DType::F32, &device)
                .and_then(|t| Var::from_tensor(&t))
                .map_err(|e| e.to_string())
        };
        let mut dropped = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let FeedForward::Moe(block) = &mut layer.ffn else { continue };
            block.shard = Some(shard);
            for (e, mlp) in block.experts.iter_mut().enumerate() {
                if !keep.contains(&e) {
                    let (gate, up, down) = (empty(0, width)?, empty(0, width)?, empty(width, 0)?);
                    *mlp = SwiGlu { gate, up, down };
                    dropped.push(format!("model.layers.{i}.mlp.experts.{e}."));
                }
            }
        }
        self.params.retain(|(name, _)| !dropped.iter().any(|prefix| name.starts_with(prefix)));
        Ok(())
    }

    /// Hidden states after the final norm, `[batch·seq, width]`, plus per-MoE-layer stats.
    /// `reduce` sums a sharded MoE block's output across its expert-parallel group.
    fn hidden(
        &self,
        ids: &Tensor,
        train: bool,
        reduce: &mut dyn FnMut(Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Vec<Vec<f32>>)> {
        let (batch, seq) = ids.dims2()?;
        let mut x = self.embed.as_tensor().index_select(&ids.flatten_all()?, 0)?;
        let mut aux: Option<Tensor> = None;
        let mut loads = Vec::new();
        for layer in &self.layers {
            let h =
                layer.attention.forward(&layer.input_norm.forward(&x)?, batch, seq, &self.rope)?;
            x = (x + h)?;
            let normed = layer.post_norm.forward(&x)?;
            let h = match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&normed)?,
                FeedForward::Moe(block) => {
                    let (mut h, stats) = block.forward(&normed, seq, train)?;
                    if block.shard().is_some() {
                        h = reduce(h)?;
                    }
                    loads.push(stats.load);
                    if let Some(a) = stats.aux_loss {
                        aux = Some(match aux {
                            Some(prev) => (prev + a)?,
                            None => a,
                        });
                    }
                    h
                }
            };
            x = (x + h)?;
        }
        Ok((self.norm.forward(&x)?, aux, loads))
    }

    /// Next-token loss of `tokens` (`[batch, seq]`, u32): predicts `tokens[:, 1:]` from `tokens[:, :-1]`.
    pub fn train_forward(&self, tokens: &Tensor) -> Result<TrainOutput> {
        let seq = tokens.dim(1)?;
        let inputs = tokens.narrow(1, 0, seq - 1)?.contiguous()?;
        let targets = tokens.narrow(1, 1, seq - 1)?.flatten_all()?;
        let (hidden, aux, expert_load) = self.hidden(&inputs, true, &mut Ok)?;
        let logits = linear(&hidden, &self.lm_head)?;
        let loss = cross_entropy(&logits, &targets)?;
        let aux_loss = match aux {
            Some(a) => a,
            None => Tensor::zeros((), DType::F32, tokens.device())?,
        };
        Ok(TrainOutput { loss, aux_loss, expert_load })
    }

    /// Logits `[batch, vocab]` at position `last[b]` of each (right-padded) row of `ids`.
    pub fn next_token_logits(&self, ids: &Tensor, last: &[u32]) -> Result<Tensor> {
        self.next_token_logits_with(ids, last, &mut Ok)
    }

    /// [`Model::next_token_logits`] on one rank of an expert-parallel group: `reduce` sums each
    /// MoE block's output across the group (every rank must call it with the same `ids`).
    pub fn next_token_logits_with(
        &self,
        ids: &Tensor,
        last: &[u32],
        reduce: &mut dyn FnMut(Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let seq = ids.dim(1)?;
        let (hidden, _, _) = self.hidden(ids, false, reduce)?;
        let rows: Vec<u32> =
            last.iter().enumerate().map(|(b, &l)| b as u32 * seq as u32 + l).collect();
        let rows = Tensor::from_slice(&rows, rows.len(), ids.device())?;
        linear(&hidden.index_select(&rows, 0)?, &self.lm_head)
    }

    /// All tensors to checkpoint, by Hugging Face name: parameters and router biases.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> =
            self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        for (i, block) in self.moe_blocks() {
            let bias = Tensor::from_slice(&block.bias, block.bias.len(), self.embed.device())?;
            out.insert(format!("model.layers.{i}.mlp.gate.e_score_correction_bias"), bias);
        }
        Ok(out)
    }

    /// Overwrites every parameter and router bias from `tensors`, checking names and shapes.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let fetch = |name: &str, shape: &Shape| -> std::result::Result<Tensor, String> {
            let t = tensors.get(name).ok_or_else(|| format!("tensor {name} is missing"))?;
            if t.shape() != shape {
                return Err(format!(
                    "tensor {name}: expected shape {shape:?}, found {:?}",
                    t.shape()
                ));
            }
            t.to_dtype(DType::F32).map_err(|e| format!("tensor {name}: {e}"))
        };
        for (name, var) in &self.params {
            var.set(&fetch(name, var.shape())?).map_err(|e| format!("tensor {name}: {e}"))?;
        }
        let indices: Vec<usize> = self.moe_blocks().map(|(i, _)| i).collect();
        for (i, bias) in indices.into_iter().zip(self.router_biases_mut()) {
            let name = format!("model.layers.{i}.mlp.gate.e_score_correction_bias");
            let t = fetch(&name, &Shape::from(bias.len()))?;
            *bias = t.to_vec1().map_err(|e| format!("tensor {name}: {e}"))?;
        }
        Ok(())
    }
}
