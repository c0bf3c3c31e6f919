//! The online learner: for each micro-batch of fresh samples, predict → score → select →
//! train on the selected fresh rows plus replayed ones → retain.
//!
//! One forward pass over [fresh ‖ replayed] rows gives the predictions (made before any update
//! on these rows: prequential), and, for the exact methods, one backward pass gives every
//! row's per-sample gradient norm *and* the parameter gradient of the selected subset, so
//! scoring and training share their work. Replayed rows are re-scored by the same pass for
//! free. Nothing here knows about Kafka, Parquet or schemas: it sees matrices of features
//! and targets, the keys and times it must remember for the buffer, and nothing else.

pub mod buffer;
pub mod eval;
pub mod importance;
pub mod model;
pub mod select;

use std::sync::Arc;

use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use buffer::{BufferConfig, BufferState, Entry, ReplayBuffer};
use importance::{ImportanceMethod, ImportanceScorer, Scored};
use model::{Head, Mlp, SavedLayer};
use select::{SelectionConfig, Selector, SelectorState};

/// Which burn CPU backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// burn-flex, burn's pure-Rust CPU backend (about 3× burn-ndarray here).
    Flex,
    /// burn-ndarray.
    Ndarray,
}

impl Backend {
    pub fn device(self) -> Device {
        match self {
            Backend::Flex => Device::flex(),
            #[allow(deprecated)]
            // burn 0.22 deprecates ndarray in favour of flex; the design names it
            Backend::Ndarray => Device::ndarray(),
        }
    }
}

/// Model settings (the `[model]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// Hidden layer widths.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
}

fn default_backend() -> Backend {
    Backend::Flex
}
fn default_hidden() -> Vec<usize> {
    vec![64, 64]
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backend: default_backend(),
            hidden: default_hidden(),
        }
    }
}

/// Optimisation settings (the `[training]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Fresh samples per learner step.
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Adam learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Seed of every random choice, weight initialisation included.
    #[serde(default)]
    pub seed: u64,
}

fn default_micro_batch() -> usize {
    256
}
fn default_lr() -> f64 {
    1e-3
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            micro_batch: default_micro_batch(),
            learning_rate: default_lr(),
            seed: 0,
        }
    }
}

/// Everything the learner needs to be built.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    pub inputs: usize,
    pub head: Head,
    pub model: ModelConfig,
    pub importance: ImportanceMethod,
    pub selection: SelectionConfig,
    pub buffer: BufferConfig,
    pub training: TrainingConfig,
}

/// A micro-batch of fresh samples: row-major features `[n, inputs]`, targets, and the keys and
/// event times the buffer keeps with each retained row.
pub struct FreshBatch<'a> {
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub keys: &'a [Arc<str>],
    pub times: &'a [i64],
}

/// What happened to each fresh row of a micro-batch.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Model outputs before the update, `[n, outputs]` row-major.
    pub outputs: Vec<f32>,
    pub scores: Vec<f32>,
    pub threshold: f32,
    /// Scored at or above the threshold (or in warm-up).
    pub selected: Vec<bool>,
    /// Trained on (selected, or sampled by the unbiased option).
    pub trained: Vec<bool>,
    /// Admitted to the replay buffer.
    pub retained: Vec<bool>,
    /// Weighted mean loss of the rows trained in this step (NaN when none).
    pub train_loss: f32,
}

/// Counters of a learner's life.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LearnerStats {
    pub seen: u64,
    pub selected: u64,
    pub trained_fresh: u64,
    pub trained_replay: u64,
    /// Rows that went through a backward pass (scoring or training).
    pub backpropagated: u64,
    pub steps: u64,
}

/// What a checkpoint keeps of an [`OnlineLearner`].
#[derive(Serialize, Deserialize)]
pub struct LearnerState {
    pub model: Vec<SavedLayer>,
    /// burn's own serialisation of the Adam state (burnpack bytes), keyed by parameter id.
    pub optimizer: Vec<u8>,
    pub selector: SelectorState,
    pub buffer: BufferState,
    pub stats: LearnerStats,
}

impl LearnerState {
    /// Samples the saved learner had seen.
    pub fn seen(&self) -> u64 {
        self.stats.seen
    }
}

/// The online learner (see the module doc).
pub struct OnlineLearner {
    cfg: LearnerConfig,
    device: Device,
    model: Mlp,
    optim: ModuleOptimizer,
    scorer: ImportanceScorer,
    selector: Selector,
    buffer: ReplayBuffer,
    rng: SmallRng,
    stats: LearnerStats,
}

