//! The online learner: for each micro-batch of fresh samples, predict → score → select →
//! train on the selected fresh rows plus replayed ones → retain.
//!
//! One forward pass over [fresh ‖ replayed] rows gives the predictions (made before any update
//! on these rows: prequential), and, for the exact methods, one backward pass gives every
//! row's per-sample gradient norm *and* the parameter gradient of the selected subset, so
//! scoring and training share their work. Replayed rows are re-scored by the same pass for
//! free. With `selection.unit = "micro_batch"` the fresh rows' pass comes first and only a
//! kept micro-batch goes on to its replayed rows and a step (a step's fixed cost is what
//! dropping rows cannot save). Every unit of this work is booked in a
//! [`compute::ComputeLedger`] (inference, scoring, training) beside what every-row training
//! would have done, so a run can say what it saved.
//! Nothing here knows about Kafka, Parquet or schemas: it sees matrices of features
//! and targets, the keys and times it must remember for the buffer, and nothing else.

pub mod average;
pub mod blend;
pub mod buffer;
pub mod compute;
pub mod decision;
pub mod drift;
pub mod eval;
pub mod fused;
pub mod importance;
pub mod kd_index;
pub mod knn;
pub mod matmul;
pub mod model;
pub mod net;
pub mod per_key;
pub mod recovery;
pub mod reducible;
pub mod row_ops;
pub mod select;
pub mod settings;
pub mod sorted;
pub mod trace;

use std::sync::Arc;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use average::{AverageState, WeightAverage};
use buffer::{BufferConfig, BufferState, Entry, ReplayBuffer};
use compute::{ComputeLedger, ComputeReport, CpuSampler, FlopModel, Stopwatch, Work};
use importance::{ImportanceMethod, ImportanceScorer, Scored};
use model::{Head, SavedLayer};
use net::Net;
use reducible::IrreducibleLoss;
use select::{NormClip, SelectionConfig, Selector, SelectorState};
pub use settings::{Backend, ModelConfig, TrainingConfig};

/// The learner's random numbers (replay draws, random selection, buffer admission):
/// xoshiro256++, the generator of rand's `SmallRng`, and the same numbers to the bit for the
/// same seed (`rng_is_small_rng_to_the_bit`). From `rand_xoshiro` rather than rand itself
/// because its state can be saved: a checkpoint carries it, so a resumed run draws what the
/// uninterrupted one would have drawn.
pub type LearnerRng = rand_xoshiro::Xoshiro256PlusPlus;

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
    /// Replay ratio of the every-row training that compute saved is measured against.
    pub reference_replay_ratio: f64,
    /// `reducible` scores: every this-many-th fresh sample is held out for the small model.
    pub holdout_every: u64,
}

/// A micro-batch of fresh samples: row-major features `[n, inputs]`, targets, and the keys and
/// event times the buffer keeps with each retained row.
pub struct FreshBatch<'a> {
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub keys: &'a [Arc<str>],
    pub times: &'a [i64],
}

/// A micro-batch's forward pass and selection, before its training step.
struct Pass {
    /// Replayed rows' buffer slots and loss weights (before normalisation).
    replay: Vec<usize>,
    replay_w: Vec<f32>,
    /// Fresh rows then replayed rows.
    scored: Scored,
    decision: select::Decision,
    /// Whether the replayed rows' scores are of the pipeline's method (stored back).
    refresh_replay: bool,
}

/// What happened to each fresh row of a micro-batch.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    /// Model outputs before the update, `[n, outputs]` row-major.
    pub outputs: Vec<f32>,
    pub scores: Vec<f32>,
    pub threshold: f32,
    /// Chosen by the policy (at or above top-k's threshold, or drawn; in warm-up, all).
    pub selected: Vec<bool>,
    /// Trained on (selected, or sampled by the unbiased option).
    pub trained: Vec<bool>,
    /// Admitted to the replay buffer.
    pub retained: Vec<bool>,
    /// Weighted mean loss of the rows trained in this step (NaN when none).
    pub train_loss: f32,
    /// Each fresh row's prequential loss (before the update).
    pub losses: Vec<f32>,
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
    /// Updates skipped because their gradient was not finite.
    pub nonfinite_steps: u64,
    /// Times the learner went back to its last good weights after non-finite steps in a row.
    pub restores: u64,
    /// Trained rows whose weight `selection.clip` cut.
    pub clipped: u64,
    /// Fresh rows predicted by the averaged weights (`training.average_decay`).
    pub averaged: u64,
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
    pub ledger: ComputeLedger,
    /// `selection.clip`'s window of fresh norms and its threshold.
    pub clip: Option<NormClip>,
    /// Where the learner's random numbers had got to (since format 10).
    pub rng: LearnerRng,
    /// `training.average_decay`'s averaged weights (since format 11).
    pub average: Option<AverageState>,
    /// The divergence guard: the weights it would go back to and its runs of steps (since
    /// format 16; a resumed guard snapshots and goes back as the uninterrupted one would).
    pub guard: GuardState,
    /// `reducible` scores: the held-out model (since format 17).
    pub irreducible: Option<reducible::IrreducibleState>,
}

/// What a checkpoint keeps of [`OnlineLearner::guard`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardState {
    pub last_good: Vec<SavedLayer>,
    pub bad_run: u32,
    pub good_run: u64,
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
    net: Net,
    scorer: ImportanceScorer,
    /// The forward-only scorer of the further steps of a micro-batch.
    step_scorer: ImportanceScorer,
    selector: Selector,
    /// `selection.clip`: the running norm threshold every trained row's weight is cut to.
    clip: Option<NormClip>,
    buffer: ReplayBuffer,
    rng: LearnerRng,
    stats: LearnerStats,
    ledger: ComputeLedger,
    /// Which stretches read the thread CPU clock, and the ratio the others are booked at.
    cpu_clock: CpuSampler,
    flops: FlopModel,
    irreducible: Option<IrreducibleLoss>,
    /// The weights after the last good stretch of steps (see [`OnlineLearner::guard`]).
    last_good: Vec<SavedLayer>,
    /// Non-finite steps in a row, and finite ones since the last non-finite one.
    bad_run: u32,
    good_run: u64,
    /// What the last drift reaction changed for its recovery window.
    recovery: Recovery,
    /// `training.average_decay`: the averaged weights the predictions come from.
    average: Option<WeightAverage>,
}

/// The recovery window of the last drift reaction: until `seen` reaches `until`, the learning
/// rate is scaled, every fresh row trains, or replay favours recent rows, as its reactions
/// asked. Reactions run together at a detection, so one window serves them all; it is not
/// checkpointed (a restart ends it).
#[derive(Debug, Clone, Copy)]
struct Recovery {
    until: u64,
    lr_factor: f64,
    keep_all: bool,
    recent_half_life: Option<f64>,
    /// Optimiser steps per micro-batch (0: as configured).
    steps: u32,
}

impl Recovery {
    const NONE: Recovery = Recovery {
        until: 0,
        lr_factor: 1.0,
        keep_all: false,
        recent_half_life: None,
        steps: 0,
    };
}

/// Good steps between snapshots of the weights a diverged learner goes back to.
const SNAPSHOT_EVERY: u64 = 256;

