//! Prequential evaluation: every sample is predicted before the model trains on it, and the
//! error is recorded over the whole stream and over a sliding window of the last samples.
//!
//! Regression reports MAE, RMSE and sMAPE in the target's own units, next to two baselines
//! measured on the same rows: persistence (the last value) and seasonal (the same slot one
//! season earlier, where the history reaches that far; the model is then also scored on
//! exactly those rows). Beam selection reports top-1 and top-3 accuracy and the power loss
//! of the chosen beam against the best one two ways: the mean of per-row
//! 10·log10(P_best / P_chosen) dB, and pooled over the rows, 10·log10(Σ P_best / Σ P_chosen)
//! (a few weak-link rows with huge per-row losses weigh less). A tie is never a hit: the
//! target counts as top-k only if fewer than k other classes score at least as high, so a
//! constant or NaN output scores nothing. Its baselines, on the same rows: persistence (the
//! key's last revealed class) and an online k-nearest-neighbour vote (see `features`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::model::Head;
use super::trace::RunningTotal;

/// One regression row to score.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RegressionRow {
    pub prediction: f64,
    pub target: f64,
    pub persistence: Option<f64>,
    pub seasonal: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ErrSum {
    n: u64,
    /// Rows whose prediction (or squared error) is not a finite number: a diverged model.
    /// They are counted in `n` but not summed, so the sums recover once they leave a window.
    nonfinite: u64,
    abs: f64,
    sq: f64,
    smape: f64,
}

fn smape(pred: f64, target: f64) -> f64 {
    let den = pred.abs() + target.abs();
    if den == 0.0 {
        0.0
    } else {
        2.0 * (pred - target).abs() / den
    }
}

impl ErrSum {
    fn add(&mut self, pred: f64, target: f64) {
        let e = pred - target;
        self.n += 1;
        if !(e * e).is_finite() {
            self.nonfinite += 1;
            return;
        }
        self.abs += e.abs();
        self.sq += e * e;
        self.smape += smape(pred, target);
    }
    fn sub(&mut self, pred: f64, target: f64) {
        let e = pred - target;
        self.n -= 1;
        if !(e * e).is_finite() {
            self.nonfinite -= 1;
            return;
        }
        self.abs -= e.abs();
        self.sq -= e * e;
        self.smape -= smape(pred, target);
    }
    /// The metrics; NaN (`null` in JSON, "n/a" or "diverged" in tables) over no rows or
    /// when any row's prediction was not finite: never a number that looks good.
    fn summary(&self) -> ErrorMetrics {
        if self.n == 0 || self.nonfinite > 0 {
            return ErrorMetrics {
                n: self.n,
                nonfinite: self.nonfinite,
                mae: f64::NAN,
                rmse: f64::NAN,
                smape_pct: f64::NAN,
            };
        }
        let n = self.n as f64;
        // Running sums can round a tiny mean square below zero; NaN must stay NaN.
        let ms = self.sq / n;
        ErrorMetrics {
            n: self.n,
            nonfinite: 0,
            mae: self.abs / n,
            rmse: if ms < 0.0 { 0.0 } else { ms.sqrt() },
            smape_pct: 100.0 * self.smape / n,
        }
    }
}

/// MAE, RMSE and sMAPE over `n` rows (NaN when `n` is 0 or `nonfinite` is not).
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ErrorMetrics {
    pub n: u64,
    /// Rows whose prediction was not finite (the model diverged).
    pub nonfinite: u64,
    pub mae: f64,
    pub rmse: f64,
    pub smape_pct: f64,
}

impl ErrorMetrics {
    /// Whether the figures are numbers to trust (rows, all finite).
    pub fn valid(&self) -> bool {
        self.n > 0 && self.nonfinite == 0
    }
}

/// The regression scoreboard.
#[derive(Debug, Clone, Serialize)]
pub struct RegressionSummary {
    pub model: ErrorMetrics,
    pub model_last_window: ErrorMetrics,
    pub persistence: ErrorMetrics,
    pub persistence_last_window: ErrorMetrics,
    pub seasonal: ErrorMetrics,
    /// The model on exactly the rows where the seasonal baseline exists.
    pub model_on_seasonal_rows: ErrorMetrics,
}

