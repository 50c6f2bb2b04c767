//! The experts of a MoE block (routed and shared) as one candle custom op with a hand-written
//! backward, which autograd's generic per-op gradients made about 3× slower than the forward.
//!
//! Slots (`token · top_k + k`) are sorted into one contiguous run per expert; each run gathers its
//! tokens once, keeps the gate and up pre-activations for the backward, and the routing weights
//! are applied in the same pass that scatters results back to tokens. SiLU·up and its derivative
//! are fused loops, weight gradients are written once per expert, and experts run in parallel on
//! `candle_core::utils::get_num_threads()` threads. The routing weights are an input of the op, so
//! the router keeps receiving gradients through them.
//!
//! The expert weights are read in place, not concatenated into one tensor (13 MB copied per step
//! at the bench's size, and candle's backward of the copy cost two more allocate-and-add passes
//! per weight). They
//! still need to be in the graph to receive gradients: a chain of [`WeightTap`] ops, each taking
//! one or two weights and passing on a one-value "carrier", feeds the mix's third input. The
//! mix's backward leaves every weight gradient in shared slots, and each tap's backward (candle
//! runs it after the mix's, as the tap is upstream) hands them to its weights.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::kernels::fused;
use super::kernels::gemm_f32::{MatRef, matmul};
use super::scratch::Scratch;

mod weight_tap;
mod work;

use weight_tap::{GradSlots, WeightTap};
use work::{cpu_f32, gather, in_parallel, split_mut, split_ref, storage_f32};

/// One expert: its weights are entries `3·index .. 3·index + 3` of the mix's weight list (gate
/// `[inner, width]`, up `[inner, width]`, down `[width, inner]`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExpertWeights {
    pub index: usize,
    pub inner: usize,
}

impl ExpertWeights {
    fn split<'a>(&self, weights: &[&'a [f32]]) -> [&'a [f32]; 3] {
        [weights[3 * self.index], weights[3 * self.index + 1], weights[3 * self.index + 2]]
    }
}

/// One expert's share of the work: the tokens it sees (`None`: all of them, the shared expert).
#[derive(Clone, Copy)]
struct Run<'a> {
    weights: ExpertWeights,
    /// Token row of each slot of the run, and the slot ids, in sorted order.
    rows: Option<(&'a [u32], &'a [u32])>,
    len: usize,
}

/// Intermediates kept from the forward for the backward.
struct Saved {
    /// Gate and up pre-activations, run after run (`len × inner` each).
    gate: Scratch,
    up: Scratch,
    /// Routed experts' outputs before weighting, `[slots, width]` in sorted order.
    routed_out: Scratch,
}

/// `Σ_k w[t,k] · expert_{e(t,k)}(x_t) + shared(x_t)` over inputs `(x [tokens, width],
/// weights [tokens, top_k], carrier)`, the carrier being the end of the [`WeightTap`] chain.
pub(crate) struct ExpertMix {
    width: usize,
    tokens: usize,
    top_k: usize,
    routed: Vec<ExpertWeights>,
    shared: Option<ExpertWeights>,
    /// The experts' weights (routed in order, then the shared one; gate, up, down each).
    weights: Vec<Tensor>,
    grads: GradSlots,
    /// Slot ids grouped by expert (stable); expert e owns `slots[starts[e]..starts[e + 1]]`.
    slots: Vec<u32>,
    rows: Vec<u32>,
    /// Inverse of `slots`: where each slot sits in the sorted order.
    positions: Vec<u32>,
    starts: Vec<usize>,
    threads: usize,
    saved: Mutex<Option<Saved>>,
}

