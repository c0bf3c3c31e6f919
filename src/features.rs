//! Online features: turn decoded rows into model inputs, with bounded per-key state.
//!
//! A raw feed carries no lags, so they are computed here from the schema: per key a short
//! history of each lagged column (lag k = the k-th previous *valid* row of that key), the
//! calendar as sin/cos of hour-of-day and day-of-week, the UE position in metres east/north
//! of its base station, and a running standardisation of every numeric feature and of a
//! regression target, or the fixed encoding the schema names (`Encoding`: a physical scale,
//! Fourier features of a position, harmonics of an angle); for classification, the key's
//! past labels as inputs (`label_lags`) and the report's two baselines (the key's last label,
//! and a k-nearest-neighbour vote over the last raw positions of the key). State is bounded: histories are as long as the largest lag (or the
//! seasonal baseline), and at most `max_keys` keys are tracked (the least recently seen is
//! forgotten). A row that cannot yet have its lags, or carries a null or non-finite value in
//! a column it needs, is skipped with a reason; it never stops the stream.

use std::collections::{BTreeMap, VecDeque};
use std::f64::consts::TAU;
use std::sync::Arc;

use crate::decode::DecodedBatch;
use crate::learner::blend::ExpertWeights;
use crate::learner::decision::{LossTable, RuleRecord};
use crate::learner::drift::KeyDetectors;
use crate::learner::eval::{ClassBaselines, KNN_K, Observation, RegressionRow};
use crate::learner::knn::KnnMemory;
use crate::learner::model::Head;
use crate::schema::{
    CalendarSpec, Encoding, LABEL_ANGLE_HARMONICS, LabelEncoding, Schema, TaskSpec,
};
use crate::source::{Injection, RowOrigin};
use crate::validate::RowCheck;

pub use crate::validate::{OutOfRange, SkipReason};

/// What evaluation needs to know about a sample besides the model output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RowEval {
    /// Target in its own units (regression) or the class.
    pub target: f64,
    /// Standardisation applied to the regression target: y_model = (y − mean) / std
    /// (`mean` is the last value when the model predicts the change).
    pub mean: f64,
    pub std: f64,
    /// Last value of the target for this key.
    pub persistence: Option<f64>,
    /// Value one season earlier for this key.
    pub seasonal: Option<f64>,
    /// Received power per beam.
    pub power: Option<Box<[f32]>>,
    /// The target is modelled as ln(1 + y): predictions go back through exp(·) − 1.
    pub log1p: bool,
    /// Classification: the baselines' picks for this row.
    pub baselines: ClassBaselines,
}

impl RowEval {
    /// The prediction in the target's units (the chosen class for classification) and the
    /// observation the scoreboard records, from the model's output row.
    pub fn observe<'a>(&'a self, head: Head, out: &'a [f32]) -> (f64, Observation<'a>) {
        match head {
            Head::Regression => {
                let p = self.prediction(out[0]);
                let row = RegressionRow {
                    prediction: p,
                    target: self.target,
                    persistence: self.persistence,
                    seasonal: self.seasonal,
                };
                (p, Observation::Regression(row))
            }
            Head::Classification { .. } => {
                let obs = Observation::Classification {
                    logits: out,
                    target: self.target as usize,
                    power: self.power.as_deref(),
                    baselines: self.baselines,
                    mlp_alone: None,
                    choice: None,
                };
                (crate::learner::eval::argmax(out) as f64, obs)
            }
        }
    }

    /// A model output back in the target's own units.
    pub fn prediction(&self, output: f32) -> f64 {
        let v = output as f64 * self.std + self.mean;
        if self.log1p { v.exp_m1() } else { v }
    }
}

/// Samples built so far, drained by the pipeline in micro-batches.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Samples {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub keys: Vec<Arc<str>>,
    pub times: Vec<i64>,
    pub eval: Vec<RowEval>,
    /// Where each sample came from (file row, or topic partition offset).
    pub origins: Vec<RowOrigin>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
    /// Removes and returns the first `n` samples.
    pub fn take_front(&mut self, n: usize, width: usize) -> Samples {
        let n = n.min(self.len());
        Samples {
            x: self.x.drain(..n * width).collect(),
            y: self.y.drain(..n).collect(),
            keys: self.keys.drain(..n).collect(),
            times: self.times.drain(..n).collect(),
            eval: self.eval.drain(..n).collect(),
            origins: self.origins.drain(..n).collect(),
        }
    }

    /// Splits into consecutive groups of `n` samples (the last one shorter), in order. Why
    /// not [`Self::take_front`] in a loop: each call shifts everything behind the front, so
    /// a 1,024-row batch cut into micro-batches of 8 moved its rows 128 times (the learner
    /// thread's largest cost, `memmove`, in `perf`).
    pub fn into_chunks(self, n: usize, width: usize) -> Vec<Samples> {
        let n = n.max(1);
        let chunks = self.len().div_ceil(n);
        let mut x = self.x.into_iter();
        let mut y = self.y.into_iter();
        let mut keys = self.keys.into_iter();
        let mut times = self.times.into_iter();
        let mut eval = self.eval.into_iter();
        let mut origins = self.origins.into_iter();
        (0..chunks)
            .map(|_| Samples {
                x: x.by_ref().take(n * width).collect(),
                y: y.by_ref().take(n).collect(),
                keys: keys.by_ref().take(n).collect(),
                times: times.by_ref().take(n).collect(),
                eval: eval.by_ref().take(n).collect(),
                origins: origins.by_ref().take(n).collect(),
            })
            .collect()
    }

    /// Cuts into micro-batches of one key each (`model.scope = "per_key"`): each key's rows,
    /// in order, make groups of `n`; a key's last, shorter group waits in the returned rest
    /// when `wait(key)`, and is a micro-batch of its own otherwise. Micro-batches come in the
    /// order their last rows arrived, the rest in arrival order. Why: one model per key
    /// learns from its own rows only, so cutting an interleaved stream in arrival order gave
    /// each key a step per few rows (four interleaved sites: four times the steps).
    pub fn cut_by_key(
        mut self,
        n: usize,
        width: usize,
        wait: impl Fn(&str) -> bool,
    ) -> (Vec<Samples>, Samples) {
        let n = n.max(1);
        let mut by_key: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
        let mut slot: foldhash::HashMap<Arc<str>, usize> = Default::default();
        for (i, k) in self.keys.iter().enumerate() {
            let s = *slot.entry(k.clone()).or_insert_with(|| {
                by_key.push((k.clone(), Vec::new()));
                by_key.len() - 1
            });
            by_key[s].1.push(i);
        }
        if let [(key, _)] = &by_key[..] {
            // One key (an archive's site, one after another): cut in order, moving the rows.
            let len = self.len();
            let full = if wait(key) { len / n * n } else { len };
            let mut rest = self;
            let ready = rest.take_front(full, width);
            return (ready.into_chunks(n, width), rest);
        }
        let (mut groups, mut rest) = (Vec::new(), Vec::new());
        for (key, rows) in by_key {
            let mut chunks = rows.chunks(n).peekable();
            while let Some(c) = chunks.next() {
                let last = chunks.peek().is_none();
                if last && c.len() < n && wait(&key) {
                    rest.extend_from_slice(c);
                } else {
                    groups.push(c.to_vec());
                }
            }
        }
        groups.sort_unstable_by_key(|g| g[g.len() - 1]);
        rest.sort_unstable();
        // Each row's evaluation (a beam row's 64 powers) is moved, not copied.
        let mut eval: Vec<Option<RowEval>> = std::mem::take(&mut self.eval)
            .into_iter()
            .map(Some)
            .collect();
        let cut = (groups.iter())
            .map(|g| self.gather(g, width, &mut eval))
            .collect();
        let rest = self.gather(&rest, width, &mut eval);
        (cut, rest)
    }

    /// `n` samples whose every field holds the row number (`width` inputs each), with keys.
    #[cfg(test)]
    pub(crate) fn numbered(n: usize, width: usize, key: impl Fn(usize) -> String) -> Samples {
        Samples {
            x: (0..n * width).map(|v| v as f32).collect(),
            y: (0..n).map(|v| v as f32).collect(),
            keys: (0..n).map(|v| Arc::from(key(v).as_str())).collect(),
            times: (0..n as i64).collect(),
            eval: (0..n)
                .map(|v| RowEval {
                    target: v as f64,
                    mean: 0.0,
                    std: 1.0,
                    persistence: None,
                    seasonal: None,
                    power: None,
                    log1p: false,
                    baselines: Default::default(),
                })
                .collect(),
            origins: (0..n as u64)
                .map(|index| RowOrigin {
                    source: Arc::from("f"),
                    index,
                })
                .collect(),
        }
    }

    /// The samples at `rows`, in that order, each row's evaluation taken from `eval` (every
    /// row is gathered once).
    fn gather(&self, rows: &[usize], width: usize, eval: &mut [Option<RowEval>]) -> Samples {
        Samples {
            x: rows
                .iter()
                .flat_map(|&i| &self.x[i * width..(i + 1) * width])
                .copied()
                .collect(),
            y: rows.iter().map(|&i| self.y[i]).collect(),
            keys: rows.iter().map(|&i| self.keys[i].clone()).collect(),
            times: rows.iter().map(|&i| self.times[i]).collect(),
            eval: (rows.iter())
                .map(|&i| eval[i].take().expect("each row is gathered once"))
                .collect(),
            origins: rows.iter().map(|&i| self.origins[i].clone()).collect(),
        }
    }
}

