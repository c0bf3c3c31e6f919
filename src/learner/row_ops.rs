//! Row-wise passes of the fused kernel: the ReLU, its mask in the backward pass, and each
//! row's squared norm, which the ghost norm ‖∇_i‖² = Σ_k (‖a_k,i‖² + 1)·‖g_k,i‖² is made of.
//!
//! Why a module of its own: the squared norms, taken in a separate pass over the batch,
//! cost 7 µs of a 64 µs exact-norm pass at B = 256, because each row's sum ended in a chain
//! of dependent scalar additions and the pass read 270 kB back from L2. Here, when the caller
//! asks for them, they are taken inside the ReLU and mask passes while each value is in a
//! register, and 16 rows' sums are reduced together (one 16 × 16 transposing add tree instead
//! of 16 horizontal sums). Without the sums, the passes are the plain loops.
//!
//! The AVX-512 path is the second module of gradsift with `unsafe` code (after
//! [`super::matmul`]): its loads and stores take their pointers from slices of exactly 16
//! values, or from a shorter tail under a mask of its length (masked-off lanes are not
//! touched), and it runs only where the CPU reports AVX-512F. The tests hold it to the plain
//! loops on widths that are and are not multiples of 16 and on row counts with a tail.
#![allow(unsafe_code)]

use super::matmul::has_avx512f;

/// a = max(z, 0) over `[n, d]` row-major; with `sq`, also sq\[i\] = ‖a_i‖².
pub fn relu(z: &[f32], a: &mut [f32], d: usize, sq: Option<&mut [f32]>) {
    assert_eq!(z.len(), a.len(), "z and a are the same shape");
    match sq {
        None => relu_plain(z, a),
        Some(sq) => {
            assert_eq!(sq.len() * d, z.len(), "one squared norm per row");
            #[cfg(target_arch = "x86_64")]
            if has_avx512f() {
                // SAFETY: AVX-512F is present (checked just above).
                unsafe { avx512::relu_sq(z, a, d, sq) };
                return;
            }
            relu_plain(z, a);
            sq_rows_plain(a, d, sq);
        }
    }
}

/// g ⊙= 1\[z > 0\] over `[n, d]`; with `sq`, also sq\[i\] = ‖g_i‖² after the mask.
pub fn relu_mask(z: &[f32], g: &mut [f32], d: usize, sq: Option<&mut [f32]>) {
    assert_eq!(z.len(), g.len(), "z and g are the same shape");
    match sq {
        None => relu_mask_plain(z, g),
        Some(sq) => {
            assert_eq!(sq.len() * d, z.len(), "one squared norm per row");
            #[cfg(target_arch = "x86_64")]
            if has_avx512f() {
                // SAFETY: AVX-512F is present (checked just above).
                unsafe { avx512::relu_mask_sq(z, g, d, sq) };
                return;
            }
            relu_mask_plain(z, g);
            sq_rows_plain(g, d, sq);
        }
    }
}

/// sq\[i\] = ‖x_i‖² for `x` `[n, d]` row-major.
pub fn sq_rows(x: &[f32], d: usize, sq: &mut [f32]) {
    assert_eq!(sq.len() * d, x.len(), "one squared norm per row");
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F is present (checked just above).
        unsafe { avx512::sq_rows(x, d, sq) };
        return;
    }
    sq_rows_plain(x, d, sq);
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn relu_plain(z: &[f32], a: &mut [f32]) {
    for (a, &z) in a.iter_mut().zip(z) {
        *a = z.max(0.0);
    }
}

/// Branch-free (after a ReLU about half the units are off, at random).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn relu_mask_plain(z: &[f32], g: &mut [f32]) {
    for (g, &z) in g.iter_mut().zip(z) {
        *g *= f32::from(u8::from(z > 0.0));
    }
}

