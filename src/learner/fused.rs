//! A fused CPU kernel for the learner's hot path: the MLP's forward pass, the per-sample
//! output gradients, the exact per-sample gradient norms, the row-weighted parameter
//! gradient and the Adam update, on contiguous f32 buffers that are reused from step to step
//! (no allocation once the largest batch has been seen). `model.backend = "fused"`.
//!
//! It computes what `model.rs` computes through burn ([`trace`](super::model::trace),
//! [`backward_deltas`](super::model::backward_deltas), [`sq_norms`](super::model::sq_norms),
//! [`weighted_grads`](super::model::weighted_grads), burn's Adam) and the tests check it
//! against burn; burn stays the reference and the way to other devices. Why: at the shipped
//! micro-batch of 8 rows burn's per-operation overhead, not arithmetic, is the cost.
//!
//! The three matrix products per layer go to [`super::matmul`] (the `gemm` crate, AVX-512 /
//! AVX2+FMA / portable, chosen at run time); the ReLU, its mask and the rows' squared norms
//! to [`super::row_ops`] (which takes the ghost norm's parts inside the ReLU passes when
//! [`FusedMlp::track_norms`] asks for them); the other row-wise loops (output gradients,
//! Adam) are plain safe Rust compiled for AVX-512, AVX2+FMA and baseline x86-64 by the
//! `multiversion` attribute and picked at run time.
//!
//! Measured (`cargo bench --bench scoring -- "norms_and_grads|peers"`, one core, 16 → 64 →
//! 64 → 1, 2026-11-30): forward + per-sample backward + ghost norms + weighted gradient
//! 4.4 µs at B = 8 and 89 µs at B = 256, against burn-flex's 30 and 183 µs; B = 8 costs 1.6× its 8/256 share
//! of B = 256. At small batches the backward pass reads a copy of Wᵀ made once per optimiser
//! step instead of letting gemm repack W on every call: 3.6 against 4.8 µs at B = 8
//! (2026-12-01, criterion's paired change −24%), 1.2× its 8/256 share.

use serde::{Deserialize, Serialize};

use super::matmul::{Layout, fast_transpose, matmul, transpose};
use super::model::{DenseParams, Head, SavedLayer, to_vec};
use super::row_ops::{relu, relu_mask, sq_rows};

/// An MLP's weights as plain row-major buffers, with scratch space for one batch.
pub struct FusedMlp {
    head: Head,
    /// Per layer, W as `[d_in, d_out]` row-major (burn's layout: z = a·W + b).
    weights: Vec<Vec<f32>>,
    /// Per layer, Wᵀ as `[d_out, d_in]` for the backward pass, where [`fast_transpose`]
    /// applies (empty elsewhere); rebuilt after the weights change.
    transposed: Vec<Vec<f32>>,
    /// Whether `transposed` is the transpose of the weights as they are now.
    transposed_fresh: bool,
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
    /// w ⊙ g_k for the weight gradient.
    scaled: Vec<f32>,
    /// ℓ_i of the last output gradient.
    losses: Vec<f32>,
    /// Whether the next forward pass and those that follow it take each row's ‖a_k‖² and
    /// ‖g_k‖² (see [`Self::track_norms`]).
    track_next: bool,
    /// Whether the current pass takes them (fixed by its forward pass, so that rows appended
    /// by [`Self::forward_more`] are treated as the rows already there).
    tracked: bool,
    /// ‖a_k,i‖² per layer, `[n]`, taken by the forward pass when norms are tracked.
    act_sq: Vec<Vec<f32>>,
    /// ‖g_k,i‖² per layer, `[n]`, taken by the backward pass when norms are tracked.
    delta_sq: Vec<Vec<f32>>,
}

impl FusedMlp {
    /// The kernel's copy of burn parameters (one entry per layer, as `Mlp::dense_params`).
    pub fn from_dense(params: &[DenseParams], head: Head) -> Self {
        let layers = params
            .iter()
            .map(|p| (to_vec(p.weight.clone()), to_vec(p.bias.clone())))
            .collect();
        Self::from_layers(layers, head)
    }