impl OnlineLearner {
    pub fn new(cfg: LearnerConfig) -> Self {
        let device = cfg.model.backend.device();
        // Same seed, same initial weights: runs are reproducible and comparable side by side.
        device.seed(cfg.training.seed);
        device.clone().autodiff().seed(cfg.training.seed);
        // Parameters live on the autodiff device because burn's optimiser expects trainable
        // (require-grad) parameters; every hot-path computation uses their plain `inner()` values.
        let model = Mlp::new(
            cfg.inputs,
            &cfg.model.hidden,
            cfg.head,
            &device.clone().autodiff(),
        );
        OnlineLearner {
            device,
            model,
            optim: AdamConfig::new().init(),
            scorer: ImportanceScorer::new(cfg.importance, cfg.head),
            selector: Selector::new(cfg.selection.clone()),
            buffer: ReplayBuffer::new(cfg.buffer.clone()),
            rng: SmallRng::seed_from_u64(cfg.training.seed),
            stats: LearnerStats::default(),
            cfg,
        }
    }

    /// Everything the learner has learned, for a checkpoint: weights, Adam's moments, the
    /// selector's window and the replay buffer.
    pub fn state(&self) -> anyhow::Result<LearnerState> {
        let optimizer = self
            .optim
            .into_bytes()
            .map_err(|e| anyhow::anyhow!("cannot serialise the optimiser state: {e:?}"))?;
        Ok(LearnerState {
            model: self.model.to_saved(),
            optimizer: optimizer.to_vec(),
            selector: self.selector.state(),
            buffer: self.buffer.state(),
            stats: self.stats,
        })
    }

