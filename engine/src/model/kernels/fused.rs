//! The experts' element-wise passes (SiLU·up, its derivative, dot products), written as plain
//! loops LLVM vectorises, and compiled twice: for the baseline target and, picked at run time,
//! for AVX-512F (16 lanes instead of 4).
//!
//! Scalar `f32::exp` is a libm call per element and kept these passes at ~15% of a training step;
//! [`exp`] is a branch-free polynomial that vectorises, accurate to a few ulp.

/// Runs `$body` (a call to an `#[inline(always)]` function) in a copy compiled for AVX-512F when
/// the CPU has it, else as compiled for the baseline.
macro_rules! dispatch {
    ($name:ident ($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if crate::model::avx512_kernels() {
                    // SAFETY: `wide` only needs AVX-512F, which `avx512_kernels` checked the CPU
                    // has.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(silu_mul(h: &mut [f32], g: &[f32], u: &[f32]) -> () = silu_mul_body);
dispatch!(silu_mul_keep(sig: &mut [f32], h: &mut [f32], g: &[f32], u: &[f32]) -> () = silu_mul_keep_body);
dispatch!(silu_mul_grad(dh: &mut [f32], h: &mut [f32], g: &[f32], u: &[f32], sig: &[f32]) -> () = silu_mul_grad_body);
dispatch!(dot(a: &[f32], b: &[f32]) -> f32 = dot_body);

/// `e^x` for f32: `2^n · e^r` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and a degree-6
/// Taylor polynomial for `e^r` (truncation error below 2e-7 relative). Inputs are clamped to
/// [-87, 88], where `2^n` is a normal f32, so results saturate instead of overflowing.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `n · LN2_HI` is exact for the |n| ≤ 127 used here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2^23 rounds to the nearest integer n, which then sits in the low mantissa
    // bits: `shifted.to_bits() == SHIFTER.to_bits() + n`. (An `as i32` cast would not vectorise.)
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let biased = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `h = silu(g) · u`.
#[inline(always)]
fn silu_mul_body(h: &mut [f32], g: &[f32], u: &[f32]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *h = g * sigmoid(g) * u;
    }
}

/// `sig = σ(g)`, `h = silu(g) · u`.
#[inline(always)]
fn silu_mul_keep_body(sig: &mut [f32], h: &mut [f32], g: &[f32], u: &[f32]) {
    for (((s, h), &g), &u) in sig.iter_mut().zip(h.iter_mut()).zip(g).zip(u) {
        *s = sigmoid(g);
        *h = g * *s * u;
    }
}

/// From `dh = dL/dh` for `h = g·σ(g)·u`: `h ← dL/du = dh · g · σ`, `dh ← dL/dg =
/// dh · u · σ · (1 + g · (1 − σ))`.
#[inline(always)]
fn silu_mul_grad_body(dh: &mut [f32], h: &mut [f32], g: &[f32], u: &[f32], sig: &[f32]) {
    for ((((dh, h), &g), &u), &s) in dh.iter_mut().zip(h.iter_mut()).zip(g).zip(u).zip(sig) {
        *h = *dh * g * s;
        *dh *= u * s * (1.0 + g * (1.0 - s));
    }
}

/// `Σ a_i · b_i`, summed in 16 interleaved partial sums (a fixed order LLVM can vectorise; a
/// single running f32 sum it may not reorder).
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm_and_saturates() {
        let mut worst = 0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    #[test]
    fn passes_match_their_definitions() {
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let u: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let sig_ref: Vec<f32> = g.iter().map(|&g| 1.0 / (1.0 + (-g).exp())).collect();
        let (mut sig, mut h, mut h2) = (vec![0.0; 37], vec![0.0; 37], vec![0.0; 37]);
        silu_mul_keep(&mut sig, &mut h, &g, &u);
        silu_mul(&mut h2, &g, &u);
        for i in 0..37 {
            assert!((sig[i] - sig_ref[i]).abs() < 1e-6);
            let want = g[i] * sig_ref[i] * u[i];
            assert!((h[i] - want).abs() <= 1e-5 * (1.0 + want.abs()), "{i}: {} vs {want}", h[i]);
            assert_eq!(h[i], h2[i]);
        }
        let mut dh: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let upstream = dh.clone();
        silu_mul_grad(&mut dh, &mut h, &g, &u, &sig);
        for i in 0..37 {
            let (s, g, u) = (sig[i], g[i], u[i]);
            assert!((h[i] - upstream[i] * g * s).abs() < 1e-5);
            assert!((dh[i] - upstream[i] * u * s * (1.0 + g * (1.0 - s))).abs() < 1e-5);
        }
        let want: f32 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
        assert!((dot(&g, &u) - want).abs() < 1e-4);
        assert_eq!(dot(&[], &[]), 0.0);
    }

    /// The baseline copies (what CPUs without AVX-512F run) give the same values.
    #[test]
    fn baseline_copies_agree() {
        let g: Vec<f32> = (0..53).map(|i| (i as f32 - 26.0) * 0.9).collect();
        let u: Vec<f32> = (0..53).map(|i| (i as f32 * 0.29).cos()).collect();
        let (mut s1, mut h1, mut s2, mut h2) =
            (vec![0.0; 53], vec![0.0; 53], vec![0.0; 53], vec![0.0; 53]);
        silu_mul_keep(&mut s1, &mut h1, &g, &u);
        silu_mul_keep_body(&mut s2, &mut h2, &g, &u);
        assert_eq!((&s1, &h1), (&s2, &h2));
        silu_mul_body(&mut h2, &g, &u);
        assert_eq!(h1, h2);
        let (mut d1, mut d2) = (u.clone(), u.clone());
        silu_mul_grad(&mut d1, &mut h1, &g, &u, &s1);
        silu_mul_grad_body(&mut d2, &mut h2, &g, &u, &s2);
        assert_eq!((&d1, &h1), (&d2, &h2));
        assert!((dot(&g, &u) - dot_body(&g, &u)).abs() < 1e-5);
    }
}