impl ExpertMix {
    /// A mix for `chosen` (`[tokens, top_k]` expert ids) over `width`-wide tokens, and the
    /// carrier to pass as its third input: the weights tapped into the graph.
    pub(crate) fn new(
        chosen: &[u32],
        top_k: usize,
        width: usize,
        weights: Vec<Tensor>,
        shared: bool,
    ) -> Result<(Self, Tensor)> {
        let experts = weights
            .chunks(3)
            .enumerate()
            .map(|(index, w)| Ok(ExpertWeights { index, inner: w[0].dim(0)? }))
            .collect::<Result<Vec<_>>>()?;
        let (routed, shared) = match (shared, experts.split_last()) {
            (true, Some((&last, routed))) => (routed.to_vec(), Some(last)),
            _ => (experts, None),
        };
        let grads: GradSlots = Arc::new(Mutex::new(vec![None; weights.len()]));
        let device =
            weights.first().map(|w| w.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let mut carrier = Tensor::zeros(1, candle_core::DType::F32, &device)?;
        for (pair, first) in weights.chunks(2).zip((0..).step_by(2)) {
            let tap = WeightTap { grads: grads.clone(), first };
            carrier = match pair {
                [a, b] => carrier.apply_op3(a, b, tap)?,
                _ => carrier.apply_op2(&pair[0], tap)?,
            };
        }
        let mut starts = vec![0usize; routed.len() + 1];
        for &e in chosen {
            starts[e as usize + 1] += 1;
        }
        for e in 0..routed.len() {
            starts[e + 1] += starts[e];
        }
        let mut next = starts.clone();
        let mut slots = vec![0u32; chosen.len()];
        for (slot, &e) in chosen.iter().enumerate() {
            slots[next[e as usize]] = slot as u32;
            next[e as usize] += 1;
        }
        let rows = slots.iter().map(|&s| s / top_k as u32).collect();
        let mut positions = vec![0u32; slots.len()];
        for (j, &slot) in slots.iter().enumerate() {
            positions[slot as usize] = j as u32;
        }
        let mix = Self {
            width,
            tokens: chosen.len() / top_k,
            top_k,
            routed,
            shared,
            weights,
            grads,
            slots,
            rows,
            positions,
            starts,
            threads: candle_core::utils::get_num_threads().max(1),
            saved: Mutex::new(None),
        };
        Ok((mix, carrier))
    }

    /// Routed runs in expert order, then the shared expert.
    fn runs(&self) -> Vec<Run<'_>> {
        let mut runs: Vec<Run<'_>> = self
            .routed
            .iter()
            .enumerate()
            .map(|(e, &weights)| {
                let range = self.starts[e]..self.starts[e + 1];
                let rows = (&self.rows[range.clone()], &self.slots[range.clone()]);
                Run { weights, rows: Some(rows), len: range.len() }
            })
            .collect();
        if let Some(weights) = self.shared {
            runs.push(Run { weights, rows: None, len: self.tokens });
        }
        runs
    }

    fn forward(&self, x: &[f32], w: &[f32], params: &[&[f32]]) -> (Vec<f32>, Saved) {
        let d = self.width;
        let runs = self.runs();
        let act: Vec<usize> = runs.iter().map(|r| r.len * r.weights.inner).collect();
        let total: usize = act.iter().sum();
        // Every value of these is written by a product below (runs cover them back to back).
        let (mut gate, mut up) = (Scratch::reuse(total), Scratch::reuse(total));
        let mut routed_out = Scratch::reuse(self.slots.len() * d);
        let mut out = vec![0f32; self.tokens * d];
        let routed = &runs[..self.routed.len()];
        let mut outs = split_mut(&mut routed_out, routed.iter().map(|r| r.len * d));
        if self.shared.is_some() {
            outs.push(&mut out); // the shared expert writes straight into the output
        }
        let tasks = runs
            .iter()
            .zip(split_mut(&mut gate, act.iter().copied()))
            .zip(split_mut(&mut up, act.iter().copied()))
            .zip(outs)
            // An expert without weights (another rank's, under expert parallelism) still has
            // to write its zeros: it costs 1 per token, not 0.
            .map(|(((run, g), u), y)| (run.len * run.weights.inner.max(1), (run, g, u, y)))
            .collect();
        in_parallel(tasks, self.threads, |(run, g, u, y)| {
            self.forward_run(x, params, run, g, u, y)
        });
        // Scatter with the routing weights in one pass.
        self.add_slots(&mut out, &routed_out, Some(w));
        (out, Saved { gate, up, routed_out })
    }

