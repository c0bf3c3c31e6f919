//! The model and its optimiser on one of two engines, as `model.backend` says: burn (`flex`
//! or `ndarray`: the reference, and the way to other devices) or the fused CPU kernel
//! (`fused`, [`super::fused`]: the same arithmetic without burn's per-operation overhead).
//!
//! The learner asks for three things, in this order: one pass over a batch that predicts and
//! scores it ([`Net::score`]), the gradient of the rows it decides to train
//! ([`Net::gradient`], reusing that pass), and an update ([`Net::apply`]). Both engines start
//! from the same seeded weights and keep checkpoints in the same layout; the optimiser state
//! of one engine is not read by the other (see [`Net::load_optimizer`]).

use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;

use super::Backend;
use super::average::WeightAverage;
use super::fused::{FusedAdam, FusedMlp};
use super::importance::{BurnPass, ImportanceMethod, ImportanceScorer, Scored};
use super::model::{self, Head, Mlp, SavedLayer};

/// Prefix of the fused engine's optimiser state in a checkpoint (burn's bytes have none).
const FUSED_ADAM: &[u8; 8] = b"GSADAM01";

/// The model on its engine (see the module doc).
#[allow(clippy::large_enum_variant)] // one per learner, built once and never moved after
pub enum Net {
    Burn(BurnNet),
    Fused(FusedNet),
}

pub struct BurnNet {
    model: Mlp,
    optim: ModuleOptimizer,
    device: Device,
    /// The last scoring pass, and the gradient computed from it.
    pass: Option<BurnPass>,
    grads: Option<Vec<(Tensor<2>, Tensor<1>)>>,
}

pub struct FusedNet {
    mlp: FusedMlp,
    adam: FusedAdam,
    /// Shapes and parameter ids, as burn initialised them (the checkpoint layout).
    layout: Vec<SavedLayer>,
    /// Whether the last pass back-propagated every row already (exact scores).
    backward_done: bool,
    grads: Vec<(Vec<f32>, Vec<f32>)>,
    rows: Vec<usize>,
    row_weights: Vec<f32>,
}

/// What [`Net::gradient`] did.
pub struct Gradient {
    /// Rows in the weight gradient.
    pub rows: usize,
    /// Rows back-propagated for it (0 when the scoring pass had done so).
    pub backward_rows: usize,
    /// Whether every entry is finite (an update with it may go ahead).
    pub finite: bool,
}

impl Net {
    /// A freshly initialised model: burn's seeded initialisation for both engines, so the
    /// same seed gives the same starting weights whichever runs.
    pub fn new(backend: Backend, inputs: usize, hidden: &[usize], head: Head, seed: u64) -> Net {
        let device = backend.device();
        // Seeded and drawn in one locked call: burn's RNG is one per process.
        let ad = device.clone().autodiff();
        let seed_both = || {
            device.seed(seed);
            ad.seed(seed);
        };
        // Parameters live on the autodiff device because burn's optimiser expects them
        // there; every hot-path computation uses their plain `inner()` values.
        let model = Mlp::seeded(seed_both, inputs, hidden, head, &ad);
        match backend {
            Backend::Fused => {
                let layout = model.to_saved();
                Net::Fused(FusedNet {
                    mlp: FusedMlp::from_saved(&layout, head),
                    adam: FusedAdam::default(),
                    grads: vec![(Vec::new(), Vec::new()); layout.len()],
                    layout,
                    backward_done: false,
                    rows: Vec::new(),
                    row_weights: Vec::new(),
                })
            }
            Backend::Flex | Backend::Ndarray => Net::Burn(BurnNet {
                model,
                optim: AdamConfig::new().init(),
                device,
                pass: None,
                grads: None,
            }),
        }
    }

    /// Predicts and scores `n` rows of `x` (`[n, inputs]`) against `y`, keeping what a
    /// following [`Net::gradient`] needs.
    pub fn score(
        &mut self,
        scorer: &ImportanceScorer,
        x: Vec<f32>,
        y: &[f32],
        rng: &mut impl Rng,
    ) -> Scored {
        match self {
            Net::Burn(b) => {
                let params = b.model.dense_params();
                let (scored, pass) = scorer.score(&params, x, y, &b.device, rng);
                b.pass = Some(pass);
                scored
            }
            Net::Fused(f) => {
                let (scored, backward_done) = scorer.score_fused(&mut f.mlp, &x, y, rng);
                f.backward_done = backward_done;
                scored
            }
        }
    }

