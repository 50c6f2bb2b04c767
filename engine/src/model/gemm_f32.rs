//! A safe, bounds-checked front for the `gemm` crate's f32 matrix product (the kernel candle uses),
//! so the hand-written expert passes can multiply strided views and accumulate in place.
//!
//! The crate's entry point takes raw pointers and strides; this is the only module of the engine
//! allowed `unsafe`, and every call is preceded by checks that each view stays inside its slice.
#![allow(unsafe_code)]

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
}
