//! Selection: which fresh samples are trained on, and with what loss weight.
//!
//! Every policy sees the same things, the micro-batch's importance scores and a window of the
//! last `window` scores (so it follows drift; the quantile-sketch crates summarise a whole
//! stream and cannot forget), and returns the same [`Decision`]. The first `warmup` samples
//! train unconditionally: an untrained model's scores mean little. The policies, each a
//! small type in its own file:
//! - `top_k` (the published rule): keep scores ≥ τ, the (1 − keep) quantile of the window;
//!   `unbiased_q > 0` also trains a below-τ row with probability q and weight 1/q (InfoBatch).
//! - `random`: keep each row with probability `keep`, whatever its score (the baseline every
//!   other policy must beat at equal compute; it needs no scores at all).
//! - `sample`: importance sampling, keep row i with p_i ∝ s_i (mean `keep`), weight 1/p_i.
//! - `infobatch`: prune below-mean rows at random, reweight the survivors (Qin et al. 2024).
//! - `trim`: drop the top `trim` fraction by score (an outlier filter), then sample at random.
//! - `surprise`: compute follows surprise: keep fraction and replay ratio scale with the
//!   stream's score level against its running baseline.
//!
//! A policy with inverse-probability weights marks its decision `unbiased`: the learner then
//! normalises the loss by the rows considered, not the rows kept, so the expected gradient of
//! the fresh rows is their full-data gradient. The buffer keeps each admitted row's weight
//! and a replayed row carries it (over the buffer's mean weight), so replay is an unbiased
//! sample of the stream the buffer covers too, under an eviction blind to the rows (FIFO,
//! reservoir; `buffer.rs`, `Entry::weight`).
//!
//! `clip = q` bounds, rather than selects: every trained row's weight is cut to the `q`
//! quantile of recent gradient norms over its own norm, where that is below 1 (`clip.rs`).
//!
//! `unit = "micro_batch"` applies the same policies to whole micro-batches, each scored by the
//! mean of its rows' scores (its window holds micro-batch means). Why: a training step has a
//! cost that does not shrink with its rows (the optimiser update of every parameter, the
//! products' fixed cost; about 10 µs of a 15-17 µs step at micro-batches of 8 on Milan), so
//! dropping rows saves far less CPU than rows. A dropped micro-batch takes no step at all:
//! nothing is replayed for it, the optimiser does not run, and its rows do not enter the
//! replay buffer (as dropped rows never do).

mod clip;
mod infobatch;
mod sample;
mod surprise;
mod top_k;
mod trim;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::sorted;

pub use clip::NormClip;
pub use surprise::SurpriseConfig;

/// The policies (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    #[default]
    TopK,
    Random,
    Sample,
    Infobatch,
    Trim,
    Surprise,
}

impl PolicyKind {
    /// The name used in pipeline files.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::TopK => "top_k",
            PolicyKind::Random => "random",
            PolicyKind::Sample => "sample",
            PolicyKind::Infobatch => "infobatch",
            PolicyKind::Trim => "trim",
            PolicyKind::Surprise => "surprise",
        }
    }

    /// Whether decisions depend on the scores (random needs none: no scoring work).
    pub fn needs_scores(self) -> bool {
        self != PolicyKind::Random
    }
}

/// What a policy decides on (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionUnit {
    /// Each fresh row.
    #[default]
    Row,
    /// Each micro-batch as a whole, by its mean score; a dropped one takes no step.
    MicroBatch,
}