    /// Scores the last scored batch (`fresh`, its inputs) with the rows `more` added, against
    /// every row's target `y`: the fused kernel forwards only the added rows, burn forwards
    /// all again. Returns the scored rows and whether the fresh rows were forwarded again.
    pub fn score_more(
        &mut self,
        scorer: &ImportanceScorer,
        fresh: &[f32],
        more: &[f32],
        y: &[f32],
        rng: &mut impl Rng,
    ) -> (Scored, bool) {
        match self {
            Net::Burn(_) => (self.score(scorer, [fresh, more].concat(), y, rng), true),
            Net::Fused(f) => {
                let (scored, backward_done) = scorer.score_fused_more(&mut f.mlp, more, y, rng);
                f.backward_done = backward_done;
                (scored, false)
            }
        }
    }

    /// The gradient of Σ_i w_i ℓ_i over the last scored batch, rows with w_i = 0 left out.
    pub fn gradient(&mut self, w: &[f32]) -> Gradient {
        match self {
            Net::Burn(b) => b.gradient(w),
            Net::Fused(f) => f.gradient(w),
        }
    }

    /// One Adam step with the last [`Net::gradient`].
    pub fn apply(&mut self, lr: f64) {
        match self {
            Net::Burn(b) => {
                let grads = b.grads.take().expect("a gradient before an update");
                let grads = b.model.gradients(grads);
                b.model = b.optim.step(lr, b.model.clone(), grads);
            }
            Net::Fused(f) => f.adam.step(&mut f.mlp, &f.grads, lr),
        }
    }

    /// Moves `avg` toward the live weights (after an optimiser step).
    pub fn update_average(&self, avg: &mut WeightAverage) {
        match self {
            Net::Fused(f) => avg.update(&f.mlp),
            Net::Burn(_) => avg.update_from_saved(&self.weights()),
        }
    }

    /// Model outputs of `n` rows, forward only.
    pub fn predict(&mut self, x: Vec<f32>, n: usize) -> Vec<f32> {
        match self {
            Net::Burn(b) => {
                let params = b.model.dense_params();
                let xt = model::matrix(x, n, params[0].weight.dims()[0], &b.device);
                model::to_vec(model::trace(&params, xt).output())
            }
            Net::Fused(f) => f.mlp.forward(&x, n).to_vec(),
        }
    }

    /// The weights with their parameter ids.
    pub fn weights(&self) -> Vec<SavedLayer> {
        match self {
            Net::Burn(b) => b.model.to_saved(),
            Net::Fused(f) => {
                let mut saved = f.layout.clone();
                f.mlp.save_into(&mut saved);
                saved
            }
        }
    }

    /// Puts back weights taken by [`Net::weights`] (the optimiser state is kept).
    pub fn set_weights(&mut self, saved: &[SavedLayer]) {
        match self {
            Net::Burn(b) => b.model = Mlp::from_saved(saved, &b.device.clone().autodiff()),
            Net::Fused(f) => {
                f.mlp = FusedMlp::from_saved(saved, f.mlp.head());
                f.layout = saved.to_vec();
            }
        }
    }

    /// Puts back weights and starts the optimiser afresh (after divergence).
    pub fn reset(&mut self, saved: &[SavedLayer]) {
        self.set_weights(saved);
        match self {
            Net::Burn(b) => b.optim = AdamConfig::new().init(),
            Net::Fused(f) => f.adam = FusedAdam::default(),
        }
    }

