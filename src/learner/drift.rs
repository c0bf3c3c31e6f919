//! Drift detectors: each takes one value per sample (`update`) and returns a [`Drift`] when
//! the stream has changed, River's interface.
//!
//! - [`Adwin`] (Bifet & Gavaldà 2007, ADWIN2): an adaptive window of the prequential loss
//!   kept as an exponential histogram (O(log W) buckets); every `clock` values it looks for
//!   a split of the window into an older and a newer part whose means differ by more than a
//!   Hoeffding-style bound at confidence `delta`, and drops the older part. It adapts to any
//!   change but signals only a rise of the loss: a falling loss is the model learning.
//! - [`PageHinkley`]: the cumulative deviation of the loss above its running mean, less a
//!   tolerance `delta`; a drift when it rises more than `threshold` above its minimum. It
//!   reacts to increases only, the direction that needs action.
//! - [`ScoreShift`]: a one-sided two-sample Kolmogorov-Smirnov test between the last
//!   `window` importance scores and the `window` before them. Gradient norms rise when the
//!   model is surprised, often before a smoothed error moves, and their whole distribution
//!   shifts up; a shift down is the model learning, and is not signalled.
//!
//! Each keeps a bounded amount of state whatever the stream's length. [`DriftMonitor`] runs
//! the three on a pipeline's stream and keeps what they found for the report; the learner's
//! reactions to a detection are [`Reaction`]s.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::sorted::order_key;

/// A detected change: the detector's statistic against its threshold when it fired.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub statistic: f64,
    pub threshold: f64,
}

/// One bucket row of ADWIN's histogram: buckets of 2^row values each, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Row {
    /// (sum, variance sum) per bucket.
    buckets: VecDeque<(f64, f64)>,
}

/// ADWIN2 (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adwin {
    delta: f64,
    clock: u64,
    max_buckets: usize,
    rows: Vec<Row>,
    width: u64,
    total: f64,
    variance: f64,
    ticks: u64,
}

/// Values before ADWIN looks for a change (River's grace period).
const ADWIN_GRACE: u64 = 10;
/// Smallest part of a split ADWIN tests.
const ADWIN_MIN_PART: u64 = 5;

impl Adwin {
    pub fn new(delta: f64) -> Self {
        Adwin {
            delta,
            clock: 32,
            max_buckets: 5,
            rows: Vec::new(),
            width: 0,
            total: 0.0,
            variance: 0.0,
            ticks: 0,
        }
    }

    /// Values in the current window.
    pub fn width(&self) -> u64 {
        self.width
    }

    pub fn mean(&self) -> f64 {
        if self.width == 0 {
            0.0
        } else {
            self.total / self.width as f64
        }
    }

    pub fn update(&mut self, x: f64) -> Option<Drift> {
        if !x.is_finite() {
            return None;
        }
        self.insert(x);
        self.ticks += 1;
        if !self.ticks.is_multiple_of(self.clock) || self.width <= ADWIN_GRACE {
            return None;
        }
        let mut fired = None;
        while let Some(d) = self.cut() {
            if d.statistic > 0.0 {
                fired = Some(d);
            }
        }
        fired
    }

    fn insert(&mut self, x: f64) {
        if self.width > 0 {
            let mean = self.mean();
            let n = self.width as f64;
            self.variance += n * (x - mean) * (x - mean) / (n + 1.0);
        }
        self.width += 1;
        self.total += x;
        if self.rows.is_empty() {
            self.rows.push(Row::default());
        }
        self.rows[0].buckets.push_back((x, 0.0));
        // Compress: a row holding too many buckets merges its two oldest into the next row.
        let mut i = 0;
        while i < self.rows.len() && self.rows[i].buckets.len() > self.max_buckets {
            let (s1, v1) = self.rows[i].buckets.pop_front().expect("full row");
            let (s2, v2) = self.rows[i].buckets.pop_front().expect("full row");
            let n = (1u64 << i) as f64;
            let (m1, m2) = (s1 / n, s2 / n);
            let merged = (s1 + s2, v1 + v2 + n * n * (m1 - m2) * (m1 - m2) / (2.0 * n));
            if i + 1 == self.rows.len() {
                self.rows.push(Row::default());
            }
            self.rows[i + 1].buckets.push_back(merged);
            i += 1;
        }
    }

    /// Drops the oldest bucket if some split of the window shows a change.
    fn cut(&mut self) -> Option<Drift> {
        let n = self.width as f64;
        let var = self.variance / n;
        let ln = (2.0 * n.ln().max(1.0) / self.delta).ln();
        let (mut n0, mut s0) = (0u64, 0.0f64);
        // Oldest buckets first: the highest row, front to back.
        for row in (0..self.rows.len()).rev() {
            let size = 1u64 << row;
            for &(s, _) in &self.rows[row].buckets {
                n0 += size;
                s0 += s;
                let n1 = self.width - n0;
                if n0 < ADWIN_MIN_PART || n1 < ADWIN_MIN_PART {
                    continue;
                }
                let (a, b) = (n0 as f64, n1 as f64);
                let rise = (self.total - s0) / b - s0 / a;
                let m = 1.0 / (1.0 / a + 1.0 / b);
                let eps = (2.0 * var * ln / m).sqrt() + 2.0 * ln / (3.0 * m);
                if rise.abs() > eps {
                    self.drop_oldest();
                    return Some(Drift {
                        statistic: rise,
                        threshold: eps,
                    });
                }
            }
        }
        None
    }

