//! One model for the whole stream, or one per key (`model.scope = "per_key"`).
//!
//! Keys are sometimes different sites: four base stations whose UE positions are given in
//! overlapping relative frames teach one shared MLP contradictory maps, and their rows crowd
//! each other out of one replay buffer. Per key, each site gets its own learner (model,
//! Adam, selector, replay buffer), created at the key's first row with the same seed. At
//! most `model.max_models` are kept (the least recently used is dropped, its counters kept),
//! so memory stays bounded: max_models × (model + buffer). Under `per_key` the feature stage
//! cuts each key's rows into micro-batches of their own (`Samples::cut_by_key`), so a
//! micro-batch here is one key's; one of several keys (a feed's or the stream end's last
//! rows) is split by key in arrival order, each part one step of its key's learner.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::buffer::BufferStats;
use super::compute::{ComputeLedger, ComputeReport, FlopModel};
use super::{FreshBatch, LearnerConfig, LearnerState, LearnerStats, OnlineLearner, StepOutcome};

/// `model.scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelScope {
    #[default]
    Shared,
    PerKey,
}

/// What a checkpoint keeps of [`Learners`].
#[derive(Serialize, Deserialize)]
pub struct LearnersState {
    pub scope: ModelScope,
    /// ("" for the shared model.)
    pub models: Vec<(Arc<str>, LearnerState)>,
    pub retired: LearnerStats,
    pub retired_ledger: ComputeLedger,
    pub evicted: u64,
    /// The dropped models' buffer counters (the report's admitted never goes back).
    pub retired_buffer: BufferStats,
    /// Each model's last use (aligned with `models`) and the use counter: which model
    /// `max_models` drops next is the same after a resume.
    pub used: Vec<u64>,
    pub tick: u64,
}

impl LearnersState {
    /// Samples the saved learners had seen.
    pub fn seen(&self) -> u64 {
        self.retired.seen + self.models.iter().map(|(_, s)| s.seen()).sum::<u64>()
    }
}

/// The replay buffers, summed.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferTotals {
    pub len: usize,
    pub bytes: usize,
    pub stats: BufferStats,
}

/// The stream's learners (see the module doc).
pub struct Learners {
    cfg: LearnerConfig,
    /// The one model's slot name under `shared` (made once: a step must not allocate it).
    shared: Arc<str>,
    flops: FlopModel,
    scope: ModelScope,
    max_models: usize,
    /// Each with the tick it was last used at.
    models: BTreeMap<Arc<str>, (OnlineLearner, u64)>,
    tick: u64,
    /// Counters of dropped models.
    retired: LearnerStats,
    retired_ledger: ComputeLedger,
    retired_buffer: BufferStats,
    /// Models dropped at `max_models`.
    pub evicted: u64,
}

impl Learners {
    pub fn new(cfg: LearnerConfig, scope: ModelScope, max_models: usize) -> Self {
        let mut widths = vec![cfg.inputs];
        widths.extend(&cfg.model.hidden);
        widths.push(cfg.head.outputs());
        let mut l = Learners {
            shared: Arc::from(""),
            flops: FlopModel::of_learner(&widths, cfg.training.average_decay),
            cfg,
            scope,
            max_models: max_models.max(1),
            models: BTreeMap::new(),
            tick: 0,
            retired: LearnerStats::default(),
            retired_ledger: ComputeLedger::default(),
            retired_buffer: BufferStats::default(),
            evicted: 0,
        };
        if scope == ModelScope::Shared {
            let shared = OnlineLearner::new(l.cfg.clone());
            l.models.insert(l.shared.clone(), (shared, 0));
        }
        l
    }