/// Values a scaler must have seen before the deviation check trusts it.
const DEVIATION_WARMUP: u64 = 1000;
/// Rows in a row a column may be far out before its values are taken as a new regime: an
/// absurd value comes alone, a level the scalers have not seen comes to stay (and the
/// scalers, which never see a dead-lettered value, would otherwise never widen to it: a
/// column that read 0 for a thousand rows would refuse every later non-zero value).
const FAR_STREAK: u32 = 32;

/// Running mean and variance (Welford).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Scaler {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Scaler {
    pub fn update(&mut self, v: f64) {
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
    }
    /// (mean, std); std is 1 until two distinct values were seen.
    pub fn params(&self) -> (f64, f64) {
        let var = if self.n > 1 {
            self.m2 / self.n as f64
        } else {
            0.0
        };
        let std = var.sqrt();
        (self.mean, if std > 0.0 { std } else { 1.0 })
    }
    fn apply(&self, v: f64) -> f64 {
        let (m, s) = self.params();
        (v - m) / s
    }
    /// Updates unless `freeze_after` values were seen.
    fn update_until(&mut self, v: f64, freeze_after: Option<u64>) {
        if freeze_after.is_none_or(|f| self.n < f) {
            self.update(v);
        }
    }
}

/// Appends the model inputs of one feature value under its encoding.
fn encode(enc: &Encoding, v: f64, scaler: &Scaler, normalise: bool, x: &mut Vec<f32>) {
    match *enc {
        Encoding::Standardise => x.push(if normalise { scaler.apply(v) } else { v } as f32),
        Encoding::Scale { scale } => x.push((v / scale) as f32),
        Encoding::Fourier { scale, octaves } => {
            let u = v / scale;
            x.push(u as f32);
            for j in 0..octaves {
                let (s, c) = (std::f64::consts::PI * f64::from(1u32 << j) * u).sin_cos();
                x.extend([s as f32, c as f32]);
            }
        }
        Encoding::Periodic { harmonics, period } => {
            let a = period.map_or(v, |p| TAU * v / p);
            for k in 1..=harmonics {
                let (s, c) = (f64::from(k) * a).sin_cos();
                x.extend([s as f32, c as f32]);
            }
        }
    }
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct KeyState {
    /// One history per numeric column (empty for columns that are not lagged).
    hist: Vec<VecDeque<f64>>,
    /// Classification: the key's last revealed labels, newest first.
    labels: VecDeque<u16>,
    /// A small number naming the key in the neighbour memory.
    id: u32,
    /// Labelled rows of the key so far.
    labelled: u32,
    /// The learner stage's parts of this key ([`KeyLearnerParts`]); they live here only
    /// inside a checkpoint, which keeps them with the key.
    learner: KeyLearnerParts,
    /// This key's own scalers (numeric columns, geo east/north/range), with
    /// `scaler.per_key`.
    own: Option<(Vec<Scaler>, [Scaler; 3])>,
    last_seen: u64,
}

/// What the learner stage keeps per key: the prediction blend's expert weights, the
/// decision's record of its two rules (`model.decision = "switch"`) and, with
/// `drift.per_key`, the key's loss detectors.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyLearnerParts {
    pub experts: ExpertWeights,
    pub rules: RuleRecord,
    /// `model.decision_scope = "per_key"`: the key's loss table (made at its first row).
    pub losses: Option<LossTable>,
    /// Made at the key's first sample that needs them.
    pub drift: Option<Box<KeyDetectors>>,
}

/// Every key's [`KeyLearnerParts`], as a checkpoint kept them.
pub type SavedLearnerParts = Vec<(Arc<str>, KeyLearnerParts)>;

/// A key the engine started or stopped tracking, told to the learner stage so that its
/// per-key state follows the same keys (and the same `max_keys` bound).
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChange {
    Tracked(Arc<str>),
    Forgotten(Arc<str>),
}

impl KeyChange {
    /// The keys a batch's `changes` leave untracked: forgotten, and not tracked again later
    /// in the same batch.
    pub fn forgotten(changes: &[KeyChange]) -> foldhash::HashSet<&str> {
        let mut gone = foldhash::HashSet::default();
        for c in changes {
            match c {
                KeyChange::Forgotten(k) => gone.insert(&**k),
                KeyChange::Tracked(k) => gone.remove(&**k),
            };
        }
        gone
    }
}

/// The learned part of a [`FeatureEngine`], as a checkpoint stores it.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct FeatureState {
    scalers: Vec<Scaler>,
    geo_scalers: [Scaler; 3],
    keys: Vec<(Arc<str>, KeyState)>,
    tick: u64,
    keys_evicted: u64,
    next_key_id: u32,
    knn: Option<KnnMemory>,
    rows: u64,
    /// The samples waiting for a full micro-batch when the checkpoint was cut (the feature
    /// stage's, not the engine's): a resume starts its first micro-batch with them, so a
    /// checkpoint never changes where micro-batches begin (format 10).
    pending: Samples,
}

impl FeatureState {
    /// Keeps the partial micro-batch with the state (see `pending`).
    pub fn set_pending(&mut self, pending: Samples) {
        self.pending = pending;
    }

    /// The partial micro-batch the state was saved with.
    pub fn take_pending(&mut self) -> Samples {
        std::mem::take(&mut self.pending)
    }

    /// Moves every key's learner-stage parts out (a resume hands them to that stage).
    pub fn take_learner_parts(&mut self) -> SavedLearnerParts {
        (self.keys.iter_mut())
            .map(|(k, s)| (k.clone(), std::mem::take(&mut s.learner)))
            .collect()
    }

    /// Puts every key's learner-stage parts in, as `parts` gives them (a checkpoint).
    pub fn put_learner_parts(&mut self, mut parts: impl FnMut(&str) -> Option<KeyLearnerParts>) {
        for (k, s) in &mut self.keys {
            if let Some(p) = parts(k) {
                s.learner = p;
            }
        }
    }
}

/// Points the neighbour baseline remembers.
pub const KNN_MEMORY: usize = 4096;