/// Selection settings (the `[selection]` table of a pipeline).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionConfig {
    #[serde(default)]
    pub policy: PolicyKind,
    /// Whether the policy decides rows or whole micro-batches.
    #[serde(default)]
    pub unit: SelectionUnit,
    /// Fraction of samples to train on after warm-up, in (0, 1].
    pub keep: f64,
    /// Number of samples that train unconditionally at the start.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Number of recent scores the policies look at (with `unit = "micro_batch"`, the means
    /// of the micro-batches over as many rows: see [`window_in_units`]).
    #[serde(default = "default_window")]
    pub window: usize,
    /// `top_k`: probability of training a below-threshold sample (0 disables it).
    #[serde(default)]
    pub unbiased_q: f64,
    /// `trim`: fraction of the highest scores dropped, in [0, 1).
    #[serde(default = "default_trim")]
    pub trim: f64,
    /// `surprise`: how the keep fraction follows the score level.
    #[serde(default)]
    pub surprise: SurpriseConfig,
    /// Norm clipping: each trained row's weight times min(1, τ/‖g_i‖), τ this quantile of
    /// the last `window` fresh rows' norms, in (0, 1); 0 is off (see [`NormClip`]).
    #[serde(default)]
    pub clip: f64,
}

impl Default for SelectionConfig {
    /// Every row trained (`top_k` at keep 1).
    fn default() -> Self {
        SelectionConfig {
            policy: PolicyKind::TopK,
            unit: SelectionUnit::Row,
            keep: 1.0,
            warmup: default_warmup(),
            window: default_window(),
            unbiased_q: 0.0,
            trim: default_trim(),
            surprise: SurpriseConfig::default(),
            clip: 0.0,
        }
    }
}

fn default_warmup() -> u64 {
    1000
}
fn default_window() -> usize {
    4096
}
fn default_trim() -> f64 {
    0.03
}

/// The settings a [`Selector`] runs with: with `unit = "micro_batch"` its window holds
/// micro-batch means, `window / micro_batch` of them, so that it spans the same stretch of
/// the stream as a row window would; so do `surprise`'s spans, given in rows.
pub fn window_in_units(mut cfg: SelectionConfig, micro_batch: usize) -> SelectionConfig {
    if cfg.unit == SelectionUnit::MicroBatch {
        let b = micro_batch.max(1);
        cfg.window = (cfg.window / b).max(1);
        cfg.surprise.short = (cfg.surprise.short / b as f64).max(1.0);
        cfg.surprise.long = (cfg.surprise.long / b as f64).max(1.0);
    }
    cfg
}

/// The decision for one micro-batch.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The policy's cut-off for this batch (τ for `top_k` and `trim`, the window mean for
    /// `sample` and `infobatch`; −∞ while warming up or when there is none).
    pub threshold: f32,
    /// Whether each row was chosen by the policy.
    pub selected: Vec<bool>,
    /// Loss weight of each row in the training step: 0 dropped.
    pub weights: Vec<f32>,
    /// The weights are inverse probabilities (normalise by the rows considered).
    pub unbiased: bool,
    /// Multiplier of the replay ratio for this step (1 but for `surprise`).
    pub replay_scale: f64,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            threshold: f32::NEG_INFINITY,
            selected: Vec::new(),
            weights: Vec::new(),
            unbiased: false,
            replay_scale: 1.0,
        }
    }
}

impl Decision {
    /// Number of rows with a non-zero training weight.
    pub fn trained(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }
    fn push(&mut self, selected: bool, weight: f32) {
        self.selected.push(selected);
        self.weights.push(weight);
    }
    /// Every row selected and trained with weight 1 (a drift reaction's recovery window).
    pub fn keep_all(&mut self) {
        self.selected.fill(true);
        self.weights.fill(1.0);
        self.unbiased = false;
    }
}

/// The last `cap` scores, oldest overwritten first, with their running sum and, once a
/// quantile has been asked for, a sorted copy kept up to date so that a quantile is one
/// lookup. Why: at micro-batch 8 and a window of 2,048-4,096 a selection over a fresh copy
/// every step was the learner's largest cost (14% of the learner core's time, `perf`);
/// keeping the copy sorted costs two binary searches and one short memmove per score
/// ([`sorted::replace`]), which only the quantile rules need.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScoreWindow {
    ring: Vec<f32>,
    next: usize,
    cap: usize,
    /// `ring`'s values in `total_cmp` order, kept only once a quantile was asked for
    /// (`ordered`): a policy that reads none does not pay the memmove per score (rebuilt
    /// after a restore).
    #[serde(skip)]
    sorted: Vec<f32>,
    #[serde(skip)]
    ordered: bool,
    /// Σ `ring`, kept as scores come and go (compensated: a huge score leaving does not
    /// take the small ones with it) and summed afresh at every wrap of the ring: the mean
    /// InfoBatch reads every micro-batch was a pass over the window, about a tenth of an
    /// LTE step's CPU. Saved, so that a resumed run's mean is the same to the bit.
    sum: Compensated,
}