    fn drop_oldest(&mut self) {
        let row = self.rows.len() - 1;
        let (s, v) = self.rows[row].buckets.pop_front().expect("a bucket");
        let size = 1u64 << row;
        let n = size as f64;
        let mean_old = s / n;
        let rest = (self.width - size) as f64;
        let mean_rest = (self.total - s) / rest;
        self.variance -= v + n * rest / (n + rest) * (mean_old - mean_rest).powi(2);
        self.variance = self.variance.max(0.0);
        self.width -= size;
        self.total -= s;
        if self.rows[row].buckets.is_empty() {
            self.rows.pop();
        }
    }
}

/// Page-Hinkley (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageHinkley {
    delta: f64,
    threshold: f64,
    min_samples: u64,
    n: u64,
    mean: f64,
    sum: f64,
    min_sum: f64,
}

impl PageHinkley {
    /// `delta`: the tolerated rise, in units of the value; `threshold`: the detection level.
    pub fn new(delta: f64, threshold: f64) -> Self {
        PageHinkley {
            delta,
            threshold,
            min_samples: 30,
            n: 0,
            mean: 0.0,
            sum: 0.0,
            min_sum: 0.0,
        }
    }

    pub fn update(&mut self, x: f64) -> Option<Drift> {
        if !x.is_finite() {
            return None;
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        self.sum += x - self.mean - self.delta;
        self.min_sum = self.min_sum.min(self.sum);
        let stat = self.sum - self.min_sum;
        if self.n >= self.min_samples && stat > self.threshold {
            let d = Drift {
                statistic: stat,
                threshold: self.threshold,
            };
            // Start over on the new regime.
            *self = PageHinkley::new(self.delta, self.threshold);
            return Some(d);
        }
        None
    }
}

/// The two-sample Kolmogorov-Smirnov test of the importance scores (see the module doc).
/// The reference is the `window` scores `lag` samples before the recent ones: the window just
/// before (`lag = window`), or the same stretch one season earlier (`lag` = the season, such
/// as a week of 10-minute slots), so that a stream's daily or weekly cycle is not a change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreShift {
    window: usize,
    lag: usize,
    /// Critical value of the KS statistic for two samples of `window` (α from `c_alpha`).
    critical: f64,
    /// The last `lag + window` scores: the reference is the oldest `window`, the recent
    /// window the newest.
    history: VecDeque<f32>,
    since_check: usize,
    /// Each test's sorted recent window (as order keys), by the count of scores when it was
    /// taken, kept until
    /// a later test takes it as its reference: a test is then one sort and one merge. Keeping
    /// both windows sorted score by score (two binary searches and a shift each, per window)
    /// cost 7% of the learner's CPU on a Milan run. Not checkpointed: a restored test sorts
    /// its reference from the history until the copies are back.
    #[serde(skip)]
    taken: VecDeque<(u64, Vec<u32>)>,
    #[serde(skip)]
    count: u64,
    /// [`Self::every`], once known (0 until then, as after a restore).
    #[serde(skip)]
    cadence: usize,
}

impl ScoreShift {
    /// `c_alpha` = sqrt(−ln(α) / 2) for the one-sided test: 1.22 for α = 0.05, 1.52 for
    /// 0.01, 1.86 for 0.001.
    /// `season`: 0 for the window just before, else the lag of the reference (at least
    /// `window`).
    pub fn new(window: usize, c_alpha: f64, season: usize) -> Self {
        let window = window.max(16);
        let lag = season.max(window);
        ScoreShift {
            window,
            lag,
            critical: c_alpha * (2.0 / window as f64).sqrt(),
            history: VecDeque::with_capacity(lag + window),
            since_check: 0,
            taken: VecDeque::new(),
            count: 0,
            cadence: 0,
        }
    }

    /// Scores between tests: about a quarter window, and a divisor of the lag where one lies
    /// between an eighth and a quarter window (63 for a week of 10-minute slots and windows
    /// of 256), so that a test's reference is an earlier test's recent window.
    fn every(&self) -> usize {
        let quarter = self.window / 4;
        (quarter / 2..=quarter)
            .rev()
            .find(|d| self.lag.is_multiple_of(*d))
            .unwrap_or(quarter)
    }

    pub fn update(&mut self, score: f32) -> Option<Drift> {
        if !score.is_finite() {
            return None;
        }
        let (w, full) = (self.window, self.lag + self.window);
        if self.history.len() == full {
            self.history.pop_front();
        }
        self.history.push_back(score);
        self.count += 1;
        self.since_check += 1;
        // Tested every `every()` scores, once the history spans both windows.
        if self.cadence == 0 {
            self.cadence = self.every();
        }
        let every = self.cadence;
        if self.history.len() < full || self.since_check < every {
            return None;
        }
        self.since_check = 0;
        let recent = sorted_keys(self.history.range(full - w..));
        let reference = self
            .take_reference()
            .unwrap_or_else(|| sorted_keys(self.history.range(..w)));
        let d = ks_sorted(&reference, &recent);
        if self.lag.is_multiple_of(every) {
            self.taken.push_back((self.count, recent));
        }
        if d > self.critical {
            // The new scores start the next reference: the test waits until the history
            // after them spans a lag again.
            self.history.drain(..full - w);
            return Some(Drift {
                statistic: d,
                threshold: self.critical,
            });
        }
        None
    }