/// Top-1, top-3 accuracy and beam power loss.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct BeamMetrics {
    pub n: u64,
    /// Rows whose logits were not finite (the model diverged).
    pub nonfinite: u64,
    pub top1: f64,
    pub top3: f64,
    /// Mean over rows of the per-row loss in dB.
    pub power_loss_db: f64,
    /// 10·log10(Σ P_best / Σ P_chosen) over the rows.
    pub power_loss_db_pooled: f64,
}

/// The beam-selection scoreboard.
#[derive(Debug, Clone, Serialize)]
pub struct ClassificationSummary {
    pub model: BeamMetrics,
    pub model_last_window: BeamMetrics,
    /// The key's last revealed class (from its second row on).
    pub persistence: BeamMetrics,
    /// The online k-nearest-neighbour vote (from the key's second row on).
    pub knn: BeamMetrics,
    /// The model on exactly the rows where both baselines exist.
    pub model_on_baseline_rows: BeamMetrics,
    /// The MLP alone when the model's prediction is a blend with the baselines (no rows
    /// otherwise: then `model` is the MLP).
    pub mlp_alone: BeamMetrics,
}

/// Either scoreboard.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum EvalSummary {
    Regression(RegressionSummary),
    Classification(ClassificationSummary),
}

/// Prequential regression metrics with a sliding window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegressionEval {
    window: usize,
    model: ErrSum,
    persistence: ErrSum,
    seasonal: ErrSum,
    model_on_seasonal: ErrSum,
    recent_model: ErrSum,
    recent: VecDeque<RegressionRow>,
}

impl RegressionEval {
    pub fn new(window: usize) -> Self {
        RegressionEval {
            window: window.max(1),
            model: ErrSum::default(),
            persistence: ErrSum::default(),
            seasonal: ErrSum::default(),
            model_on_seasonal: ErrSum::default(),
            recent_model: ErrSum::default(),
            recent: VecDeque::with_capacity(window.max(1)),
        }
    }

    pub fn record(&mut self, r: RegressionRow) {
        self.model.add(r.prediction, r.target);
        if let Some(p) = r.persistence {
            self.persistence.add(p, r.target);
        }
        if let Some(s) = r.seasonal {
            self.seasonal.add(s, r.target);
            self.model_on_seasonal.add(r.prediction, r.target);
        }
        self.recent_model.add(r.prediction, r.target);
        if self.recent.len() == self.window
            && let Some(old) = self.recent.pop_front()
        {
            self.recent_model.sub(old.prediction, old.target);
        }
        self.recent.push_back(r);
    }

    /// Current windowed absolute error (for drift detectors and progress display).
    pub fn window_mae(&self) -> f64 {
        self.recent_model.summary().mae
    }