    /// The model of `key`, made (and the least recently used dropped) as needed.
    fn model(&mut self, key: &Arc<str>) -> &mut OnlineLearner {
        self.tick += 1;
        let slot: Arc<str> = match self.scope {
            ModelScope::Shared => self.shared.clone(),
            ModelScope::PerKey => key.clone(),
        };
        if !self.models.contains_key(&slot) {
            // `while`: a set restored under a smaller `max_models` comes down to it.
            while self.models.len() >= self.max_models
                && let Some(old) = self
                    .models
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| k.clone())
            {
                let (gone, _) = self.models.remove(&old).expect("present");
                add_stats(&mut self.retired, &gone.stats());
                self.retired_ledger.add(&gone.ledger());
                self.retired_buffer.add(&gone.buffer().stats);
                self.evicted += 1;
                tracing::warn!(key = %old, max_models = self.max_models, "model.max_models reached: the least recently used key's model is dropped");
            }
            let fresh = OnlineLearner::new(self.cfg.clone());
            self.models.insert(slot.clone(), (fresh, 0));
        }
        let (m, t) = self.models.get_mut(&slot).expect("present");
        *t = self.tick;
        m
    }

    /// One prequential step over a micro-batch (split by key under `per_key`).
    pub fn learn_batch(&mut self, b: FreshBatch<'_>) -> StepOutcome {
        let n = b.y.len();
        if n == 0 {
            return StepOutcome::default();
        }
        if self.scope == ModelScope::Shared || b.keys.iter().all(|k| *k == b.keys[0]) {
            return self.model(&b.keys[0]).learn_batch(b);
        }
        let dim = self.cfg.inputs;
        let k = self.cfg.head.outputs();
        let mut groups: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
        for (i, key) in b.keys.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| g == key) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((key.clone(), vec![i])),
            }
        }
        let mut out = StepOutcome {
            outputs: vec![0.0; n * k],
            scores: vec![0.0; n],
            losses: vec![0.0; n],
            selected: vec![false; n],
            trained: vec![false; n],
            retained: vec![false; n],
            ..Default::default()
        };
        let (mut loss, mut losses, mut diverged) = (0.0f32, 0, false);
        for (key, rows) in groups {
            let x: Vec<f32> = rows
                .iter()
                .flat_map(|&i| b.x[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let y: Vec<f32> = rows.iter().map(|&i| b.y[i]).collect();
            let keys: Vec<Arc<str>> = rows.iter().map(|&i| b.keys[i].clone()).collect();
            let times: Vec<i64> = rows.iter().map(|&i| b.times[i]).collect();
            let part = self.model(&key).learn_batch(FreshBatch {
                x: &x,
                y: &y,
                keys: &keys,
                times: &times,
            });
            for (j, &i) in rows.iter().enumerate() {
                out.outputs[i * k..(i + 1) * k].copy_from_slice(&part.outputs[j * k..(j + 1) * k]);
                out.scores[i] = part.scores[j];
                out.losses[i] = part.losses[j];
                out.selected[i] = part.selected[j];
                out.trained[i] = part.trained[j];
                out.retained[i] = part.retained[j];
            }
            out.threshold = part.threshold;
            if part.train_loss.is_finite() {
                loss += part.train_loss;
                losses += 1;
            } else if part.trained.iter().any(|&t| t) {
                // A key's model that trained to a loss that is not a number: the batch's loss
                // says so, as one shared model's would, rather than the other keys' mean.
                diverged = true;
            }
        }
        out.train_loss = if diverged {
            f32::NAN
        } else if losses > 0 {
            loss / losses as f32
        } else {
            f32::NAN
        };
        out
    }

    pub fn stats(&self) -> LearnerStats {
        let mut s = self.retired;
        for (m, _) in self.models.values() {
            add_stats(&mut s, &m.stats());
        }
        s
    }

    /// The work of every model, dropped ones included.
    pub fn compute(&self) -> ComputeReport {
        let mut ledger = self.retired_ledger;
        for (m, _) in self.models.values() {
            ledger.add(&m.ledger());
        }
        ledger.report(&self.flops, self.cfg.reference_replay_ratio)
    }

    pub fn buffers(&self) -> BufferTotals {
        let mut t = BufferTotals {
            stats: self.retired_buffer,
            ..BufferTotals::default()
        };
        for (m, _) in self.models.values() {
            let b = m.buffer();
            t.len += b.len();
            t.bytes += b.bytes();
            t.stats.add(&b.stats);
        }
        t
    }

    /// Every model reacts to a detected change.
    pub fn react(&mut self, cfg: &super::drift::DriftConfig) {
        for (m, _) in self.models.values_mut() {
            m.react(cfg);
        }
    }

    /// Models currently kept.
    pub fn models(&self) -> usize {
        self.models.len()
    }

    pub fn state(&self) -> anyhow::Result<LearnersState> {
        let mut models = Vec::with_capacity(self.models.len());
        let mut used = Vec::with_capacity(self.models.len());
        for (k, (m, t)) in &self.models {
            models.push((k.clone(), m.state()?));
            used.push(*t);
        }
        Ok(LearnersState {
            scope: self.scope,
            models,
            retired: self.retired,
            retired_ledger: self.retired_ledger,
            evicted: self.evicted,
            retired_buffer: self.retired_buffer,
            used,
            tick: self.tick,
        })
    }

    /// Continues from a saved state of the same scope.
    pub fn restore(&mut self, s: LearnersState) -> anyhow::Result<()> {
        anyhow::ensure!(
            s.scope == self.scope,
            "the checkpoint's models are {:?}; this pipeline's model.scope is {:?}",
            s.scope,
            self.scope
        );
        self.models.clear();
        for (i, (k, state)) in s.models.into_iter().enumerate() {
            let mut m = OnlineLearner::new(self.cfg.clone());
            m.restore(state)?;
            self.models
                .insert(k, (m, s.used.get(i).copied().unwrap_or(0)));
        }
        self.tick = s.tick;
        self.retired_buffer = s.retired_buffer;
        if self.scope == ModelScope::Shared && self.models.is_empty() {
            let shared = OnlineLearner::new(self.cfg.clone());
            self.models.insert(self.shared.clone(), (shared, 0));
        }
        self.retired = s.retired;
        self.retired_ledger = s.retired_ledger;
        self.evicted = s.evicted;
        Ok(())
    }
}