    /// The weights of a checkpoint (or of a freshly initialised burn model).
    pub fn from_saved(saved: &[SavedLayer], head: Head) -> Self {
        let layers = saved
            .iter()
            .map(|s| (s.weight.clone(), s.bias.clone()))
            .collect();
        Self::from_layers(layers, head)
    }

    fn from_layers(layers: Vec<(Vec<f32>, Vec<f32>)>, head: Head) -> Self {
        let depth = layers.len();
        let mut widths: Vec<usize> = layers.iter().map(|(w, b)| w.len() / b.len()).collect();
        widths.push(layers.last().map_or(0, |(_, b)| b.len()));
        let (weights, biases) = layers.into_iter().unzip();
        FusedMlp {
            head,
            weights,
            transposed: vec![Vec::new(); depth],
            transposed_fresh: false,
            biases,
            widths,
            n: 0,
            acts: vec![Vec::new(); depth],
            pre: vec![Vec::new(); depth],
            deltas: vec![Vec::new(); depth],
            scaled: Vec::new(),
            losses: Vec::new(),
            track_next: false,
            tracked: false,
            act_sq: vec![Vec::new(); depth],
            delta_sq: vec![Vec::new(); depth],
        }
    }

    /// Overwrites `saved`'s numbers with these weights (shapes and parameter ids kept).
    pub fn save_into(&self, saved: &mut [SavedLayer]) {
        for ((s, w), b) in saved.iter_mut().zip(&self.weights).zip(&self.biases) {
            s.weight.copy_from_slice(w);
            s.bias.copy_from_slice(b);
        }
    }

    pub fn depth(&self) -> usize {
        self.weights.len()
    }