/// A sum with Neumaier's compensation term (Kahan-Babuška): exact to a rounding of the true
/// sum even when large terms cancel.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Compensated {
    sum: f64,
    comp: f64,
}

impl Compensated {
    fn of(values: &[f32]) -> Self {
        let mut c = Compensated::default();
        for v in values {
            c.add(f64::from(*v));
        }
        c
    }
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        self.comp += if self.sum.abs() >= x.abs() {
            (self.sum - t) + x
        } else {
            (x - t) + self.sum
        };
        self.sum = t;
    }
    fn value(&self) -> f64 {
        self.sum + self.comp
    }
}

impl ScoreWindow {
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        ScoreWindow {
            ring: Vec::with_capacity(cap),
            next: 0,
            cap,
            sorted: Vec::new(),
            ordered: false,
            sum: Compensated::default(),
        }
    }
    /// Adds a score. A score that is not a number (a diverged model's) is left out: as a
    /// stand-in it would move the quantiles, and make the mean about MAX/len so that every
    /// other score looked negligible for a whole window.
    pub fn push(&mut self, s: f32) {
        if !s.is_finite() {
            return;
        }
        if self.ordered {
            self.sync_sorted();
        }
        let sorted = self.ordered;
        if self.ring.len() < self.cap {
            self.ring.push(s);
            if sorted {
                sorted::insert(&mut self.sorted, s);
            }
            self.sum.add(f64::from(s));
        } else {
            let old = std::mem::replace(&mut self.ring[self.next], s);
            if sorted {
                sorted::replace(&mut self.sorted, old, s);
            }
            self.sum.add(f64::from(s));
            self.sum.add(-f64::from(old));
        }
        self.next = (self.next + 1) % self.cap;
        if self.next == 0 {
            self.sum = Compensated::of(&self.ring);
        }
    }
    /// Rebuilds the sorted copy when it does not mirror the ring (after a restore or a
    /// resize, or when first asked for); from then on pushes keep it.
    fn sync_sorted(&mut self) {
        if !self.ordered || self.sorted.len() != self.ring.len() {
            self.sorted.clone_from(&self.ring);
            self.sorted.sort_unstable_by(f32::total_cmp);
            self.ordered = true;
        }
    }
    /// How many scores in the window are below `x`: a binary search once the sorted copy is
    /// kept, else one pass (cheaper than keeping the copy for a policy that asks once per
    /// micro-batch and never for a quantile).
    pub fn count_below(&self, x: f32) -> usize {
        if self.ordered && self.sorted.len() == self.ring.len() {
            self.sorted.partition_point(|v| *v < x)
        } else {
            self.ring.iter().filter(|v| **v < x).count()
        }
    }
    pub fn len(&self) -> usize {
        self.ring.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
    pub fn values(&self) -> &[f32] {
        &self.ring
    }
    /// The `level` quantile (the k-th smallest, k = ⌊level·len⌋); −∞ when empty.
    pub fn quantile(&mut self, level: f64) -> f32 {
        if self.ring.is_empty() {
            return f32::NEG_INFINITY;
        }
        self.sync_sorted();
        let len = self.sorted.len();
        let k = ((level.clamp(0.0, 1.0) * len as f64).floor() as usize).min(len - 1);
        self.sorted[k]
    }
    pub fn mean(&self) -> f64 {
        if self.ring.is_empty() {
            return 0.0;
        }
        self.sum.value() / self.ring.len() as f64
    }
    /// A window of another capacity keeps its newest scores.
    fn resized(mut self, cap: usize) -> Self {
        let cap = cap.max(1);
        if self.cap != cap {
            let mut ordered: Vec<f32> = if self.ring.len() < self.cap {
                self.ring.clone()
            } else {
                let (a, b) = self.ring.split_at(self.next);
                b.iter().chain(a).copied().collect()
            };
            let drop = ordered.len().saturating_sub(cap);
            ordered.drain(..drop);
            self.next = ordered.len() % cap;
            self.ring = ordered;
            self.cap = cap;
            self.ordered = false;
            self.sum = Compensated::of(&self.ring);
        }
        self
    }
}