fn add_stats(a: &mut LearnerStats, b: &LearnerStats) {
    a.seen += b.seen;
    a.selected += b.selected;
    a.trained_fresh += b.trained_fresh;
    a.trained_replay += b.trained_replay;
    a.backpropagated += b.backpropagated;
    a.steps += b.steps;
    a.nonfinite_steps += b.nonfinite_steps;
    a.restores += b.restores;
    a.clipped += b.clipped;
    a.averaged += b.averaged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::buffer::{BufferConfig, EvictionPolicy, ReplaySampling};
    use crate::learner::importance::ImportanceMethod;
    use crate::learner::model::Head;
    use crate::learner::select::SelectionConfig;
    use crate::learner::{ModelConfig, TrainingConfig};

    fn config() -> LearnerConfig {
        LearnerConfig {
            inputs: 2,
            head: Head::Regression,
            model: ModelConfig::default(),
            importance: ImportanceMethod::Loss,
            selection: SelectionConfig::default(),
            buffer: BufferConfig {
                policy: EvictionPolicy::Fifo,
                capacity: 32,
                max_bytes: 100_000,
                decay: 0.999,
                replay_ratio: 1.0,
                replay_sampling: ReplaySampling::Uniform,
                rescore_every: 0,
                rescore_slice: 16,
            },
            training: TrainingConfig {
                micro_batch: 4,
                seed: 2,
                ..TrainingConfig::default()
            },
            reference_replay_ratio: 1.0,
            holdout_every: 10,
        }
    }

    fn step(l: &mut Learners, keys: &[&str]) -> StepOutcome {
        let n = keys.len();
        let x: Vec<f32> = (0..2 * n).map(|i| i as f32 / 10.0).collect();
        let y: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let keys: Vec<Arc<str>> = keys.iter().map(|k| Arc::from(*k)).collect();
        l.learn_batch(FreshBatch {
            x: &x,
            y: &y,
            keys: &keys,
            times: &vec![0; n],
        })
    }

    #[test]
    fn per_key_splits_a_micro_batch_and_each_key_learns_alone() {
        let mut l = Learners::new(config(), ModelScope::PerKey, 2);
        let out = step(&mut l, &["a", "b", "a", "b"]);
        assert_eq!(out.outputs.len(), 4);
        assert_eq!(l.models(), 2);
        assert_eq!(l.stats().seen, 4);
        assert_eq!(l.stats().steps, 2, "one step per key's part");
        // A key's model answers as a lone learner of that key's rows does.
        let mut alone = Learners::new(config(), ModelScope::Shared, 1);
        let keys: Vec<Arc<str>> = vec![Arc::from("a"); 2];
        let lone = alone.learn_batch(FreshBatch {
            x: &[0.0, 0.1, 0.4, 0.5],
            y: &[0.0, 2.0],
            keys: &keys,
            times: &[0, 0],
        });
        assert_eq!(
            (out.outputs[0], out.outputs[2]),
            (lone.outputs[0], lone.outputs[1])
        );
        assert_eq!(out.trained, [true; 4]);
        // A third key drops the least recently used model; its counts stay.
        step(&mut l, &["b"]);
        step(&mut l, &["c"]);
        assert_eq!((l.models(), l.evicted), (2, 1));
        assert_eq!(l.stats().seen, 6);
        assert_eq!(l.compute().inference.work.rows_forward, 6);
    }

    /// One key's loss overflowing makes the batch's training loss not a number, as one
    /// shared model's would (it was the other keys' mean, and the loss gauge looked sound).
    #[test]
    fn a_key_whose_loss_overflows_shows_in_the_batchs_loss() {
        let mut l = Learners::new(config(), ModelScope::PerKey, 2);
        let keys: Vec<Arc<str>> = ["a", "b", "a", "b"].iter().map(|k| Arc::from(*k)).collect();
        let mut loss = |y: [f32; 4]| {
            let b = FreshBatch {
                x: &[0.1; 8],
                y: &y,
                keys: &keys,
                times: &[0; 4],
            };
            l.learn_batch(b).train_loss
        };
        assert!(loss([1.0, 2.0, 1.0, 2.0]).is_finite());
        assert!(loss([1.0, 3e19, 1.0, 3e19]).is_nan());
    }

    /// The stream's FLOPs book averaged weights' update with each step, as each learner
    /// does: the report reads these.
    #[test]
    fn averaged_weights_cost_flops_in_the_streams_count() {
        for scope in [ModelScope::Shared, ModelScope::PerKey] {
            let learners = |average_decay: f64| {
                let mut cfg = config();
                cfg.training.average_decay = average_decay;
                let mut l = Learners::new(cfg, scope, 2);
                step(&mut l, &["a", "a", "b", "b"]);
                l
            };
            let (plain, averaged) = (learners(0.0), learners(0.9));
            let (p, a) = (plain.compute(), averaged.compute());
            assert_eq!(
                a.training.work.optimizer_steps,
                p.training.work.optimizer_steps
            );
            assert!(a.training.flops > p.training.flops, "{scope:?}");
            assert!(a.reference.flops > p.reference.flops, "{scope:?}");
        }
    }

    #[test]
    fn per_key_models_survive_a_checkpoint_and_a_scope_change_is_refused() {
        let mut l = Learners::new(config(), ModelScope::PerKey, 4);
        step(&mut l, &["a", "b", "a"]);
        let mut back = Learners::new(config(), ModelScope::PerKey, 4);
        back.restore(l.state().unwrap()).unwrap();
        assert_eq!((back.models(), back.stats().seen), (2, 3));
        let (o1, o2) = (step(&mut l, &["b"]), step(&mut back, &["b"]));
        assert_eq!(o1.outputs, o2.outputs, "the same model of key b");
        let mut shared = Learners::new(config(), ModelScope::Shared, 1);
        let err = shared.restore(l.state().unwrap()).unwrap_err().to_string();
        assert!(err.contains("model.scope"), "{err}");
        // Restored under a smaller `max_models`, the set comes down to it at the next new
        // key (before, each new key dropped one model and added one).
        step(&mut l, &["c", "d"]);
        let mut small = Learners::new(config(), ModelScope::PerKey, 2);
        small.restore(l.state().unwrap()).unwrap();
        assert_eq!(small.models(), 4);
        step(&mut small, &["e"]);
        assert_eq!(small.models(), 2);
        // Which model `max_models` drops next is the same after a resume: the least
        // recently used, not the first key of equal (unsaved) ticks.
        let mut two = Learners::new(config(), ModelScope::PerKey, 2);
        step(&mut two, &["b", "a"]);
        step(&mut two, &["a"]);
        let mut back = Learners::new(config(), ModelScope::PerKey, 2);
        back.restore(two.state().unwrap()).unwrap();
        step(&mut two, &["c"]);
        step(&mut back, &["c"]);
        let keys = |l: &Learners| l.models.keys().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(keys(&two), ["a", "c"]);
        assert_eq!(keys(&back), keys(&two));
    }
}