    /// Continues from a saved state. The model's layer widths must match this configuration.
    pub fn restore(&mut self, s: LearnerState) -> anyhow::Result<()> {
        let dev = self.device.clone().autodiff();
        let model = Mlp::from_saved(&s.model, &dev);
        anyhow::ensure!(
            model.widths() == self.model.widths(),
            "the saved model has layer widths {:?}; this pipeline builds {:?}",
            model.widths(),
            self.model.widths()
        );
        self.model = model;
        self.optim = AdamConfig::new()
            .init()
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(s.optimizer))
            .map_err(|e| anyhow::anyhow!("cannot load the optimiser state: {e:?}"))?;
        self.selector.restore(s.selector);
        self.buffer.restore(s.buffer);
        self.stats = s.stats;
        // A fresh stream of random draws, different from the one before the restart.
        self.rng = SmallRng::seed_from_u64(self.cfg.training.seed ^ s.stats.seen);
        Ok(())
    }

    pub fn stats(&self) -> LearnerStats {
        self.stats
    }
    pub fn buffer(&self) -> &ReplayBuffer {
        &self.buffer
    }

    /// One prequential step over a micro-batch of fresh samples.
    pub fn learn_batch(&mut self, b: FreshBatch<'_>) -> StepOutcome {
        let n = b.y.len();
        if n == 0 {
            return StepOutcome::default();
        }
        let replay_n = if self.buffer.is_empty() {
            0
        } else {
            (self.cfg.buffer.replay_ratio * n as f64).round() as usize
        };
        let replay = self.buffer.sample(replay_n, &mut self.rng);
        let mut x = Vec::with_capacity((n + replay.len()) * self.cfg.inputs);
        x.extend_from_slice(b.x);
        let mut y = Vec::with_capacity(n + replay.len());
        y.extend_from_slice(b.y);
        self.buffer.gather(&replay, &mut x, &mut y);

        let params = self.model.dense_params();
        let scored = self
            .scorer
            .score(&params, x, &y, &self.device, &mut self.rng);
        let decision = self.selector.decide(&scored.scores[..n], &mut self.rng);

        // Loss weights: fresh rows as decided, replayed rows 1; normalised to a mean.
        let mut w: Vec<f32> = decision.weights.clone();
        w.resize(n + replay.len(), 1.0);
        let denom = if self.cfg.selection.unbiased_q > 0.0 {
            (n + replay.len()) as f32
        } else {
            w.iter().filter(|v| **v > 0.0).count().max(1) as f32
        };
        for v in &mut w {
            *v /= denom;
        }
        let trained_rows = w.iter().filter(|v| **v > 0.0).count();
        let train_loss = {
            let (num, den) = w
                .iter()
                .zip(&scored.losses)
                .fold((0f64, 0f64), |(a, c), (wi, li)| {
                    (a + (*wi as f64) * (*li as f64), c + *wi as f64)
                });
            if den > 0.0 {
                (num / den) as f32
            } else {
                f32::NAN
            }
        };
        self.stats.backpropagated += if self.cfg.importance.backward_on_all_rows() {
            (n + replay.len()) as u64
        } else {
            trained_rows as u64
        };
        if trained_rows > 0 {
            self.train(&params, scored_parts(&scored), w);
        }

        // Replayed rows were scored by this pass: refresh their stored scores.
        let version_before = self.stats.steps.saturating_sub(1);
        for (j, &slot) in replay.iter().enumerate() {
            self.buffer
                .rescore(slot, scored.scores[n + j], version_before);
        }

        let dim = self.cfg.inputs;
        let mut retained = vec![false; n];
        let mut trained = vec![false; n];
        for i in 0..n {
            trained[i] = decision.weights[i] > 0.0;
            if decision.selected[i] {
                let e = Entry {
                    x: b.x[i * dim..(i + 1) * dim].into(),
                    y: b.y[i],
                    key: b.keys[i].clone(),
                    time: b.times[i],
                    score: scored.scores[i],
                    version: version_before,
                    born: self.stats.seen + i as u64,
                };
                retained[i] = self.buffer.offer(e, &mut self.rng);
            }
        }
        self.stats.seen += n as u64;
        self.stats.selected += decision.selected.iter().filter(|s| **s).count() as u64;
        self.stats.trained_fresh += trained.iter().filter(|t| **t).count() as u64;
        self.stats.trained_replay += replay.len() as u64 * (trained_rows > 0) as u64;

        let every = self.cfg.buffer.rescore_every;
        if every > 0 && trained_rows > 0 && self.stats.steps.is_multiple_of(every) {
            self.rescore_slice();
        }

        StepOutcome {
            outputs: scored.outputs[..n * self.cfg.head.outputs()].to_vec(),
            scores: scored.scores[..n].to_vec(),
            threshold: decision.threshold,
            selected: decision.selected,
            trained,
            retained,
            train_loss,
        }
    }

    /// One Adam step on Σ w_i ℓ_i.
    fn train(&mut self, params: &[model::DenseParams], parts: ScoredParts<'_>, w: Vec<f32>) {
        let rows = w.len();
        let grads = match parts {
            ScoredParts::Full { inputs, deltas } => {
                let wt = Tensor::<2>::from_data(TensorData::new(w, [rows, 1]), &self.device);
                model::weighted_grads(inputs, deltas, wt)
            }
            ScoredParts::Pending { trace, g_out } => {
                // Forward-only scores: back-propagate the trained rows alone.
                let (idx, wsub): (Vec<i64>, Vec<f32>) = w
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.0)
                    .map(|(i, v)| (i as i64, *v))
                    .unzip();
                let m = idx.len();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [m]), &self.device);
                let sub = trace.rows(&idx);
                let g = g_out.clone().select(0, idx);
                let deltas = model::backward_deltas(params, &sub, g);
                let wt = Tensor::<2>::from_data(TensorData::new(wsub, [m, 1]), &self.device);
                model::weighted_grads(&sub.inputs, &deltas, wt)
            }
        };
        let grads = self.model.gradients(grads);
        self.model = self
            .optim
            .step(self.cfg.training.learning_rate, self.model.clone(), grads);
        self.stats.steps += 1;
    }

    /// Re-scores the next slice of the buffer with the current model.
    fn rescore_slice(&mut self) {
        let slots = self.buffer.rescore_slice(self.cfg.buffer.rescore_slice);
        if slots.is_empty() {
            return;
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        self.buffer.gather(&slots, &mut x, &mut y);
        let params = self.model.dense_params();
        let scored = self
            .scorer
            .score(&params, x, &y, &self.device, &mut self.rng);
        if self.cfg.importance.backward_on_all_rows() {
            self.stats.backpropagated += slots.len() as u64;
        }
        for (slot, s) in slots.iter().zip(scored.scores) {
            self.buffer.rescore(*slot, s, self.stats.steps);
        }
    }
}

enum ScoredParts<'a> {
    Full {
        inputs: &'a [Tensor<2>],
        deltas: &'a [Tensor<2>],
    },
    Pending {
        trace: &'a model::Trace,
        g_out: &'a Tensor<2>,
    },
}

fn scored_parts(s: &Scored) -> ScoredParts<'_> {
    match (&s.deltas, &s.pending) {
        (Some(deltas), _) => ScoredParts::Full {
            inputs: &s.inputs,
            deltas,
        },
        (None, Some((trace, g_out))) => ScoredParts::Pending { trace, g_out },
        (None, None) => unreachable!("a scored batch carries deltas or a pending trace"),
    }
}