/// Builds samples from decoded batches (see the module doc).
pub struct FeatureEngine {
    schema: Arc<Schema>,
    /// Numeric column names in decode order.
    numeric: Vec<String>,
    inputs: Vec<usize>,
    lags: Vec<(usize, Vec<usize>)>,
    /// History length kept per numeric column.
    hist_len: Vec<usize>,
    /// Longest lag per numeric column (a row needs this much history).
    need_len: Vec<usize>,
    target: Option<usize>,
    geo: Option<[usize; 4]>,
    scalers: Vec<Scaler>,
    geo_scalers: [Scaler; 3],
    /// The checks a row must pass (nulls, finiteness, ranges, transform domains, classes).
    check: RowCheck,
    /// Values clamped to their range (`out_of_range = "clip"`).
    pub clipped: u64,
    /// By key, hashed with foldhash (seeded per process) rather than SipHash: four lookups
    /// per row made SipHash a measurable part of the per-row feature cost.
    keys: foldhash::HashMap<Arc<str>, KeyState>,
    /// Every tracked key by the tick it was last seen at, oldest first: the least recently
    /// seen key is found in O(log keys) when `max_keys` is reached (a scan of every key per
    /// arriving row made a capped stream 80× slower).
    recency: BTreeMap<u64, Arc<str>>,
    max_keys: usize,
    tick: u64,
    width: usize,
    /// Keys forgotten because `max_keys` was reached.
    pub keys_evicted: u64,
    /// See [`FeatureEngine::with_max_deviations`].
    max_deviations: f64,
    /// Per numeric column (and the position's distance, last): rows in a row whose value was
    /// far out (see [`FAR_STREAK`]).
    far_streak: Vec<u32>,
    /// Classification: classes, and labels kept per key (the longest label lag, at least 1).
    classes: usize,
    label_len: usize,
    /// Classification: the neighbour baseline's memory of raw inputs and geo east/north.
    knn: Option<KnnMemory>,
    next_key_id: u32,
    /// Rows offered so far (the injection's clock), and the injection: (column, from_row,
    /// scale, shift).
    rows: u64,
    inject: Option<(usize, u64, f64, f64)>,
    /// Keys started and forgotten since last taken, when asked for
    /// ([`FeatureEngine::with_key_changes`]).
    key_changes: Option<Vec<KeyChange>>,
}

const EARTH_RADIUS_M: f64 = 6_371_000.0;

impl FeatureEngine {
    pub fn new(schema: Arc<Schema>, numeric: &[String], max_keys: usize) -> Self {
        let idx = |c: &String| numeric.iter().position(|n| n == c).expect("numeric column");
        let mut hist_len = vec![0; numeric.len()];
        let mut need_len = vec![0; numeric.len()];
        let lags: Vec<(usize, Vec<usize>)> = schema
            .features
            .lags
            .iter()
            .map(|l| (idx(&l.column), l.lags.clone()))
            .collect();
        for (c, ls) in &lags {
            let m = *ls.iter().max().expect("validated non-empty");
            need_len[*c] = need_len[*c].max(m);
            hist_len[*c] = hist_len[*c].max(m);
        }
        let target = (schema.task == TaskSpec::Regression).then(|| idx(&schema.target));
        if let Some(t) = target {
            hist_len[t] = hist_len[t]
                .max(1)
                .max(schema.baselines.seasonal_lag.unwrap_or(0));
        }
        let geo = schema.features.geo.as_ref().map(|g| {
            [
                idx(&g.bs_lat),
                idx(&g.bs_lon),
                idx(&g.ue_lat),
                idx(&g.ue_lon),
            ]
        });
        let classes = match schema.task {
            TaskSpec::Classification { classes } => classes,
            TaskSpec::Regression => 0,
        };
        let label_len = match &schema.features.label_lags {
            Some(l) => l.lags.iter().copied().max().unwrap_or(1),
            None => usize::from(classes > 0),
        };
        let knn_dims = schema.features.inputs.len() + 2 * usize::from(geo.is_some());
        let knn = (classes > 0 && knn_dims > 0).then(|| KnnMemory::new(knn_dims, KNN_MEMORY));
        FeatureEngine {
            classes,
            label_len,
            knn,
            next_key_id: 0,
            rows: 0,
            inject: None,
            key_changes: None,
            check: RowCheck::new(schema.clone(), numeric, OutOfRange::DeadLetter),
            clipped: 0,
            inputs: schema.features.inputs.iter().map(idx).collect(),
            width: schema.input_width(),
            numeric: numeric.to_vec(),
            lags,
            hist_len,
            need_len,
            target,
            geo,
            scalers: vec![Scaler::default(); numeric.len()],
            geo_scalers: [Scaler::default(); 3],
            keys: foldhash::HashMap::default(),
            recency: BTreeMap::new(),
            max_keys: max_keys.max(1),
            tick: 0,
            keys_evicted: 0,
            max_deviations: 0.0,
            far_streak: vec![0; numeric.len() + 1],
            schema,
        }
    }

    /// Injects a drift (see [`crate::source::Injection`]); the column must be one the
    /// schema reads as a number.
    pub fn with_injection(mut self, inj: Option<&Injection>) -> Result<Self, String> {
        if let Some(inj) = inj {
            let Some(c) = self.numeric.iter().position(|n| *n == inj.column) else {
                return Err(format!(
                    "column: `{}` is not a numeric column this schema reads ({})",
                    inj.column,
                    self.numeric.join(", ")
                ));
            };
            if !(inj.scale.is_finite() && inj.shift.is_finite()) {
                return Err(format!(
                    "scale and shift must be finite numbers, are {} and {}",
                    inj.scale, inj.shift
                ));
            }
            self.inject = Some((c, inj.from_row, inj.scale, inj.shift));
        }
        Ok(self)
    }

    /// What to do with values outside their column's range (dead-letter by default).
    pub fn with_out_of_range(mut self, mode: OutOfRange) -> Self {
        self.check = RowCheck::new(self.schema.clone(), &self.numeric, mode);
        self
    }

    /// Dead-letters values this many running standard deviations from their column's running
    /// mean (0: off; see `features.max_deviations`).
    pub fn with_max_deviations(mut self, k: f64) -> Self {
        self.max_deviations = k;
        self
    }

    /// The first column (or `ue_distance`, for the position) whose value is absurdly far
    /// from what the running scalers have seen: none until they have seen enough values, and
    /// none for a column far out for more than [`FAR_STREAK`] rows in a row (logged once).
    fn far_out(&mut self, vals: &[f64], en: Option<(f64, f64)>) -> Option<String> {
        let k = self.max_deviations;
        if k <= 0.0 {
            return None;
        }
        let far = |s: &Scaler, v: f64| {
            let (mean, std) = s.params();
            s.n >= DEVIATION_WARMUP && s.m2 > 0.0 && (v - mean).abs() > k * std
        };
        // Raw coordinates are judged by the distance they give: a base station's own
        // coordinates are constant within a site and jump between sites.
        let geo = self.geo.unwrap_or([usize::MAX; 4]);
        let dist = self.numeric.len();
        let mut first = None;
        for c in (0..dist).filter(|c| !geo.contains(c)).chain([dist]) {
            let is_far = match (c < dist, en) {
                (true, _) => far(&self.scalers[c], vals[c]),
                (false, Some((e, n))) => far(&self.geo_scalers[2], e.hypot(n)),
                (false, None) => false,
            };
            let streak = &mut self.far_streak[c];
            *streak = if is_far { streak.saturating_add(1) } else { 0 };
            let name = || self.numeric.get(c).map_or("ue_distance", |n| n.as_str());
            if *streak == FAR_STREAK + 1 {
                tracing::warn!(
                    column = name(),
                    rows = FAR_STREAK,
                    "far from the running mean for this many rows in a row: taken as a new level"
                );
            }
            if is_far && *streak <= FAR_STREAK && first.is_none() {
                first = Some(name().to_string());
            }
        }
        first
    }