    fn forward_run(
        &self,
        x: &[f32],
        params: &[&[f32]],
        run: &Run<'_>,
        g: &mut [f32],
        u: &mut [f32],
        y: &mut [f32],
    ) {
        let (n, d, inner) = (run.len, self.width, run.weights.inner);
        if n == 0 {
            return;
        }
        if inner == 0 {
            y.fill(0.0);
            return;
        }
        let gathered;
        let xs = match run.rows {
            Some((rows, _)) => {
                gathered = gather(x, rows, d);
                &gathered[..]
            }
            None => x,
        };
        let [wg, wu, wd] = run.weights.split(params);
        let xs = MatRef::row_major(xs, n, d);
        matmul(g, xs, MatRef::row_major(wg, inner, d).t(), false);
        matmul(u, xs, MatRef::row_major(wu, inner, d).t(), false);
        let mut h = Scratch::reuse(n * inner);
        fused::silu_mul(&mut h, g, u);
        matmul(y, MatRef::row_major(&h, n, inner), MatRef::row_major(wd, d, inner).t(), false);
    }

    /// Gradients of x, of the routing weights, and of each expert weight (in `weights` order).
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        params: &[&[f32]],
        grad: &[f32],
        saved: &Saved,
    ) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let d = self.width;
        let runs = self.runs();
        let act: Vec<usize> = runs.iter().map(|r| r.len * r.weights.inner).collect();
        // Zeros stay for experts no token chose.
        let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
        let mut dx = vec![0f32; self.tokens * d];
        // Written in full by the runs (products and the dw loop), so no zeroing needed.
        let mut dx_sorted = Scratch::reuse(self.slots.len() * d);
        let mut dw_sorted = Scratch::reuse(self.slots.len());
        let routed = &runs[..self.routed.len()];
        let mut dxs = split_mut(&mut dx_sorted, routed.iter().map(|r| r.len * d));
        let mut dws = split_mut(&mut dw_sorted, routed.iter().map(|r| r.len));
        if self.shared.is_some() {
            dxs.push(&mut dx); // the shared expert writes straight into dx, before the scatter
            dws.push(&mut []);
        }
        let outs = split_ref(&saved.routed_out, routed.iter().map(|r| r.len * d));
        let dps = dparams.chunks_mut(3); // runs are in weight order
        let tasks = runs
            .iter()
            .zip(split_ref(&saved.gate, act.iter().copied()))
            .zip(split_ref(&saved.up, act.iter().copied()))
            .zip(outs.into_iter().chain(std::iter::once(&[][..])))
            .zip(dps)
            .zip(dxs)
            .zip(dws)
            .map(|((((((run, g), u), y), dp), dx), dw)| {
                (run.len * run.weights.inner, BackwardRun { run, g, u, y, dp, dx, dw })
            })
            .collect();
        in_parallel(tasks, self.threads, |task| self.backward_run(x, w, params, grad, task));
        self.add_slots(&mut dx, &dx_sorted, None);
        let mut dw = vec![0f32; self.tokens * self.top_k];
        for (&slot, &v) in self.slots.iter().zip(dw_sorted.iter()) {
            dw[slot as usize] = v;
        }
        (dx, dw, dparams)
    }

    /// Adds to each token's row of `dst` its slots' rows of `sorted` (`[slots, width]` in sorted
    /// order), scaled by the routing weights `w` if given. Token rows are split over the threads,
    /// each gathering from its tokens' slots, so no two threads write the same row.
    fn add_slots(&self, dst: &mut [f32], sorted: &[f32], w: Option<&[f32]>) {
        const ROWS: usize = 64;
        let (d, top_k) = (self.width, self.top_k);
        let tasks = dst.chunks_mut(ROWS * d).enumerate().map(|(c, rows)| (rows.len(), (c, rows)));
        in_parallel(tasks.collect(), self.threads, |(c, rows)| {
            for (i, row) in rows.chunks_exact_mut(d).enumerate() {
                let token = c * ROWS + i;
                for slot in token * top_k..(token + 1) * top_k {
                    let j = self.positions[slot] as usize;
                    let weight = w.map_or(1.0, |w| w[slot]);
                    for (o, &v) in row.iter_mut().zip(&sorted[j * d..(j + 1) * d]) {
                        *o += weight * v;
                    }
                }
            }
        });
    }

    fn backward_run(&self, x: &[f32], w: &[f32], params: &[&[f32]], grad: &[f32], t: BackwardRun) {
        let BackwardRun { run, g, u, y, dp, dx, dw } = t;
        let (n, d, inner) = (run.len, self.width, run.weights.inner);
        if n == 0 {
            return;
        }
        let (gathered, dy_owned);
        let (xs, dy) = match run.rows {
            Some((rows, slots)) => {
                gathered = gather(x, rows, d);
                // dL/dw of a slot is ⟨dout_t, y_slot⟩; the expert sees dout_t scaled by w.
                let mut dy = Scratch::reuse(n * d);
                for (j, (&row, &slot)) in rows.iter().zip(slots).enumerate() {
                    let dout = &grad[row as usize * d..(row as usize + 1) * d];
                    let yj = &y[j * d..(j + 1) * d];
                    dw[j] = fused::dot(dout, yj);
                    let weight = w[slot as usize];
                    for (o, &g) in dy[j * d..(j + 1) * d].iter_mut().zip(dout) {
                        *o = weight * g;
                    }
                }
                dy_owned = dy;
                (&gathered[..], &dy_owned[..])
            }
            None => (x, grad),
        };
        let [wg, wu, wd] = run.weights.split(params);
        let [dwg, dwu, dwd] = dp else { unreachable!("three weights per expert") };
        let xs = MatRef::row_major(xs, n, d);
        let dy = MatRef::row_major(dy, n, d);
        let (mut sig, mut h) = (Scratch::reuse(n * inner), Scratch::reuse(n * inner));
        fused::silu_mul_keep(&mut sig, &mut h, g, u);
        matmul(dwd, dy.t(), MatRef::row_major(&h, n, inner), false);
        let mut dh = Scratch::reuse(n * inner);
        matmul(&mut dh, dy, MatRef::row_major(wd, d, inner), false);
        // Fused SiLU·up derivative: dh becomes d(gate), h becomes d(up).
        fused::silu_mul_grad(&mut dh, &mut h, g, u, &sig);
        let (dg, du) = (MatRef::row_major(&dh, n, inner), MatRef::row_major(&h, n, inner));
        matmul(dwg, dg.t(), xs, false);
        matmul(dwu, du.t(), xs, false);
        matmul(dx, dg, MatRef::row_major(wg, inner, d), false);
        matmul(dx, du, MatRef::row_major(wu, inner, d), true);
    }
}