    pub fn summary(&self) -> RegressionSummary {
        // The window sums are running; recompute them exactly to shed rounding drift.
        let mut m = ErrSum::default();
        let mut p = ErrSum::default();
        for r in &self.recent {
            m.add(r.prediction, r.target);
            if let Some(v) = r.persistence {
                p.add(v, r.target);
            }
        }
        RegressionSummary {
            model: self.model.summary(),
            model_last_window: m.summary(),
            persistence: self.persistence.summary(),
            persistence_last_window: p.summary(),
            seasonal: self.seasonal.summary(),
            model_on_seasonal_rows: self.model_on_seasonal.summary(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct BeamSum {
    n: u64,
    /// Rows whose logits were not all finite (the model diverged).
    nonfinite: u64,
    top1: u64,
    top3: u64,
    n_power: u64,
    loss_db: f64,
    power_best: f64,
    power_chosen: f64,
}

impl BeamSum {
    /// NaN figures over no rows or when any row's logits were not finite.
    fn summary(&self) -> BeamMetrics {
        let n = self.n as f64;
        let ok = self.n > 0 && self.nonfinite == 0;
        let or_nan = |v: f64| if ok { v } else { f64::NAN };
        BeamMetrics {
            n: self.n,
            nonfinite: self.nonfinite,
            top1: or_nan(self.top1 as f64 / n),
            top3: or_nan(self.top3 as f64 / n),
            power_loss_db: if ok && self.n_power > 0 {
                self.loss_db / self.n_power as f64
            } else {
                f64::NAN
            },
            power_loss_db_pooled: if ok && self.n_power > 0 {
                10.0 * (self.power_best / self.power_chosen).log10()
            } else {
                f64::NAN
            },
        }
    }
    fn add(&mut self, r: &BeamRow) {
        self.n += 1;
        if !r.finite {
            self.nonfinite += 1;
            return;
        }
        self.top1 += r.top1 as u64;
        self.top3 += r.top3 as u64;
        if let Some((best, chosen)) = r.power {
            self.n_power += 1;
            self.loss_db += 10.0 * (best / chosen).log10();
            self.power_best += best;
            self.power_chosen += chosen;
        }
    }
}

impl BeamMetrics {
    /// Whether the figures are numbers to trust (rows, all finite).
    pub fn valid(&self) -> bool {
        self.n > 0 && self.nonfinite == 0
    }
}

/// One scored beam row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct BeamRow {
    finite: bool,
    top1: bool,
    top3: bool,
    /// Received power of the best and of the chosen beam (both positive).
    power: Option<(f64, f64)>,
}

impl BeamRow {
    /// Scores one row from per-class scores (logits or votes), the true class and,
    /// optionally, per-class received power.
    fn new(scores: &[f32], target: usize, power: Option<&[f32]>) -> BeamRow {
        Self::ranked(scores, scores, target, power)
    }

    /// Top-3 from the ranking `rank` (the predicted distribution), top-1 and power loss from
    /// the class `choice` scores highest (the decision: see [`super::decision`]).
    fn ranked(rank: &[f32], choice: &[f32], target: usize, power: Option<&[f32]>) -> BeamRow {
        // A row is scored several times (model, baselines, MLP alone), so these are plain
        // counting loops that vectorise. NaN scores make every comparison false: beam 0
        // would look like a choice, hence `finite`.
        debug_assert_eq!(rank.len(), choice.len());
        let (tr, tc) = (rank.get(target), choice.get(target));
        let (tr, tc) = (
            tr.copied().unwrap_or(f32::NAN),
            tc.copied().unwrap_or(f32::NAN),
        );
        let finite = rank
            .iter()
            .chain(choice)
            .fold(true, |all, x| all & x.is_finite());
        let (above_rank, above_choice) = (classes_at_least(rank, tr), classes_at_least(choice, tc));
        let best = argmax(choice);
        let power = power.and_then(|p| {
            let p_best = p.iter().copied().fold(f32::MIN, f32::max) as f64;
            let p_chosen = *p.get(best)? as f64;
            (finite && p_best > 0.0 && p_chosen > 0.0).then_some((p_best, p_chosen))
        });
        BeamRow {
            finite,
            top1: finite && tc.is_finite() && above_choice < 1,
            top3: finite && tr.is_finite() && above_rank < 3,
            power,
        }
    }
}

/// Classes other than the target scoring at least `t`, the target's own score (a tie is not
/// a hit): all of them counted, less the target itself (which counts when `t` is a number;
/// a NaN `t`, or a target out of range, counts nothing).
fn classes_at_least(scores: &[f32], t: f32) -> usize {
    let all: usize = scores.iter().map(|&x| usize::from(x >= t)).sum();
    all - usize::from(!t.is_nan())
}

/// The classification baselines of one row, computed where the per-key history is kept
/// (`features`): the key's last revealed class, and up to [`KNN_K`] neighbours' votes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassBaselines {
    pub persistence: Option<u16>,
    /// (class, weight), the nearest first; `knn_len` of them are set.
    pub knn: [(u16, f32); KNN_K],
    pub knn_len: u8,
    /// Labelled rows of this key before this one.
    pub key_seen: u32,
}

/// Neighbours in the k-nearest-neighbour baseline vote.
pub const KNN_K: usize = 5;

impl ClassBaselines {
    /// The vote as per-class scores in `out` (cleared first); false when there is no vote.
    fn knn_scores(&self, out: &mut [f32]) -> bool {
        out.fill(0.0);
        for &(c, w) in &self.knn[..self.knn_len as usize] {
            if let Some(v) = out.get_mut(c as usize) {
                *v += w;
            }
        }
        self.knn_len > 0
    }
}

/// Prequential beam-selection metrics with a sliding window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassificationEval {
    window: usize,
    all: BeamSum,
    persistence: BeamSum,
    knn: BeamSum,
    model_on_baseline_rows: BeamSum,
    mlp_alone: BeamSum,
    recent: VecDeque<BeamRow>,
    /// Scratch per-class scores of a baseline.
    #[serde(skip)]
    scratch: Vec<f32>,
}

impl ClassificationEval {
    pub fn new(window: usize) -> Self {
        ClassificationEval {
            window: window.max(1),
            all: BeamSum::default(),
            persistence: BeamSum::default(),
            knn: BeamSum::default(),
            model_on_baseline_rows: BeamSum::default(),
            mlp_alone: BeamSum::default(),
            recent: VecDeque::with_capacity(window.max(1)),
            scratch: Vec::new(),
        }
    }

