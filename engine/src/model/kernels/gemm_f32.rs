//! A safe, bounds-checked f32 matrix product over strided views, so the hand-written expert
//! passes can multiply transposed operands and accumulate in place.
//!
//! On x86-64 CPUs with AVX-512F it runs our own kernel (`sgemm_avx512`); elsewhere the `gemm`
//! crate's (the kernel candle uses, which stops at AVX2 on a stable compiler). The crate's entry
//! point takes raw pointers and strides; every call is preceded by checks that each view stays
//! inside its slice.

/// A read-only `rows × cols` view of a slice with arbitrary (non-negative) strides.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix; panics when `data` holds fewer than `rows · cols` values.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "{rows}×{cols} matrix over {} values", data.len());
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn operand(self) -> super::sgemm_avx512::Operand<'a> {
        let (rows, cols, rs, cs) = (self.rows, self.cols, self.row_stride, self.col_stride);
        super::sgemm_avx512::Operand { data: self.data, rows, cols, rs, cs }
    }

    /// Whether every element `(r, c)` with `r < rows`, `c < cols` lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `dst` dense row-major
/// `lhs.rows × rhs.cols`. Single-threaded: callers parallelise over independent products.
pub fn matmul(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    product(dst, lhs, rhs, accumulate, true);
}