    /// The sorted copy of the reference (the window that ended `lag` scores ago), if a test
    /// took it then; drops the copies no later test can use.
    fn take_reference(&mut self) -> Option<Vec<u32>> {
        let end = self.count.checked_sub(self.lag as u64)?;
        while self.taken.front().is_some_and(|(at, _)| *at < end) {
            self.taken.pop_front();
        }
        match self.taken.front() {
            Some((at, _)) if *at == end => self.taken.pop_front().map(|(_, v)| v),
            _ => None,
        }
    }
}

/// The values' order keys, sorted: the windows are sorted and merged with integer comparisons
/// (`cargo bench --bench scoring -- drift_score_test`: 134 ns per score sorting the floats
/// with `total_cmp`, 101 ns sorting their keys).
fn sorted_keys<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u32> {
    let mut keys: Vec<u32> = values.map(|&x| order_key(x)).collect();
    keys.sort_unstable();
    keys
}

/// sup (F_a − F_b) of two samples' empirical distributions: how far `b` lies above `a`.
#[cfg(test)]
fn ks_statistic(a: &VecDeque<f32>, b: &VecDeque<f32>) -> f64 {
    ks_sorted(&sorted_keys(a.iter()), &sorted_keys(b.iter()))
}

/// [`ks_statistic`] of two samples of sorted order keys. One value of each sample per step, without
/// branches on the values (random scores made the branches of a nested-loop merge
/// mispredict at every step); the difference i·|y| − j·|x| is compared in integers and
/// turned into i/|x| − j/|y| only where it reaches a new largest.
fn ks_sorted(x: &[u32], y: &[u32]) -> f64 {
    let (nx, ny) = (x.len(), y.len());
    let (mut i, mut j) = (0, 0);
    let (mut best, mut d) = (0i64, 0f64);
    let mut point = |i: usize, j: usize| {
        let c = (i * ny) as i64 - (j * nx) as i64;
        if c >= best {
            // Points of equal value in integers may round apart in f64: their largest is
            // kept, as a max over every point's f64 value would.
            let here = i as f64 / nx as f64 - j as f64 / ny as f64;
            d = if c > best { here } else { d.max(here) };
            best = c;
        }
    };
    let mut v = 0; // below every finite value's key
    while i < nx && j < ny {
        let (a, b) = (x[i], y[j]);
        v = a.min(b);
        i += usize::from(a <= v);
        j += usize::from(b <= v);
        // Only where both samples have passed every value ≤ v is (i, j) a point of the
        // two empirical distributions (ties within a sample take several steps).
        // `&`, not `&&`: the second comparison is cheaper than a branch on the first.
        let past = |s: &[u32], k: usize| s.get(k).is_none_or(|&a| a > v);
        if past(x, i) & past(y, j) {
            point(i, j);
        }
    }
    // The step that used up one sample may have stopped the other inside a run of values
    // equal to v: that run ends at the last point.
    while j < ny && y[j] <= v {
        j += 1;
    }
    while i < nx && x[i] <= v {
        i += 1;
    }
    point(i, j);
    d
}

/// `[drift]`: the detectors every pipeline runs on its prequential loss (model units: the
/// squared standardised error, or the cross-entropy) and on its importance scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// ADWIN's confidence (smaller: fewer false alarms, later detections).
    #[serde(default = "default_adwin_delta")]
    pub adwin_delta: f64,
    /// Page-Hinkley's tolerated rise of the loss and its detection level.
    #[serde(default = "default_ph_delta")]
    pub page_hinkley_delta: f64,
    #[serde(default = "default_ph_threshold")]
    pub page_hinkley_threshold: f64,
    /// Scores per window of the Kolmogorov-Smirnov test, and its c(α).
    #[serde(default = "default_score_window")]
    pub score_window: usize,
    #[serde(default = "default_c_alpha")]
    pub score_c_alpha: f64,
    /// The stream's season in samples (a week of 10-minute slots: 1,008): the score test
    /// compares the recent window with the same stretch one season earlier, so the cycle
    /// itself raises no alarm. 0 (default): with the window just before.
    #[serde(default)]
    pub score_season: usize,
    /// What the learner does when a loss detector (ADWIN, Page-Hinkley) fires; none by
    /// default. At most one reaction per `recovery_samples`.
    #[serde(default)]
    pub reactions: Vec<Reaction>,
    #[serde(default = "default_recovery")]
    pub recovery_samples: u64,
    /// `boost_learning_rate`: the factor, for `recovery_samples` samples.
    #[serde(default = "default_lr_boost")]
    pub lr_boost: f64,
    /// `forget_buffer`: replayed rows younger than this many samples are kept.
    #[serde(default = "default_keep_recent")]
    pub keep_recent: u64,
    /// `replay_recent`: the age, in samples, at which a row's replay weight halves.
    #[serde(default = "default_recent_half_life")]
    pub recent_half_life: f64,
    /// `extra_steps`: optimiser steps per micro-batch while recovering.
    #[serde(default = "default_recovery_steps")]
    pub recovery_steps: u32,
    /// ADWIN and Page-Hinkley per key as well (a site that changes among stable ones), kept
    /// with the key's features: at most `features.max_keys` sets.
    #[serde(default)]
    pub per_key: bool,
}