impl OnlineLearner {
    pub fn new(cfg: LearnerConfig) -> Self {
        let device = cfg.model.backend.device();
        // Same seed, same initial weights: runs are reproducible and comparable side by side.
        let net = Net::new(
            cfg.model.backend,
            cfg.inputs,
            &cfg.model.hidden,
            cfg.head,
            cfg.training.seed,
        );
        // A policy that ignores scores still scores every row for the score file, the drift
        // score test and clipping: with the configured method where that is free (read off
        // the forward pass), with the loss otherwise.
        let clipping = cfg.selection.clip > 0.0;
        debug_assert!(
            !clipping || cfg.importance.free_norms(),
            "selection.clip reads free norms (the configuration checks this)"
        );
        let method = if cfg.selection.policy.needs_scores() || cfg.importance.is_free() {
            cfg.importance
        } else {
            ImportanceMethod::Loss
        };
        let mut widths = vec![cfg.inputs];
        widths.extend(&cfg.model.hidden);
        widths.push(cfg.head.outputs());
        let d = cfg.training.average_decay;
        let average = (d > 0.0).then(|| WeightAverage::new(d, net.weights(), cfg.head));
        let flops = FlopModel::of_learner(&widths, d);
        let irreducible = (method == ImportanceMethod::Reducible).then(|| {
            let lr = cfg.training.learning_rate;
            IrreducibleLoss::new(cfg.inputs, cfg.head, &device, cfg.holdout_every, lr)
        });
        OnlineLearner {
            last_good: net.weights(),
            bad_run: 0,
            good_run: 0,
            recovery: Recovery::NONE,
            net,
            irreducible,
            scorer: ImportanceScorer::new(method, cfg.head),
            // Further steps forward only: the loss, or the free norms clipping reads.
            step_scorer: ImportanceScorer::new(
                if clipping {
                    method
                } else {
                    ImportanceMethod::Loss
                },
                cfg.head,
            ),
            clip: clipping.then(|| NormClip::new(cfg.selection.clip, cfg.selection.window)),
            ledger: ComputeLedger::default(),
            cpu_clock: CpuSampler::default(),
            flops,
            average,
            selector: Selector::new(select::window_in_units(
                cfg.selection.clone(),
                cfg.training.micro_batch,
            )),
            buffer: ReplayBuffer::new(cfg.buffer.clone()),
            rng: LearnerRng::seed_from_u64(cfg.training.seed),
            stats: LearnerStats::default(),
            cfg,
        }
    }

    /// Everything the learner has learned, for a checkpoint: weights, Adam's moments, the
    /// selector's window and the replay buffer.
    pub fn state(&self) -> anyhow::Result<LearnerState> {
        Ok(LearnerState {
            model: self.net.weights(),
            optimizer: self.net.optimizer_bytes()?,
            selector: self.selector.state(),
            buffer: self.buffer.state(),
            stats: self.stats,
            ledger: self.ledger,
            clip: self.clip.clone(),
            rng: self.rng.clone(),
            average: self.average.as_ref().map(WeightAverage::state),
            guard: GuardState {
                last_good: self.last_good.clone(),
                bad_run: self.bad_run,
                good_run: self.good_run,
            },
            irreducible: self.irreducible.as_ref().map(|m| m.state()).transpose()?,
        })
    }