    /// θ ← keep·θ + (1 − keep)·θ_live, weights and biases (a running average of `live`'s).
    pub fn average_toward(&mut self, live: &FusedMlp, keep: f32) {
        let lerp = |a: &mut [f32], b: &[f32]| {
            for (x, y) in a.iter_mut().zip(b) {
                *x = keep * *x + (1.0 - keep) * y;
            }
        };
        for (a, b) in self.weights.iter_mut().zip(&live.weights) {
            lerp(a, b);
        }
        for (a, b) in self.biases.iter_mut().zip(&live.biases) {
            lerp(a, b);
        }
        self.transposed_fresh = false;
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// Layer widths, `inputs → … → outputs`.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Rows of the last pass (fewer after [`Self::keep_rows`]).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Whether the passes from the next forward pass on also take each row's squared
    /// activation and gradient norms, the parts of [`Self::sq_norms`]. Why: taken inside the
    /// ReLU passes while the values are in registers, they cost a fraction of a separate pass
    /// over the batch (see [`super::row_ops`]). Off, [`Self::sq_norms`] makes that pass.
    pub fn track_norms(&mut self, on: bool) {
        self.track_next = on;
    }

    /// Forward pass over `n` rows of `x` (`[n, inputs]` row-major), keeping what the backward
    /// pass needs. Returns the model output, `[n, outputs]`.
    pub fn forward(&mut self, x: &[f32], n: usize) -> &[f32] {
        assert_eq!(x.len(), n * self.widths[0], "x is [n, inputs]");
        self.n = n;
        self.tracked = self.track_next;
        let last = self.depth() - 1;
        resize(&mut self.acts[0], x.len());
        self.acts[0].copy_from_slice(x);
        if self.tracked {
            resize(&mut self.act_sq[0], n);
            sq_rows(x, self.widths[0], &mut self.act_sq[0]);
        }
        for k in 0..=last {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            resize(&mut self.pre[k], n * d_out);
            let z = &mut self.pre[k];
            for row in z.chunks_exact_mut(d_out) {
                row.copy_from_slice(&self.biases[k]);
            }
            let (a, w) = (&self.acts[k], &self.weights[k]);
            matmul(z, a, Layout::Rows, w, Layout::Rows, (n, d_in, d_out), true);
            if k < last {
                let (pre, acts) = (&self.pre[k], &mut self.acts[k + 1]);
                resize(acts, pre.len());
                let sq = self.tracked.then(|| {
                    resize(&mut self.act_sq[k + 1], n);
                    &mut self.act_sq[k + 1][..]
                });
                relu(pre, acts, d_out, sq);
            }
        }
        &self.pre[last]
    }

    /// Appends `m` rows (`x`, `[m, inputs]`) to the last forward pass, as if it had been over
    /// all of them: a row's activations do not depend on the other rows, so the rows already
    /// there are not forwarded again. Why: a micro-batch selected whole is decided on its
    /// fresh rows' pass, and only a kept one goes on to its replayed rows.
    pub fn forward_more(&mut self, x: &[f32], m: usize) {
        assert_eq!(x.len(), m * self.widths[0], "x is [m, inputs]");
        let (n0, last) = (self.n, self.depth() - 1);
        self.n = n0 + m;
        let extend = |v: &mut Vec<f32>, d: usize| {
            v.truncate(n0 * d);
            v.resize((n0 + m) * d, 0.0);
        };
        extend(&mut self.acts[0], self.widths[0]);
        self.acts[0][n0 * self.widths[0]..].copy_from_slice(x);
        if self.tracked {
            extend(&mut self.act_sq[0], 1);
            sq_rows(x, self.widths[0], &mut self.act_sq[0][n0..]);
        }
        for k in 0..=last {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            extend(&mut self.pre[k], d_out);
            let z = &mut self.pre[k][n0 * d_out..];
            for row in z.chunks_exact_mut(d_out) {
                row.copy_from_slice(&self.biases[k]);
            }
            let (a, w) = (&self.acts[k][n0 * d_in..], &self.weights[k]);
            matmul(z, a, Layout::Rows, w, Layout::Rows, (m, d_in, d_out), true);
            if k < last {
                extend(&mut self.acts[k + 1], d_out);
                let (pre, acts) = (&self.pre[k], &mut self.acts[k + 1]);
                let sq = self.tracked.then(|| {
                    extend(&mut self.act_sq[k + 1], 1);
                    &mut self.act_sq[k + 1][n0..]
                });
                relu(&pre[n0 * d_out..], &mut acts[n0 * d_out..], d_out, sq);
            }
        }
    }

    /// The model output of the last forward pass, `[n, outputs]`.
    pub fn output(&self) -> &[f32] {
        &self.pre[self.depth() - 1][..self.n * self.widths[self.depth()]]
    }

    /// g_L = dℓ_i/dz_L of the last forward pass against targets `y` (values, or class
    /// indices as f32), and each row's loss ℓ_i ([`Self::losses`]), from the same softmax.
    pub fn output_grads(&mut self, y: &[f32]) {
        let (n, last) = (self.n, self.depth() - 1);
        let k_out = self.widths[last + 1];
        assert_eq!(y.len(), n, "one target per row");
        resize(&mut self.deltas[last], n * k_out);
        resize(&mut self.losses, n);
        let (out, g) = (&self.pre[last], &mut self.deltas[last]);
        output_grad(self.head, out, y, k_out, g, &mut self.losses);
        if self.tracked {
            resize(&mut self.delta_sq[last], n);
            sq_rows(&self.deltas[last], k_out, &mut self.delta_sq[last]);
        }
    }

    /// Per-sample losses of the last [`Self::output_grads`].
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// The last layer's g_L, `[n, outputs]` (after [`Self::output_grads`]).
    pub fn output_deltas(&self) -> &[f32] {
        &self.deltas[self.depth() - 1]
    }

    /// Back-propagates g_L through every hidden layer (after [`Self::output_grads`]).
    pub fn backward_hidden(&mut self) {
        let (n, last) = (self.n, self.depth() - 1);
        // Past a few dozen rows gemm's repacking of W is paid back by the product's length:
        // at 256 rows the two ways differed by less than this machine's run-to-run spread
        // (three alternating criterion runs of `learner_core_B256` and `peers_B256`, ±10%),
        // so the copy is kept to the small batches where it measured −24%.
        let use_transposed = n <= TRANSPOSED_ROWS;
        if use_transposed {
            self.refresh_transposed();
        }
        for k in (1..=last).rev() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            let (lower, upper) = self.deltas.split_at_mut(k);
            let g_below = &mut lower[k - 1];
            resize(g_below, n * d_in);
            // g_{k-1} = (g_k · W_kᵀ) ⊙ 1[z_{k-1} > 0], from the copy of Wᵀ where there is one,
            // else with Wᵀ read in place (gemm repacks it).
            let wt = &self.transposed[k];
            let (rhs, layout) = if use_transposed && !wt.is_empty() {
                (wt, Layout::Rows)
            } else {
                (&self.weights[k], Layout::Transposed)
            };
            let dims = (n, d_out, d_in);
            matmul(g_below, &upper[0], Layout::Rows, rhs, layout, dims, false);
            let sq = self.tracked.then(|| {
                resize(&mut self.delta_sq[k - 1], n);
                &mut self.delta_sq[k - 1][..]
            });
            relu_mask(&self.pre[k - 1], g_below, d_in, sq);
        }
    }