    /// The raw point the neighbour memory compares: input columns and geo east/north.
    fn knn_point(&self, vals: &[f64], en: Option<(f64, f64)>, point: &mut Vec<f32>) {
        point.clear();
        point.extend(self.inputs.iter().map(|&c| vals[c] as f32));
        if let Some((e, n)) = en {
            point.extend([e as f32, n as f32]);
        }
    }

    /// Persistence and the neighbours' vote for a row of `state`'s key.
    fn baselines(&self, state: &KeyState, point: &[f32]) -> ClassBaselines {
        let mut b = ClassBaselines {
            persistence: state.labels.front().copied(),
            key_seen: state.labelled,
            ..Default::default()
        };
        if let Some(m) = &self.knn {
            let mut near = [(0f32, 0u16); KNN_K];
            let found = m.nearest(point, state.id, &mut near);
            for (rank, &(_, class)) in near[..found].iter().enumerate() {
                // One vote each; nearness only breaks ties.
                b.knn[rank] = (class, 1.0 + 1e-3 * (KNN_K - rank) as f32);
            }
            b.knn_len = found as u8;
        }
        b
    }

    /// Width of a feature row.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn schema_name(&self) -> &str {
        &self.schema.name
    }

    /// Records every key started and forgotten, for [`FeatureEngine::take_key_changes`].
    pub fn with_key_changes(mut self) -> Self {
        self.key_changes = Some(Vec::new());
        self
    }

    /// The keys started and forgotten since the last call, in order.
    pub fn take_key_changes(&mut self) -> Vec<KeyChange> {
        self.key_changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Keys currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }

    /// What a checkpoint keeps: the running scalers and every key's lag window.
    pub fn state(&self) -> FeatureState {
        FeatureState {
            scalers: self.scalers.clone(),
            geo_scalers: self.geo_scalers,
            keys: self
                .keys
                .iter()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            tick: self.tick,
            keys_evicted: self.keys_evicted,
            next_key_id: self.next_key_id,
            knn: self.knn.clone(),
            rows: self.rows,
            pending: Samples::default(),
        }
    }

    /// Continues from a saved state; it must come from the same schema.
    pub fn restore(&mut self, s: FeatureState) -> Result<(), String> {
        let knn_dims = |k: &Option<KnnMemory>| k.as_ref().map(KnnMemory::dims);
        if s.scalers.len() != self.scalers.len()
            || s.keys
                .iter()
                .any(|(_, k)| k.hist.len() != self.hist_len.len())
            || knn_dims(&s.knn) != knn_dims(&self.knn)
        {
            return Err(format!(
                "feature state has {} numeric columns; this schema has {}",
                s.scalers.len(),
                self.scalers.len()
            ));
        }
        self.scalers = s.scalers;
        self.geo_scalers = s.geo_scalers;
        self.recency = (s.keys.iter())
            .map(|(k, state)| (state.last_seen, k.clone()))
            .collect();
        self.keys = s.keys.into_iter().collect();
        self.tick = s.tick;
        self.keys_evicted = s.keys_evicted;
        self.next_key_id = s.next_key_id;
        self.knn = s.knn;
        self.rows = s.rows;
        Ok(())
    }

    fn norm(&self, scalers: &[Scaler], col: usize, v: f64) -> f32 {
        if self.schema.features.normalise {
            scalers[col].apply(v) as f32
        } else {
            v as f32
        }
    }

    /// The scalers a row of `state`'s key is scaled with: its own, or the stream's.
    fn scalers_of<'a>(&'a self, state: &'a KeyState) -> (&'a [Scaler], &'a [Scaler; 3]) {
        match &state.own {
            Some((cols, geo)) => (cols, geo),
            None => (&self.scalers, &self.geo_scalers),
        }
    }

    /// A label as inputs.
    fn encode_label(&self, class: u16, enc: LabelEncoding, x: &mut Vec<f32>) {
        match enc {
            LabelEncoding::OneHot => {
                x.extend((0..self.classes).map(|c| f32::from(u8::from(c == class as usize))))
            }
            LabelEncoding::Angle => {
                let a = std::f64::consts::PI * f64::from(class) / self.classes as f64;
                for h in 1..=LABEL_ANGLE_HARMONICS {
                    let (s, c) = (h as f64 * a).sin_cos();
                    x.extend([s as f32, c as f32]);
                }
            }
        }
    }

    fn key_state(&mut self, key: &str) -> Arc<str> {
        if let Some((k, _)) = self.keys.get_key_value(key) {
            return k.clone();
        }
        // Forget the least recently seen keys (more than one when a state restored under a
        // smaller `max_keys` holds more).
        while self.keys.len() >= self.max_keys.max(1) {
            let Some((_, old)) = self.recency.pop_first() else {
                break;
            };
            self.keys.remove(&old);
            self.keys_evicted += 1;
            if let Some(c) = &mut self.key_changes {
                c.push(KeyChange::Forgotten(old));
            }
        }
        let k: Arc<str> = Arc::from(key);
        if let Some(c) = &mut self.key_changes {
            c.push(KeyChange::Tracked(k.clone()));
        }
        let hist = self
            .hist_len
            .iter()
            .map(|&n| VecDeque::with_capacity(n))
            .collect();
        let state = KeyState {
            hist,
            labels: VecDeque::with_capacity(self.label_len),
            id: self.next_key_id,
            labelled: 0,
            learner: KeyLearnerParts::default(),
            own: (self.schema.features.scaler.per_key).then(|| {
                (
                    vec![Scaler::default(); self.numeric.len()],
                    [Scaler::default(); 3],
                )
            }),
            last_seen: 0,
        };
        self.next_key_id = self.next_key_id.wrapping_add(1);
        self.keys.insert(k.clone(), state);
        k
    }

    /// Turns every row of `d` into a sample appended to `out`, or a skip passed to `skip`
    /// with the row index.
    pub fn push_batch(
        &mut self,
        d: &DecodedBatch,
        origins: &[RowOrigin],
        out: &mut Samples,
        mut skip: impl FnMut(usize, SkipReason),
    ) {
        let mut vals = vec![0f64; self.numeric.len()];
        let mut point = Vec::new();
        let label_need = self
            .schema
            .features
            .label_lags
            .as_ref()
            .map_or(0, |_| self.label_len);
        for (i, origin) in origins.iter().enumerate().take(d.len) {
            let row = self.rows;
            self.rows += 1;
            let class = match self.check.row(d, i, &mut vals) {
                Ok(c) => {
                    self.clipped += c.clipped as u64;
                    c.class
                }
                Err(r) => {
                    skip(i, r);
                    continue;
                }
            };
            if let Some((c, from, scale, shift)) = self.inject
                && row >= from
            {
                // In the column's own units: a log1p column is held as ln(1 + v) here.
                vals[c] = if self.check.log1p[c] {
                    (vals[c].exp_m1() * scale + shift).ln_1p()
                } else {
                    vals[c] * scale + shift
                };
                // An injected value is read as any other: outside log1p's domain (or not a
                // number) it is bad input, not a NaN in the scalers.
                if !vals[c].is_finite() {
                    skip(i, SkipReason::OutOfDomain(self.numeric[c].clone()));
                    continue;
                }
            }
            // The position relative to the base station, once per row.
            let en = (self.geo)
                .map(|[bl, bo, ul, uo]| east_north(vals[bl], vals[bo], vals[ul], vals[uo]));
            if let Some(col) = self.far_out(&vals, en) {
                skip(i, SkipReason::OutOfRange(col));
                continue;
            }
            let key = self.key_state(d.key.value(i));
            self.tick += 1;
            let state = self.keys.get_mut(&key).expect("just inserted");
            // Ticks start at 1: a new key's last_seen 0 has no recency entry to remove.
            self.recency.remove(&state.last_seen);
            self.recency.insert(self.tick, key.clone());
            state.last_seen = self.tick;
            let ready = self
                .need_len
                .iter()
                .zip(&state.hist)
                .all(|(&need, h)| h.len() >= need)
                && state.labels.len() >= label_need;
            if self.knn.is_some() {
                self.knn_point(&vals, en, &mut point);
            }
            if !ready {
                self.remember(&key, &vals, en, class, &point);
                skip(i, SkipReason::LagWarmup);
                continue;
            }
            self.emit(d, i, &key, (&vals, en), class, &point, out);
            out.origins.push(origin.clone());
            self.remember(&key, &vals, en, class, &point);
        }
    }

    #[allow(clippy::too_many_arguments)] // one row's parts, read where they are kept
    fn emit(
        &self,
        d: &DecodedBatch,
        i: usize,
        key: &Arc<str>,
        (vals, en): (&[f64], Option<(f64, f64)>),
        class: Option<i64>,
        point: &[f32],
        out: &mut Samples,
    ) {
        let state = &self.keys[key];
        let f = &self.schema.features;
        let (scalers, geo_scalers) = self.scalers_of(state);
        for (&c, name) in self.inputs.iter().zip(&f.inputs) {
            let (scaler, norm) = (&scalers[c], f.normalise);
            encode(&f.encoding(name), vals[c], scaler, norm, &mut out.x);
        }
        for (c, lags) in &self.lags {
            for &k in lags {
                out.x.push(self.norm(scalers, *c, state.hist[*c][k - 1]));
            }
        }
        let time = d.time.value(i);
        if let Some(cal) = &self.schema.features.calendar {
            push_calendar(cal, time, &mut out.x);
        }
        if let Some((east, north)) = en {
            let range = east.hypot(north);
            // Clockwise from north: sin = east / range, cos = north / range.
            let bearing = east.atan2(north);
            let scaled = [(east, "east"), (north, "north"), (range, "range")];
            for (g, (v, name)) in scaled.into_iter().enumerate() {
                let s = &geo_scalers[g];
                encode(&f.encoding(name), v, s, f.normalise, &mut out.x);
            }
            let unit = Scaler::default();
            encode(&f.encoding("bearing"), bearing, &unit, false, &mut out.x);
        }
        if let Some(k) = &f.key_embedding {
            let slot = state.id as usize % k.slots;
            out.x
                .extend((0..k.slots).map(|i| f32::from(u8::from(i == slot))));
        }
        if let Some(l) = &f.label_lags {
            for &k in &l.lags {
                self.encode_label(state.labels[k - 1], l.encoding, &mut out.x);
            }
        }
        let eval = match (self.target, class) {
            (Some(t), _) => self.regression_eval(state, scalers, vals, t, &mut out.y),
            (None, Some(c)) => {
                out.y.push(c as f32);
                RowEval {
                    target: c as f64,
                    mean: 0.0,
                    std: 1.0,
                    persistence: state.labels.front().map(|&l| f64::from(l)),
                    seasonal: None,
                    power: d.power_row(i),
                    log1p: false,
                    baselines: self.baselines(state, point),
                }
            }
            (None, None) => unreachable!("regression has a target column, classification a class"),
        };
        out.keys.push(key.clone());
        out.times.push(time);
        out.eval.push(eval);
    }

    /// A regression row's model target (pushed to `y`: scaled, and as a change from the last
    /// value when the schema predicts changes) and what its evaluation needs in raw units.
    fn regression_eval(
        &self,
        state: &KeyState,
        scalers: &[Scaler],
        vals: &[f64],
        t: usize,
        y: &mut Vec<f32>,
    ) -> RowEval {
        let h = &state.hist[t];
        let (mut mean, std) = if self.schema.features.normalise {
            scalers[t].params()
        } else {
            (0.0, 1.0)
        };
        if self.schema.features.predict_change {
            // y_model = (y − y_last) / std: the offset is this row's persistence value.
            mean = h.front().copied().unwrap_or(mean);
        }
        y.push(((vals[t] - mean) / std) as f32);
        let log = self.check.log1p[t];
        let raw = |v: f64| if log { v.exp_m1() } else { v };
        RowEval {
            target: raw(vals[t]),
            mean,
            std,
            persistence: h.front().copied().map(raw),
            seasonal: self
                .schema
                .baselines
                .seasonal_lag
                .and_then(|s| h.get(s - 1).copied())
                .map(raw),
            power: None,
            log1p: log,
            baselines: ClassBaselines::default(),
        }
    }

    /// Adds a valid row to its key's history and to the scalers (after it was used: the
    /// scalers never see a target before it is predicted).
    fn remember(
        &mut self,
        key: &Arc<str>,
        vals: &[f64],
        en: Option<(f64, f64)>,
        class: Option<i64>,
        point: &[f32],
    ) {
        let freeze = self.schema.features.scaler.freeze_after;
        update_scalers(&mut self.scalers, &mut self.geo_scalers, vals, en, freeze);
        let state = self.keys.get_mut(key).expect("tracked key");
        if let Some((cols, geo)) = &mut state.own {
            update_scalers(cols, geo, vals, en, freeze);
        }
        if let Some(c) = class {
            // Checked against `classes` by `RowCheck`.
            let c = c as u16;
            // `while`: a state restored under shorter lags holds more than its cap.
            while state.labels.len() >= self.label_len.max(1) {
                state.labels.pop_back();
            }
            state.labels.push_front(c);
            state.labelled = state.labelled.saturating_add(1);
            if let Some(m) = &mut self.knn {
                m.insert(point, c, state.id);
            }
        }
        for (c, h) in state.hist.iter_mut().enumerate() {
            let cap = self.hist_len[c];
            if cap == 0 {
                continue;
            }
            h.truncate(cap - 1);
            h.push_front(vals[c]);
        }
    }
}

