//! A fused CPU kernel for the learner's hot path (issue 11, first part): the MLP's forward
//! pass, the per-sample output gradients, the exact per-sample gradient norms and the
//! row-weighted parameter gradient, on contiguous f32 buffers that are reused from step to
//! step (no allocation once the largest batch has been seen).
//!
//! It computes what `model.rs` computes through burn ([`trace`](super::model::trace),
//! [`backward_deltas`](super::model::backward_deltas), [`sq_norms`](super::model::sq_norms),
//! [`weighted_grads`](super::model::weighted_grads)) and is checked against burn in the
//! tests; burn stays the reference. Why: at the shipped micro-batch of 8 rows burn's
//! per-operation overhead, not arithmetic, is the cost (issue 11's table).
//!
//! Where it stands (`cargo bench --bench scoring -- norms_and_grads`, 16 → 64 → 64 → 1, one
//! run, this 2-core machine): at B = 8 it takes 12.5 µs against burn-flex's 45.2 µs (3.6×
//! faster); at B = 256, 409 µs against 249 µs (1.6× *slower*). The inner loops are plain
//! safe Rust over contiguous rows, compiled for AVX-512, for AVX2+FMA and for baseline
//! x86-64 and picked at run time (the `multiversion` crate: an attribute, no `unsafe` in this
//! crate), but without register blocking they are bound by loads and stores of the output
//! rows. So it is not yet selectable as a backend and the learner still trains through
//! burn. Next: register-blocked inner products (or a GEMM crate), the Adam update, and the
//! learner wiring (issue 11).

use super::model::{DenseParams, Head, to_vec};

/// An MLP's weights as plain row-major buffers, with scratch space for one batch.
pub struct FusedMlp {
    head: Head,
    /// Per layer, W as `[d_in, d_out]` row-major (burn's layout: z = a·W + b).
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
    /// `widths[k]` is the input width of layer k; the last entry is the output width.
    widths: Vec<usize>,
    /// Rows in the current batch.
    n: usize,
    /// a_k, the input of layer k, `[n, widths[k]]` (a_0 is the batch itself).
    acts: Vec<Vec<f32>>,
    /// z_k, the pre-activation output of layer k, `[n, widths[k + 1]]`.
    pre: Vec<Vec<f32>>,
    /// g_k = dℓ_i/dz_k, `[n, widths[k + 1]]`.
    deltas: Vec<Vec<f32>>,
}

impl FusedMlp {
    /// The kernel's copy of burn parameters (one entry per layer, as `Mlp::dense_params`).
    pub fn from_dense(params: &[DenseParams], head: Head) -> Self {
        let mut widths = Vec::with_capacity(params.len() + 1);
        let mut weights = Vec::with_capacity(params.len());
        let mut biases = Vec::with_capacity(params.len());
        for p in params {
            let [d_in, _] = p.weight.dims();
            widths.push(d_in);
            weights.push(to_vec(p.weight.clone()));
            biases.push(to_vec(p.bias.clone()));
        }
        widths.push(biases.last().map_or(0, Vec::len));
        let depth = params.len();
        FusedMlp {
            head,
            weights,
            biases,
            widths,
            n: 0,
            acts: vec![Vec::new(); depth],
            pre: vec![Vec::new(); depth],
            deltas: vec![Vec::new(); depth],
        }
    }

    fn depth(&self) -> usize {
        self.weights.len()
    }

    /// Forward pass over `n` rows of `x` (`[n, inputs]` row-major), keeping what the backward
    /// pass needs. Returns the model output, `[n, outputs]`.
    pub fn forward(&mut self, x: &[f32], n: usize) -> &[f32] {
        assert_eq!(x.len(), n * self.widths[0], "x is [n, inputs]");
        self.n = n;
        let last = self.depth() - 1;
        resize(&mut self.acts[0], x.len());
        self.acts[0].copy_from_slice(x);
        for k in 0..=last {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            resize(&mut self.pre[k], n * d_out);
            affine(
                &self.acts[k],
                &self.weights[k],
                &self.biases[k],
                d_in,
                d_out,
                &mut self.pre[k],
            );
            if k < last {
                let (pre, acts) = (&self.pre[k], &mut self.acts[k + 1]);
                resize(acts, pre.len());
                for (a, &z) in acts.iter_mut().zip(pre) {
                    *a = z.max(0.0);
                }
            }
        }
        &self.pre[last]
    }