    /// Scores the row's baselines (where it has them) on the same target and power.
    fn record_baselines(
        &mut self,
        b: &ClassBaselines,
        model: &BeamRow,
        classes: usize,
        target: usize,
        power: Option<&[f32]>,
    ) {
        self.scratch.resize(classes, 0.0);
        if let Some(c) = b.persistence {
            self.scratch.fill(0.0);
            if let Some(v) = self.scratch.get_mut(c as usize) {
                *v = 1.0;
            }
            self.persistence
                .add(&BeamRow::new(&self.scratch, target, power));
        }
        if b.knn_scores(&mut self.scratch) {
            self.knn.add(&BeamRow::new(&self.scratch, target, power));
        }
        if b.persistence.is_some() && b.knn_len > 0 {
            self.model_on_baseline_rows.add(model);
        }
    }

    /// Scores one row from its logits, true class and (optionally) per-class received power.
    pub fn record(&mut self, logits: &[f32], target: usize, power: Option<&[f32]>) {
        self.record_row(BeamRow::new(logits, target, power));
    }

    fn record_row(&mut self, row: BeamRow) {
        self.all.add(&row);
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(row);
    }

    /// Windowed top-1 error rate.
    pub fn window_error(&self) -> f64 {
        let n = self.recent.len().max(1) as f64;
        1.0 - self.recent.iter().filter(|r| r.finite && r.top1).count() as f64 / n
    }

    pub fn summary(&self) -> ClassificationSummary {
        let mut w = BeamSum::default();
        for r in &self.recent {
            w.add(r);
        }
        ClassificationSummary {
            model: self.all.summary(),
            model_last_window: w.summary(),
            persistence: self.persistence.summary(),
            knn: self.knn.summary(),
            model_on_baseline_rows: self.model_on_baseline_rows.summary(),
            mlp_alone: self.mlp_alone.summary(),
        }
    }
}

/// One row's observation, as either scoreboard takes it.
#[derive(Debug, Clone, Copy)]
pub enum Observation<'a> {
    Regression(RegressionRow),
    Classification {
        logits: &'a [f32],
        target: usize,
        power: Option<&'a [f32]>,
        baselines: ClassBaselines,
        /// The MLP's own output, when `logits` is a blend (`model.blend`).
        mlp_alone: Option<&'a [f32]>,
        /// Decision scores, when the class acted on is not the most probable one
        /// (`model.decision`); `logits` still ranks the classes for top-3.
        choice: Option<&'a [f32]>,
    },
}

/// The prequential scoreboard of the task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Metrics {
    Regression(RegressionEval),
    Classification(ClassificationEval),
}

impl Metrics {
    pub fn new(head: Head, window: usize) -> Self {
        match head {
            Head::Regression => Metrics::Regression(RegressionEval::new(window)),
            Head::Classification { .. } => Metrics::Classification(ClassificationEval::new(window)),
        }
    }
    pub fn record(&mut self, o: Observation<'_>) {
        match (self, o) {
            (Metrics::Regression(r), Observation::Regression(row)) => r.record(row),
            (
                Metrics::Classification(c),
                Observation::Classification {
                    logits,
                    target,
                    power,
                    baselines,
                    mlp_alone,
                    choice,
                },
            ) => {
                let row = BeamRow::ranked(logits, choice.unwrap_or(logits), target, power);
                c.record_row(row);
                c.record_baselines(&baselines, &row, logits.len(), target, power);
                if let Some(m) = mlp_alone {
                    c.mlp_alone.add(&BeamRow::new(m, target, power));
                }
            }
            _ => unreachable!("an observation of the scoreboard's own task"),
        }
    }
    pub fn summary(&self) -> EvalSummary {
        match self {
            Metrics::Regression(r) => EvalSummary::Regression(r.summary()),
            Metrics::Classification(c) => EvalSummary::Classification(c.summary()),
        }
    }
    /// The model's windowed headline metric (MAE, or power loss dB where the data has beam
    /// powers, else 1 − top-1) and persistence's, where the scoreboard keeps it.
    pub fn window_point(&self) -> (f64, Option<f64>) {
        match self {
            Metrics::Regression(r) => {
                let s = r.summary();
                let p = s.persistence_last_window;
                (s.model_last_window.mae, p.valid().then_some(p.mae))
            }
            Metrics::Classification(c) => {
                let w = c.summary().model_last_window;
                let v = if w.power_loss_db.is_finite() {
                    w.power_loss_db
                } else {
                    1.0 - w.top1
                };
                (v, None)
            }
        }
    }