/// One row into a set of scalers: every numeric column, and east, north and range.
fn update_scalers(
    cols: &mut [Scaler],
    geo: &mut [Scaler; 3],
    vals: &[f64],
    en: Option<(f64, f64)>,
    freeze: Option<u64>,
) {
    for (s, v) in cols.iter_mut().zip(vals) {
        s.update_until(*v, freeze);
    }
    if let Some((e, n)) = en {
        for (s, v) in geo.iter_mut().zip([e, n, e.hypot(n)]) {
            s.update_until(v, freeze);
        }
    }
}

/// Metres east and north of the base station (equirectangular, exact to well under a metre
/// over the few hundred metres of a mmWave cell).
pub fn east_north(bs_lat: f64, bs_lon: f64, ue_lat: f64, ue_lon: f64) -> (f64, f64) {
    let east = (ue_lon - bs_lon).to_radians() * EARTH_RADIUS_M * bs_lat.to_radians().cos();
    let north = (ue_lat - bs_lat).to_radians() * EARTH_RADIUS_M;
    (east, north)
}

/// The calendar inputs of a row at `time` (µs since the epoch, UTC): hour of day and day of
/// week as sin/cos pairs, in the schema's local time.
fn push_calendar(cal: &CalendarSpec, time: i64, x: &mut Vec<f32>) {
    let local_s = time as f64 / 1e6 + cal.utc_offset_hours * 3600.0;
    let day = local_s.div_euclid(86_400.0);
    let hour = local_s.rem_euclid(86_400.0) / 3600.0;
    if cal.hour_of_day {
        x.push((TAU * hour / 24.0).sin() as f32);
        x.push((TAU * hour / 24.0).cos() as f32);
    }
    if cal.day_of_week {
        // 1970-01-01 was a Thursday: Monday = 0.
        let dow = (day + 3.0).rem_euclid(7.0) + hour / 24.0;
        x.push((TAU * dow / 7.0).sin() as f32);
        x.push((TAU * dow / 7.0).cos() as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_every_sample_in_order() {
        let (n, width) = (21usize, 3usize);
        let s = Samples::numbered(n, width, |v| v.to_string());
        let chunks = s.into_chunks(8, width);
        assert_eq!(
            chunks.iter().map(Samples::len).collect::<Vec<_>>(),
            [8, 8, 5]
        );
        let mut next = 0;
        for c in &chunks {
            assert_eq!(c.x.len(), c.len() * width);
            for i in 0..c.len() {
                assert_eq!(c.y[i], next as f32);
                assert_eq!(c.x[i * width], (next * width) as f32);
                assert_eq!(&*c.keys[i], next.to_string());
                assert_eq!(
                    (c.times[i], c.eval[i].target, c.origins[i].index),
                    (next as i64, next as f64, next as u64)
                );
                next += 1;
            }
        }
        assert_eq!(next, n);
    }

    /// Per-key micro-batches: each key's rows in order, full groups first in the order they
    /// filled, a short group waiting only where asked, every field of a row kept together.
    #[test]
    fn cut_by_key_gives_each_key_its_own_micro_batches() {
        let width = 2;
        // Keys a b a c b a c a b: a at rows 0 2 5 7, b at 1 4 8, c at 3 6.
        let keys = ["a", "b", "a", "c", "b", "a", "c", "a", "b"];
        let s = Samples::numbered(keys.len(), width, |v| keys[v].to_string());
        let rows = |c: &Samples| c.y.iter().map(|&v| v as usize).collect::<Vec<_>>();
        let (cut, rest) = s.clone().cut_by_key(2, width, |k| k != "c");
        // a's [0 2] filled at row 2, c's [3 6] at 6, a's [5 7] at 7; b's [1 4] at 4.
        assert_eq!(
            cut.iter().map(rows).collect::<Vec<_>>(),
            [vec![0, 2], vec![1, 4], vec![3, 6], vec![5, 7]]
        );
        assert_eq!(rows(&rest), [8], "b's short group waits");
        for c in cut.iter().chain([&rest]) {
            for (i, &r) in rows(c).iter().enumerate() {
                assert_eq!(&*c.keys[i], keys[r]);
                assert_eq!(c.x[i * width], (r * width) as f32);
                assert_eq!((c.times[i], c.origins[i].index), (r as i64, r as u64));
            }
        }
        // One key (the fast path): the same cut, in order.
        let one = Samples::numbered(9, width, |_| "a".into());
        let (cut, rest) = one.clone().cut_by_key(4, width, |_| true);
        assert_eq!(
            cut.iter().map(rows).collect::<Vec<_>>(),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(rows(&rest), [8]);
        let (cut, rest) = one.cut_by_key(4, width, |_| false);
        assert_eq!((cut.len(), rows(&cut[2]), rest.len()), (3, vec![8], 0));
        // Nothing waits: the short groups are micro-batches, each where its last row came.
        let (cut, rest) = s.cut_by_key(3, width, |_| false);
        assert!(rest.is_empty());
        assert_eq!(
            cut.iter().map(rows).collect::<Vec<_>>(),
            [vec![0, 2, 5], vec![3, 6], vec![7], vec![1, 4, 8]]
        );
    }
    use std::path::Path;

    #[test]
    fn scaler_matches_two_pass() {
        let v = [3.0, 5.0, 9.0, 1.0];
        let mut s = Scaler::default();
        v.iter().for_each(|x| s.update(*x));
        let mean = 4.5;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 4.0;
        let (m, sd) = s.params();
        assert!((m - mean).abs() < 1e-12 && (sd - var.sqrt()).abs() < 1e-12);
    }

    /// Milan's schema over rows whose keys arrive in `keys` order, one 10-minute slot apart.
    fn feed(fe: &mut FeatureEngine, keys: &[i64]) {
        feed_values(fe, keys, &vec![100.0; keys.len()], 0);
    }

    /// Where [`feed_values`]'s times start (µs): 2013-11-01, in the Milan archive's period.
    const NOV_2013: i64 = 1_383_264_000_000_000;

    /// As [`feed`], with these values, the first `t0` µs after [`NOV_2013`]; the skip
    /// reasons by row.
    fn feed_values(
        fe: &mut FeatureEngine,
        keys: &[i64],
        v: &[f64],
        t0: i64,
    ) -> Vec<(usize, String)> {
        use arrow::array::{Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray};
        let n = keys.len();
        let cols: Vec<arrow::array::ArrayRef> = vec![
            Arc::new(Int64Array::from(keys.to_vec())),
            Arc::new(
                TimestampMicrosecondArray::from(
                    (0..n as i64)
                        .map(|i| NOV_2013.saturating_add(t0).saturating_add(i * 600_000_000))
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from(v.to_vec())),
        ];
        let batch =
            RecordBatch::try_from_iter(["square_id", "ts", "internet"].into_iter().zip(cols))
                .unwrap();
        let dec = crate::decode::Decoder::new(fe.schema.clone());
        push_all(fe, &dec.decode(&batch).unwrap())
    }

    /// Every row of a decoded batch through the engine; the (row, reason) of each skip.
    fn push_all(fe: &mut FeatureEngine, d: &DecodedBatch) -> Vec<(usize, String)> {
        let origins: Vec<_> = (0..d.len as u64)
            .map(|index| crate::source::RowOrigin {
                source: Arc::from("t"),
                index,
            })
            .collect();
        let mut skips = Vec::new();
        fe.push_batch(d, &origins, &mut Samples::default(), |i, r| {
            skips.push((i, r.label().into_owned()))
        });
        skips
    }

    fn milan(max_keys: usize) -> FeatureEngine {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/milan_internet.json");
        let schema = Arc::new(Schema::load(&path).unwrap());
        let numeric = schema.numeric_columns();
        FeatureEngine::new(schema, &numeric, max_keys)
    }

    fn tracked(fe: &FeatureEngine) -> Vec<String> {
        let mut k: Vec<String> = fe.keys.keys().map(|k| k.to_string()).collect();
        k.sort();
        k
    }

    #[test]
    fn the_least_recently_seen_key_is_forgotten_at_the_cap() {
        let mut fe = milan(3);
        feed(&mut fe, &[1, 2, 3, 1, 4]);
        // 2 was seen longest ago when 4 arrived.
        assert_eq!(tracked(&fe), ["1", "3", "4"]);
        assert_eq!(fe.keys_evicted, 1);
        feed(&mut fe, &[3, 5, 6]);
        assert_eq!(tracked(&fe), ["3", "5", "6"]);
        assert_eq!(fe.keys_evicted, 3);
        assert_eq!(fe.recency.len(), 3);
    }

    #[test]
    fn started_and_forgotten_keys_are_told_in_order_and_parts_ride_in_the_state() {
        use KeyChange::{Forgotten, Tracked};
        let mut fe = milan(2).with_key_changes();
        feed(&mut fe, &[1, 2, 1, 3]);
        let k = |s: &str| Arc::<str>::from(s);
        assert_eq!(
            fe.take_key_changes(),
            [
                Tracked(k("1")),
                Tracked(k("2")),
                Forgotten(k("2")),
                Tracked(k("3"))
            ]
        );
        assert!(fe.take_key_changes().is_empty(), "taken once");
        // The learner stage's parts go into a checkpoint's state and come back out by key.
        let mut state = fe.state();
        let mut rules = RuleRecord::default();
        rules.learn(0.9, &[1.0, 2.0], 0, 1);
        state.put_learner_parts(|key| {
            (key == "3").then_some(KeyLearnerParts {
                experts: [0.5, 0.25, 0.25],
                rules,
                losses: None,
                drift: None,
            })
        });
        let mut parts = state.take_learner_parts();
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(parts[0].0, k("1"));
        assert_eq!(parts[0].1.experts, ExpertWeights::default());
        assert_eq!(
            (parts[1].0.clone(), parts[1].1.experts, parts[1].1.rules),
            (k("3"), [0.5, 0.25, 0.25], rules)
        );
        assert!(state.take_learner_parts().iter().all(|(_, p)| {
            p.experts == ExpertWeights::default() && p.rules == RuleRecord::default()
        }));
    }

    fn bad_input(skips: &[(usize, String)]) -> Vec<(usize, String)> {
        skips
            .iter()
            .filter(|(_, r)| r != "lag_warmup")
            .cloned()
            .collect()
    }

    #[test]
    fn values_outside_the_physical_range_are_dead_lettered_and_never_reach_the_scalers() {
        // Milan declares internet in [0, 1e7]; one absurd value used to ruin the model for good.
        let mut fe = milan(10);
        let v = [100.0, 1.7e308, 120.0, -5.0, 90.0];
        let skips = bad_input(&feed_values(&mut fe, &[1; 5], &v, 0));
        let want = [
            (1, "out_of_range:internet".to_string()),
            (3, "out_of_range:internet".to_string()),
        ];
        assert_eq!(skips, want);
        let (mean, _) = fe.scalers[0].params();
        assert!(mean > 4.0 && mean < 5.0, "log1p of 90..120 only: {mean}");
    }

    /// A value inside the declared range but absurdly far from everything seen (Milan's
    /// range is wide; a schema may declare none): dead-lettered once the scaler is warm,
    /// never before, and the scaler never sees it.
    #[test]
    fn a_value_far_outside_the_running_distribution_is_dead_lettered() {
        let mut fe = milan(10).with_max_deviations(10.0);
        // log1p of 90..130: mean ≈ 4.7, std ≈ 0.1. 9e6 is in range, log1p ≈ 16: 100 std out.
        let calm: Vec<f64> = (0..1200).map(|i| 90.0 + (i % 41) as f64).collect();
        let mut v = vec![9e6];
        v.extend(&calm);
        v.push(9e6);
        v.push(125.0);
        let skips = bad_input(&feed_values(&mut fe, &vec![1; v.len()], &v, 0));
        assert_eq!(
            skips,
            [(1201, "out_of_range:internet".to_string())],
            "the first 9e6 came before the scaler was warm"
        );
        let mut off = milan(10).with_max_deviations(0.0);
        assert!(bad_input(&feed_values(&mut off, &vec![1; v.len()], &v, 0)).is_empty());
    }

    /// A column that sat at one level for a thousand rows and then moves to a level its
    /// scalers never saw, to stay: the first rows of it are dead-lettered, then the new
    /// level is taken (before, the scalers never saw a dead-lettered value, so every later
    /// row was refused for the rest of the run). A lone absurd value is still refused.
    #[test]
    fn a_new_level_that_stays_is_taken_after_a_streak_and_a_lone_outlier_is_not() {
        let mut fe = milan(10).with_max_deviations(10.0);
        let calm: Vec<f64> = (0..1200).map(|i| 90.0 + (i % 41) as f64).collect();
        let mut v = calm.clone();
        v.extend([9e6; 60]);
        let skips = bad_input(&feed_values(&mut fe, &vec![1; v.len()], &v, 0));
        let refused: Vec<usize> = skips.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            refused,
            (1200..1200 + FAR_STREAK as usize).collect::<Vec<_>>()
        );
        // A lone one after calm rows: refused.
        let mut fe = milan(10).with_max_deviations(10.0);
        let mut v = calm;
        v.extend([9e6, 100.0, 9e6, 100.0]);
        let skips = bad_input(&feed_values(&mut fe, &vec![1; v.len()], &v, 0));
        assert_eq!(skips.len(), 2, "{skips:?}");
    }

    /// A UE position inside the globe's range but 1,100 km from a base station whose UEs
    /// have all been within ~100 m: judged by the distance it gives, and dead-lettered.
    #[test]
    fn a_position_far_from_every_position_seen_is_dead_lettered() {
        let mut lat: Vec<f64> = (0..1100)
            .map(|i| 33.4201 + (i % 10) as f64 * 1e-4)
            .collect();
        lat.push(43.42);
        let (_, d) = crate::validate::tests::beam(&lat, &vec![3; lat.len()]);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/deepsense_beam.json");
        let schema = Arc::new(Schema::load(&path).unwrap());
        let numeric = crate::decode::Decoder::new(schema.clone())
            .numeric_columns()
            .to_vec();
        let mut fe = FeatureEngine::new(schema, &numeric, 10).with_max_deviations(1000.0);
        assert_eq!(
            push_all(&mut fe, &d),
            [(1100, "out_of_range:ue_distance".to_string())]
        );
    }

    #[test]
    fn clip_mode_clamps_to_the_range_and_counts() {
        let mut fe = milan(10).with_out_of_range(OutOfRange::Clip);
        let skips = bad_input(&feed_values(&mut fe, &[1; 3], &[100.0, 1e300, -1.0], 0));
        assert!(skips.is_empty(), "{skips:?}");
        assert_eq!(fe.clipped, 2);
        assert_eq!(fe.scalers[0].n, 3);
    }

    #[test]
    fn a_time_far_outside_any_physical_clock_is_dead_lettered() {
        let mut fe = milan(10);
        let skips = bad_input(&feed_values(&mut fe, &[1], &[100.0], i64::MAX - 1));
        assert_eq!(skips, [(0, "out_of_range:ts".to_string())]);
    }

    /// 2013-11-01 in milliseconds, read as microseconds, is 1970-01-17: refused, not learnt
    /// as a time 43 years early (a feed's unit mistake would pass the 1900 bound).
    #[test]
    fn an_epoch_in_milliseconds_read_as_microseconds_is_dead_lettered() {
        let mut fe = milan(10);
        let ms = NOV_2013 / 1000;
        let skips = bad_input(&feed_values(&mut fe, &[1], &[100.0], ms - NOV_2013));
        assert_eq!(skips, [(0, "out_of_range:ts".to_string())]);
    }

    #[test]
    fn key_recency_survives_a_checkpoint() {
        let mut fe = milan(3);
        feed(&mut fe, &[1, 2, 3, 1]);
        let mut back = milan(3);
        back.restore(fe.state()).unwrap();
        feed(&mut back, &[4]);
        assert_eq!(tracked(&back), ["1", "3", "4"]);
    }

    /// A state restored under a smaller `max_keys` comes down to it at the next new key
    /// (before, each new key evicted one, so the count never came down).
    #[test]
    fn a_restore_under_fewer_keys_comes_down_to_them() {
        let mut fe = milan(5);
        feed(&mut fe, &[1, 2, 3, 4, 5]);
        let mut back = milan(2);
        back.restore(fe.state()).unwrap();
        feed(&mut back, &[6]);
        assert_eq!(tracked(&back), ["5", "6"]);
    }

    /// The beam schema with these features changes, over rows 11.1 m apart due north.
    fn beam_rows(edit: impl FnOnce(&mut Schema), best: &[i64]) -> (FeatureEngine, Samples) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/deepsense_beam.json");
        let mut schema = Schema::load(&path).unwrap();
        schema.features.key_embedding = None;
        edit(&mut schema);
        let schema = Arc::new(schema);
        let lat: Vec<f64> = (1..=best.len()).map(|i| 33.42 + i as f64 * 1e-4).collect();
        let (_, d) = crate::validate::tests::beam(&lat, best);
        let numeric = crate::decode::Decoder::new(schema.clone())
            .numeric_columns()
            .to_vec();
        let mut fe = FeatureEngine::new(schema, &numeric, 10);
        let origins: Vec<_> = (0..d.len as u64)
            .map(|index| RowOrigin {
                source: Arc::from("t"),
                index,
            })
            .collect();
        let mut s = Samples::default();
        fe.push_batch(&d, &origins, &mut s, |_, _| {});
        (fe, s)
    }

    #[test]
    fn fixed_encodings_give_the_named_features_and_the_same_row_whenever_it_arrives() {
        let enc = |s: &mut Schema| {
            let e = &mut s.features.encodings;
            e.insert(
                "north".into(),
                Encoding::Fourier {
                    scale: 100.0,
                    octaves: 3,
                },
            );
            e.insert("east".into(), Encoding::Scale { scale: 100.0 });
            e.insert("range".into(), Encoding::Scale { scale: 100.0 });
            let periodic = Encoding::Periodic {
                harmonics: 4,
                period: None,
            };
            e.insert("bearing".into(), periodic);
        };
        let (fe, s) = beam_rows(enc, &[1, 2, 3]);
        let w = fe.width();
        assert_eq!(w, 1 + 7 + 1 + 8, "{:?}", fe.schema.feature_names());
        // Row 2 is 22.24 m due north: north/100, then sin/cos(π·2^j·north/100).
        let r = &s.x[w..2 * w];
        let u = 2.0 * 1e-4f64.to_radians() * EARTH_RADIUS_M / 100.0;
        assert!((r[0] as f64).abs() < 1e-6, "east");
        assert!((r[1] as f64 - u).abs() < 1e-6);
        for j in 0..3 {
            let a = std::f64::consts::PI * f64::from(1 << j) * u;
            assert!((r[2 + 2 * j] as f64 - a.sin()).abs() < 1e-5);
            assert!((r[3 + 2 * j] as f64 - a.cos()).abs() < 1e-5);
        }
        assert!((r[8] as f64 - u).abs() < 1e-6, "range");
        // Bearing due north: sin(k·0) = 0, cos(k·0) = 1 at every harmonic.
        assert_eq!(&r[9..], &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn label_lags_and_classification_baselines_come_from_the_keys_past() {
        let lag = |s: &mut Schema| {
            s.features.encodings.clear();
            let spec = crate::schema::LabelLagSpec {
                lags: vec![1, 2],
                encoding: LabelEncoding::OneHot,
            };
            s.features.label_lags = Some(spec);
        };
        let (fe, s) = beam_rows(lag, &[4, 5, 6, 7]);
        // Rows 0 and 1 wait for two past labels.
        assert_eq!(s.len(), 2);
        let w = fe.width();
        assert_eq!(w, 5 + 2 * 64);
        let row = &s.x[..w];
        assert_eq!(
            (row[5 + 5], row[5 + 64 + 4]),
            (1.0, 1.0),
            "lag 1 = 5, lag 2 = 4"
        );
        assert_eq!(row[5..].iter().sum::<f32>(), 2.0);
        let b = s.eval[1].baselines;
        assert_eq!(b.persistence, Some(6));
        assert_eq!(b.knn_len, 3, "three points of this key before row 3");
        assert_eq!(b.knn[0].0, 6, "the nearest point is the previous row");
        assert!(b.knn[0].1 > b.knn[1].1, "nearness breaks ties");
    }

    #[test]
    fn a_key_embedding_is_one_input_per_key_slot() {
        let emb = |s: &mut Schema| {
            s.features.key_embedding = Some(crate::schema::KeyEmbeddingSpec { slots: 3 });
        };
        let (fe, s) = beam_rows(emb, &[1, 2]);
        let w = fe.width();
        assert_eq!(
            fe.schema.feature_names()[w - 3..],
            ["key_slot0", "key_slot1", "key_slot2"]
        );
        assert_eq!(
            &s.x[w - 3..w],
            &[1.0, 0.0, 0.0],
            "the first key takes slot 0"
        );
    }

    #[test]
    fn per_key_scalers_standardise_each_key_on_its_own_values() {
        // Two squares a hundredfold apart: per key, each one's latest value sits at the same
        // place in its own distribution; stream-wide, both are squeezed into one.
        let keys: Vec<i64> = (0..400).map(|i| 1 + i % 2).collect();
        let v: Vec<f64> = (0..400)
            .map(|i| if i % 2 == 0 { 10.0 } else { 1000.0 } * (1.0 + (i / 2 % 7) as f64 / 10.0))
            .collect();
        let schema_of = |per_key: bool| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/milan_internet.json");
            let mut schema = Schema::load(&path).unwrap();
            schema.features.scaler.per_key = per_key;
            schema.features.log1p.clear();
            schema.features.predict_change = false;
            Arc::new(schema)
        };
        let lag1 = |per_key: bool| {
            let schema = schema_of(per_key);
            let numeric = schema.numeric_columns();
            let mut fe = FeatureEngine::new(schema, &numeric, 10);
            feed_values(&mut fe, &keys, &v, 0);
            // The lag-1 input of each key's next row, as the engine scales it now.
            ["1", "2"].map(|k| {
                let st = &fe.keys[k];
                let (sc, _) = fe.scalers_of(st);
                fe.norm(sc, 0, st.hist[0][0])
            })
        };
        let [a, b] = lag1(true);
        assert!((a - b).abs() < 1e-3, "per key: {a} vs {b}");
        let [a, b] = lag1(false);
        assert!(b - a > 1.5, "stream-wide: {a} vs {b}");
    }

    #[test]
    fn a_frozen_scaler_stops_and_the_state_survives_a_checkpoint() {
        let freeze = |s: &mut Schema| s.features.scaler.freeze_after = Some(2);
        let (fe, _) = beam_rows(freeze, &[1, 2, 3, 4]);
        assert_eq!(fe.geo_scalers[1].n, 2);
        let mut back = beam_rows(freeze, &[]).0;
        back.restore(fe.state()).unwrap();
        assert_eq!(back.knn.as_ref().map(KnnMemory::len), Some(4));
        assert_eq!(back.keys.values().next().unwrap().labels, [4]);
    }

    #[test]
    fn an_injection_scales_the_column_in_its_own_units() {
        let inj = Injection {
            column: "internet".into(),
            from_row: 3,
            scale: 2.0,
            shift: 0.0,
        };
        let mut fe = milan(10).with_injection(Some(&inj)).unwrap();
        feed_values(&mut fe, &[1; 5], &[100.0; 5], 0);
        // Milan models ln(1 + v): rows 3 and 4 read 200, not (1 + 100)² − 1.
        let h = &fe.keys["1"].hist[0];
        assert!((h[0] - 200f64.ln_1p()).abs() < 1e-12 && (h[2] - 100f64.ln_1p()).abs() < 1e-12);
        let bad = Injection {
            column: "nope".into(),
            ..inj.clone()
        };
        assert!(milan(10).with_injection(Some(&bad)).is_err());
        let infinite = Injection {
            shift: f64::INFINITY,
            ..inj.clone()
        };
        assert!(milan(10).with_injection(Some(&infinite)).is_err());
        // A shift below −1 takes ln(1 + v) out of its domain: those rows are bad input, and
        // no NaN reaches the history or the scalers.
        let below = Injection {
            shift: -500.0,
            ..inj
        };
        let mut fe = milan(10).with_injection(Some(&below)).unwrap();
        let skips = bad_input(&feed_values(&mut fe, &[1; 5], &[100.0; 5], 0));
        assert_eq!(
            skips,
            [
                (3, "out_of_domain:internet".to_string()),
                (4, "out_of_domain:internet".to_string())
            ]
        );
        assert!(fe.scalers.iter().all(|s| s.apply(1.0).is_finite()));
        assert_eq!(fe.keys["1"].hist[0].len(), 3);
    }

    #[test]
    fn east_north_of_a_known_offset() {
        // 0.001° of latitude is about 111.2 m north.
        let (e, n) = east_north(33.42, -111.93, 33.421, -111.93);
        assert!(e.abs() < 1e-9 && (n - 111.19).abs() < 0.1, "{e} {n}");
    }
}