/// Each row's Σ x² in 8 partial sums (vectorisable without reassociation).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn sq_rows_plain(x: &[f32], d: usize, sq: &mut [f32]) {
    if d == 0 {
        sq.fill(0.0);
        return;
    }
    for (s, row) in sq.iter_mut().zip(x.chunks_exact(d)) {
        let mut acc = [0f32; 8];
        let (chunks, rest) = row.as_chunks::<8>();
        for c in chunks {
            for j in 0..8 {
                acc[j] += c[j] * c[j];
            }
        }
        *s = acc.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The AVX-512 form of [`super::relu`] with the squared norms.
    #[target_feature(enable = "avx512f")]
    pub fn relu_sq(z: &[f32], a: &mut [f32], d: usize, sq: &mut [f32]) {
        let zero = _mm512_setzero_ps();
        by_rows(sq, |r| {
            let (zr, ar) = (&z[r * d..(r + 1) * d], &mut a[r * d..(r + 1) * d]);
            let (zc, zt) = zr.as_chunks::<16>();
            let (ac, at) = ar.as_chunks_mut::<16>();
            let mut acc = zero;
            for (zc, ac) in zc.iter().zip(ac) {
                let x = _mm512_max_ps(load(zc), zero);
                store(ac, x);
                acc = _mm512_fmadd_ps(x, x, acc);
            }
            if !zt.is_empty() {
                let m = tail_mask(zt.len());
                let x = _mm512_max_ps(load_tail(zt, m), zero);
                store_tail(at, m, x);
                acc = _mm512_fmadd_ps(x, x, acc);
            }
            acc
        });
    }

    /// The AVX-512 form of [`super::relu_mask`] with the squared norms: g times 1 or 0, as
    /// the plain loop does (a NaN in g stays a NaN, for the divergence check).
    #[target_feature(enable = "avx512f")]
    pub fn relu_mask_sq(z: &[f32], g: &mut [f32], d: usize, sq: &mut [f32]) {
        let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
        let masked = |z: __m512, g: __m512| {
            let on = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, zero);
            _mm512_mul_ps(g, _mm512_maskz_mov_ps(on, one))
        };
        by_rows(sq, |r| {
            let (zr, gr) = (&z[r * d..(r + 1) * d], &mut g[r * d..(r + 1) * d]);
            let (zc, zt) = zr.as_chunks::<16>();
            let (gc, gt) = gr.as_chunks_mut::<16>();
            let mut acc = zero;
            for (zc, gc) in zc.iter().zip(gc) {
                let x = masked(load(zc), load(gc));
                store(gc, x);
                acc = _mm512_fmadd_ps(x, x, acc);
            }
            if !zt.is_empty() {
                let m = tail_mask(zt.len());
                let x = masked(load_tail(zt, m), load_tail(gt, m));
                store_tail(gt, m, x);
                acc = _mm512_fmadd_ps(x, x, acc);
            }
            acc
        });
    }

    /// The AVX-512 form of [`super::sq_rows`].
    #[target_feature(enable = "avx512f")]
    pub fn sq_rows(x: &[f32], d: usize, sq: &mut [f32]) {
        by_rows(sq, |r| {
            let (xc, xt) = x[r * d..(r + 1) * d].as_chunks::<16>();
            let mut acc = _mm512_setzero_ps();
            for c in xc {
                let v = load(c);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            if !xt.is_empty() {
                let v = load_tail(xt, tail_mask(xt.len()));
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            acc
        });
    }

    /// Calls `row(r)` for every row, in blocks of 16, and writes the sum of each returned
    /// vector's lanes to sq\[r\].
    #[target_feature(enable = "avx512f")]
    fn by_rows(sq: &mut [f32], mut row: impl FnMut(usize) -> __m512) {
        let mut blocks = sq.chunks_exact_mut(16);
        let mut r0 = 0;
        for out in &mut blocks {
            // Slot q holds row 4·(q % 4) + q / 4: the add tree's lane p then sums row p.
            let v: [__m512; 16] = std::array::from_fn(|q| row(r0 + 4 * (q % 4) + q / 4));
            let out: &mut [f32; 16] = out.try_into().expect("a block of 16");
            store(out, sum_lanes_16(&v));
            r0 += 16;
        }
        for (r, s) in blocks.into_remainder().iter_mut().enumerate() {
            *s = _mm512_reduce_add_ps(row(r0 + r));
        }
    }

    /// Lane p of the result is the sum of the 16 lanes of v\[4·(p % 4) + p / 4\]: three
    /// rounds of shuffles and adds (8 + 4 + 2 + 1 additions) instead of 16 horizontal sums.
    #[target_feature(enable = "avx512f")]
    fn sum_lanes_16(v: &[__m512; 16]) -> __m512 {
        // 128-bit lanes: (a0 + a2, a1 + a3, b0 + b2, b1 + b3) for each pair (a, b).
        let t: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            _mm512_add_ps(lo, hi)
        });
        // 128-bit lane L of u[i]: four partial sums of v[4i + L].
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (t[2 * i], t[2 * i + 1]);
            let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            _mm512_add_ps(even, odd)
        });
        // Within each 128-bit lane L, element e becomes the sum of u[e]'s lane L.
        let s01 = _mm512_add_ps(
            _mm512_unpacklo_ps(u[0], u[1]),
            _mm512_unpackhi_ps(u[0], u[1]),
        );
        let s23 = _mm512_add_ps(
            _mm512_unpacklo_ps(u[2], u[3]),
            _mm512_unpackhi_ps(u[2], u[3]),
        );
        let lo = _mm512_shuffle_ps::<0b01_00_01_00>(s01, s23);
        let hi = _mm512_shuffle_ps::<0b11_10_11_10>(s01, s23);
        _mm512_add_ps(lo, hi)
    }

    fn tail_mask(len: usize) -> __mmask16 {
        debug_assert!(len < 16);
        ((1u32 << len) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    fn load(x: &[f32; 16]) -> __m512 {
        // SAFETY: x is 16 readable f32 values.
        unsafe { _mm512_loadu_ps(x.as_ptr()) }
    }

    #[target_feature(enable = "avx512f")]
    fn store(x: &mut [f32; 16], v: __m512) {
        // SAFETY: x is 16 writable f32 values.
        unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
    }

    /// The first `x.len()` lanes from x (m = tail_mask(x.len())), zero elsewhere.
    #[target_feature(enable = "avx512f")]
    fn load_tail(x: &[f32], m: __mmask16) -> __m512 {
        assert_eq!(m, tail_mask(x.len()));
        // SAFETY: the mask covers x.len() lanes; masked-off lanes are neither read nor fault.
        unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr()) }
    }

    #[target_feature(enable = "avx512f")]
    fn store_tail(x: &mut [f32], m: __mmask16, v: __m512) {
        assert_eq!(m, tail_mask(x.len()));
        // SAFETY: as in load_tail; masked-off lanes are not written.
        unsafe { _mm512_mask_storeu_ps(x.as_mut_ptr(), m, v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let tol = 1e-5 * x.abs().max(y.abs()).max(1.0);
            assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Every width and row count the blocks and tails can meet, against the plain loops; the
    /// values themselves (a, masked g) must be the same to the bit.
    #[test]
    fn row_passes_with_norms_match_the_plain_loops() {
        eprintln!("row_ops: AVX-512 path exercised: {}", has_avx512f());
        for d in [1, 5, 16, 17, 40, 64, 71] {
            for n in [0, 1, 15, 16, 17, 33, 256] {
                let z = values(n * d, (d * 1000 + n) as u32);
                let g0 = values(n * d, (d * 7 + n) as u32 + 1);
                let (mut a, mut a_ref) = (vec![0.0; n * d], vec![0.0; n * d]);
                let (mut sq, mut sq_ref) = (vec![f32::NAN; n], vec![0.0; n]);
                relu(&z, &mut a, d, Some(&mut sq));
                relu_plain(&z, &mut a_ref);
                sq_rows_plain(&a_ref, d, &mut sq_ref);
                assert_eq!(a, a_ref, "relu d {d} n {n}");
                close(&sq, &sq_ref, &format!("relu sq d {d} n {n}"));

                let (mut g, mut g_ref) = (g0.clone(), g0.clone());
                relu_mask(&z, &mut g, d, Some(&mut sq));
                relu_mask_plain(&z, &mut g_ref);
                sq_rows_plain(&g_ref, d, &mut sq_ref);
                assert_eq!(g, g_ref, "mask d {d} n {n}");
                close(&sq, &sq_ref, &format!("mask sq d {d} n {n}"));

                sq_rows(&g0, d, &mut sq);
                sq_rows_plain(&g0, d, &mut sq_ref);
                close(&sq, &sq_ref, &format!("sq_rows d {d} n {n}"));
                let naive: Vec<f32> = g0
                    .chunks_exact(d)
                    .map(|r| r.iter().map(|v| v * v).sum())
                    .collect();
                close(&sq, &naive, &format!("sq_rows vs naive d {d} n {n}"));
            }
        }
    }

    #[test]
    fn a_nan_gradient_survives_the_mask() {
        let z = vec![1.0, -1.0, 2.0, -2.0];
        let mut g = vec![f32::NAN, 1.0, 3.0, f32::NAN];
        let mut sq = vec![0.0; 2];
        relu_mask(&z, &mut g, 2, Some(&mut sq));
        assert!(g[0].is_nan() && g[3].is_nan(), "{g:?}");
        assert_eq!((g[1], g[2]), (0.0, 3.0));
        assert!(sq[0].is_nan() && sq[1].is_nan(), "{sq:?}");
    }
}