/// One policy's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Rule {
    TopK(top_k::TopK),
    Random,
    Sample(sample::Proportional),
    InfoBatch(infobatch::InfoBatch),
    Trim(trim::Trim),
    Surprise(surprise::Surprise),
}

impl Rule {
    fn new(kind: PolicyKind) -> Self {
        match kind {
            PolicyKind::TopK => Rule::TopK(top_k::TopK::default()),
            PolicyKind::Random => Rule::Random,
            PolicyKind::Sample => Rule::Sample(sample::Proportional::default()),
            PolicyKind::Infobatch => Rule::InfoBatch(infobatch::InfoBatch),
            PolicyKind::Trim => Rule::Trim(trim::Trim),
            PolicyKind::Surprise => Rule::Surprise(surprise::Surprise::default()),
        }
    }
    fn kind(&self) -> PolicyKind {
        match self {
            Rule::TopK(_) => PolicyKind::TopK,
            Rule::Random => PolicyKind::Random,
            Rule::Sample(_) => PolicyKind::Sample,
            Rule::InfoBatch(_) => PolicyKind::Infobatch,
            Rule::Trim(_) => PolicyKind::Trim,
            Rule::Surprise(_) => PolicyKind::Surprise,
        }
    }
}

/// What a checkpoint keeps of a [`Selector`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectorState {
    window: ScoreWindow,
    seen: u64,
    rule: Rule,
}

/// Applies the configured policy to each micro-batch (see the module doc).
#[derive(Debug, Clone)]
pub struct Selector {
    cfg: SelectionConfig,
    window: ScoreWindow,
    seen: u64,
    rule: Rule,
}

impl Selector {
    pub fn new(cfg: SelectionConfig) -> Self {
        Selector {
            window: ScoreWindow::new(cfg.window),
            seen: 0,
            rule: Rule::new(cfg.policy),
            cfg,
        }
    }

    pub fn state(&self) -> SelectorState {
        SelectorState {
            window: self.window.clone(),
            seen: self.seen,
            rule: self.rule.clone(),
        }
    }

    /// Continues from a saved state; a saved policy of another kind starts afresh.
    pub fn restore(&mut self, s: SelectorState) {
        self.window = s.window.resized(self.cfg.window);
        self.seen = s.seen;
        if s.rule.kind() == self.cfg.policy {
            self.rule = s.rule;
        }
    }

    /// Scores the window holds.
    pub fn scores_in_window(&self) -> usize {
        self.window.len()
    }

    /// Forgets the score window (a drift reaction): the threshold re-forms from the scores
    /// that arrive next.
    pub fn reset_window(&mut self) {
        self.window = ScoreWindow::new(self.cfg.window);
        // top_k's debt is relative to the old window: kept, it would hold the level at 1
        // over the new window's first rows, when the reaction means to train more.
        if let Rule::TopK(t) = &mut self.rule {
            *t = top_k::TopK::default();
        }
    }

    /// Multiplier of the replay ratio for the next step (`surprise` only; 1 otherwise).
    pub fn replay_scale(&self) -> f64 {
        match &self.rule {
            Rule::Surprise(s) if self.seen >= self.cfg.warmup => s.factor(&self.cfg),
            _ => 1.0,
        }
    }

    /// Whether decisions read the scores (`random` does not: it can decide before the pass).
    pub fn needs_scores(&self) -> bool {
        self.cfg.policy.needs_scores()
    }

    /// Whether whole micro-batches are selected (a dropped one takes no step).
    pub fn per_micro_batch(&self) -> bool {
        self.cfg.unit == SelectionUnit::MicroBatch
    }