struct BackwardRun<'a, 'b> {
    run: &'b Run<'a>,
    g: &'b [f32],
    u: &'b [f32],
    y: &'b [f32],
    dp: &'b mut [Vec<f32>],
    dx: &'b mut [f32],
    dw: &'b mut [f32],
}

impl CustomOp3 for ExpertMix {
    fn name(&self) -> &'static str {
        "moe-expert-mix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _carrier: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "x")?;
        let w = cpu_f32(s2, l2, "routing weights")?;
        let storages: Vec<_> = self.weights.iter().map(Tensor::storage_and_layout).collect();
        let params = storages
            .iter()
            .map(|(s, l)| storage_f32(s, l, "expert weight"))
            .collect::<Result<Vec<_>>>()?;
        self.check(x, w, &params)?;
        let (out, saved) = self.forward(x, w, &params);
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some(saved);
        Ok((CpuStorage::F32(out), Shape::from((self.tokens, self.width))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        carrier: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (xs, ws) = (storage_f32(&sx, lx, "x")?, storage_f32(&sw, lw, "w")?);
        let gs = storage_f32(&sg, lg, "output gradient")?;
        let storages: Vec<_> = self.weights.iter().map(Tensor::storage_and_layout).collect();
        let params = storages
            .iter()
            .map(|(s, l)| storage_f32(s, l, "expert weight"))
            .collect::<Result<Vec<_>>>()?;
        let saved = self.saved.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let saved = saved.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("moe-expert-mix: backward before forward".into())
        })?;
        let (dx, dw, dparams) = self.backward(xs, ws, &params, gs, saved);
        let device = x.device();
        let mut slots =
            self.grads.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        for ((slot, dp), weight) in slots.iter_mut().zip(dparams).zip(&self.weights) {
            *slot = Some(Tensor::from_vec(dp, weight.shape(), device)?);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dw, w.shape(), device)?),
            Some(carrier.zeros_like()?),
        ))
    }
}