/// A reaction to a detected change (see [`DriftConfig::reactions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reaction {
    /// Adam's moments start afresh: its step sizes were tuned to the old regime.
    ResetOptimizer,
    /// The learning rate × `lr_boost` for `recovery_samples` samples.
    BoostLearningRate,
    /// Replayed rows older than `keep_recent` samples leave the buffer: they teach the old
    /// regime.
    ForgetBuffer,
    /// Every fresh row trains for `recovery_samples` samples (keep → 1): the new regime is
    /// what matters, and a selection tuned to the old one would drop it.
    KeepAll,
    /// The selection's score window starts afresh, so its threshold follows the new
    /// regime's scores instead of the old one's.
    ResetSelection,
    /// Every buffered row is scored again by the current model (booked as scoring work).
    RescoreBuffer,
    /// For `recovery_samples` samples, replayed rows are drawn with weight
    /// 2^(−age / `recent_half_life`): the new regime is replayed most, and the old rows stay
    /// in the buffer (unlike `forget_buffer`) in case the change passes.
    ReplayRecent,
    /// For `recovery_samples` samples, each micro-batch takes `recovery_steps` optimiser
    /// steps (its usual number if that is more), each over fresh rows and a new replay draw:
    /// the new regime is learnt in fewer samples, and the extra compute is spent only while
    /// recovering (and counted).
    ExtraSteps,
}

fn default_recovery() -> u64 {
    500
}
fn default_lr_boost() -> f64 {
    3.0
}
fn default_keep_recent() -> u64 {
    128
}
fn default_recent_half_life() -> f64 {
    128.0
}
fn default_recovery_steps() -> u32 {
    4
}

fn yes() -> bool {
    true
}
fn default_adwin_delta() -> f64 {
    0.002
}
fn default_ph_delta() -> f64 {
    0.005
}
fn default_ph_threshold() -> f64 {
    50.0
}
fn default_score_window() -> usize {
    256
}
fn default_c_alpha() -> f64 {
    1.95
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            adwin_delta: default_adwin_delta(),
            page_hinkley_delta: default_ph_delta(),
            page_hinkley_threshold: default_ph_threshold(),
            score_window: default_score_window(),
            score_c_alpha: default_c_alpha(),
            score_season: 0,
            reactions: Vec::new(),
            recovery_samples: default_recovery(),
            lr_boost: default_lr_boost(),
            keep_recent: default_keep_recent(),
            recent_half_life: default_recent_half_life(),
            recovery_steps: default_recovery_steps(),
            per_key: false,
        }
    }
}

impl DriftConfig {
    /// What is wrong with these settings, as (key, expectation), if anything.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(self.adwin_delta > 0.0 && self.adwin_delta < 1.0) {
            return Err(("drift.adwin_delta", "a confidence in (0, 1)"));
        }
        if !(self.page_hinkley_threshold > 0.0 && self.page_hinkley_threshold.is_finite()) {
            return Err(("drift.page_hinkley_threshold", "a finite positive level"));
        }
        if !(self.page_hinkley_delta >= 0.0 && self.page_hinkley_delta.is_finite()) {
            return Err(("drift.page_hinkley_delta", "a finite tolerance ≥ 0"));
        }
        if self.recovery_samples == 0 {
            return Err((
                "drift.recovery_samples",
                "at least 1 sample (the reactions' window and cool-down)",
            ));
        }
        if !(self.recent_half_life >= 1.0 && self.recent_half_life <= 1e9) {
            return Err(("drift.recent_half_life", "a half-life of 1 to 1e9 samples"));
        }
        if !(self.lr_boost > 0.0 && self.lr_boost <= 100.0) {
            return Err(("drift.lr_boost", "a factor in (0, 100]"));
        }
        if !(1..=64).contains(&self.recovery_steps) {
            return Err((
                "drift.recovery_steps",
                "1 to 64 optimiser steps per micro-batch",
            ));
        }
        if self.score_window < 16 {
            return Err(("drift.score_window", "at least 16 scores"));
        }
        if !(self.score_c_alpha > 0.0 && self.score_c_alpha.is_finite()) {
            return Err(("drift.score_c_alpha", "a finite positive critical value"));
        }
        if self.score_season != 0 && !(self.score_window..=1 << 20).contains(&self.score_season) {
            return Err((
                "drift.score_season",
                "0, or a season of score_window to 1,048,576 samples",
            ));
        }
        Ok(())
    }
}

/// Which detector fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    Adwin,
    PageHinkley,
    ScoreShift,
}