    /// Decides a micro-batch: row by row, or as a whole by its mean score.
    pub fn decide(&mut self, scores: &[f32], rng: &mut impl Rng) -> Decision {
        if !self.per_micro_batch() || scores.is_empty() {
            return self.decide_rows(scores, rng);
        }
        let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64;
        self.decide_whole(mean as f32, scores.len(), rng)
    }

    /// Decides a micro-batch of `n` rows before any score exists, as a policy that reads none
    /// (`random`, see [`Self::needs_scores`]) can with `unit = "micro_batch"`.
    pub fn decide_unscored(&mut self, n: usize, rng: &mut impl Rng) -> Decision {
        debug_assert!(self.per_micro_batch() && !self.needs_scores());
        self.decide_whole(0.0, n, rng)
    }

    /// One decision for a whole micro-batch of `n` rows with this score, given to each row.
    fn decide_whole(&mut self, score: f32, n: usize, rng: &mut impl Rng) -> Decision {
        // Warm-up counts rows: the batch is warm when its first row is.
        let d = self.decide_rows(&[score], rng);
        self.seen += n as u64 - 1;
        Decision {
            selected: vec![d.selected[0]; n],
            weights: vec![d.weights[0]; n],
            ..d
        }
    }

    /// Decides each row. Its own scores join the window first, so a batch is judged
    /// against a window that includes it (the kept fraction then holds even in small windows).
    fn decide_rows(&mut self, scores: &[f32], rng: &mut impl Rng) -> Decision {
        // `random` and `surprise` read no window: keeping it sorted was 9% of the learning
        // CPU of a random-selection step at micro-batches of 16 (`perf`, LTE).
        if !matches!(self.rule, Rule::Random | Rule::Surprise(_)) {
            for &s in scores {
                self.window.push(s);
            }
        }
        let warm = (self.cfg.warmup.saturating_sub(self.seen) as usize).min(scores.len());
        self.seen += scores.len() as u64;
        let mut d = Decision {
            selected: Vec::with_capacity(scores.len()),
            weights: Vec::with_capacity(scores.len()),
            ..Decision::default()
        };
        for _ in 0..warm {
            d.push(true, 1.0);
        }
        let (early, rest) = scores.split_at(warm);
        if let Rule::Surprise(s) = &mut self.rule {
            s.observe(&self.cfg.surprise, early);
        }
        if rest.is_empty() {
            return d;
        }
        let cfg = &self.cfg;
        let win = &mut self.window;
        match &mut self.rule {
            Rule::TopK(r) => r.decide(cfg, win, rest, rng, &mut d),
            Rule::Random => {
                for _ in rest {
                    let keep = rng.random::<f64>() < cfg.keep;
                    d.push(keep, keep as u8 as f32);
                }
            }
            Rule::Sample(r) => r.decide(cfg, win, rest, rng, &mut d),
            Rule::InfoBatch(r) => r.decide(cfg, win, rest, rng, &mut d),
            Rule::Trim(r) => r.decide(cfg, win, rest, rng, &mut d),
            Rule::Surprise(r) => r.decide(cfg, rest, rng, &mut d),
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::LearnerRng;
    use rand::SeedableRng;

    pub(super) fn cfg(policy: PolicyKind, keep: f64, warmup: u64) -> SelectionConfig {
        SelectionConfig {
            policy,
            unit: SelectionUnit::Row,
            keep,
            warmup,
            window: 2048,
            unbiased_q: 0.0,
            trim: 0.05,
            surprise: SurpriseConfig::default(),
            clip: 0.0,
        }
    }

    /// Realised kept fraction after warm-up over a stream of heavy-tailed scores.
    pub(super) fn kept_fraction(policy: PolicyKind, keep: f64) -> f64 {
        let mut rng = LearnerRng::seed_from_u64(1);
        let mut sel = Selector::new(cfg(policy, keep, 512));
        let (mut kept, mut total) = (0, 0);
        for b in 0..400 {
            let scores: Vec<f32> = (0..32).map(|_| rng.random::<f32>().powi(3)).collect();
            let d = sel.decide(&scores, &mut rng);
            if b >= 16 {
                kept += d.trained();
                total += scores.len();
            } else {
                assert_eq!(d.trained(), 32, "warm-up trains everything");
            }
        }
        kept as f64 / total as f64
    }

    /// One non-finite score does not stall the mean-based policies for a window: after it,
    /// `sample` and `infobatch` keep about their fraction again at once.
    #[test]
    fn a_non_finite_score_leaves_the_mean_based_policies_keeping() {
        for policy in [PolicyKind::Sample, PolicyKind::Infobatch] {
            let mut rng = LearnerRng::seed_from_u64(4);
            let mut sel = Selector::new(cfg(policy, 0.5, 512));
            let batch = |sel: &mut Selector, rng: &mut LearnerRng, bad: bool| {
                let mut scores: Vec<f32> = (0..32).map(|_| rng.random::<f32>()).collect();
                if bad {
                    scores[0] = f32::INFINITY;
                }
                sel.decide(&scores, rng)
            };
            for _ in 0..128 {
                batch(&mut sel, &mut rng, false);
            }
            batch(&mut sel, &mut rng, true);
            let after: Vec<Decision> = (0..16).map(|_| batch(&mut sel, &mut rng, false)).collect();
            let kept: usize = after.iter().map(|d| d.trained()).sum();
            let f = kept as f64 / (16.0 * 32.0);
            assert!((f - 0.5).abs() < 0.1, "{policy:?}: kept {f}");
            // The window's mean (both policies' threshold) is the finite scores' own, about
            // 0.5: an infinite score in it would make it infinite, and `sample` and
            // `infobatch` would still keep about half (their fallbacks).
            for d in &after {
                assert!(
                    (d.threshold - 0.5).abs() < 0.1,
                    "{policy:?}: {}",
                    d.threshold
                );
            }
        }
    }

    /// Deciding whole micro-batches, every span given in rows (the window, `surprise`'s
    /// short and long means) counts micro-batches of as many rows.
    #[test]
    fn micro_batch_selection_spans_the_same_rows() {
        let mut c = cfg(PolicyKind::Surprise, 0.5, 0);
        c.window = 2048;
        c.surprise.short = 64.0;
        c.surprise.long = 4096.0;
        let rows = window_in_units(c.clone(), 8);
        assert_eq!(
            (rows.window, rows.surprise.short),
            (2048, 64.0),
            "rows: unchanged"
        );
        c.unit = SelectionUnit::MicroBatch;
        let b = window_in_units(c, 8);
        assert_eq!(
            (b.window, b.surprise.short, b.surprise.long),
            (256, 8.0, 512.0)
        );
    }

    /// A window reset (a drift reaction) starts `top_k` afresh: it keeps about its fraction
    /// over the new window's first rows, whatever debt the old window left.
    #[test]
    fn a_window_reset_starts_top_k_afresh() {
        let mut rng = LearnerRng::seed_from_u64(5);
        let mut sel = Selector::new(cfg(PolicyKind::TopK, 0.5, 64));
        for b in 0..64 {
            // Rising scores: each batch above the window, so the debt builds.
            let scores: Vec<f32> = (0..8).map(|i| (b * 8 + i) as f32).collect();
            sel.decide(&scores, &mut rng);
        }
        sel.reset_window();
        let kept: usize = (0..8)
            .map(|_| {
                let scores: Vec<f32> = (0..8).map(|_| rng.random::<f32>()).collect();
                sel.decide(&scores, &mut rng).trained()
            })
            .sum();
        assert!(kept >= 24, "kept {kept} of 64 right after the reset");
    }

    #[test]
    fn every_policy_keeps_about_the_configured_fraction() {
        for p in [
            PolicyKind::TopK,
            PolicyKind::Random,
            PolicyKind::Sample,
            PolicyKind::Infobatch,
            PolicyKind::Trim,
            PolicyKind::Surprise,
        ] {
            let f = kept_fraction(p, 0.6);
            assert!((f - 0.6).abs() < 0.05, "{p:?} kept {f}");
        }
    }

    /// A huge (finite) score leaving the window does not take the small ones' sum with it,
    /// and a window saved mid-ring resumes with the same mean to the bit.
    #[test]
    fn the_running_mean_survives_a_huge_score_and_a_round_trip() {
        let mut w = ScoreWindow::new(8);
        w.push(1e20);
        for i in 0..9 {
            w.push(1.0 + i as f32);
        }
        // The ring holds 2..=9 now: 1e20 left at the ninth push, before the wrap re-sums.
        assert_eq!(w.mean(), 5.5);
        for s in [0.1f32, 0.2, 0.3] {
            w.push(s);
        }
        let back: ScoreWindow = postcard::from_bytes(&postcard::to_stdvec(&w).unwrap()).unwrap();
        assert_eq!(back.mean().to_bits(), w.mean().to_bits());
    }

    #[test]
    fn window_quantile_and_resize_keep_the_newest_scores() {
        let mut w = ScoreWindow::new(4);
        for s in [9.0, 1.0, 2.0, 3.0, 4.0] {
            w.push(s);
        }
        assert_eq!(w.quantile(0.0), 1.0);
        assert_eq!(w.quantile(0.99), 4.0);
        let w = w.resized(2);
        let mut v = w.values().to_vec();
        v.sort_by(f32::total_cmp);
        assert_eq!(v, vec![3.0, 4.0]);
        assert_eq!(w.mean(), 3.5, "the sum follows the resize");
    }

    #[test]
    fn the_kept_sorted_window_gives_the_quantile_mean_and_rank_of_a_fresh_pass() {
        let mut w = ScoreWindow::new(37);
        // A twin asked for no quantile: it keeps no sorted copy and counts by a pass.
        let mut plain = ScoreWindow::new(37);
        let mut x = 12345u32;
        for i in 0..500 {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            let s = match i % 50 {
                7 => f32::NAN,
                8 => -0.0,
                _ => (x >> 8) as f32 / 1e5 - 50.0,
            };
            w.push(s);
            plain.push(s);
            if i == 250 {
                // After a checkpoint round trip the sorted copy is rebuilt.
                w = postcard::from_bytes(&postcard::to_stdvec(&w).unwrap()).unwrap();
            }
            let mut want = w.values().to_vec();
            want.sort_by(f32::total_cmp);
            for level in [0.0, 0.03, 0.5, 0.7, 0.97, 1.0] {
                let k = ((level * want.len() as f64).floor() as usize).min(want.len() - 1);
                assert_eq!(
                    w.quantile(level).to_bits(),
                    want[k].to_bits(),
                    "push {i} level {level}"
                );
            }
            // The running sum and the binary-searched count agree with a pass over the ring.
            let mean = w.values().iter().map(|v| f64::from(*v)).sum::<f64>() / want.len() as f64;
            assert!(
                (w.mean() - mean).abs() <= 1e-9 * mean.abs().max(1.0),
                "push {i}"
            );
            assert_eq!(w.mean(), plain.mean(), "push {i}");
            for x in [want[0], want[want.len() / 2], mean as f32, -0.0, 0.0] {
                let below = want.iter().filter(|v| **v < x).count();
                assert_eq!(w.count_below(x), below, "push {i} below {x}");
                assert_eq!(plain.count_below(x), below, "push {i} below {x}");
            }
            assert!(!plain.ordered && plain.sorted.is_empty());
        }
    }

    #[test]
    fn a_restored_selector_decides_as_the_original() {
        let mut rng = LearnerRng::seed_from_u64(3);
        let mut a = Selector::new(cfg(PolicyKind::Surprise, 0.5, 10));
        let s: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        a.decide(&s, &mut rng);
        let mut b = Selector::new(cfg(PolicyKind::Surprise, 0.5, 10));
        b.restore(a.state());
        let (mut r1, mut r2) = (LearnerRng::seed_from_u64(9), LearnerRng::seed_from_u64(9));
        let next: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(
            a.decide(&next, &mut r1).weights,
            b.decide(&next, &mut r2).weights
        );
    }
}