impl ExpertMix {
    fn check(&self, x: &[f32], w: &[f32], params: &[&[f32]]) -> Result<()> {
        let d = self.width;
        let weights_fit = self
            .routed
            .iter()
            .chain(&self.shared)
            .all(|e| e.split(params).iter().all(|p| p.len() == e.inner * d));
        if x.len() != self.tokens * d || w.len() != self.tokens * self.top_k || !weights_fit {
            candle_core::bail!(
                "moe-expert-mix: expected x {}×{d}, weights {}×{}, experts' weights \
                 inner×{d}; got {}, {} values",
                self.tokens,
                self.tokens,
                self.top_k,
                x.len(),
                w.len(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::config::EngineConfig;
    use crate::model::standalone_moe_block;
    use crate::rng::normal_init;

    /// Largest `|a − b|` over two tensors, relative to the reference's largest magnitude.
    fn relative_gap(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
    }

    /// The hand-written experts give the autograd reference's output and every gradient (input,
    /// router, routed and shared expert weights), including an expert no token picks.
    #[test]
    fn hand_written_experts_match_autograd() {
        let mut config = EngineConfig::preset("tiny").expect("tiny").model;
        config.hidden_size = 24;
        config.moe_intermediate_size = 20; // ≠ width, so a swapped stride cannot pass
        config.num_shared_experts = 2; // shared inner 40, different from the routed experts
        config.experts_per_token = 3;
        config.init_std = 0.3;
        let device = Device::Cpu;
        let (mut block, params) = standalone_moe_block(&config, 5, &device).unwrap();
        block.bias = normal_init(6, "bias", 8, 0.05);
        block.bias[7] = -10.0; // never chosen: its gradients must be zero, not missing values
        let tokens = 37;
        let x = Tensor::from_vec(normal_init(7, "x", tokens * 24, 1.0), (tokens, 24), &device);
        let x = Var::from_tensor(&x.unwrap()).unwrap();
        let probe =
            Tensor::from_vec(normal_init(8, "probe", tokens * 24, 1.0), (tokens, 24), &device)
                .unwrap();
        let fast = block.forward(x.as_tensor(), tokens, false).unwrap().0;
        let reference = block.experts_autograd(x.as_tensor()).unwrap();
        assert!(relative_gap(&fast, &reference) < 1e-4, "outputs differ");
        let fast_grads = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let ref_grads = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = params.iter().map(|(n, v)| (n.as_str(), v)).chain([("x", &x)]);
        for (name, var) in vars {
            let zero = var.zeros_like().unwrap();
            let want = ref_grads.get(var.as_tensor()).unwrap_or(&zero);
            let got = fast_grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: none"));
            let gap = relative_gap(got, want);
            assert!(gap < 1e-4, "{name}: gradients differ by {gap}");
            if name.ends_with("gate.weight") && !name.contains("experts") {
                assert!(relative_gap(&zero, got) > 0.0, "router gradient is zero");
            }
        }
    }
}