    /// Continues from a saved state. The model's layer widths must match this configuration.
    pub fn restore(&mut self, s: LearnerState) -> anyhow::Result<()> {
        let saved_widths = model::saved_widths(&s.model);
        anyhow::ensure!(
            saved_widths == self.net.widths(),
            "the saved model has layer widths {:?}; this pipeline builds {:?}",
            saved_widths,
            self.net.widths()
        );
        self.net.set_weights(&s.model);
        self.net.load_optimizer(s.optimizer)?;
        // The guard's snapshot has the model's shape (saved by the same configuration).
        let same_shape = |a: &[SavedLayer], b: &[SavedLayer]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x.d_in, x.d_out) == (y.d_in, y.d_out))
        };
        anyhow::ensure!(
            same_shape(&s.guard.last_good, &s.model),
            "the saved divergence guard's weights do not have the model's shape"
        );
        (self.bad_run, self.good_run) = (s.guard.bad_run, s.guard.good_run);
        self.selector.restore(s.selector);
        self.buffer.restore(s.buffer);
        self.stats = s.stats;
        self.ledger = s.ledger;
        if let (Some(c), Some(saved)) = (&mut self.clip, s.clip) {
            c.restore(saved);
        }
        // The random draws continue where the saved learner had got to.
        self.rng = s.rng;
        if let Some(a) = &mut self.average {
            match s.average {
                Some(saved) => a.restore(saved),
                // Saved without averaging: the average starts from the saved weights.
                None => a.reset(&s.model),
            }
        }
        self.last_good = s.guard.last_good;
        // Saved without the held-out model (another importance method): it starts afresh.
        if let (Some(m), Some(saved)) = (&mut self.irreducible, s.irreducible) {
            m.restore(saved)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> LearnerStats {
        self.stats
    }
    pub fn buffer(&self) -> &ReplayBuffer {
        &self.buffer
    }
    /// The work counted so far, as counts.
    pub fn ledger(&self) -> ComputeLedger {
        self.ledger
    }

    /// The work counted so far, with FLOPs and the saving against every-row training.
    pub fn compute(&self) -> ComputeReport {
        self.ledger
            .report(&self.flops, self.cfg.reference_replay_ratio)
    }

    /// One prequential step over a micro-batch of fresh samples.
    pub fn learn_batch(&mut self, b: FreshBatch<'_>) -> StepOutcome {
        let n = b.y.len();
        if n == 0 {
            return StepOutcome::default();
        }
        let mut clock = Stopwatch::start(&self.ledger, &mut self.cpu_clock);
        let steps_before = self.stats.steps;
        // The averaged model predicts before this micro-batch's step, as the live one does;
        // which of the two predictions is used follows the record of the rows before these.
        let averaged = self
            .average
            .as_mut()
            .map(|a| (a.prefers_average(), a.predict(b.x, n)));
        if averaged.is_some() {
            self.ledger.inference.rows_forward += n as u64;
            self.ledger.inference.cpu_s += clock.lap();
        }
        let ratio = self.cfg.buffer.replay_ratio * self.selector.replay_scale();
        let (replay_n, reference_n) = if self.buffer.is_empty() {
            (0, 0)
        } else {
            let per = |r: f64| (r * n as f64).round() as usize;
            (per(ratio), per(self.cfg.reference_replay_ratio))
        };
        let Pass {
            replay,
            replay_w,
            scored,
            decision,
            refresh_replay,
        } = if self.selector.per_micro_batch() {
            self.pass_micro_batch(&b, replay_n, &mut clock)
        } else {
            self.pass_rows(&b, replay_n, &mut clock, None)
        };
        if let Some(a) = &mut self.average {
            a.record(b.y, &scored.losses[..n]);
            self.ledger.inference.cpu_s += clock.lap();
        }
        let r = replay.len();
        let trained_rows = decision.trained() + r;
        let (mut w, denom) = loss_weights(&decision, &replay_w);
        let train_loss = weighted_mean(&w, &scored.losses);
        if let Some(c) = &mut self.clip {
            self.stats.clipped += c.apply(&scored.scores[..n], &scored.scores, &mut w) as u64;
        }
        self.book_every_row(n, reference_n);
        if trained_rows > 0 {
            self.train(&w);
        }

        // Replayed rows were scored by this pass for free: refresh their stored scores.
        let version_before = self.stats.steps.saturating_sub(1);
        if refresh_replay {
            for (&slot, &score) in replay.iter().zip(&scored.scores[n..]) {
                self.buffer.rescore(slot, score, version_before);
            }
        }
        let retained = self.retain(&b, &scored.scores[..n], &decision, version_before);
        if trained_rows > 0 {
            let steps = self
                .cfg
                .training
                .steps_per_batch
                .max(self.recovering().steps);
            for _ in 1..steps {
                self.further_step(b.x, b.y, &decision, replay_n, denom);
            }
        }
        self.count_step(n, r, &decision);
        self.ledger.training.cpu_s += clock.lap();
        clock.settle(&mut self.ledger, &mut self.cpu_clock);
        // Once each time the step count passes a multiple of `every`: a batch whose step was
        // refused takes none, and several steps per batch may jump one.
        let every = self.cfg.buffer.rescore_every;
        if every > 0 && trained_rows > 0 && self.stats.steps / every > steps_before / every {
            self.rescore_slice();
        }
        self.stats.backpropagated =
            self.ledger.scoring.rows_backward + self.ledger.training.rows_backward;
        let mut out = outcome(
            scored,
            decision,
            retained,
            train_loss,
            self.cfg.head.outputs(),
        );
        if let Some((true, averaged)) = averaged {
            // Row by row: where the average's output is not a number and the live model's
            // is, the live one speaks (one overflow must not read as a diverged model).
            if averaged.iter().all(|v| v.is_finite()) {
                out.outputs = averaged;
                self.stats.averaged += n as u64;
            } else {
                let k = self.cfg.head.outputs();
                for (live, avg) in out.outputs.chunks_mut(k).zip(averaged.chunks(k)) {
                    if avg.iter().all(|v| v.is_finite()) || !live.iter().all(|v| v.is_finite()) {
                        live.copy_from_slice(avg);
                        self.stats.averaged += 1;
                    }
                }
            }
        }
        out
    }

    /// Books what every-row training would have done with this micro-batch of `n` fresh rows
    /// and `reference_n` replayed ones: each further step forwards its rows again.
    fn book_every_row(&mut self, n: usize, reference_n: usize) {
        let steps = u64::from(self.cfg.training.steps_per_batch.max(1));
        let rows = (n + reference_n) as u64;
        self.ledger.reference.add(&Work {
            rows_forward: reference_n as u64 + (steps - 1) * rows,
            rows_backward: steps * rows,
            rows_weight_grad: steps * rows,
            optimizer_steps: steps,
            cpu_s: 0.0,
        });
    }

    /// The step's counts of rows seen, selected and trained (`r` replayed rows drawn).
    fn count_step(&mut self, n: usize, r: usize, decision: &select::Decision) {
        let trained_fresh = decision.trained();
        self.stats.seen += n as u64;
        self.stats.selected += decision.selected.iter().filter(|s| **s).count() as u64;
        self.stats.trained_fresh += trained_fresh as u64;
        self.stats.trained_replay += r as u64 * (trained_fresh + r > 0) as u64;
    }

    /// Row selection: one pass over [fresh ‖ replayed] rows, then the decision (unless it
    /// was `decided` before the pass, as a policy that reads no scores can).
    fn pass_rows(
        &mut self,
        b: &FreshBatch<'_>,
        replay_n: usize,
        clock: &mut Stopwatch,
        decided: Option<select::Decision>,
    ) -> Pass {
        let n = b.y.len();
        let (replay, replay_w) = self.draw_replay(replay_n);
        let r = replay.len();
        let mut x = Vec::with_capacity((n + r) * self.cfg.inputs);
        x.extend_from_slice(b.x);
        let mut y = Vec::with_capacity(n + r);
        y.extend_from_slice(b.y);
        self.buffer.gather(&replay, &mut x, &mut y);

        let x_held = self.irreducible.is_some().then(|| x.clone());
        let mut scored = self.net.score(&self.scorer, x, &y, &mut self.rng);
        let pass_cpu = clock.lap();
        if let Some(x) = &x_held {
            self.reducible_scores(x, &y, &mut scored.scores);
            self.ledger.scoring.cpu_s += clock.lap();
        }
        let mut decision = match decided {
            Some(d) => d,
            None => self.decide(Some(&scored.scores[..n]), n),
        };
        if x_held.is_some() {
            self.hold_out(b, &mut decision);
            self.ledger.scoring.cpu_s += clock.lap();
        }
        self.account_pass(n, r, decision.trained(), pass_cpu + clock.lap());
        Pass {
            replay,
            replay_w,
            scored,
            decision,
            refresh_replay: true,
        }
    }

    /// Micro-batch selection. A policy that reads no scores (`random`) decides first, and a
    /// dropped micro-batch's pass forwards its fresh rows alone (the predictions). Otherwise
    /// the fresh rows' pass decides, and only a kept micro-batch draws replayed rows and adds
    /// them to the pass (the fused kernel forwards only them; burn forwards all again).
    /// Forward-only: an exact method's backward of the fresh rows was scoring, and the step
    /// back-propagates its rows itself.
    fn pass_micro_batch(
        &mut self,
        b: &FreshBatch<'_>,
        replay_n: usize,
        clock: &mut Stopwatch,
    ) -> Pass {
        let n = b.y.len();
        if !self.selector.needs_scores() {
            let d = self.decide(None, n);
            let replay_n = if d.trained() > 0 { replay_n } else { 0 };
            return self.pass_rows(b, replay_n, clock, Some(d));
        }
        let mut scored = self
            .net
            .score(&self.scorer, b.x.to_vec(), b.y, &mut self.rng);
        let pass_cpu = clock.lap();
        let decision = self.decide(Some(&scored.scores), n);
        // Every backward of this pass was scoring: the step repeats it on the rows it trains.
        self.account_pass(n, 0, 0, pass_cpu + clock.lap());
        let kept = decision.trained() > 0;
        let (replay, replay_w) = self.draw_replay(if kept { replay_n } else { 0 });
        let exact = self.scorer.method.backward_on_all_rows();
        if kept && (exact || !replay.is_empty()) {
            let mut more = Vec::with_capacity(replay.len() * self.cfg.inputs);
            let mut y = Vec::with_capacity(n + replay.len());
            y.extend_from_slice(b.y);
            self.buffer.gather(&replay, &mut more, &mut y);
            let scorer = if exact {
                &self.step_scorer
            } else {
                &self.scorer
            };
            let (again, fresh_again) = self.net.score_more(scorer, b.x, &more, &y, &mut self.rng);
            let forwarded = replay.len() + if fresh_again { n } else { 0 };
            self.ledger.training.rows_forward += forwarded as u64;
            // The model has not changed: the fresh rows' outputs and losses are the same.
            scored.scores.extend_from_slice(&again.scores[n..]);
            scored.losses = again.losses;
        }
        // The replay draw and its pass are training's (not the next stretch's, which may be
        // the averaged weights' record, booked as inference).
        self.ledger.training.cpu_s += clock.lap();
        Pass {
            replay,
            replay_w,
            scored,
            decision,
            refresh_replay: !exact,
        }
    }

    /// RHO-LOSS: each score becomes loss − loss under the held-out model.
    fn reducible_scores(&self, x: &[f32], y: &[f32], scores: &mut [f32]) {
        let ir = self.irreducible.as_ref().expect("reducible scores");
        for (s, il) in scores.iter_mut().zip(ir.losses(x, y)) {
            *s -= il;
        }
    }

    /// Takes the held-out fresh rows out of training and teaches them to the held-out model.
    fn hold_out(&mut self, b: &FreshBatch<'_>, d: &mut select::Decision) {
        let ir = self.irreducible.as_mut().expect("reducible scores");
        let dim = self.cfg.inputs;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..b.y.len() {
            if ir.held_out(self.stats.seen + i as u64) {
                d.selected[i] = false;
                d.weights[i] = 0.0;
                x.extend_from_slice(&b.x[i * dim..(i + 1) * dim]);
                y.push(b.y[i]);
            }
        }
        ir.learn(&x, &y);
    }

    /// Books the shared forward (and, for exact scores, backward) pass over n fresh and r
    /// replayed rows: the fresh forward is inference, the replayed forward is training; the
    /// backward of fresh rows that are then not trained is scoring. The pass's CPU time is
    /// split in proportion to the FLOPs of each part.
    fn account_pass(&mut self, n: usize, r: usize, trained_fresh: usize, cpu_s: f64) {
        let f = self.flops;
        let (n, r, tf) = (n as u64, r as u64, trained_fresh as u64);
        let backward_all = self.scorer.method.backward_on_all_rows();
        let (score_bwd, train_bwd) = if backward_all {
            (n - tf, tf + r)
        } else {
            (0, 0)
        };
        let parts = [
            n as f64 * f.forward_row,
            score_bwd as f64 * f.backward_row,
            r as f64 * f.forward_row + train_bwd as f64 * f.backward_row,
        ];
        let total: f64 = parts.iter().sum::<f64>().max(1.0);
        let l = &mut self.ledger;
        l.inference.rows_forward += n;
        l.inference.cpu_s += cpu_s * parts[0] / total;
        l.scoring.rows_backward += score_bwd;
        l.scoring.cpu_s += cpu_s * parts[1] / total;
        l.training.rows_forward += r;
        l.training.rows_backward += train_bwd;
        l.training.cpu_s += cpu_s * parts[2] / total;
    }

    /// Offers the selected fresh rows to the buffer, each with its admission weight (1/p under
    /// an unbiased policy); returns which were admitted.
    fn retain(
        &mut self,
        b: &FreshBatch<'_>,
        scores: &[f32],
        d: &select::Decision,
        version: u64,
    ) -> Vec<bool> {
        let dim = self.cfg.inputs;
        (0..b.y.len())
            .map(|i| {
                d.selected[i] && {
                    let e = Entry {
                        y: b.y[i],
                        key_bytes: b.keys[i].len() as u32,
                        time: b.times[i],
                        score: scores[i],
                        version,
                        born: self.stats.seen + i as u64,
                        weight: if d.unbiased { d.weights[i] } else { 1.0 },
                    };
                    let x = &b.x[i * dim..(i + 1) * dim];
                    self.buffer.offer(x, e, &mut self.rng)
                }
            })
            .collect()
    }

    /// One Adam step on Σ w_i ℓ_i over the last scored batch, rows with w_i > 0 only.
    fn train(&mut self, w: &[f32]) {
        let g = self.net.gradient(w);
        self.ledger.training.rows_backward += g.backward_rows as u64;
        self.ledger.training.rows_weight_grad += g.rows as u64;
        if !self.guard(g.finite) {
            return;
        }
        let lr_factor = self.recovering().lr_factor;
        self.net.apply(self.cfg.training.learning_rate * lr_factor);
        if let Some(a) = &mut self.average {
            self.net.update_average(a);
        }
        self.stats.steps += 1;
        self.ledger.training.optimizer_steps += 1;
        // Weights count as good after a long enough stretch without a non-finite step.
        if self.good_run >= SNAPSHOT_EVERY && self.stats.steps.is_multiple_of(SNAPSHOT_EVERY) {
            self.last_good = self.net.weights();
        }
    }

    /// A further optimiser step of this micro-batch: its trained fresh rows with their
    /// weights, and a new draw of `replay_n` replayed rows; losses over `denom` as in the
    /// first step. Forward-only scoring: only the trained rows are back-propagated. Its CPU
    /// time is in the micro-batch's last lap (training).
    fn further_step(
        &mut self,
        fx: &[f32],
        fy: &[f32],
        d: &select::Decision,
        replay_n: usize,
        denom: f32,
    ) {
        let dim = self.cfg.inputs;
        let (replay, replay_w) = self.draw_replay(replay_n);
        let (mut x, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &wi) in d.weights.iter().enumerate() {
            if wi > 0.0 {
                x.extend_from_slice(&fx[i * dim..(i + 1) * dim]);
                y.push(fy[i]);
                w.push(wi / denom);
            }
        }
        self.buffer.gather(&replay, &mut x, &mut y);
        w.extend(replay_w.iter().map(|v| v / denom));
        self.ledger.training.rows_forward += y.len() as u64;
        let scored = self.net.score(&self.step_scorer, x, &y, &mut self.rng);
        if let Some(c) = &mut self.clip {
            self.stats.clipped += c.apply(&[], &scored.scores, &mut w) as u64;
        }
        self.train(&w);
        self.stats.trained_replay += replay.len() as u64;
    }

    /// The policy's decision on the fresh rows' scores (`None`: before any score, for a policy
    /// that reads none), with a recovery window's `keep_all` applied.
    fn decide(&mut self, scores: Option<&[f32]>, n: usize) -> select::Decision {
        let mut d = match scores {
            Some(s) => self.selector.decide(s, &mut self.rng),
            None => self.selector.decide_unscored(n, &mut self.rng),
        };
        if self.recovering().keep_all {
            d.keep_all();
        }
        d
    }

    /// `n` replayed rows and their loss weights: as the buffer samples them, or, while a
    /// `replay_recent` reaction lasts, favouring the rows admitted since the change.
    fn draw_replay(&mut self, n: usize) -> (Vec<usize>, Vec<f32>) {
        match self.recovering().recent_half_life {
            Some(h) => self.buffer.sample_recent(n, h, &mut self.rng),
            None => self.buffer.sample(n, &mut self.rng),
        }
    }

    /// The reaction window in force now (none once it has run its samples).
    fn recovering(&self) -> Recovery {
        if self.stats.seen < self.recovery.until {
            self.recovery
        } else {
            Recovery::NONE
        }
    }

    /// Reacts to a detected change (see [`drift::Reaction`]).
    pub fn react(&mut self, cfg: &drift::DriftConfig) {
        let mut window = Recovery {
            until: self.stats.seen + cfg.recovery_samples,
            ..Recovery::NONE
        };
        for r in &cfg.reactions {
            match r {
                drift::Reaction::ResetOptimizer => {
                    let w = self.net.weights();
                    self.net.reset(&w);
                }
                drift::Reaction::BoostLearningRate => window.lr_factor = cfg.lr_boost,
                drift::Reaction::ForgetBuffer => {
                    let keep_from = self.stats.seen.saturating_sub(cfg.keep_recent);
                    self.buffer.forget_born_before(keep_from);
                }
                drift::Reaction::KeepAll => window.keep_all = true,
                drift::Reaction::ReplayRecent => {
                    window.recent_half_life = Some(cfg.recent_half_life);
                }
                drift::Reaction::ExtraSteps => window.steps = cfg.recovery_steps,
                drift::Reaction::ResetSelection => self.selector.reset_window(),
                drift::Reaction::RescoreBuffer => self.rescore_slots(self.buffer.len()),
            }
        }
        self.recovery = window;
    }

    /// Whether an update with these gradients may go ahead. A non-finite gradient (NaN or
    /// ±inf anywhere: their sum is then not finite) skips the update and is counted; after
    /// `max_nonfinite_steps` in a row the model goes back to its last good weights, with
    /// fresh Adam moments (whose size is usually what ran away), and a warning.
    fn guard(&mut self, finite: bool) -> bool {
        if finite {
            self.bad_run = 0;
            self.good_run += 1;
            return true;
        }
        self.good_run = 0;
        self.stats.nonfinite_steps += 1;
        self.bad_run += 1;
        if self.bad_run >= self.cfg.training.max_nonfinite_steps.max(1) {
            self.net.reset(&self.last_good);
            if let Some(a) = &mut self.average {
                a.reset(&self.last_good);
            }
            self.stats.restores += 1;
            self.bad_run = 0;
            tracing::warn!(
                nonfinite_steps = self.stats.nonfinite_steps,
                restores = self.stats.restores,
                learning_rate = self.cfg.training.learning_rate,
                "the model diverged (non-finite gradients): back to its last good weights with fresh Adam moments; a lower training.learning_rate may be needed"
            );
        }
        false
    }

    /// Offline (`gradsift train`): one optimiser step on the given rows, loss weights `w`
    /// normalised to sum to one. Returns each row's score from this very pass, which costs
    /// nothing extra: the ghost norm of the training backward, or the proxy of its forward.
    pub fn fit_rows(&mut self, x: Vec<f32>, y: &[f32], w: &[f32]) -> Vec<f32> {
        let mut clock = Stopwatch::start(&self.ledger, &mut self.cpu_clock);
        let n = y.len() as u64;
        let scored = self.net.score(&self.scorer, x, y, &mut self.rng);
        let total = w.iter().map(|v| *v as f64).sum::<f64>().max(1e-30);
        let mut w: Vec<f32> = w.iter().map(|v| (*v as f64 / total) as f32).collect();
        if let Some(c) = &mut self.clip {
            self.stats.clipped += c.apply(&scored.scores, &scored.scores, &mut w) as u64;
        }
        self.ledger.training.rows_forward += n;
        if self.scorer.method.backward_on_all_rows() {
            self.ledger.training.rows_backward += n;
        }
        self.train(&w);
        self.ledger.training.cpu_s += clock.lap();
        clock.settle(&mut self.ledger, &mut self.cpu_clock);
        scored.scores
    }

    /// Model outputs of `n` rows, forward only (evaluation work, booked as inference).
    pub fn predict(&mut self, x: Vec<f32>, n: usize) -> Vec<f32> {
        let mut clock = Stopwatch::start(&self.ledger, &mut self.cpu_clock);
        let out = self.net.predict(x, n);
        self.ledger.inference.rows_forward += n as u64;
        self.ledger.inference.cpu_s += clock.lap();
        clock.settle(&mut self.ledger, &mut self.cpu_clock);
        out
    }

    /// The model's weights (to keep the best epoch's).
    pub fn weights(&self) -> Vec<SavedLayer> {
        self.net.weights()
    }

    /// Puts back weights taken by [`Self::weights`].
    pub fn set_weights(&mut self, saved: &[SavedLayer]) {
        self.net.set_weights(saved);
    }

    /// Adds what every-row training would have done (offline: per epoch).
    pub fn book_reference(&mut self, w: Work) {
        self.ledger.reference.add(&w);
    }

    /// Books CPU seconds spent choosing rows outside the learner (offline epochs' selection)
    /// as scoring: work the every-row reference never does.
    pub fn book_selection_cpu(&mut self, cpu_s: f64) {
        self.ledger.scoring.cpu_s += cpu_s;
    }

    /// Re-scores the next slice of the buffer with the current model (scoring work).
    fn rescore_slice(&mut self) {
        self.rescore_slots(self.cfg.buffer.rescore_slice);
    }

    /// Re-scores the next `n` buffered rows with the current model (scoring work).
    fn rescore_slots(&mut self, n: usize) {
        let mut clock = Stopwatch::start(&self.ledger, &mut self.cpu_clock);
        let slots = self.buffer.rescore_slice(n);
        if slots.is_empty() {
            return;
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        self.buffer.gather(&slots, &mut x, &mut y);
        let scored = self.net.score(&self.scorer, x, &y, &mut self.rng);
        let rows = slots.len() as u64;
        self.ledger.scoring.rows_forward += rows;
        if self.scorer.method.backward_on_all_rows() {
            self.ledger.scoring.rows_backward += rows;
        }
        for (slot, s) in slots.iter().zip(scored.scores) {
            self.buffer.rescore(*slot, s, self.stats.steps);
        }
        self.ledger.scoring.cpu_s += clock.lap();
        clock.settle(&mut self.ledger, &mut self.cpu_clock);
    }
}

fn weighted_mean(w: &[f32], v: &[f32]) -> f32 {
    let (num, den) = w.iter().zip(v).fold((0f64, 0f64), |(a, c), (wi, li)| {
        (a + (*wi as f64) * (*li as f64), c + *wi as f64)
    });
    if den > 0.0 {
        (num / den) as f32
    } else {
        f32::NAN
    }
}

/// Loss weights of a pass over [fresh ‖ replayed] rows: fresh rows as decided, replayed rows
/// as drawn, over the rows trained (or over all rows considered when the weights are inverse
/// probabilities); and that denominator, which further steps reuse.
fn loss_weights(decision: &select::Decision, replay_w: &[f32]) -> (Vec<f32>, f32) {
    let (n, r) = (decision.weights.len(), replay_w.len());
    let mut w = Vec::with_capacity(n + r);
    w.extend_from_slice(&decision.weights);
    w.extend_from_slice(replay_w);
    let denom = if decision.unbiased {
        (n + r) as f32
    } else {
        (decision.trained() + r).max(1) as f32
    };
    for v in &mut w {
        *v /= denom;
    }
    (w, denom)
}

/// What a step returns: the pass's own buffers cut to the fresh rows (moved, not copied).
fn outcome(
    scored: Scored,
    decision: select::Decision,
    retained: Vec<bool>,
    train_loss: f32,
    outputs_per_row: usize,
) -> StepOutcome {
    let n = decision.weights.len();
    let Scored {
        mut outputs,
        mut scores,
        mut losses,
    } = scored;
    outputs.truncate(n * outputs_per_row);
    scores.truncate(n);
    losses.truncate(n);
    StepOutcome {
        outputs,
        scores,
        losses,
        threshold: decision.threshold,
        trained: decision.weights.iter().map(|w| *w > 0.0).collect(),
        selected: decision.selected,
        retained,
        train_loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small regression learner with a FIFO buffer.
    fn small(
        backend: Backend,
        importance: ImportanceMethod,
        replay_ratio: f64,
        training: TrainingConfig,
    ) -> OnlineLearner {
        let selection = SelectionConfig::default();
        small_selecting(backend, importance, replay_ratio, training, selection)
    }

    fn small_selecting(
        backend: Backend,
        importance: ImportanceMethod,
        replay_ratio: f64,
        training: TrainingConfig,
        selection: SelectionConfig,
    ) -> OnlineLearner {
        OnlineLearner::new(LearnerConfig {
            inputs: 4,
            head: Head::Regression,
            model: ModelConfig {
                backend,
                ..ModelConfig::default()
            },
            importance,
            selection,
            buffer: BufferConfig {
                policy: buffer::EvictionPolicy::Fifo,
                capacity: 64,
                max_bytes: 100_000,
                decay: 0.999,
                replay_ratio,
                replay_sampling: buffer::ReplaySampling::Uniform,
                rescore_every: 0,
                rescore_slice: 16,
            },
            reference_replay_ratio: replay_ratio,
            holdout_every: 10,
            training,
        })
    }

    /// The learner's generator is rand's `SmallRng` to the bit (so swapping it in for a
    /// saveable one moved no figure), and a saved generator continues its stream.
    #[test]
    fn rng_is_small_rng_to_the_bit() {
        use rand::{Rng, RngCore};
        for seed in [0, 7, u64::MAX] {
            let mut a = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut b = LearnerRng::seed_from_u64(seed);
            for _ in 0..200 {
                assert_eq!(a.next_u64(), b.next_u64());
                assert_eq!(a.next_u32(), b.next_u32());
                assert_eq!(a.random::<f64>().to_bits(), b.random::<f64>().to_bits());
                assert_eq!(a.random_range(0..977usize), b.random_range(0..977usize));
            }
            let mut saved: LearnerRng =
                postcard::from_bytes(&postcard::to_stdvec(&b).unwrap()).unwrap();
            assert_eq!(saved.next_u64(), b.next_u64());
        }
    }

    /// `n` micro-batches of the same 8 rows of one key (inputs a ramp, targets 1).
    fn learn_ramps(l: &mut OnlineLearner, n: usize) {
        let keys: Vec<Arc<str>> = (0..8).map(|_| Arc::from("k")).collect();
        let x: Vec<f32> = (0..32).map(|i| i as f32 / 32.0).collect();
        let y = vec![1.0f32; 8];
        for _ in 0..n {
            l.learn_batch(FreshBatch {
                x: &x,
                y: &y,
                keys: &keys,
                times: &[0; 8],
            });
        }
    }

    #[test]
    fn optimiser_steps_leave_parameters_untracked() {
        let mut l = small(
            Backend::Flex,
            ImportanceMethod::Exact,
            1.0,
            TrainingConfig::default(),
        );
        assert!(!l.net.tracks_gradients());
        learn_ramps(&mut l, 3);
        assert!(l.stats().steps >= 3);
        // A require-grad parameter opens an autodiff graph that nothing frees (no burn backward).
        assert!(!l.net.tracks_gradients());
        let mut back = OnlineLearner::new(l.cfg.clone());
        back.restore(l.state().unwrap()).unwrap();
        assert!(!back.net.tracks_gradients());
    }

    /// A checkpoint keeps the divergence guard: the weights it would go back to and its runs
    /// of steps (a restore used to take the saved weights as the snapshot and start the runs
    /// at 0, so a resumed run went back to other weights than the uninterrupted one).
    #[test]
    fn the_divergence_guard_survives_a_checkpoint() {
        let mut l = small(
            Backend::Flex,
            ImportanceMethod::Loss,
            1.0,
            TrainingConfig::default(),
        );
        learn_ramps(&mut l, 300);
        // Past one snapshot (256 steps): the snapshot is not the current weights.
        assert!(l.good_run >= 256);
        let mut back = OnlineLearner::new(l.cfg.clone());
        back.restore(l.state().unwrap()).unwrap();
        assert_eq!((back.good_run, back.bad_run), (l.good_run, l.bad_run));
        let flat = |w: &[SavedLayer]| {
            w.iter()
                .flat_map(|s| s.weight.clone())
                .collect::<Vec<f32>>()
        };
        assert_eq!(flat(&back.last_good), flat(&l.last_good));
        assert_ne!(flat(&back.last_good), flat(&l.net.weights()));
    }

    fn finite_weights(l: &OnlineLearner) -> bool {
        l.net
            .weights()
            .iter()
            .all(|s| s.weight.iter().chain(&s.bias).all(|v| v.is_finite()))
    }

    #[test]
    fn a_diverging_learner_skips_non_finite_steps_and_goes_back_to_good_weights() {
        for backend in [Backend::Flex, Backend::Fused] {
            let training = TrainingConfig {
                micro_batch: 8,
                learning_rate: 1e30,
                seed: 1,
                max_nonfinite_steps: 4,
                steps_per_batch: 1,
                average_decay: 0.5,
            };
            let mut l = small(backend, ImportanceMethod::Loss, 0.0, training);
            for _ in 0..40 {
                feed(&mut l, 8, 0);
            }
            let s = l.stats();
            assert!(s.nonfinite_steps > 0, "{backend:?}: {s:?}");
            assert!(s.restores > 0, "{backend:?}: {s:?}");
            assert!(
                finite_weights(&l),
                "{backend:?}: a skipped update never reaches the weights"
            );
        }
    }

    /// One micro-batch of `n` rows of a fixed, learnable pattern (step `t` shifts it).
    fn feed(l: &mut OnlineLearner, n: usize, t: usize) -> StepOutcome {
        feed_noisy(l, n, t, 0.0)
    }

    /// The same with targets off the pattern by up to ±`noise` (fixed pseudo-random draws).
    fn feed_noisy(l: &mut OnlineLearner, n: usize, t: usize, noise: f32) -> StepOutcome {
        let keys: Vec<Arc<str>> = (0..n).map(|_| Arc::from("k")).collect();
        let x: Vec<f32> = (0..n * 4)
            .map(|i| (((i + 7 * t) * 37 % 101) as f32 - 50.0) / 16.0)
            .collect();
        let y: Vec<f32> = (x.chunks(4).enumerate())
            .map(|(i, r)| {
                let u = ((i * 7919 + t * 104_729) % 1000) as f32 / 500.0 - 1.0;
                r[0] - 0.5 * r[1] + r[2] * r[3] + noise * u
            })
            .collect();
        l.learn_batch(FreshBatch {
            x: &x,
            y: &y,
            keys: &keys,
            times: &vec![0; n],
        })
    }

    /// `selection.clip` trains exactly the rows training without it would (same draws, same
    /// work counted), cuts the weight of the rows above its running norm quantile, and so
    /// learns differently; on one and on two steps per micro-batch, fused and burn.
    #[test]
    fn norm_clipping_cuts_weights_at_equal_compute() {
        for backend in [Backend::Fused, Backend::Flex] {
            for steps in [1, 2] {
                let run = |clip: f64| {
                    let training = TrainingConfig {
                        micro_batch: 8,
                        steps_per_batch: steps,
                        ..TrainingConfig::default()
                    };
                    let selection = SelectionConfig {
                        policy: select::PolicyKind::Random,
                        keep: 0.7,
                        warmup: 0,
                        window: 512,
                        clip,
                        ..SelectionConfig::default()
                    };
                    let mut l =
                        small_selecting(backend, ImportanceMethod::El2n, 2.0, training, selection);
                    for t in 0..120 {
                        feed(&mut l, 8, t);
                    }
                    l
                };
                let (plain, clipped) = (run(0.0), run(0.5));
                let what = format!("{backend:?}, {steps} steps");
                let (a, b) = (plain.ledger(), clipped.ledger());
                for (x, y) in [(&a.training, &b.training), (&a.scoring, &b.scoring)] {
                    assert_eq!(x.rows_forward, y.rows_forward, "{what}");
                    assert_eq!(x.rows_backward, y.rows_backward, "{what}");
                    assert_eq!(x.rows_weight_grad, y.rows_weight_grad, "{what}");
                    assert_eq!(x.optimizer_steps, y.optimizer_steps, "{what}");
                }
                assert_eq!(plain.stats().clipped, 0, "{what}");
                // After 256 fresh norms, rows above the fresh rows' median are cut: up to half
                // of a step's fresh rows, fewer of the replayed ones (already learnt) and of
                // a second step's (just learnt).
                let trained = b.training.rows_weight_grad as f64;
                let cut = clipped.stats().clipped as f64;
                assert!(
                    cut > 0.1 * trained && cut < 0.6 * trained,
                    "{what}: {cut} of {trained}"
                );
                assert_ne!(
                    plain.weights()[0].weight,
                    clipped.weights()[0].weight,
                    "{what}: clipping changes what is learnt"
                );
                // Offline epochs (`fit_rows`) clip too: a row far off the stream's residuals.
                let mut clipped = clipped;
                let before = clipped.stats().clipped;
                let x = vec![0.5, -0.25, 1.0, 2.0];
                clipped.fit_rows(x, &[1e4], &[1.0]);
                assert_eq!(clipped.stats().clipped, before + 1, "{what}: offline");
            }
        }
    }

    /// An averaged model whose outputs overflow does not make the run read as diverged: the
    /// live model's outputs stand in row by row (they were taken as they were).
    #[test]
    fn an_overflowing_average_leaves_the_live_outputs() {
        let training = TrainingConfig {
            micro_batch: 8,
            average_decay: 0.5,
            ..TrainingConfig::default()
        };
        let mut l = small(Backend::Fused, ImportanceMethod::Loss, 2.0, training);
        let mut state = l.state().unwrap();
        let avg = state.average.as_mut().unwrap();
        for layer in &mut avg.weights {
            layer.weight.fill(f32::MAX);
        }
        l.restore(state).unwrap();
        let out = feed_noisy(&mut l, 8, 0, 8.0);
        assert!(
            out.outputs.iter().all(|v| v.is_finite()),
            "{:?}",
            out.outputs
        );
        assert_eq!(l.stats().averaged, 0);
    }

    /// `training.average_decay` changes the predictions and nothing else: the same rows
    /// train to the same live weights, with the same work counted but for one more forward of
    /// each fresh row (inference); the predictions are the averaged model's while it loses
    /// no more than the live one, and a restored learner predicts as the uninterrupted one
    /// (its record of both losses included). Fused and burn.
    #[test]
    fn averaged_weights_predict_and_training_is_unchanged() {
        for backend in [Backend::Fused, Backend::Flex] {
            let training = |average_decay: f64| TrainingConfig {
                micro_batch: 8,
                steps_per_batch: 2,
                average_decay,
                ..TrainingConfig::default()
            };
            // Both learners start from one learner's saved state, so that nothing but the
            // averaging tells them apart.
            let start = small(backend, ImportanceMethod::Loss, 2.0, training(0.0));
            let start = postcard::to_stdvec(&start.state().unwrap()).unwrap();
            let run = |average_decay: f64, batches: usize| {
                let mut l = small(
                    backend,
                    ImportanceMethod::Loss,
                    2.0,
                    training(average_decay),
                );
                l.restore(postcard::from_bytes(&start).unwrap()).unwrap();
                let outs: Vec<StepOutcome> = (0..batches)
                    .map(|t| feed_noisy(&mut l, 8, t, 8.0))
                    .collect();
                (l, outs)
            };
            let ((plain, p), (avg, a)) = (run(0.0, 60), run(0.5, 60));
            let what = format!("{backend:?}");
            let numbers = |l: &OnlineLearner| -> Vec<(Vec<f32>, Vec<f32>)> {
                l.weights()
                    .into_iter()
                    .map(|s| (s.weight, s.bias))
                    .collect()
            };
            assert!(
                numbers(&plain) == numbers(&avg),
                "{what}: the same live weights"
            );
            let (x, y) = (plain.ledger(), avg.ledger());
            let counts = |w: Work| Work { cpu_s: 0.0, ..w };
            assert_eq!(counts(x.training), counts(y.training), "{what}");
            assert_eq!(
                x.inference.rows_forward + 60 * 8,
                y.inference.rows_forward,
                "{what}"
            );
            assert_eq!(
                p[0].outputs, a[0].outputs,
                "{what}: no step yet, the same weights"
            );
            assert_eq!(
                (p[59].losses.clone(), p[59].scores.clone()),
                (a[59].losses.clone(), a[59].scores.clone())
            );
            // Each batch is predicted by the average where it had lost no more than the live
            // weights, by the live weights otherwise (counted).
            let by_average = (0..60).filter(|&t| p[t].outputs != a[t].outputs).count() as u64;
            // (On this noisy pattern the live weights learn fast enough to win most batches.)
            assert!(
                (5..60).contains(&by_average),
                "{what}: {by_average} batches by the average"
            );
            assert!(avg.stats().averaged >= 8 * by_average, "{what}");
            assert_eq!(plain.stats().averaged, 0);
            assert!(avg.compute().reference.flops > plain.compute().reference.flops);
            // A checkpoint keeps the average.
            let (mut first, _) = run(0.9, 30);
            let mut back = small(backend, ImportanceMethod::Loss, 2.0, training(0.9));
            back.restore(first.state().unwrap()).unwrap();
            for t in 30..60 {
                let (o1, o2) = (
                    feed_noisy(&mut first, 8, t, 8.0),
                    feed_noisy(&mut back, 8, t, 8.0),
                );
                assert_eq!(o1.outputs, o2.outputs, "{what}: batch {t}");
            }
            assert_eq!(
                first.ledger().inference.rows_forward,
                y.inference.rows_forward
            );
        }
    }

    /// The drift reactions on the learner: `keep_all` trains every fresh row for the
    /// recovery window whatever the policy, then the policy again; `rescore_buffer` scores
    /// every buffered row once, booked as scoring work; `reset_selection` forgets the window.
    #[test]
    fn keep_all_rescore_buffer_and_reset_selection_reactions() {
        let mut l = small(
            Backend::Fused,
            ImportanceMethod::Exact,
            1.0,
            TrainingConfig::default(),
        );
        l.cfg.selection.warmup = 0;
        l.cfg.selection.keep = 0.25;
        l.cfg.selection.policy = select::PolicyKind::Random;
        l.selector = Selector::new(l.cfg.selection.clone());
        for t in 0..20 {
            feed(&mut l, 8, t);
        }
        let trained = |o: &StepOutcome| o.trained.iter().filter(|t| **t).count();
        let cfg = drift::DriftConfig {
            reactions: vec![
                drift::Reaction::KeepAll,
                drift::Reaction::RescoreBuffer,
                drift::Reaction::ResetSelection,
            ],
            recovery_samples: 80,
            ..drift::DriftConfig::default()
        };
        let scoring_before = l.ledger.scoring.rows_forward;
        let buffered = l.buffer.len() as u64;
        assert!(buffered > 0);
        l.react(&cfg);
        assert_eq!(l.ledger.scoring.rows_forward - scoring_before, buffered);
        assert_eq!(l.selector.scores_in_window(), 0, "the window starts afresh");
        let during: usize = (0..10).map(|t| trained(&feed(&mut l, 8, 20 + t))).sum();
        assert_eq!(during, 80, "every fresh row of the recovery window trains");
        let after: usize = (0..10).map(|t| trained(&feed(&mut l, 8, 30 + t))).sum();
        assert!(
            after < 40,
            "keep 0.25 again after the window: {after} of 80"
        );
    }

    /// Under `sample` the buffer keeps each admitted row's 1/p: the sum over the buffer
    /// estimates the rows of stream its entries came from (so replay weighted by it is an
    /// unbiased sample of that stretch, as the fresh rows are), and replay draws weigh rows
    /// in proportion to it.
    #[test]
    fn sampled_rows_enter_the_buffer_with_their_inverse_probability() {
        let selection = SelectionConfig {
            policy: select::PolicyKind::Sample,
            keep: 0.4,
            warmup: 0,
            window: 64,
            ..SelectionConfig::default()
        };
        let mut l = small_selecting(
            Backend::Fused,
            ImportanceMethod::Loss,
            1.0,
            TrainingConfig::default(),
            selection,
        );
        let (mut covered, mut estimated) = (0.0, 0.0);
        for t in 0..400 {
            feed_noisy(&mut l, 8, t, 0.5);
            if t >= 100 && t % 10 == 0 {
                let oldest = l.buffer.entries().map(|e| e.born).min().unwrap();
                covered += (l.stats.seen - oldest) as f64;
                estimated += l.buffer.entries().map(|e| f64::from(e.weight)).sum::<f64>();
            }
        }
        let ratio = estimated / covered;
        assert!(
            (ratio - 1.0).abs() < 0.15,
            "Σ 1/p over the buffer / rows covered: {ratio}"
        );
        let w: Vec<f32> = l.buffer.entries().map(|e| e.weight).collect();
        assert!(
            w.iter().all(|w| *w >= 1.0) && w.iter().any(|w| *w > 1.5),
            "{w:?}"
        );
        let (slots, rw) = l.draw_replay(2000);
        let mean_w = w.iter().sum::<f32>() / w.len() as f32;
        for (s, r) in slots.iter().zip(&rw) {
            let e = l.buffer.get(*s).unwrap();
            assert!(
                (r - e.weight / mean_w).abs() < 1e-4,
                "{r} vs {}",
                e.weight / mean_w
            );
        }
    }

    /// `replay_recent`: for the recovery window the replayed rows are mostly the newest, then
    /// uniform over the buffer again; no row left it.
    #[test]
    fn replay_recent_favours_the_rows_since_the_change_for_a_while() {
        let mut l = small(
            Backend::Fused,
            ImportanceMethod::Loss,
            1.0,
            TrainingConfig::default(),
        );
        l.buffer = ReplayBuffer::new(BufferConfig {
            capacity: 512,
            ..l.cfg.buffer.clone()
        });
        for t in 0..64 {
            feed(&mut l, 8, t);
        }
        let mean_age = |l: &mut OnlineLearner| {
            let (slots, _) = l.draw_replay(4000);
            let age = |s: &usize| (l.stats.seen - l.buffer.get(*s).unwrap().born) as f64;
            slots.iter().map(age).sum::<f64>() / slots.len() as f64
        };
        let uniform = mean_age(&mut l);
        assert!(uniform > 200.0, "{uniform}: ages 1-512");
        let cfg = drift::DriftConfig {
            reactions: vec![drift::Reaction::ReplayRecent],
            recovery_samples: 80,
            recent_half_life: 32.0,
            ..drift::DriftConfig::default()
        };
        let len = l.buffer.len();
        l.react(&cfg);
        let recent = mean_age(&mut l);
        assert!(recent < 60.0, "{recent}: half-life 32");
        assert_eq!(l.buffer.len(), len);
        for t in 64..74 {
            feed(&mut l, 8, t);
        }
        let after = mean_age(&mut l);
        assert!(after > 200.0, "uniform again after the window: {after}");
    }

    /// `extra_steps`: four optimiser steps per micro-batch for the recovery window, counted
    /// as training work beyond the reference (which keeps the configured one), then one again.
    #[test]
    fn extra_steps_train_harder_while_recovering_and_are_counted() {
        let mut l = small(
            Backend::Fused,
            ImportanceMethod::Loss,
            1.0,
            TrainingConfig::default(),
        );
        for t in 0..10 {
            feed(&mut l, 8, t);
        }
        let cfg = drift::DriftConfig {
            reactions: vec![drift::Reaction::ExtraSteps],
            recovery_samples: 40,
            recovery_steps: 4,
            ..drift::DriftConfig::default()
        };
        l.react(&cfg);
        let (steps, reference) = (l.stats.steps, l.ledger.reference.optimizer_steps);
        for t in 10..15 {
            feed(&mut l, 8, t);
        }
        assert_eq!(
            l.stats.steps - steps,
            5 * 4,
            "4 steps per micro-batch for 40 samples"
        );
        assert_eq!(l.ledger.training.optimizer_steps, l.stats.steps);
        assert_eq!(l.ledger.reference.optimizer_steps - reference, 5);
        for t in 15..20 {
            feed(&mut l, 8, t);
        }
        assert_eq!(
            l.stats.steps - steps,
            5 * 4 + 5,
            "one step again after the window"
        );
        assert!(
            l.compute().saved_backward_fraction < 0.0,
            "more work than the reference"
        );
    }

    #[test]
    fn further_steps_per_micro_batch_train_fresh_and_new_replay_rows_and_are_counted() {
        let run = |steps: u32| {
            let training = TrainingConfig {
                micro_batch: 8,
                seed: 5,
                steps_per_batch: steps,
                ..TrainingConfig::default()
            };
            let mut l = small(Backend::Fused, ImportanceMethod::Loss, 2.0, training);
            let mut late = 0.0;
            for t in 0..60 {
                let out = feed(&mut l, 8, t);
                if t >= 50 {
                    late += out.train_loss;
                }
            }
            (l.stats(), l.compute(), late)
        };
        let (one, c1, loss1) = run(1);
        let (three, c3, loss3) = run(3);
        assert_eq!((one.steps, three.steps), (60, 180));
        // Steps 2 and 3 of a batch forward and back-propagate 8 fresh + 16 replayed rows.
        assert_eq!(
            c3.training.work.rows_weight_grad,
            3 * c1.training.work.rows_weight_grad
        );
        assert_eq!(c3.reference.work.optimizer_steps, 180);
        assert!(
            c3.saved_backward_fraction.abs() < 1e-9,
            "every row, as its reference"
        );
        assert!(three.trained_replay > 2 * one.trained_replay);
        assert!(
            loss3 < loss1,
            "more steps fit the stream better: {loss3} vs {loss1}"
        );
    }

    /// `unit = "micro_batch"`: a micro-batch trains whole or not at all, a dropped one takes
    /// no step and replays nothing, and the work is booked as done: an exact method's
    /// backward of every fresh row is scoring, the step's own backward is training.
    #[test]
    fn micro_batch_selection_drops_whole_steps_and_books_their_work() {
        use select::{PolicyKind, SelectionUnit};
        let cases = [
            (PolicyKind::Random, ImportanceMethod::Loss),
            (PolicyKind::TopK, ImportanceMethod::El2n),
            (PolicyKind::TopK, ImportanceMethod::Exact),
        ];
        for ((policy, method), backend) in cases
            .into_iter()
            .flat_map(|c| [(c, Backend::Fused), (c, Backend::Flex)])
        {
            let selection = SelectionConfig {
                policy,
                unit: SelectionUnit::MicroBatch,
                keep: 0.5,
                warmup: 80,
                window: 256,
                ..SelectionConfig::default()
            };
            let training = TrainingConfig {
                micro_batch: 8,
                seed: 3,
                ..TrainingConfig::default()
            };
            let mut l = small_selecting(backend, method, 2.0, training, selection);
            let mut kept_late = 0;
            let mut kept = 0;
            for t in 0..400 {
                let out = feed(&mut l, 8, t);
                assert!(
                    out.trained.iter().all(|&k| k == out.trained[0]),
                    "{policy:?}: a micro-batch trains whole or not at all"
                );
                assert_eq!(out.outputs.len(), 8, "every row is predicted");
                kept += usize::from(out.trained[0]);
                if t < 10 {
                    assert!(out.trained[0], "warm-up trains every micro-batch");
                } else {
                    kept_late += usize::from(out.trained[0]);
                }
            }
            let (stats, c) = (l.stats(), l.compute());
            let f = kept_late as f64 / 390.0;
            assert!(
                (0.35..0.65).contains(&f),
                "{policy:?}: kept {f} of micro-batches"
            );
            assert_eq!(
                stats.steps, kept as u64,
                "{policy:?}: a dropped batch takes no step"
            );
            assert_eq!(c.training.work.optimizer_steps, kept as u64);
            assert_eq!(c.reference.work.optimizer_steps, 400);
            assert!(stats.trained_replay <= 16 * kept as u64);
            assert!(stats.trained_replay >= 16 * (kept as u64 - 2));
            assert_eq!(
                c.training.work.rows_weight_grad,
                8 * kept as u64 + stats.trained_replay,
                "{policy:?}: the kept batches' fresh and replayed rows"
            );
            // The fused kernel adds a kept batch's replayed rows to its pass; burn forwards
            // the fresh rows again when the decision read their scores.
            let forwarded = c.training.work.rows_forward - stats.trained_replay;
            if backend == Backend::Fused || policy == PolicyKind::Random {
                assert_eq!(
                    forwarded, 0,
                    "{policy:?} {backend:?}: fresh rows forwarded once"
                );
            } else {
                assert!(
                    forwarded <= 8 * kept as u64,
                    "{policy:?} {backend:?}: {forwarded}"
                );
            }
            let scoring_backward = if method == ImportanceMethod::Exact {
                3200
            } else {
                0
            };
            assert_eq!(c.scoring.work.rows_backward, scoring_backward);
            assert_eq!(c.inference.work.rows_forward, 3200);
            if method != ImportanceMethod::Exact {
                assert!(
                    c.saved_backward_fraction > 0.4,
                    "{policy:?}: {}",
                    c.saved_backward_fraction
                );
            }
        }
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn the_fused_backend_learns_as_burn_does() {
        use importance::ImportanceMethod::*;
        for method in [Exact, LastLayer, El2n, Loss, Random] {
            let training = TrainingConfig {
                micro_batch: 16,
                seed: 3,
                ..TrainingConfig::default()
            };
            let mut flex = small(Backend::Flex, method, 1.0, training.clone());
            let mut fused = small(Backend::Fused, method, 1.0, training);
            // burn's seeded initialisation is process-wide, and other tests draw from it in
            // parallel: start both from one set of weights.
            fused.set_weights(&flex.weights());
            for t in 0..30 {
                let (a, b) = (feed(&mut flex, 16, t), feed(&mut fused, 16, t));
                let what = format!("{method:?} step {t}");
                close(&b.outputs, &a.outputs, 1e-3, &format!("{what}: outputs"));
                close(&b.scores, &a.scores, 1e-3, &format!("{what}: scores"));
                assert_eq!(a.trained, b.trained, "{what}: the same rows trained");
            }
            let (sa, sb) = (flex.stats(), fused.stats());
            assert_eq!(sa.steps, sb.steps, "{method:?}");
            assert_eq!(
                flex.compute().training.work.rows_backward,
                fused.compute().training.work.rows_backward,
                "{method:?}: the same work is counted"
            );
        }
    }

    #[test]
    fn a_fused_checkpoint_resumes_exactly_and_a_burn_one_is_migrated() {
        let fresh = |backend| {
            let training = TrainingConfig {
                micro_batch: 8,
                seed: 5,
                ..TrainingConfig::default()
            };
            small(backend, ImportanceMethod::Exact, 1.0, training)
        };
        let trained = |backend| {
            let mut l = fresh(backend);
            for t in 0..10 {
                feed(&mut l, 8, t);
            }
            l
        };
        let mut a = trained(Backend::Fused);
        let mut b = fresh(Backend::Fused);
        b.restore(a.state().unwrap()).unwrap();
        // Same weights, same Adam moments: the next update is the same (the replay draws
        // differ after a restore on purpose, so compare with replay off).
        a.cfg.buffer.replay_ratio = 0.0;
        b.cfg.buffer.replay_ratio = 0.0;
        feed(&mut a, 8, 10);
        feed(&mut b, 8, 10);
        for (x, y) in a.weights().iter().zip(b.weights()) {
            assert_eq!(x.weight, y.weight, "resumed Adam state");
            assert_eq!((x.weight_id, x.bias_id), (y.weight_id, y.bias_id));
        }

        // A checkpoint of the burn backend: weights, counters and buffer carry over.
        let mut flex = trained(Backend::Flex);
        let mut fused = fresh(Backend::Fused);
        fused.restore(flex.state().unwrap()).unwrap();
        assert_eq!(fused.stats().seen, 80);
        assert_eq!(fused.buffer().len(), flex.buffer().len());
        let (p, q) = (feed(&mut flex, 8, 10), feed(&mut fused, 8, 10));
        close(
            &q.outputs,
            &p.outputs,
            1e-4,
            "predictions right after the migration",
        );
    }
}
