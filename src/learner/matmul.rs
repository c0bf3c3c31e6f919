//! Matrix products for the fused kernel, by the `gemm` crate, and a transpose: one of the
//! two modules of gradsift with `unsafe` code (the other is [`super::row_ops`]).
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
//!
//! The transpose's AVX-512 path (16 × 16 blocks in registers) is the other `unsafe` part:
//! its loads and stores are checked against the slices' lengths and it runs only where the
//! CPU reports AVX-512F. It is tested against a plain loop; measured in the learner
//! (`cargo bench --bench scoring -- "learner_core_B8|peers_B8"`, see `fused.rs`).
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
    if k == 1 && !accumulate {
        outer(&mut dst[..m * n], &lhs[..m], &rhs[..n]);
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

/// dst `[m, n]` = a bᵀ, a product of one term per entry (a `[m, 1]` or `[1, m]` operand lies the
/// same in either layout). Why: the backward pass through a one-output layer is such a
/// product, and `gemm`'s set-up (dispatch, blocking, a thread-local workspace) is most of
/// its cost at 8-24 rows: `perf` on the 10 M-row Milan stream, the backward pass 19.1% →
/// 18.4% of the learner thread's samples. Each entry is the one rounded product `gemm`
/// computes too.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn outer(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for (row, &ai) in dst.chunks_exact_mut(b.len()).zip(a) {
        for (d, &bj) in row.iter_mut().zip(b) {
            *d = ai * bj;
        }
    }
}

/// Whether [`transpose`] of a `[rows, cols]` matrix takes the AVX-512 path: both sides a
/// multiple of 16 and the CPU has AVX-512F. Elsewhere it is a plain loop, slower than the
/// packing that `gemm` does on its own when handed a transposed operand.
pub fn fast_transpose(rows: usize, cols: usize) -> bool {
    rows.is_multiple_of(16) && cols.is_multiple_of(16) && has_avx512f()
}

/// Whether this CPU has AVX-512F (the kernels' fast paths check it at run time).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_avx512f() -> bool {
    false
}

/// dst `[cols, rows]` = srcᵀ, for a row-major src `[rows, cols]`. Why: `gemm` reads a
/// product's left operand in columns, and repacks a row-major one on every call; for the
/// backward pass's g·Wᵀ at a micro-batch of 8-24 rows that repacking of a 64 × 64 W cost
/// more than the product. A copy of Wᵀ made once per optimiser step costs less.
pub fn transpose(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32]) {
    assert!(src.len() >= rows * cols, "src holds [{rows}, {cols}]");
    assert!(dst.len() >= rows * cols, "dst holds [{cols}, {rows}]");
    #[cfg(target_arch = "x86_64")]
    if fast_transpose(rows, cols) {
        // SAFETY: AVX-512F is present (checked at run time just above), both sides are
        // multiples of 16 and both slices hold rows·cols values (asserted above).
        unsafe { transpose_avx512(src, rows, cols, dst) };
        return;
    }
    transpose_plain(src, rows, cols, dst);
}

fn transpose_plain(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (i, row) in src[..rows * cols].chunks_exact(cols).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            dst[j * rows + i] = x;
        }
    }
}

/// 16 × 16 blocks, each transposed in registers by the usual four rounds of shuffles
/// (pairs of rows, of 64-bit pairs, then of 128-bit lanes twice).
///
/// # Safety
/// The CPU must have AVX-512F; `rows` and `cols` multiples of 16; both slices at least
/// `rows · cols` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for i0 in (0..rows).step_by(16) {
        for j0 in (0..cols).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (t, v) in r.iter_mut().enumerate() {
                // SAFETY: row i0 + t < rows, columns j0..j0 + 16 ≤ cols: inside src.
                *v = unsafe { _mm512_loadu_ps(s.add((i0 + t) * cols + j0)) };
            }
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for b in (0..16).step_by(4) {
                let pd = |x: __m512| _mm512_castps_pd(x);
                r[b] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[b]), pd(t[b + 2])));
                r[b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[b]), pd(t[b + 2])));
                r[b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[b + 1]), pd(t[b + 3])));
                r[b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[b + 1]), pd(t[b + 3])));
            }
            for b in [0, 8] {
                for j in 0..4 {
                    t[b + j] = _mm512_shuffle_f32x4::<0x88>(r[b + j], r[b + j + 4]);
                    t[b + j + 4] = _mm512_shuffle_f32x4::<0xdd>(r[b + j], r[b + j + 4]);
                }
            }
            for j in 0..8 {
                r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
                r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[j + 8]);
            }
            for (c, v) in r.iter().enumerate() {
                // SAFETY: dst row j0 + c < cols, columns i0..i0 + 16 ≤ rows: inside dst.
                unsafe { _mm512_storeu_ps(d.add((j0 + c) * rows + i0), *v) };
            }
        }
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
    fn outer_products_equal_gemm_s() {
        use Layout::{Rows, Transposed};
        // The same values to the bit (a zero's sign aside) as the gemm path they replace.
        for m in [1, 2, 3, 4, 7, 8, 16, 24, 64] {
            for n in [1, 5, 16, 64] {
                for (ll, rl) in [(Rows, Rows), (Rows, Transposed), (Transposed, Rows)] {
                    let (a, b) = (values(m, 5), values(n, 6));
                    // Accumulating onto zeros takes gemm's path: 0 + a·b is a·b.
                    let mut want = vec![0.0; m * n];
                    matmul(&mut want, &a, ll, &b, rl, (m, 1, n), true);
                    let mut got = vec![f32::NAN; m * n];
                    matmul(&mut got, &a, ll, &b, rl, (m, 1, n), false);
                    assert_eq!(got, want, "[{m}, 1, {n}] {ll:?}·{rl:?}");
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
    #[test]
    fn transposes_match_a_plain_loop_on_every_path() {
        for (rows, cols) in [(64, 64), (16, 48), (32, 16), (64, 1), (3, 5), (16, 16)] {
            let src = values(rows * cols, 4);
            let mut got = vec![f32::NAN; rows * cols];
            transpose(&src, (rows, cols), &mut got);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        got[j * rows + i],
                        src[i * cols + j],
                        "[{rows}, {cols}] ({i}, {j})"
                    );
                }
            }
        }
        // Which path the square cases took on this machine, so a run says what it tested.
        eprintln!(
            "transpose: AVX-512 path {}",
            if fast_transpose(64, 64) {
                "tested"
            } else {
                "not available here (plain loop tested)"
            }
        );
    }
}