    /// The running total of the per-row quantity behind [`Self::window_point`] (absolute
    /// error, power loss dB, or top-1 misses, a non-finite row a miss) and the rows it sums,
    /// so that a trace can read the metric over any stretch of rows without keeping them.
    pub fn running_total(&self) -> RunningTotal {
        match self {
            Metrics::Regression(r) => RunningTotal {
                sum: r.model.abs,
                rows: r.model.n - r.model.nonfinite,
                power: false,
            },
            Metrics::Classification(c) if c.all.n_power > 0 => RunningTotal {
                sum: c.all.loss_db,
                rows: c.all.n_power,
                power: true,
            },
            Metrics::Classification(c) => RunningTotal {
                sum: (c.all.n - c.all.top1) as f64,
                rows: c.all.n,
                power: false,
            },
        }
    }

    /// Rows of the whole stream whose prediction was not finite.
    pub fn nonfinite(&self) -> u64 {
        match self {
            Metrics::Regression(r) => r.model.nonfinite,
            Metrics::Classification(c) => c.all.nonfinite,
        }
    }
    pub fn window_text(&self) -> String {
        match self {
            Metrics::Regression(r) => format!("window MAE {:.4}", r.window_mae()),
            Metrics::Classification(c) => format!("window top-1 {:.3}", 1.0 - c.window_error()),
        }
    }
    /// Whether both score the same task.
    pub fn same_task(&self, other: &Metrics) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Where an evaluation period starts: a sample number of the stream, or an event time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Boundary {
    Sample(u64),
    /// Microseconds since the epoch (or the index, for index-timed streams).
    Time(i64),
}

impl Boundary {
    pub fn reached(&self, sample: u64, time: i64) -> bool {
        match *self {
            Boundary::Sample(s) => sample >= s,
            Boundary::Time(t) => time >= t,
        }
    }
}

/// A named part of the stream with its own scoreboard: settings are chosen on one period
/// (validation) and reported on a later one (test), never on the rows they were chosen on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Period {
    pub name: String,
    pub start: Boundary,
    pub metrics: Metrics,
}

/// The whole-stream scoreboard and one per period.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scoreboard {
    pub whole: Metrics,
    /// In stream order; a row belongs to the last period whose start it has reached.
    pub periods: Vec<Period>,
}

/// A period's figures in a report.
#[derive(Debug, Clone, Serialize)]
pub struct PeriodReport {
    pub name: String,
    pub samples: u64,
    pub metrics: EvalSummary,
}

impl Scoreboard {
    pub fn new(head: Head, window: usize, periods: &[(String, Boundary)]) -> Self {
        Scoreboard {
            whole: Metrics::new(head, window),
            periods: periods
                .iter()
                .map(|(name, start)| Period {
                    name: name.clone(),
                    start: *start,
                    metrics: Metrics::new(head, window),
                })
                .collect(),
        }
    }

    /// Records the `sample`-th row of the stream (event time `time`).
    pub fn record(&mut self, sample: u64, time: i64, o: Observation<'_>) {
        self.whole.record(o);
        if let Some(p) = self
            .periods
            .iter_mut()
            .rev()
            .find(|p| p.start.reached(sample, time))
        {
            p.metrics.record(o);
        }
    }

    pub fn periods(&self) -> Vec<PeriodReport> {
        self.periods
            .iter()
            .map(|p| {
                let metrics = p.metrics.summary();
                let samples = match &metrics {
                    EvalSummary::Regression(r) => r.model.n,
                    EvalSummary::Classification(c) => c.model.n,
                };
                PeriodReport {
                    name: p.name.clone(),
                    samples,
                    metrics,
                }
            })
            .collect()
    }
}