    /// The per-sample output gradients of the last forward pass against targets `y`,
    /// back-propagated through every layer.
    pub fn backward(&mut self, y: &[f32]) {
        self.output_grads(y);
        self.backward_hidden();
    }

    /// Restricts the last pass to some of its rows (ascending), compacting every buffer a
    /// later backward or weight gradient reads; `with_hidden_deltas` when the hidden g_k are
    /// already there (after [`Self::backward_hidden`]).
    pub fn keep_rows(&mut self, rows: &[usize], with_hidden_deltas: bool) {
        let last = self.depth() - 1;
        for k in 0..=last {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            compact(&mut self.acts[k], d_in, rows);
            compact(&mut self.pre[k], d_out, rows);
            if k == last || with_hidden_deltas {
                compact(&mut self.deltas[k], d_out, rows);
            }
            if self.tracked {
                compact(&mut self.act_sq[k], 1, rows);
                if k == last || with_hidden_deltas {
                    compact(&mut self.delta_sq[k], 1, rows);
                }
            }
        }
        self.n = rows.len();
    }

    /// Squared per-sample gradient norm over all parameters, s_i² = Σ_k (‖a_k,i‖² + 1)·‖g_k,i‖²
    /// (the ghost norm), for the rows of the last backward pass.
    pub fn sq_norms(&mut self, out: &mut [f32]) {
        self.ghost_norms(0, out);
    }

    /// Squared norm of the last layer's per-sample gradient only (the `last_layer` proxy),
    /// after [`Self::output_grads`].
    pub fn last_layer_sq_norms(&mut self, out: &mut [f32]) {
        self.ghost_norms(self.depth() - 1, out);
    }