    /// The per-sample output gradients of the last forward pass against targets `y` (values,
    /// or class indices as f32), back-propagated through every layer.
    pub fn backward(&mut self, y: &[f32]) {
        let (n, last) = (self.n, self.depth() - 1);
        let k_out = self.widths[last + 1];
        assert_eq!(y.len(), n, "one target per row");
        resize(&mut self.deltas[last], n * k_out);
        output_grad(self.head, &self.pre[last], y, k_out, &mut self.deltas[last]);
        for k in (1..=last).rev() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            let (lower, upper) = self.deltas.split_at_mut(k);
            let g_below = &mut lower[k - 1];
            resize(g_below, n * d_in);
            back_through_relu(
                &upper[0],
                &self.weights[k],
                &self.pre[k - 1],
                d_in,
                d_out,
                g_below,
            );
        }
    }

    /// Squared per-sample gradient norm over all parameters, s_i² = Σ_k (‖a_k,i‖² + 1)·‖g_k,i‖²
    /// (the ghost norm), for the rows of the last backward pass.
    pub fn sq_norms(&self, out: &mut [f32]) {
        let n = self.n;
        assert_eq!(out.len(), n);
        out.fill(0.0);
        for k in 0..self.depth() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            for (i, s) in out.iter_mut().enumerate() {
                let a = &self.acts[k][i * d_in..(i + 1) * d_in];
                let g = &self.deltas[k][i * d_out..(i + 1) * d_out];
                *s += (dot(a, a) + 1.0) * dot(g, g);
            }
        }
    }

    /// Gradient of Σ_i w_i ℓ_i for every layer, into `grads` (`[d_in·d_out]` weights and
    /// `[d_out]` biases per layer, overwritten): dW_k = a_kᵀ·(w ⊙ g_k), db_k = Σ_i w_i g_k,i.
    pub fn weighted_grads(&self, w: &[f32], grads: &mut [(Vec<f32>, Vec<f32>)]) {
        let n = self.n;
        assert_eq!(w.len(), n);
        assert_eq!(grads.len(), self.depth());
        for (k, (gw, gb)) in grads.iter_mut().enumerate() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            resize(gw, d_in * d_out);
            resize(gb, d_out);
            weighted_outer(&self.acts[k], &self.deltas[k], w, d_in, d_out, gw, gb);
        }
    }
}

/// g_{k-1} = (g_k · W_kᵀ) ⊙ 1[z_{k-1} > 0], row by row; branch-free, as after a ReLU about
/// half the units are off, at random.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn back_through_relu(
    g_above: &[f32],
    w: &[f32],
    z: &[f32],
    d_in: usize,
    d_out: usize,
    out: &mut [f32],
) {
    for ((g, zr), o) in g_above
        .chunks_exact(d_out)
        .zip(z.chunks_exact(d_in))
        .zip(out.chunks_exact_mut(d_in))
    {
        for ((oi, &zp), wr) in o.iter_mut().zip(zr).zip(w.chunks_exact(d_out)) {
            let on = f32::from(u8::from(zp > 0.0));
            *oi = on * dot(g, wr);
        }
    }
}

/// dW = aᵀ·(w ⊙ g), db = Σ_i w_i g_i (overwritten).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn weighted_outer(
    a: &[f32],
    g: &[f32],
    w: &[f32],
    d_in: usize,
    d_out: usize,
    gw: &mut [f32],
    gb: &mut [f32],
) {
    gw.fill(0.0);
    gb.fill(0.0);
    for ((ar, gr), &wi) in a.chunks_exact(d_in).zip(g.chunks_exact(d_out)).zip(w) {
        if wi == 0.0 {
            continue; // an unselected row (weights are 0 or 1 mostly, so well predicted)
        }
        axpy(wi, gr, gb);
        for (&ap, row) in ar.iter().zip(gw.chunks_exact_mut(d_out)) {
            axpy(wi * ap, gr, row);
        }
    }
}

fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() != len {
        v.resize(len, 0.0);
    }
}

/// z = a·W + b for `[n, d_in]` a and `[d_in, d_out]` W, row by row: each row is a sum of
/// W's rows scaled by a's entries (contiguous, vectorisable).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn affine(a: &[f32], w: &[f32], b: &[f32], d_in: usize, d_out: usize, z: &mut [f32]) {
    for (row, zr) in a.chunks_exact(d_in).zip(z.chunks_exact_mut(d_out)) {
        zr.copy_from_slice(b);
        // No skipping of zero inputs: after a ReLU they fall at random, and a mispredicted
        // branch costs more than the row it would skip.
        for (&ap, wr) in row.iter().zip(w.chunks_exact(d_out)) {
            axpy(ap, wr, zr);
        }
    }
}