impl Detector {
    /// In the order [`DriftMonitor::update`] reports them.
    pub const ALL: [Detector; 3] = [Detector::Adwin, Detector::PageHinkley, Detector::ScoreShift];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Adwin => "adwin",
            Detector::PageHinkley => "page_hinkley",
            Detector::ScoreShift => "score_shift",
        }
    }
}

/// One detection, where in the stream it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftEvent {
    /// Sample number in the stream, and its event time.
    pub sample: u64,
    pub time: i64,
    pub detector: Detector,
    /// The key whose own detector fired; none for the stream-wide detectors.
    pub key: Option<std::sync::Arc<str>>,
    pub statistic: f64,
    pub threshold: f64,
}

/// One key's loss detectors (`drift.per_key`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyDetectors {
    adwin: Adwin,
    ph: PageHinkley,
}

impl KeyDetectors {
    pub fn new(cfg: &DriftConfig) -> Self {
        KeyDetectors {
            adwin: Adwin::new(cfg.adwin_delta),
            ph: PageHinkley::new(cfg.page_hinkley_delta, cfg.page_hinkley_threshold),
        }
    }

    /// What ADWIN and Page-Hinkley found on this loss.
    pub fn update(&mut self, loss: f32) -> [Option<Drift>; 2] {
        [self.adwin.update(loss as f64), self.ph.update(loss as f64)]
    }

    /// Restored from a checkpoint: this configuration's settings apply from now on.
    pub fn retune(&mut self, cfg: &DriftConfig) {
        self.adwin.delta = cfg.adwin_delta;
        (self.ph.delta, self.ph.threshold) = (cfg.page_hinkley_delta, cfg.page_hinkley_threshold);
    }
}

/// Events a report lists (the counts cover all of them).
pub const EVENTS_KEPT: usize = 256;

/// The stream-wide detectors and what they found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriftMonitor {
    adwin: Adwin,
    ph: PageHinkley,
    scores: ScoreShift,
    /// The first [`EVENTS_KEPT`] events.
    pub events: Vec<DriftEvent>,
    pub counts: [u64; 3],
    /// Per-key detections: ADWIN, Page-Hinkley.
    pub key_counts: [u64; 2],
    /// Samples at which the learner reacted (the first [`EVENTS_KEPT`]), and how often.
    pub reacted_at: Vec<u64>,
    pub reactions: u64,
    /// The latest reaction (the cool-down runs from it, whether or not the list is full).
    last_reaction: Option<u64>,
}

impl DriftMonitor {
    pub fn new(cfg: &DriftConfig) -> Self {
        DriftMonitor {
            adwin: Adwin::new(cfg.adwin_delta),
            ph: PageHinkley::new(cfg.page_hinkley_delta, cfg.page_hinkley_threshold),
            scores: ScoreShift::new(cfg.score_window, cfg.score_c_alpha, cfg.score_season),
            events: Vec::new(),
            counts: [0; 3],
            key_counts: [0; 2],
            reacted_at: Vec::new(),
            reactions: 0,
            last_reaction: None,
        }
    }

    /// Continues from a checkpoint's detectors under this configuration's settings (a
    /// `--set` on a resume was ignored): ADWIN's and Page-Hinkley's apply at once with their
    /// state kept; a score test of another window or season starts afresh (its history has
    /// another shape), the critical value of the same one is this configuration's.
    pub fn restore(&mut self, saved: DriftMonitor, cfg: &DriftConfig) {
        let fresh = std::mem::replace(self, saved);
        // The learner's recovery window ends at a restart (it is not checkpointed), so the
        // cool-down does too: the gauge said "recovering" and a detection got no reaction.
        self.last_reaction = None;
        self.adwin.delta = cfg.adwin_delta;
        (self.ph.delta, self.ph.threshold) = (cfg.page_hinkley_delta, cfg.page_hinkley_threshold);
        if (self.scores.window, self.scores.lag) == (fresh.scores.window, fresh.scores.lag) {
            self.scores.critical = fresh.scores.critical;
        } else {
            tracing::warn!(
                "drift.score_window or score_season changed since the checkpoint: the score test starts afresh"
            );
            self.scores = fresh.scores;
        }
    }

    /// ADWIN's current window (samples since the last change it dropped).
    pub fn adwin_width(&self) -> u64 {
        self.adwin.width()
    }

    /// Page-Hinkley's statistic (fires above its threshold).
    pub fn page_hinkley_statistic(&self) -> f64 {
        self.ph.sum - self.ph.min_sum
    }

    /// Whether `sample` is within `recovery_samples` of the last reaction.
    pub fn recovering(&self, cfg: &DriftConfig, sample: u64) -> bool {
        (self.last_reaction).is_some_and(|s| sample < s + cfg.recovery_samples)
    }

    /// Records what one key's detectors found; which fired (ADWIN, Page-Hinkley).
    pub fn record_key(
        &mut self,
        sample: u64,
        time: i64,
        key: &std::sync::Arc<str>,
        found: [Option<Drift>; 2],
    ) -> [bool; 2] {
        let detectors = [Detector::Adwin, Detector::PageHinkley];
        let mut fired = [false; 2];
        for (i, d) in found.into_iter().enumerate() {
            let Some(d) = d else { continue };
            fired[i] = true;
            self.key_counts[i] += 1;
            if self.events.len() < EVENTS_KEPT {
                self.events.push(DriftEvent {
                    sample,
                    time,
                    detector: detectors[i],
                    key: Some(key.clone()),
                    statistic: d.statistic,
                    threshold: d.threshold,
                });
            }
        }
        fired
    }

