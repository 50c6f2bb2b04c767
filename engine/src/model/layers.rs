//! Building blocks on candle tensors: RMSNorm, SwiGLU, rotary multi-head attention, softmax.
//! Activations are kept 2-D (`[tokens, width]`) outside attention.

use candle_core::{D, DType, Device, Result, Tensor, Var};

use super::ParamBuilder;

/// `x · Wᵀ` for a weight stored `[out, in]` as in Hugging Face checkpoints.
pub fn linear(x: &Tensor, w: &Var) -> Result<Tensor> {
    x.matmul(&w.as_tensor().t()?)
}

/// Softmax over the last dimension; the max is detached (it only stabilises the exponent).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `1 / (1 + e^-x)`, built from differentiable primitives.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Root-mean-square normalisation with a learned scale.
pub struct RmsNorm {
    weight: Var,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(p: &mut ParamBuilder, name: &str, width: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.ones(name, width)?, eps })
    }

    /// Normalises each row of `x` (`[tokens, width]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(self.weight.as_tensor())
    }
}

/// A SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`. Used for dense layers and every expert.
pub struct SwiGlu {
    pub(crate) gate: Var,
    pub(crate) up: Var,
    pub(crate) down: Var,
}

impl SwiGlu {
    pub(crate) fn new(
        p: &mut ParamBuilder,
        prefix: &str,
        width: usize,
        inner: usize,
    ) -> Result<Self> {
        Ok(Self {
            gate: p.normal(&format!("{prefix}.gate_proj.weight"), (inner, width))?,
            up: p.normal(&format!("{prefix}.up_proj.weight"), (inner, width))?,
            down: p.normal(&format!("{prefix}.down_proj.weight"), (width, inner))?,
        })
    }

    /// Applies the MLP to `[tokens, width]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (linear(x, &self.gate)?.silu()? * linear(x, &self.up)?)?;
        linear(&h, &self.down)
    }
}

/// Rotary position embedding tables (rotate-half layout, as in the Hugging Face Llama code).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for i in 0..half {
                let freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), device)?,
            sin: Tensor::from_vec(sin, (max_len, half), device)?,
        })
    }

    /// Rotates `x` shaped `[batch, heads, seq, head_dim]`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, seq, dim) = x.dims4()?;
        let half = dim / 2;
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    }
}

/// Causal multi-head self-attention with rotary positions.
pub struct Attention {
    q: Var,
    k: Var,
    v: Var,
    o: Var,
    heads: usize,
}

impl Attention {
    pub(crate) fn new(
        p: &mut ParamBuilder,
        prefix: &str,
        width: usize,
        heads: usize,
    ) -> Result<Self> {
        let w = |p: &mut ParamBuilder, n: &str| {
            p.normal(&format!("{prefix}.{n}_proj.weight"), (width, width))
        };
        Ok(Self { q: w(p, "q")?, k: w(p, "k")?, v: w(p, "v")?, o: w(p, "o")?, heads })
    }

    /// Attends within each of `batch` sequences of `seq` tokens; `x` is `[batch·seq, width]`.
    pub fn forward(&self, x: &Tensor, batch: usize, seq: usize, rope: &Rope) -> Result<Tensor> {
        let width = x.dim(1)?;
        let head_dim = width / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, seq, self.heads, head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = rope.apply(&split(linear(x, &self.q)?)?)?;
        let k = rope.apply(&split(linear(x, &self.k)?)?)?;
        let v = split(linear(x, &self.v)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(&causal_mask(seq, x.device())?)?;
        let out = softmax_last(&scores)?.matmul(&v)?;
        let out = out.transpose(1, 2)?.contiguous()?.reshape((batch * seq, width))?;
        linear(&out, &self.o)
    }
}

fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}

/// Mean cross-entropy of `logits` (`[tokens, vocab]`) against `targets` (`[tokens]`, u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.mean_all()
}

/// Zeros of shape `[rows, cols]` in f32.
pub fn zeros(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((rows, cols), DType::F32, device)
}