/// y += a·x
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Σ x_i y_i, in 8 partial sums (vectorisable without reassociation).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for j in 0..8 {
            acc[j] += a[j] * b[j];
        }
    }
    let tail: f32 = xr.iter().zip(yr).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

/// g_L: 2(ŷ − y) for squared error, softmax(z) − onehot(y) for cross-entropy.
fn output_grad(head: Head, out: &[f32], y: &[f32], k: usize, g: &mut [f32]) {
    match head {
        Head::Regression => {
            for ((gi, &o), &t) in g.iter_mut().zip(out).zip(y) {
                *gi = 2.0 * (o - t);
            }
        }
        Head::Classification { classes } => {
            for ((zr, gr), &t) in out.chunks_exact(k).zip(g.chunks_exact_mut(k)).zip(y) {
                let m = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (gi, &z) in gr.iter_mut().zip(zr) {
                    *gi = (z - m).exp();
                    sum += *gi;
                }
                for gi in gr.iter_mut() {
                    *gi /= sum;
                }
                let c = (t as usize).min(classes - 1);
                gr[c] -= 1.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::model::{
        Mlp, backward_deltas, matrix, naive_sq_norms, output_grad as burn_output_grad, sq_norms,
        target_tensor, trace, weighted_grads,
    };
    use burn::tensor::Device;

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{what}[{i}]: fused {x} vs burn {y} (scale {scale})"
            );
        }
    }

    /// Deterministic pseudo-random values in [-2, 2) (no RNG crate needed).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn check(head: Head, inputs: usize, hidden: &[usize], n: usize) {
        let device = Device::default();
        let mlp = Mlp::new(inputs, hidden, head, &device);
        let params = mlp.dense_params();
        let x = values(n * inputs, 1);
        let y: Vec<f32> = match head {
            Head::Regression => values(n, 2),
            Head::Classification { classes } => (0..n).map(|i| (i % classes) as f32).collect(),
        };
        let w: Vec<f32> = values(n, 3).iter().map(|v| v.abs()).collect();

        let tr = trace(&params, matrix(x.clone(), n, inputs, &device));
        let target = target_tensor(head, &y, &device);
        let g_out = burn_output_grad(head, tr.output(), target);
        let deltas = backward_deltas(&params, &tr, g_out);
        let want_norms = to_vec(sq_norms(&tr.inputs, &deltas));
        let want_grads = weighted_grads(&tr.inputs, &deltas, matrix(w.clone(), n, 1, &device));

        let mut f = FusedMlp::from_dense(&params, head);
        let out = f.forward(&x, n).to_vec();
        close(&out, &to_vec(tr.output()), "output");
        f.backward(&y);
        let mut norms = vec![0.0; n];
        f.sq_norms(&mut norms);
        close(&norms, &want_norms, "sq_norms");
        if n <= 8 {
            // And against one burn autodiff backward per sample.
            let naive = naive_sq_norms(&params, head, &x, &y);
            close(&norms, &naive, "sq_norms vs one backward per sample");
        }
        let mut grads = vec![(Vec::new(), Vec::new()); params.len()];
        f.weighted_grads(&w, &mut grads);
        for (k, ((gw, gb), (ww, wb))) in grads.iter().zip(want_grads).enumerate() {
            close(gw, &to_vec(ww), &format!("dW{k}"));
            close(gb, &to_vec(wb), &format!("db{k}"));
        }
    }

    #[test]
    fn matches_burn_on_a_regression_mlp() {
        check(Head::Regression, 16, &[64, 64], 256);
        check(Head::Regression, 16, &[64, 64], 8);
        check(Head::Regression, 5, &[33], 3);
    }

    #[test]
    fn matches_burn_on_a_classification_mlp() {
        check(Head::Classification { classes: 64 }, 5, &[64, 64], 256);
        check(Head::Classification { classes: 7 }, 9, &[17, 5], 8);
    }

    #[test]
    fn a_smaller_batch_after_a_larger_reuses_the_buffers_correctly() {
        let device = Device::default();
        let head = Head::Regression;
        let params = Mlp::new(4, &[8], head, &device).dense_params();
        let mut f = FusedMlp::from_dense(&params, head);
        f.forward(&values(40, 5), 10);
        let x = values(12, 6);
        let out = f.forward(&x, 3).to_vec();
        let want = to_vec(trace(&params, matrix(x, 3, 4, &device)).output());
        close(&out, &want, "output after a larger batch");
    }
}