    /// Σ over layers `from..` of (‖a_k,i‖² + 1)·‖g_k,i‖², from the norms the passes took
    /// when tracked, else from a pass over the activations and gradients now.
    fn ghost_norms(&mut self, from: usize, out: &mut [f32]) {
        let n = self.n;
        assert_eq!(out.len(), n);
        out.fill(0.0);
        for k in from..self.depth() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            if !self.tracked {
                resize(&mut self.act_sq[k], n);
                sq_rows(&self.acts[k][..n * d_in], d_in, &mut self.act_sq[k]);
                resize(&mut self.delta_sq[k], n);
                sq_rows(&self.deltas[k][..n * d_out], d_out, &mut self.delta_sq[k]);
            }
            add_ghost_norms(&self.act_sq[k][..n], &self.delta_sq[k][..n], out);
        }
    }

    /// Gradient of Σ_i w_i ℓ_i for every layer, into `grads` (`[d_in·d_out]` weights and
    /// `[d_out]` biases per layer, overwritten): dW_k = a_kᵀ·(w ⊙ g_k), db_k = Σ_i w_i g_k,i.
    pub fn weighted_grads(&mut self, w: &[f32], grads: &mut [(Vec<f32>, Vec<f32>)]) {
        let n = self.n;
        assert_eq!(w.len(), n);
        assert_eq!(grads.len(), self.depth());
        for (k, (gw, gb)) in grads.iter_mut().enumerate() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            resize(gw, d_in * d_out);
            resize(gb, d_out);
            resize(&mut self.scaled, n * d_out);
            scale_rows(&self.deltas[k], w, d_out, &mut self.scaled, gb);
            // aᵀ is read in place.
            let (a, s) = (&self.acts[k], &self.scaled);
            matmul(
                gw,
                a,
                Layout::Transposed,
                s,
                Layout::Rows,
                (d_in, n, d_out),
                false,
            );
        }
    }

    /// The parameters as (weights, bias) slices per layer, for the optimiser.
    fn params_mut(&mut self) -> impl Iterator<Item = (&mut Vec<f32>, &mut Vec<f32>)> {
        self.transposed_fresh = false;
        self.weights.iter_mut().zip(self.biases.iter_mut())
    }

    /// Makes `transposed` the transpose of the current weights, for the layers a backward
    /// pass goes through (not the first) where the fast transpose applies.
    fn refresh_transposed(&mut self) {
        if self.transposed_fresh {
            return;
        }
        for k in 1..self.depth() {
            let (d_in, d_out) = (self.widths[k], self.widths[k + 1]);
            if fast_transpose(d_in, d_out) {
                resize(&mut self.transposed[k], d_in * d_out);
                transpose(&self.weights[k], (d_in, d_out), &mut self.transposed[k]);
            }
        }
        self.transposed_fresh = true;
    }
}

/// Largest batch whose backward pass reads the copy of Wᵀ rather than W in place.
const TRANSPOSED_ROWS: usize = 64;

/// burn's Adam (β₁ 0.9, β₂ 0.999, ε 1e-5, bias-corrected as burn does) on the kernel's
/// buffers; its state is what a checkpoint keeps for the `fused` backend.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FusedAdam {
    /// Steps taken.
    pub time: u64,
    /// Per layer: first and second moments of the weights, then of the bias.
    pub moments: Vec<[Vec<f32>; 4]>,
}

const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

impl FusedAdam {
    /// One update of `mlp` with the gradient `grads` (as [`FusedMlp::weighted_grads`] gives).
    pub fn step(&mut self, mlp: &mut FusedMlp, grads: &[(Vec<f32>, Vec<f32>)], lr: f64) {
        if self.moments.len() != grads.len() {
            self.moments = grads
                .iter()
                .map(|(w, b)| {
                    [
                        vec![0.0; w.len()],
                        vec![0.0; w.len()],
                        vec![0.0; b.len()],
                        vec![0.0; b.len()],
                    ]
                })
                .collect();
            self.time = 0;
        }
        self.time += 1;
        let (bc2, factor) = bias_corrections(self.time);
        let (lr, eps) = (lr as f32, EPSILON * bc2);
        for (((w, b), (gw, gb)), [mw, vw, mb, vb]) in
            mlp.params_mut().zip(grads).zip(&mut self.moments)
        {
            adam(w, gw, mw, vw, lr, factor, eps);
            adam(b, gb, mb, vb, lr, factor, eps);
        }
    }
}

/// Adam's √(1 − β₂ᵗ) and √(1 − β₂ᵗ) / (1 − β₁ᵗ) at step `t`. From 2¹⁷ steps on both powers
/// are 0 in f32 (`powi` squares β: 0.999^(2¹⁷) ≈ 1e-57 and 0.9^(2¹⁰) ≈ 1.4e-47 round to 0, and a
/// larger t multiplies one of them in), so the corrections are exactly 1 and the two `powi`
/// calls (0.6% of the learner thread's CPU on a 10 M-row Milan run) are skipped.
fn bias_corrections(t: u64) -> (f32, f32) {
    if t >= 1 << 17 {
        return (1.0, 1.0);
    }
    let t = t as i32;
    let bc2 = (1.0 - BETA_2.powi(t)).sqrt();
    (bc2, bc2 / (1.0 - BETA_1.powi(t)))
}

