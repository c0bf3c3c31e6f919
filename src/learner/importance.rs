//! Importance scoring: how much would each sample move the model?
//!
//! The score of sample i is s_i = ‖∇_θ ℓ_i‖₂ over all parameters (method.md §1). `exact`
//! gets it from the hand-written fused backward of [`super::model`]; `exact_autodiff` gets
//! the very same numbers from burn's autodiff with probe tensors (kept as the reference route
//! and for the benchmark). The proxies (`last_layer`, `el2n`, `loss`, `random`) need only the
//! forward pass; with them the backward runs later on the selected rows alone, which is where
//! a proxy saves compute. Both routes hand back a [`Scored`] batch that the learner trains from.

use burn::tensor::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::fused::FusedMlp;
use super::model::{self, DenseParams, Head, Trace};

/// How a sample's importance is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceMethod {
    /// Exact per-sample gradient norm over all layers, fused hand-written backward.
    Exact,
    /// Exact per-sample gradient norm through burn autodiff and probe tensors.
    ExactAutodiff,
    /// Exact norm of the last layer's gradient only (closed form, forward only).
    LastLayer,
    /// Error L2 norm: ‖p − onehot(y)‖ or |ŷ − y|.
    El2n,
    /// The per-sample loss.
    Loss,
    /// The loss minus the loss of a small model fitted on held-out rows (RHO-LOSS; see
    /// [`super::reducible`]).
    Reducible,
    /// Uniform random scores: the baseline every method must beat.
    Random,
}

impl ImportanceMethod {
    /// Whether the scores come from the forward pass and the output gradient alone, at no
    /// cost beyond the prediction (`random` draws from the learner's RNG, so it is not).
    pub fn is_free(self) -> bool {
        matches!(
            self,
            ImportanceMethod::El2n | ImportanceMethod::LastLayer | ImportanceMethod::Loss
        )
    }

    /// Whether the scores are gradient norms read off the forward pass (what
    /// `selection.clip` needs for every row a step trains).
    pub fn free_norms(self) -> bool {
        matches!(self, ImportanceMethod::El2n | ImportanceMethod::LastLayer)
    }

    /// Whether the scores come with every row's backward pass already done.
    pub fn backward_on_all_rows(self) -> bool {
        matches!(
            self,
            ImportanceMethod::Exact | ImportanceMethod::ExactAutodiff
        )
    }
}

/// A scored batch: predictions, scores and losses, row by row.
pub struct Scored {
    /// Model outputs before any update on this batch, `[n, outputs]`, row-major.
    pub outputs: Vec<f32>,
    /// Importance score per row.
    pub scores: Vec<f32>,
    /// Per-sample loss per row.
    pub losses: Vec<f32>,
}

/// What burn's pass keeps for training the batch next.
#[allow(clippy::large_enum_variant)] // one per step, moved once
pub enum BurnPass {
    /// Layer inputs a_k and g_k for all rows, when the method back-propagated every row.
    Full {
        inputs: Vec<Tensor<2>>,
        deltas: Vec<Tensor<2>>,
    },
    /// Forward trace and output gradient, kept by forward-only methods for a later backward.
    Pending {
        params: Vec<DenseParams>,
        trace: Trace,
        g_out: Tensor<2>,
    },
}

/// Scores batches with one [`ImportanceMethod`].
#[derive(Debug, Clone, Copy)]
pub struct ImportanceScorer {
    pub method: ImportanceMethod,
    pub head: Head,
}

impl ImportanceScorer {
    pub fn new(method: ImportanceMethod, head: Head) -> Self {
        ImportanceScorer { method, head }
    }