/// Logits to probabilities in place (shifted by the largest for range).
pub fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter_mut().for_each(|x| *x = (*x - m).exp());
    let s: f32 = v.iter().sum();
    v.iter_mut().for_each(|x| *x /= s);
}

pub fn argmax(v: &[f32]) -> usize {
    // The best value kept in a register: read back from `v[best]` it made every comparison
    // wait on the load its last update addressed (half of `BeamRow::ranked`'s time).
    let Some(&first) = v.first() else {
        return 0;
    };
    let (mut best, mut top) = (0, first);
    for (i, &x) in v.iter().enumerate().skip(1) {
        if x > top {
            (best, top) = (i, x);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prediction: f64, target: f64) -> RegressionRow {
        RegressionRow {
            prediction,
            target,
            persistence: Some(target + 1.0),
            seasonal: None,
        }
    }

    #[test]
    fn no_rows_is_not_a_perfect_score() {
        let s = RegressionEval::new(4).summary();
        assert!(!s.model.valid() && s.model.mae.is_nan() && s.model.rmse.is_nan());
        let c = ClassificationEval::new(4).summary();
        assert!(!c.model.valid() && c.model.top1.is_nan());
        let json = serde_json::to_value(s.model).unwrap();
        assert!(json["mae"].is_null(), "{json}");
    }

    #[test]
    fn a_non_finite_prediction_marks_the_window_diverged_until_it_leaves() {
        let mut e = RegressionEval::new(3);
        e.record(row(1.0, 2.0));
        // A huge but finite prediction squares to infinity: the RMSE used to print 0.
        e.record(row(1e200, 2.0));
        e.record(row(f64::NAN, 2.0));
        let s = e.summary();
        assert_eq!((s.model.n, s.model.nonfinite), (3, 2));
        assert!(s.model.rmse.is_nan() && s.model_last_window.mae.is_nan());
        assert!(s.persistence.valid(), "the baselines are unaffected");
        for _ in 0..3 {
            e.record(row(3.0, 2.0));
        }
        let s = e.summary();
        assert!(s.model_last_window.valid() && s.model_last_window.mae == 1.0);
        assert!(e.window_mae() == 1.0, "the running window sums recovered");
        assert!(!s.model.valid(), "the whole stream stays diverged");
    }

    #[test]
    fn ties_are_not_hits_and_argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 3.0]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 2.0]), 2);
        assert_eq!(argmax(&[]), 0);
        let p = [0.1, 0.4, 0.4, 0.1];
        let r = BeamRow::ranked(&p, &p, 1, None);
        assert!(
            r.finite && !r.top1 && r.top3,
            "a tie for the top is no top-1 hit"
        );
        let p = [0.3, 0.3, 0.3, 0.1];
        let r = BeamRow::ranked(&p, &p, 3, None);
        assert!(!r.top1 && !r.top3, "three classes above the target");
        let r = BeamRow::ranked(&p, &p, 9, None);
        assert!(!r.top1 && !r.top3, "a target out of range is no hit");
    }

    #[test]
    fn nan_logits_are_not_a_beam_choice() {
        let mut c = ClassificationEval::new(8);
        c.record(&[f32::NAN; 4], 0, None);
        c.record(&[0.0, 1.0, 0.0, 0.0], 1, None);
        let s = c.summary();
        assert_eq!((s.model.n, s.model.nonfinite), (2, 1));
        assert!(s.model.top1.is_nan() && s.model.top3.is_nan());
    }

    #[test]
    fn regression_metrics_match_hand_computation() {
        let mut e = RegressionEval::new(2);
        for (p, t) in [(1.0, 2.0), (3.0, 3.0), (5.0, 1.0)] {
            e.record(RegressionRow {
                prediction: p,
                target: t,
                persistence: Some(t + 1.0),
                seasonal: None,
            });
        }
        let s = e.summary();
        assert!((s.model.mae - 5.0 / 3.0).abs() < 1e-12);
        assert!((s.model.rmse - (17.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.model_last_window.mae - 2.0).abs() < 1e-12);
        assert!((s.persistence.mae - 1.0).abs() < 1e-12);
        assert_eq!(s.seasonal.n, 0);
    }

    #[test]
    fn rows_land_in_the_period_they_reached() {
        let periods = [
            ("validation".to_string(), Boundary::Sample(2)),
            ("test".to_string(), Boundary::Time(100)),
        ];
        let mut b = Scoreboard::new(Head::Regression, 10, &periods);
        for (i, t) in [0i64, 10, 20, 100, 110].iter().enumerate() {
            let row = RegressionRow {
                prediction: i as f64,
                target: 0.0,
                persistence: None,
                seasonal: None,
            };
            b.record(i as u64, *t, Observation::Regression(row));
        }
        let p = b.periods();
        assert_eq!((p[0].samples, p[1].samples), (1, 2));
        let EvalSummary::Regression(test) = &p[1].metrics else {
            panic!("regression")
        };
        assert!((test.model.mae - 3.5).abs() < 1e-12);
    }

    #[test]
    fn beam_metrics() {
        let mut e = ClassificationEval::new(10);
        let power = [1.0, 10.0, 0.1, 5.0];
        e.record(&[0.0, 3.0, 1.0, 2.0], 1, Some(&power)); // top-1 hit, 0 dB
        e.record(&[0.0, 2.0, 1.0, 3.0], 1, Some(&power)); // top-3 hit, chose beam 3: 3.01 dB
        let s = e.summary().model;
        assert_eq!(s.n, 2);
        assert!((s.top1 - 0.5).abs() < 1e-12 && (s.top3 - 1.0).abs() < 1e-12);
        assert!((s.power_loss_db - 10.0 * 2f64.log10() / 2.0).abs() < 1e-9);
        assert!((s.power_loss_db_pooled - 10.0 * (20.0f64 / 15.0).log10()).abs() < 1e-9);
    }

    #[test]
    fn ties_and_constant_outputs_are_not_hits() {
        let mut e = ClassificationEval::new(10);
        e.record(&[0.5; 8], 3, None);
        e.record(&[0.0, 2.0, 2.0, 1.0], 1, None); // tied with class 2: top-3, not top-1
        let s = e.summary().model;
        assert_eq!((s.top1, s.top3), (0.0, 0.5));
    }

    #[test]
    fn a_decision_sets_top1_and_power_and_the_ranking_sets_top3() {
        let power = [1.0, 10.0, 0.1, 5.0];
        let rank = [0.0, 1.0, 3.0, 2.0]; // beam 1 third
        let choice = [0.0, 0.0, 0.0, 1.0]; // acts on beam 3
        let r = BeamRow::ranked(&rank, &choice, 1, Some(&power));
        assert!(!r.top1 && r.top3);
        assert_eq!(r.power, Some((10.0, 5.0)));
        let r = BeamRow::ranked(&rank, &[0.0, 1.0, 0.0, 0.0], 1, Some(&power));
        assert!(r.top1 && r.top3 && r.power == Some((10.0, 10.0)));
        assert!(!BeamRow::ranked(&rank, &[f32::NAN; 4], 1, None).finite);
    }

    #[test]
    fn baselines_are_scored_on_their_rows() {
        let mut e = ClassificationEval::new(10);
        let power = [1.0, 10.0, 0.1, 5.0];
        let logits = [0.0, 3.0, 1.0, 2.0];
        let none = ClassBaselines::default();
        e.record_baselines(
            &none,
            &BeamRow::new(&logits, 1, Some(&power)),
            4,
            1,
            Some(&power),
        );
        let mut b = ClassBaselines {
            persistence: Some(3),
            knn_len: 3,
            ..Default::default()
        };
        b.knn[..3].copy_from_slice(&[(2, 1.2), (1, 1.1), (1, 1.0)]);
        e.record_baselines(
            &b,
            &BeamRow::new(&logits, 1, Some(&power)),
            4,
            1,
            Some(&power),
        );
        let s = e.summary();
        assert_eq!(
            (s.persistence.n, s.knn.n, s.model_on_baseline_rows.n),
            (1, 1, 1)
        );
        assert_eq!((s.persistence.top1, s.persistence.top3), (0.0, 0.0));
        assert!((s.persistence.power_loss_db - 10.0 * 2f64.log10()).abs() < 1e-9);
        assert_eq!(
            (s.knn.top1, s.knn.power_loss_db),
            (1.0, 0.0),
            "2.1 votes beat 1.2"
        );
    }
}