/// θ −= lr · m̂ / (√v̂ + ε), in burn's arrangement of the bias corrections. Moments below
/// f32's smallest normal are flushed to zero: a parameter whose gradient stays at zero (a
/// dead ReLU unit) lets its moments decay geometrically into subnormals, and arithmetic on
/// subnormals is two orders of magnitude slower on x86 (measured: this update took 44% of
/// the learner's CPU time before the flush). Below 1.2e-38 a moment changes no update.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, factor: f32, eps: f32) {
    let flush = |x: f32| if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x };
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = flush(BETA_1 * *m + (1.0 - BETA_1) * g);
        *v = flush(BETA_2 * *v + (1.0 - BETA_2) * g * g);
        *p -= lr * (*m * factor / (v.sqrt() + eps));
    }
}

/// out_i += (‖a_i‖² + 1)·‖g_i‖² for one layer, from the rows' squared norms.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn add_ghost_norms(a_sq: &[f32], g_sq: &[f32], out: &mut [f32]) {
    for ((s, &a), &g) in out.iter_mut().zip(a_sq).zip(g_sq) {
        *s += (a + 1.0) * g;
    }
}

/// s_i = w_i·g_i row by row, and their column sums into `colsum` (the bias gradient).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn scale_rows(g: &[f32], w: &[f32], d: usize, s: &mut [f32], colsum: &mut [f32]) {
    colsum.fill(0.0);
    for ((gr, sr), &wi) in g.chunks_exact(d).zip(s.chunks_exact_mut(d)).zip(w) {
        for ((si, &gi), c) in sr.iter_mut().zip(gr).zip(colsum.iter_mut()) {
            *si = wi * gi;
            *c += *si;
        }
    }
}

/// Whether every entry of a gradient is finite (a NaN or ±inf makes the sum non-finite);
/// summed in 16 lanes so that it vectorises.
pub fn all_finite(grads: &[(Vec<f32>, Vec<f32>)]) -> bool {
    grads
        .iter()
        .map(|(w, b)| lane_sum(w) + lane_sum(b))
        .sum::<f32>()
        .is_finite()
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Keeps the listed rows (ascending) of a `[_, d]` row-major buffer, in place.
fn compact(v: &mut Vec<f32>, d: usize, rows: &[usize]) {
    for (to, &from) in rows.iter().enumerate() {
        if to != from {
            v.copy_within(from * d..(from + 1) * d, to * d);
        }
    }
    v.truncate(rows.len() * d);
}

fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() != len {
        v.resize(len, 0.0);
    }
}