    /// Scores `n` rows of `x` (row-major, `[n, d]`) against targets `y`.
    pub fn score(
        &self,
        params: &[DenseParams],
        x: Vec<f32>,
        y: &[f32],
        device: &Device,
        rng: &mut impl Rng,
    ) -> (Scored, BurnPass) {
        let n = y.len();
        let d = x.len() / n.max(1);
        let xt = model::matrix(x, n, d, device);
        let target = model::target_tensor(self.head, y, device);
        if self.method == ImportanceMethod::ExactAutodiff {
            let (inputs, deltas, losses, output) =
                model::probe_trace(params, self.head, xt, target);
            let scores = sqrt_all(model::to_vec(model::sq_norms(&inputs, &deltas)));
            let scored = Scored {
                outputs: model::to_vec(output),
                scores,
                losses: model::to_vec(losses),
            };
            return (scored, BurnPass::Full { inputs, deltas });
        }
        let tr = model::trace(params, xt);
        let out = tr.output();
        let losses = model::to_vec(model::per_sample_loss(
            self.head,
            out.clone(),
            target.clone(),
        ));
        let g_out = model::output_grad(self.head, out.clone(), target);
        let outputs = model::to_vec(out);
        let (scores, deltas, pending) = match self.method {
            ImportanceMethod::Exact | ImportanceMethod::ExactAutodiff => {
                let deltas = model::backward_deltas(params, &tr, g_out);
                let s = sqrt_all(model::to_vec(model::sq_norms(&tr.inputs, &deltas)));
                (s, Some(deltas), None)
            }
            ImportanceMethod::LastLayer => {
                let s = sqrt_all(model::to_vec(model::last_layer_sq_norms(&tr, &g_out)));
                (s, None, Some(g_out))
            }
            ImportanceMethod::El2n => {
                let half = if self.head == Head::Regression {
                    0.5
                } else {
                    1.0
                };
                let s = model::to_vec(g_out.clone().square().sum_dim(1).sqrt().mul_scalar(half));
                (s, None, Some(g_out))
            }
            // The learner subtracts the held-out model's losses.
            ImportanceMethod::Loss | ImportanceMethod::Reducible => {
                (losses.clone(), None, Some(g_out))
            }
            ImportanceMethod::Random => (
                (0..n).map(|_| rng.random::<f32>()).collect(),
                None,
                Some(g_out),
            ),
        };
        let pass = match (deltas, pending) {
            (Some(deltas), _) => BurnPass::Full {
                inputs: tr.inputs,
                deltas,
            },
            (None, g_out) => BurnPass::Pending {
                params: params.to_vec(),
                trace: tr,
                g_out: g_out.expect("forward-only methods keep the output gradient"),
            },
        };
        let scored = Scored {
            outputs,
            scores,
            losses,
        };
        (scored, pass)
    }

    /// The same scores from the fused kernel; returns whether every row was back-propagated
    /// (the exact methods), which a following weight gradient then reuses.
    pub fn score_fused(
        &self,
        mlp: &mut FusedMlp,
        x: &[f32],
        y: &[f32],
        rng: &mut impl Rng,
    ) -> (Scored, bool) {
        mlp.track_norms(self.norms_from_passes());
        mlp.forward(x, y.len());
        self.finish_fused(mlp, y, rng)
    }

    /// Scores the rows of the last fused pass with `x_more` appended to it (see
    /// [`FusedMlp::forward_more`]); `y` holds every row's target.
    pub fn score_fused_more(
        &self,
        mlp: &mut FusedMlp,
        x_more: &[f32],
        y: &[f32],
        rng: &mut impl Rng,
    ) -> (Scored, bool) {
        mlp.forward_more(x_more, y.len() - mlp.rows());
        self.finish_fused(mlp, y, rng)
    }

    /// Whether the scores read the ghost norm's parts, which the fused passes then take as
    /// they go (`FusedMlp::track_norms`).
    fn norms_from_passes(&self) -> bool {
        matches!(
            self.method,
            ImportanceMethod::Exact | ImportanceMethod::ExactAutodiff | ImportanceMethod::LastLayer
        )
    }

    /// Output gradients, losses and scores of the fused pass over all of `y`'s rows.
    fn finish_fused(&self, mlp: &mut FusedMlp, y: &[f32], rng: &mut impl Rng) -> (Scored, bool) {
        let n = y.len();
        let outputs = mlp.output().to_vec();
        mlp.output_grads(y);
        let losses = mlp.losses().to_vec();
        let mut scores = vec![0.0; n];
        // Squared norms first (square-rooted below); the loss and random scores are final.
        let (squared, backward_done) = match self.method {
            ImportanceMethod::Exact | ImportanceMethod::ExactAutodiff => {
                mlp.backward_hidden();
                mlp.sq_norms(&mut scores);
                (true, true)
            }
            ImportanceMethod::LastLayer => {
                mlp.last_layer_sq_norms(&mut scores);
                (true, false)
            }
            ImportanceMethod::El2n => {
                // ‖g_L‖ is 2|ŷ − y| for squared error: EL2N is half of it.
                let (k, half) = match self.head {
                    Head::Regression => (1, 0.25),
                    Head::Classification { classes } => (classes, 1.0),
                };
                for (s, g) in scores.iter_mut().zip(mlp.output_deltas().chunks_exact(k)) {
                    *s = g.iter().map(|v| v * v).sum::<f32>() * half;
                }
                (true, false)
            }
            // The learner subtracts the held-out model's losses from `reducible` scores.
            ImportanceMethod::Loss | ImportanceMethod::Reducible => {
                scores.copy_from_slice(&losses);
                (false, false)
            }
            ImportanceMethod::Random => {
                scores.iter_mut().for_each(|s| *s = rng.random::<f32>());
                (false, false)
            }
        };
        let scores = if squared { sqrt_all(scores) } else { scores };
        let scored = Scored {
            outputs,
            scores,
            losses,
        };
        (scored, backward_done)
    }
}

fn sqrt_all(mut v: Vec<f32>) -> Vec<f32> {
    for s in &mut v {
        *s = s.max(0.0).sqrt();
    }
    v
}
