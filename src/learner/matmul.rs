//! Matrix products for the fused kernel, by the `gemm` crate: the only module of gradsift
//! with `unsafe` code.
//!
//! Why `gemm`: it picks AVX-512, AVX2+FMA or a portable micro-kernel at run time, takes
//! any row and column strides (so Wᵀ and aᵀ are read in place, never copied) and is
//! already compiled for burn-flex. On the 16 → 64 → 64 → 1 MLP at B = 256 it made the fused
//! kernel 4.4× faster than the hand loops it replaced (measured in `cargo bench --bench
//! scoring -- norms_and_grads`, see `fused.rs`). Its entry point takes raw pointers; the
//! one `unsafe` call below is sound because every slice is checked to cover the span that
//! `gemm` reads or writes for the given shape and strides, and `dst` is a unique borrow
//! that cannot alias the inputs. The tests here compare it with a naive triple loop in
//! every layout the kernel uses, on the path `gemm` picks on the machine running them
//! (AVX-512 on the development machine; the AVX2 and portable paths are not forced here).
#![allow(unsafe_code)]

/// How a matrix operand lies in its slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[rows, cols]` row-major.
    Rows,
    /// The transpose of a row-major `[cols, rows]` matrix, read in place.
    Transposed,
}

impl Layout {
    /// (row stride, column stride) of a `rows × cols` operand.
    fn strides(self, rows: usize, cols: usize) -> (isize, isize) {
        match self {
            Layout::Rows => (cols as isize, 1),
            Layout::Transposed => (1, rows as isize),
        }
    }
}

/// dst `[m, n]` (row-major) = lhs `[m, k]` · rhs `[k, n]`, added to dst when `accumulate`.
#[allow(clippy::too_many_arguments)] // a GEMM's shape, operands and layouts, no fewer
pub fn matmul(
    dst: &mut [f32],
    lhs: &[f32],
    lhs_layout: Layout,
    rhs: &[f32],
    rhs_layout: Layout,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "dst holds [{m}, {n}]");
    assert!(lhs.len() >= m * k, "lhs holds [{m}, {k}]");
    assert!(rhs.len() >= k * n, "rhs holds [{k}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let (lhs_rs, lhs_cs) = lhs_layout.strides(m, k);
    let (rhs_rs, rhs_cs) = rhs_layout.strides(k, n);
    // SAFETY: with these strides gemm touches lhs[0..m·k], rhs[0..k·n] and dst[0..m·n]
    // (the largest offset is (rows−1)·rs + (cols−1)·cs = rows·cols − 1 in both layouts),
    // all inside the slices checked above; `dst` is borrowed mutably, so it aliases neither
    // input; one thread (`Parallelism::None`), so nothing outlives the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
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

    fn at(v: &[f32], layout: Layout, rows: usize, cols: usize, r: usize, c: usize) -> f32 {
        match layout {
            Layout::Rows => v[r * cols + c],
            Layout::Transposed => v[c * rows + r],
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn matches_a_naive_product_in_every_layout() {
        use Layout::*;
        for (m, k, n) in [
            (256, 16, 64),
            (8, 64, 64),
            (3, 64, 1),
            (64, 256, 64),
            (1, 1, 1),
        ] {
            for (ll, rl) in [(Rows, Rows), (Rows, Transposed), (Transposed, Rows)] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                for accumulate in [false, true] {
                    let start = values(m * n, 3);
                    let mut dst = start.clone();
                    matmul(&mut dst, &a, ll, &b, rl, (m, k, n), accumulate);
                    for r in 0..m {
                        for c in 0..n {
                            let mut want = if accumulate { start[r * n + c] } else { 0.0 };
                            for p in 0..k {
                                want += at(&a, ll, m, k, r, p) * at(&b, rl, k, n, p, c);
                            }
                            let got = dst[r * n + c];
                            assert!(
                                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                "[{m},{k},{n}] {ll:?}·{rl:?} acc={accumulate} ({r},{c}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "rhs holds")]
    fn a_short_operand_is_refused_before_any_pointer_is_used() {
        let mut dst = vec![0.0; 4];
        matmul(
            &mut dst,
            &[1.0; 4],
            Layout::Rows,
            &[1.0; 3],
            Layout::Rows,
            (2, 2, 2),
            false,
        );
    }
}