/// [`matmul`], with the AVX-512 kernel allowed or not (tests check both paths).
fn product(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, avx512: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ: {m}×{k} · {}×{n}", rhs.rows);
    assert_eq!(dst.len(), m * n, "destination holds {} values, product is {m}×{n}", dst.len());
    assert!(lhs.in_bounds() && rhs.in_bounds(), "matrix view outside its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512 && super::sgemm_avx512::available() {
        return super::sgemm_avx512::matmul(dst, lhs.operand(), rhs.operand(), accumulate);
    }
    let _ = avx512; // unused off x86-64
    let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: `dst` is exactly m·n dense row-major values (checked above), `lhs` and `rhs` are
    // m×k and k×n views whose last element lies inside their slices (`in_bounds`), strides are
    // non-negative, and `dst` is a unique borrow so it cannot alias either input. With
    // `read_dst == false` gemm ignores dst's old contents and alpha.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            stride(n),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_the_definition() {
        // a: 2×3, b: 2×4 stored row-major; compute aᵀ·b (3×4) through transposed views.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, -1.0, 2.0, 0.5, 1.0, 2.0, -2.0];
        let mut dst = vec![9.0; 12];
        matmul(&mut dst, MatRef::row_major(&a, 2, 3).t(), MatRef::row_major(&b, 2, 4), false);
        for i in 0..3 {
            for j in 0..4 {
                let want: f32 = (0..2).map(|r| a[r * 3 + i] * b[r * 4 + j]).sum();
                assert_eq!(dst[i * 4 + j], want, "({i},{j})");
            }
        }
        let before = dst.clone();
        matmul(&mut dst, MatRef::row_major(&a, 2, 3).t(), MatRef::row_major(&b, 2, 4), true);
        assert!(dst.iter().zip(&before).all(|(d, b)| *d == 2.0 * b));
    }

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Runs `product` on an `m×k · k×n` problem with each operand stored plain or transposed,
    /// overwriting or accumulating, and compares every element with a f64 dot product.
    fn check(
        product: fn(&mut [f32], MatRef<'_>, MatRef<'_>, bool),
        (m, k, n): (usize, usize, usize),
    ) {
        let (a, b) = (values(m as u64 * 31 + k as u64, m * k), values(n as u64 * 17 + 5, k * n));
        for (transpose_a, transpose_b, accumulate) in
            (0..8).map(|i| (i & 1 > 0, i & 2 > 0, i & 4 > 0))
        {
            let lhs = if transpose_a {
                MatRef::row_major(&a, k, m).t()
            } else {
                MatRef::row_major(&a, m, k)
            };
            let rhs = if transpose_b {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let start = values(7, m * n);
            let mut dst = start.clone();
            product(&mut dst, lhs, rhs, accumulate);
            let at =
                |v: &MatRef<'_>, r: usize, c: usize| v.data[r * v.row_stride + c * v.col_stride];
            for i in 0..m {
                for j in 0..n {
                    let terms =
                        (0..k).map(|p| f64::from(at(&lhs, i, p)) * f64::from(at(&rhs, p, j)));
                    let (sum, scale) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let base = if accumulate { f64::from(start[i * n + j]) } else { 0.0 };
                    let gap = (f64::from(dst[i * n + j]) - base - sum).abs();
                    assert!(
                        gap <= 1e-6 * (scale + 1.0) * (k as f64).sqrt(),
                        "{m}×{k}·{k}×{n} (ta {transpose_a}, tb {transpose_b}, acc {accumulate}) \
                         at ({i},{j}): {} vs {}",
                        dst[i * n + j],
                        base + sum
                    );
                }
            }
        }
    }

    /// Shapes around the AVX-512 kernel's tiles (12×32), depth block (256), row block (144) and
    /// column block (1024): multiples, one less and one more, k = 1, single rows and columns.
    const SHAPES: [(usize, usize, usize); 16] = [
        (1, 1, 1),
        (1, 7, 33),
        (3, 1, 5),
        (12, 256, 32),
        (11, 255, 31),
        (13, 257, 33),
        (25, 9, 64),
        (37, 24, 20),
        (40, 20, 24),
        (145, 3, 17),
        (144, 513, 16),
        (7, 40, 1025),
        (2, 600, 1),
        (1, 300, 2),
        (130, 64, 96),
        (20, 520, 48),
    ];

    #[test]
    fn products_match_a_reference_over_odd_shapes() {
        for shape in SHAPES {
            check(matmul, shape);
        }
    }

    /// The `gemm` crate path, used on CPUs without AVX-512F, is checked on every machine.
    #[test]
    fn fallback_matches_the_reference() {
        for shape in SHAPES {
            check(|d, l, r, acc| product(d, l, r, acc, false), shape);
        }
    }

    #[test]
    fn empty_products() {
        let a = values(1, 12);
        // k = 0: the product is zero; accumulating leaves dst as it was.
        let mut dst = vec![3.0; 6];
        matmul(&mut dst, MatRef::row_major(&a, 2, 0), MatRef::row_major(&a, 0, 3), true);
        assert!(dst.iter().all(|&v| v == 3.0));
        matmul(&mut dst, MatRef::row_major(&a, 2, 0), MatRef::row_major(&a, 0, 3), false);
        assert!(dst.iter().all(|&v| v == 0.0));
        // m = 0 or n = 0: nothing to write.
        let mut none: Vec<f32> = Vec::new();
        matmul(&mut none, MatRef::row_major(&a, 0, 4), MatRef::row_major(&a, 4, 3), false);
        matmul(&mut none, MatRef::row_major(&a, 3, 4).t(), MatRef::row_major(&a, 3, 0), true);
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn views_past_their_slice_are_refused() {
        let a = values(1, 5);
        let view = MatRef { data: &a, rows: 2, cols: 3, row_stride: 3, col_stride: 1 };
        matmul(&mut [0.0; 2], view, MatRef::row_major(&a, 3, 1), false);
    }

    /// GFLOP/s of both paths on the expert products' shapes (prints; run with
    /// `cargo test --release -p flotilla-engine --lib gemm_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing, prints figures"]
    fn gemm_throughput() {
        let (w, a, b) = (values(1, 2048 * 256), values(2, 2048 * 256), values(3, 2048 * 256));
        let mut c = vec![0f32; 2048 * 256];
        // (label, m, k, n, lhs transposed, rhs transposed) as expert_mix calls them.
        let cases = [
            ("x·Wᵀ 128", 128, 256, 256, false, true),
            ("dy·W 128", 128, 256, 256, false, false),
            ("dyᵀ·h 128", 256, 128, 256, true, false),
            ("x·Wᵀ 512", 512, 256, 256, false, true),
            ("x·Wᵀ 2048", 2048, 256, 256, false, true),
            ("dy·W 512", 512, 256, 256, false, false),
            ("dyᵀ·h 512", 256, 512, 256, true, false),
            ("dyᵀ·h 2048", 256, 2048, 256, true, false),
        ];
        for (label, m, k, n, ta, tb) in cases {
            let lhs =
                if ta { MatRef::row_major(&a, k, m).t() } else { MatRef::row_major(&a, m, k) };
            let rhs =
                if tb { MatRef::row_major(&b, n, k).t() } else { MatRef::row_major(&w, k, n) };
            for avx512 in [true, false] {
                // Best of 5 batches of 20, so a busy machine disturbs less.
                let mut batch = || {
                    let started = std::time::Instant::now();
                    for _ in 0..20 {
                        product(&mut c[..m * n], lhs, rhs, false, avx512);
                    }
                    started.elapsed().as_secs_f64() / 20.0
                };
                let secs = (0..5).map(|_| batch()).fold(f64::INFINITY, f64::min);
                let path = if avx512 { "avx512" } else { "gemm crate" };
                println!(
                    "{label:12} {path:10} {:6.1} GFLOP/s",
                    2.0 * (m * k * n) as f64 / secs / 1e9
                );
            }
        }
    }
}