    /// The optimiser state as a checkpoint keeps it.
    pub fn optimizer_bytes(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Net::Burn(b) => Ok(b
                .optim
                .into_bytes()
                .map_err(|e| anyhow::anyhow!("cannot serialise the optimiser state: {e:?}"))?
                .to_vec()),
            Net::Fused(f) => {
                let mut out = FUSED_ADAM.to_vec();
                out.extend(postcard::to_stdvec(&f.adam)?);
                Ok(out)
            }
        }
    }

    /// Loads an optimiser state saved by [`Net::optimizer_bytes`]. One written by the other
    /// engine is not translated: Adam's moments start afresh (the weights, buffer and every
    /// other part of the checkpoint carry over), with a warning. Returns whether the state
    /// was loaded.
    pub fn load_optimizer(&mut self, bytes: Vec<u8>) -> anyhow::Result<bool> {
        let fused = bytes.starts_with(FUSED_ADAM);
        match self {
            Net::Burn(b) if !fused => {
                b.optim = AdamConfig::new()
                    .init()
                    .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                    .map_err(|e| anyhow::anyhow!("cannot load the optimiser state: {e:?}"))?;
                Ok(true)
            }
            Net::Fused(f) if fused => {
                f.adam = postcard::from_bytes(&bytes[FUSED_ADAM.len()..])
                    .map_err(|e| anyhow::anyhow!("cannot load the optimiser state: {e}"))?;
                Ok(true)
            }
            _ => {
                let (was, now) = if fused {
                    ("fused", "burn")
                } else {
                    ("burn", "fused")
                };
                tracing::warn!(
                    "the checkpoint's Adam state was written by the {was} backend and this run uses the {now} one: weights, buffer and metrics carry over, Adam's moments start afresh"
                );
                self.reset(&self.weights());
                Ok(false)
            }
        }
    }

    /// Layer widths, `inputs → … → outputs`.
    pub fn widths(&self) -> Vec<usize> {
        match self {
            Net::Burn(b) => b.model.widths(),
            Net::Fused(f) => f.mlp.widths().to_vec(),
        }
    }

    /// Whether any burn parameter is marked require-grad (see `Mlp::untracked`).
    pub fn tracks_gradients(&self) -> bool {
        matches!(self, Net::Burn(b) if b.model.tracks_gradients())
    }
}

impl BurnNet {
    fn gradient(&mut self, w: &[f32]) -> Gradient {
        let pass = self.pass.take().expect("a scored batch before a gradient");
        let (idx, wsub): (Vec<i64>, Vec<f32>) = w
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(|(i, v)| (i as i64, *v))
            .unzip();
        let m = idx.len();
        // Every row trained (the common case): no row selection at all.
        let idx = (m < w.len())
            .then(|| Tensor::<1, Int>::from_data(TensorData::new(idx, [m]), &self.device));
        let wt = Tensor::<2>::from_data(TensorData::new(wsub, [m, 1]), &self.device);
        let pick = |v: &[Tensor<2>], idx: &Tensor<1, Int>| -> Vec<Tensor<2>> {
            v.iter().map(|t| t.clone().select(0, idx.clone())).collect()
        };
        let mut backward_rows = 0;
        let grads = match (pass, idx) {
            (BurnPass::Full { inputs, deltas }, None) => {
                model::weighted_grads(&inputs, &deltas, wt)
            }
            (BurnPass::Full { inputs, deltas }, Some(idx)) => {
                model::weighted_grads(&pick(&inputs, &idx), &pick(&deltas, &idx), wt)
            }
            (
                BurnPass::Pending {
                    params,
                    trace,
                    g_out,
                },
                idx,
            ) => {
                // Forward-only scores: back-propagate the trained rows alone.
                let (sub, g) = match idx {
                    None => (trace, g_out),
                    Some(idx) => (trace.rows(&idx), g_out.select(0, idx)),
                };
                backward_rows = m;
                let deltas = model::backward_deltas(&params, &sub, g);
                model::weighted_grads(&sub.inputs, &deltas, wt)
            }
        };
        let total = grads
            .iter()
            .map(|(w, b)| w.clone().sum() + b.clone().sum())
            .reduce(|a, b| a + b)
            .map(|t| model::to_vec(t)[0])
            .unwrap_or(0.0);
        self.grads = Some(grads);
        Gradient {
            rows: m,
            backward_rows,
            finite: total.is_finite(),
        }
    }
}

impl FusedNet {
    fn gradient(&mut self, w: &[f32]) -> Gradient {
        self.rows.clear();
        self.row_weights.clear();
        for (i, &v) in w.iter().enumerate() {
            if v > 0.0 {
                self.rows.push(i);
                self.row_weights.push(v);
            }
        }
        let m = self.rows.len();
        if m < self.mlp.rows() {
            self.mlp.keep_rows(&self.rows, self.backward_done);
        }
        let backward_rows = if self.backward_done {
            0
        } else {
            self.mlp.backward_hidden();
            m
        };
        self.mlp.weighted_grads(&self.row_weights, &mut self.grads);
        Gradient {
            rows: m,
            backward_rows,
            finite: super::fused::all_finite(&self.grads),
        }
    }
}

/// Which methods each engine runs.
pub fn check_method(backend: Backend, method: ImportanceMethod) -> Result<(), String> {
    if backend == Backend::Fused && method == ImportanceMethod::ExactAutodiff {
        return Err("exact_autodiff runs burn's autodiff: use model.backend = \"flex\" or \"ndarray\" with it (\"exact\" gives the same scores on any backend)".into());
    }
    Ok(())
}