    /// Whether the learner should react at `sample` to what fired: a loss detector, with
    /// reactions configured, and none in the last `recovery_samples`.
    pub fn should_react(&mut self, cfg: &DriftConfig, sample: u64, fired: [bool; 3]) -> bool {
        let loss = fired[Detector::Adwin as usize] || fired[Detector::PageHinkley as usize];
        if !loss || cfg.reactions.is_empty() || self.recovering(cfg, sample) {
            return false;
        }
        self.reactions += 1;
        self.last_reaction = Some(sample);
        if self.reacted_at.len() < EVENTS_KEPT {
            self.reacted_at.push(sample);
        }
        true
    }

    /// One sample's prequential loss and importance score; which detectors fired, in
    /// [`Detector`] order.
    pub fn update(&mut self, sample: u64, time: i64, loss: f32, score: f32) -> [bool; 3] {
        let found = [
            (Detector::Adwin, self.adwin.update(loss as f64)),
            (Detector::PageHinkley, self.ph.update(loss as f64)),
            (Detector::ScoreShift, self.scores.update(score)),
        ];
        let mut fired = [false; 3];
        for (detector, d) in found {
            if let Some(d) = d {
                fired[detector as usize] = true;
                self.counts[detector as usize] += 1;
                if self.events.len() < EVENTS_KEPT {
                    self.events.push(DriftEvent {
                        sample,
                        time,
                        detector,
                        key: None,
                        statistic: d.statistic,
                        threshold: d.threshold,
                    });
                }
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume takes this configuration's detector settings: Page-Hinkley's threshold and
    /// ADWIN's δ at once with their state kept, a score test of another window afresh (they
    /// came back as saved, whatever the `--set`).
    #[test]
    fn a_restored_monitor_takes_this_configurations_settings() {
        let old = DriftConfig::default();
        let mut saved = DriftMonitor::new(&old);
        for i in 0..500 {
            saved.update(i, 0, (i % 7) as f32, 1.0);
        }
        let new = DriftConfig {
            page_hinkley_threshold: 123.0,
            adwin_delta: 0.5,
            score_window: old.score_window * 2,
            ..old.clone()
        };
        let mut m = DriftMonitor::new(&new);
        m.restore(saved.clone(), &new);
        assert_eq!((m.ph.threshold, m.adwin.delta), (123.0, 0.5));
        assert_eq!((m.ph.n, m.adwin.width()), (saved.ph.n, saved.adwin.width()));
        assert!(m.scores.history.is_empty() && m.scores.window == new.score_window);
        let mut same = DriftMonitor::new(&old);
        saved.last_reaction = Some(499);
        same.restore(saved.clone(), &old);
        assert_eq!(same.scores.history.len(), saved.scores.history.len());
        assert!(
            !same.recovering(&old, 500),
            "the recovery window ends at a restart"
        );
    }
    use crate::learner::LearnerRng;
    use rand::{Rng, SeedableRng};

    /// Noisy values around `before`, then around `after` from `change` on; the first
    /// detection at or after `change`, and how many came before it (false alarms).
    fn detect(
        mut update: impl FnMut(f64) -> Option<Drift>,
        change: usize,
        n: usize,
        (before, after): (f64, f64),
        seed: u64,
    ) -> (Option<usize>, usize) {
        let mut rng = LearnerRng::seed_from_u64(seed);
        let mut false_alarms = 0;
        for i in 0..n {
            let mean = if i < change { before } else { after };
            let x = mean + rng.random_range(-0.5..0.5);
            if update(x).is_some() {
                if i < change {
                    false_alarms += 1;
                } else {
                    return (Some(i - change), false_alarms);
                }
            }
        }
        (None, false_alarms)
    }

    #[test]
    fn adwin_finds_a_rise_in_the_loss_quickly_and_keeps_quiet_before() {
        for seed in 0..5 {
            let mut a = Adwin::new(0.002);
            let (delay, false_alarms) = detect(|x| a.update(x), 20_000, 30_000, (1.0, 1.3), seed);
            let delay = delay.expect("the change is found");
            assert!(delay < 500, "seed {seed}: found after {delay}");
            assert_eq!(false_alarms, 0, "seed {seed}");
            // Later windows drop the rest of the old regime.
            let mut rng = LearnerRng::seed_from_u64(seed);
            for _ in 0..3_000 {
                a.update(1.3 + rng.random_range(-0.5..0.5));
            }
            assert!((a.mean() - 1.3).abs() < 0.03, "seed {seed}: {}", a.mean());
        }
    }

    #[test]
    fn adwin_keeps_a_bounded_histogram_on_a_long_stationary_stream() {
        let mut a = Adwin::new(0.002);
        let (found, false_alarms) = detect(|x| a.update(x), usize::MAX, 200_000, (1.0, 1.0), 3);
        assert_eq!((found, false_alarms), (None, 0));
        assert!((a.mean() - 1.0).abs() < 0.01);
        assert!(a.rows.len() <= 18, "{} rows for 200 k values", a.rows.len());
    }

    #[test]
    fn the_learner_reacts_to_loss_detectors_at_most_once_per_recovery() {
        let cfg = DriftConfig {
            reactions: vec![Reaction::ForgetBuffer],
            recovery_samples: 100,
            ..DriftConfig::default()
        };
        let mut m = DriftMonitor::new(&cfg);
        assert!(
            !m.should_react(&cfg, 10, [false, false, true]),
            "scores alone: no"
        );
        assert!(m.should_react(&cfg, 20, [true, false, false]));
        assert!(
            !m.should_react(&cfg, 119, [false, true, false]),
            "still recovering"
        );
        assert!(m.should_react(&cfg, 120, [false, true, false]));
        assert_eq!((m.reactions, m.reacted_at.clone()), (2, vec![20, 120]));
        assert!(m.recovering(&cfg, 219) && !m.recovering(&cfg, 220));
        let off = DriftConfig::default();
        assert!(
            !DriftMonitor::new(&off).should_react(&off, 5, [true; 3]),
            "none configured"
        );
    }

    #[test]
    fn a_key_s_own_detectors_find_its_change_and_name_it() {
        let cfg = DriftConfig::default();
        let mut m = DriftMonitor::new(&cfg);
        let mut k = KeyDetectors::new(&cfg);
        let key: std::sync::Arc<str> = std::sync::Arc::from("cell-7");
        let mut rng = LearnerRng::seed_from_u64(4);
        let mut first = None;
        for i in 0..6_000u64 {
            let loss = if i < 5_000 { 1.0 } else { 1.5 } + rng.random_range(-0.5..0.5);
            let fired = m.record_key(i, i as i64, &key, k.update(loss as f32));
            if fired.iter().any(|f| *f) && first.is_none() {
                first = Some(i);
            }
        }
        assert!(
            first.is_some_and(|i| (5_000..5_500).contains(&i)),
            "{first:?}"
        );
        assert!(m.key_counts.iter().sum::<u64>() >= 1 && m.counts == [0; 3]);
        assert_eq!(m.events[0].key.as_deref(), Some("cell-7"));
    }

    #[test]
    fn page_hinkley_finds_a_rise_and_ignores_a_fall() {
        for seed in 0..5 {
            let mut ph = PageHinkley::new(0.05, 20.0);
            let (delay, false_alarms) = detect(|x| ph.update(x), 10_000, 20_000, (1.0, 1.5), seed);
            assert!(
                delay.expect("found") < 500 && false_alarms == 0,
                "seed {seed}"
            );
            let mut ph = PageHinkley::new(0.05, 20.0);
            let (fall, _) = detect(|x| ph.update(x), 10_000, 20_000, (1.0, 0.5), seed);
            assert_eq!(fall, None, "a falling loss needs no reaction");
            let mut a = Adwin::new(0.002);
            let (fall, _) = detect(|x| a.update(x), 10_000, 20_000, (1.0, 0.5), seed);
            assert_eq!(fall, None, "ADWIN adapts to a fall without a signal");
            assert!((a.mean() - 0.5).abs() < 0.05, "{}", a.mean());
        }
    }

    /// Reusing an earlier test's sorted window as the reference gives the statistics of sorting
    /// both windows at every test, through detections, for adjacent and seasonal references;
    /// and a restored detector (the copies are not saved) carries on identically.
    #[test]
    fn the_score_test_reuses_sorted_windows_exactly_and_survives_a_restore() {
        // Sorts both windows of the history at every test.
        fn plain(scores: &[f32], w: usize, lag: usize, every: usize, critical: f64) -> Vec<usize> {
            let (mut from, mut since, mut fired) = (0, 0, Vec::new());
            for n in 1..=scores.len() {
                let start = from.max(n.saturating_sub(lag + w));
                since += 1;
                if n - start < lag + w || since < every {
                    continue;
                }
                since = 0;
                let hist = &scores[start..n];
                let r = sorted_keys(hist[lag..].iter());
                let f = sorted_keys(hist[..w].iter());
                if ks_sorted(&f, &r) > critical {
                    fired.push(n - 1);
                    from = n - w;
                }
            }
            fired
        }
        for (lag, every) in [(0, 16), (200, 10), (256, 16), (257, 16)] {
            let mut rng = LearnerRng::seed_from_u64(9);
            let scores: Vec<f32> = (0..6_000)
                .map(|i| {
                    rng.random_range(0.0..1.0f32) + if (i / 1_500) % 2 == 1 { 3.0 } else { 0.0 }
                })
                .collect();
            let mut s = ScoreShift::new(64, 1.95, lag);
            assert_eq!(s.every(), every, "lag {lag}");
            let fired: Vec<usize> = (0..scores.len())
                .filter(|&i| s.update(scores[i]).is_some())
                .collect();
            assert!(fired.len() >= 3, "lag {lag}: {fired:?}");
            assert_eq!(
                fired,
                plain(&scores, 64, s.lag, every, s.critical),
                "lag {lag}"
            );
        }
        let mut rng = LearnerRng::seed_from_u64(2);
        let mut s = ScoreShift::new(64, 1.95, 200);
        for i in 0..3_000 {
            s.update(rng.random_range(0.0..1.0f32) + if i < 1_500 { 0.0 } else { 3.0 });
        }
        assert!(!s.taken.is_empty());
        let bytes = postcard::to_stdvec(&s).unwrap();
        let mut back: ScoreShift = postcard::from_bytes(&bytes).unwrap();
        assert!(back.taken.is_empty(), "the copies are not saved");
        let mut fired = 0;
        for i in 0..2_000 {
            let x = rng.random_range(0.0..1.0f32) + if i < 1_000 { 0.0 } else { 3.0 };
            let (a, b) = (s.update(x), back.update(x));
            assert_eq!(a.map(|d| d.statistic), b.map(|d| d.statistic), "sample {i}");
            fired += a.is_some() as u32;
        }
        assert!(fired >= 1);
    }

    /// A stream with a cycle (scores high for a quarter of each 400-sample period): compared
    /// with the window just before, every rise of the cycle is an alarm; compared with the
    /// same stretch one period earlier, none is, and a real rise is still found quickly.
    #[test]
    fn a_seasonal_reference_ignores_the_cycle_and_finds_a_change() {
        let cycle = |i: usize, rng: &mut LearnerRng| {
            let busy = (i % 400) < 100;
            rng.random_range(0.0..1.0f32) + if busy { 2.0 } else { 0.0 }
        };
        let run = |season: usize| {
            let mut rng = LearnerRng::seed_from_u64(3);
            let mut s = ScoreShift::new(64, 1.95, season);
            let (mut before, mut first_after) = (0, None);
            for i in 0..12_000 {
                let x = cycle(i, &mut rng) + if i >= 10_000 { 0.5 } else { 0.0 };
                if s.update(x).is_some() {
                    if i < 10_000 {
                        before += 1;
                    } else {
                        first_after.get_or_insert(i - 10_000);
                    }
                }
            }
            (before, first_after)
        };
        let (adjacent, _) = run(0);
        assert!(
            adjacent >= 20,
            "the cycle alarms the adjacent test: {adjacent}"
        );
        let (seasonal, found) = run(400);
        assert_eq!(seasonal, 0, "no alarm from the cycle");
        assert!(found.expect("the rise is found") < 500, "{found:?}");
        let cfg = |season| DriftConfig {
            score_season: season,
            ..DriftConfig::default()
        };
        assert!(cfg(1008).check().is_ok() && cfg(0).check().is_ok());
        assert_eq!(cfg(100).check().unwrap_err().0, "drift.score_season");
    }

    /// The branch-free merge gives the plain merge's statistic, ties and unequal sizes too.
    #[test]
    fn the_ks_merge_matches_the_plain_one() {
        fn plain(x: &[f32], y: &[f32]) -> f64 {
            let (mut i, mut j, mut d) = (0, 0, 0f64);
            while i < x.len() && j < y.len() {
                let v = x[i].min(y[j]);
                while i < x.len() && x[i] <= v {
                    i += 1;
                }
                while j < y.len() && y[j] <= v {
                    j += 1;
                }
                d = d.max(i as f64 / x.len() as f64 - j as f64 / y.len() as f64);
            }
            d
        }
        let mut rng = LearnerRng::seed_from_u64(4);
        for case in 0..2_000 {
            let levels = [3u8, 20, 255][case % 3];
            let mut sample = |n: usize, shift: u8| {
                let mut v: Vec<f32> = (0..n)
                    .map(|_| f32::from(rng.random_range(0..levels).saturating_add(shift)))
                    .collect();
                v.sort_unstable_by(f32::total_cmp);
                v
            };
            let (nx, ny) = (1 + case % 37, 1 + case % 23);
            let (x, y) = (sample(nx, 0), sample(ny, (case % 4) as u8));
            let (kx, ky) = (sorted_keys(x.iter()), sorted_keys(y.iter()));
            assert_eq!(ks_sorted(&kx, &ky), plain(&x, &y), "case {case}");
            assert_eq!(ks_sorted(&ky, &kx), plain(&y, &x), "case {case}");
        }
    }

    #[test]
    fn the_score_test_finds_a_shifted_distribution_not_a_stable_one() {
        for seed in 0..5 {
            let mut s = ScoreShift::new(256, 1.95, 0);
            let (delay, false_alarms) =
                detect(|x| s.update(x as f32), 10_000, 12_000, (1.0, 1.2), seed);
            assert!(delay.expect("found") < 500, "seed {seed}");
            assert_eq!(false_alarms, 0, "seed {seed}");
        }
        let (a, b): (VecDeque<f32>, VecDeque<f32>) = (
            (0..10).map(|v| v as f32).collect(),
            (5..15).map(|v| v as f32).collect(),
        );
        assert!((ks_statistic(&a, &b) - 0.5).abs() < 1e-12, "b lies above a");
        assert_eq!(ks_statistic(&b, &a), 0.0, "a lies below b: no rise");
        let mut s = ScoreShift::new(256, 1.95, 0);
        let (fall, _) = detect(|x| s.update(x as f32), 10_000, 12_000, (1.2, 1.0), 1);
        assert_eq!(fall, None, "falling scores are the model learning");
    }
}