/// g_L and ℓ: 2(ŷ − y) and (ŷ − y)² for squared error; softmax(z) − onehot(y) and
/// −log softmax(z)_y for cross-entropy.
fn output_grad(head: Head, out: &[f32], y: &[f32], k: usize, g: &mut [f32], loss: &mut [f32]) {
    match head {
        Head::Regression => {
            for (((gi, li), &o), &t) in g.iter_mut().zip(loss.iter_mut()).zip(out).zip(y) {
                *gi = 2.0 * (o - t);
                *li = (o - t) * (o - t);
            }
        }
        Head::Classification { classes } => {
            let rows = out.chunks_exact(k).zip(g.chunks_exact_mut(k));
            for (((zr, gr), li), &t) in rows.zip(loss.iter_mut()).zip(y) {
                let m = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // The exponentials first, then their sum in the same order: summed as they
                // came, the running sum waited on every `exp` call (kept on the stack across
                // it). Same numbers to the bit; 1-2% less learning CPU on beam (3 runs).
                for (gi, &z) in gr.iter_mut().zip(zr) {
                    *gi = (z - m).exp();
                }
                let sum = gr.iter().fold(0.0f32, |a, &e| a + e);
                for gi in gr.iter_mut() {
                    *gi /= sum;
                }
                let c = (t as usize).min(classes - 1);
                *li = m + sum.ln() - zr[c];
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

    #[test]
    fn bias_corrections_are_powi_s_to_the_bit() {
        let direct = |t: u64| {
            let t = t.min(i32::MAX as u64) as i32;
            let bc2 = (1.0 - BETA_2.powi(t)).sqrt();
            (bc2, bc2 / (1.0 - BETA_1.powi(t)))
        };
        let around = |c: u64| c.saturating_sub(3)..c + 3;
        let steps = (1..2000)
            .chain(around(1 << 16))
            .chain(around(1 << 17))
            .chain(around(1 << 20))
            .chain([1_000_003, 123_456_789, u32::MAX as u64]);
        for t in steps {
            let (a, b) = (bias_corrections(t), direct(t));
            assert_eq!(
                (a.0.to_bits(), a.1.to_bits()),
                (b.0.to_bits(), b.1.to_bits()),
                "t = {t}"
            );
        }
        assert_eq!(
            direct(1 << 17),
            (1.0, 1.0),
            "both powers are 0 from 2^17 steps on"
        );
        assert_ne!(direct(1 << 10).0, 1.0, "but not after 2^10");
    }

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
        // The same norms from the parts the passes take when asked to.
        f.track_norms(true);
        f.forward(&x, n);
        f.backward(&y);
        let mut tracked = vec![0.0; n];
        f.sq_norms(&mut tracked);
        close(&tracked, &want_norms, "sq_norms taken by the passes");
        f.track_norms(false);
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

    /// Rows appended to a pass give the outputs, losses and gradient of one pass over all.
    #[test]
    fn rows_appended_to_a_pass_are_as_one_pass_over_all() {
        for head in [Head::Regression, Head::Classification { classes: 5 }] {
            let params = Mlp::new(6, &[16, 8], head, &Device::default()).dense_params();
            let (mut one, mut two) = (
                FusedMlp::from_dense(&params, head),
                FusedMlp::from_dense(&params, head),
            );
            let (x, n0, m) = (values(11 * 6, 3), 4, 7);
            let y: Vec<f32> = match head {
                Head::Regression => values(11, 4),
                Head::Classification { .. } => (0..11).map(|i| (i % 5) as f32).collect(),
            };
            one.forward(&x, n0 + m);
            one.output_grads(&y);
            // `two` takes the norms' parts as it goes; `one` computes them afterwards.
            two.track_norms(true);
            two.forward(&x[..n0 * 6], n0);
            two.output_grads(&y[..n0]);
            two.backward_hidden();
            two.forward_more(&x[n0 * 6..], m);
            two.output_grads(&y);
            close(two.output(), one.output(), "outputs");
            close(two.losses(), one.losses(), "losses");
            let w = vec![0.5; n0 + m];
            let mut g1 = vec![(Vec::new(), Vec::new()); params.len()];
            let mut g2 = g1.clone();
            one.backward_hidden();
            two.backward_hidden();
            let (mut s1, mut s2) = (vec![0.0; n0 + m], vec![0.0; n0 + m]);
            one.sq_norms(&mut s1);
            two.sq_norms(&mut s2);
            close(&s2, &s1, "norms");
            one.last_layer_sq_norms(&mut s1);
            two.last_layer_sq_norms(&mut s2);
            close(&s2, &s1, "last-layer norms");
            one.weighted_grads(&w, &mut g1);
            two.weighted_grads(&w, &mut g2);
            for ((a, b), (c, d)) in g2.iter().zip(&g1) {
                close(a, c, "weight gradient");
                close(b, d, "bias gradient");
            }
            // Kept rows keep their norms.
            let rows = [0, 2, 3, 6, 10];
            one.keep_rows(&rows, true);
            two.keep_rows(&rows, true);
            let (mut k1, mut k2) = (vec![0.0; rows.len()], vec![0.0; rows.len()]);
            one.sq_norms(&mut k1);
            two.sq_norms(&mut k2);
            close(&k2, &k1, "norms of kept rows");
            let before: Vec<f32> = rows.iter().map(|&r| s1[r]).collect();
            two.last_layer_sq_norms(&mut k2);
            close(&k2, &before, "last-layer norms of kept rows");
        }
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
