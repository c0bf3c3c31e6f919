//! Schemas: what each column of a workload is for.
//!
//! A schema (`schemas/*.json`) names the key (cell, grid square, scenario), the event time,
//! the target and the task, declares the type of every column it reads, and lists the
//! features derived online (per-key lags, calendar terms, GPS → metres east/north,
//! standardisation). It is the single contract between the data and the learner: decoding
//! checks batches against it, `gradsift schema check` checks whole files against it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use arrow::datatypes::{DataType, Schema as ArrowSchema};
use serde::{Deserialize, Serialize};

use crate::learner::model::Head;

/// The learning task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskSpec {
    /// Forecast the target value (MSE head).
    Regression,
    /// Predict one of `classes` labels 0..classes (cross-entropy head).
    Classification { classes: usize },
}

impl TaskSpec {
    pub fn head(&self) -> Head {
        match self {
            TaskSpec::Regression => Head::Regression,
            TaskSpec::Classification { classes } => Head::Classification { classes: *classes },
        }
    }
}

/// See [`Schema::headline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headline {
    Mae,
    PowerLossDb,
    Top1,
}

/// Declared column types; each accepts the Arrow types a writer may reasonably use for it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Int,
    Float,
    String,
    Timestamp,
    FloatList,
}

/// One declared column.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Fixed list length (for `float_list`).
    #[serde(default)]
    pub size: Option<usize>,
    /// The physically possible values `[min, max]` (numeric columns): a value outside is
    /// bad input (`out_of_range`), dead-lettered or clipped as `features.out_of_range` says.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// What an integer in a JSON or Avro message counts for a `timestamp` column (default
    /// microseconds). Parquet and Avro logical types carry their own unit.
    #[serde(default)]
    pub unit: Option<EpochUnit>,
}

/// Avro names allow `[A-Za-z_][A-Za-z0-9_]*` only.
pub fn avro_name(s: &str) -> String {
    let mut n: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if n.chars().next().is_none_or(|c| c.is_ascii_digit()) {
        n.insert(0, '_');
    }
    n
}

/// The unit of an integer epoch time in a message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EpochUnit {
    #[serde(rename = "s")]
    Seconds,
    #[serde(rename = "ms")]
    Millis,
    #[serde(rename = "us")]
    Micros,
    #[serde(rename = "ns")]
    Nanos,
}

impl EpochUnit {
    /// `v` of this unit in microseconds; `None` where it overflows.
    pub fn to_micros(self, v: i64) -> Option<i64> {
        match self {
            EpochUnit::Seconds => v.checked_mul(1_000_000),
            EpochUnit::Millis => v.checked_mul(1_000),
            EpochUnit::Micros => Some(v),
            EpochUnit::Nanos => Some(v.div_euclid(1_000)),
        }
    }
}

impl ColumnSpec {
    /// `None` if `dt` is acceptable, otherwise what was expected.
    pub fn mismatch(&self, dt: &DataType) -> Option<String> {
        let ok = match self.ty {
            ColumnType::Int => dt.is_integer(),
            ColumnType::Float => dt.is_floating() || dt.is_integer(),
            ColumnType::String => {
                matches!(
                    dt,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                ) || matches!(dt, DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8))
            }
            ColumnType::Timestamp => matches!(dt, DataType::Timestamp(_, _)),
            ColumnType::FloatList => match dt {
                DataType::FixedSizeList(f, n) => {
                    f.data_type().is_floating() && self.size.is_none_or(|s| s == *n as usize)
                }
                _ => false,
            },
        };
        (!ok).then(|| match (self.ty, self.size) {
            (ColumnType::FloatList, Some(n)) => format!("float_list of {n}"),
            (ty, _) => format!("{ty:?}").to_lowercase(),
        })
    }
}

/// How the time column is read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimeKind {
    /// An Arrow timestamp; held as microseconds since the epoch, UTC.
    Timestamp,
    /// An integer position (sample index) with no wall-clock meaning.
    Index,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSpec {
    pub column: String,
    pub kind: TimeKind,
}

/// Lagged values of one column, per key: lag k is the k-th previous valid row of that key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagSpec {
    pub column: String,
    pub lags: Vec<usize>,
}

/// Hour-of-day and day-of-week as sin/cos pairs, in local time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarSpec {
    #[serde(default = "yes")]
    pub hour_of_day: bool,
    #[serde(default = "yes")]
    pub day_of_week: bool,
    /// Local time = UTC + this offset.
    #[serde(default)]
    pub utc_offset_hours: f64,
}

fn yes() -> bool {
    true
}

/// UE position relative to the base station, from GPS columns: metres east and north, the
/// range, and the bearing as sin/cos (a beam of a phased array points at a bearing).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoSpec {
    pub bs_lat: String,
    pub bs_lon: String,
    pub ue_lat: String,
    pub ue_lon: String,
}

/// How one feature enters the model. Running standardisation drifts as the stream goes on,
/// so a replayed row stored under an early scaling is off under a later one; the fixed
/// encodings below give every row the same input whenever it was stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Encoding {
    /// (v − running mean) / running std (the default when `normalise` is on).
    Standardise,
    /// v / scale, a fixed physical scale (for example 100 m).
    Scale { scale: f64 },
    /// v / scale, then sin and cos of π·2^j·v / scale for j = 0..octaves: positions resolved
    /// at every scale from `scale` down to scale / 2^(octaves−1).
    Fourier { scale: f64, octaves: u32 },
    /// An angle (radians, or a value of the given period): sin and cos of k·angle for
    /// k = 1..harmonics, so neighbouring beams a degree apart get distinct inputs.
    Periodic {
        harmonics: u32,
        #[serde(default)]
        period: Option<f64>,
    },
}

impl Encoding {
    /// Output names for a feature called `name`.
    pub fn names(&self, name: &str) -> Vec<String> {
        match self {
            Encoding::Standardise | Encoding::Scale { .. } => vec![name.to_string()],
            Encoding::Fourier { octaves, .. } => {
                let mut v = vec![name.to_string()];
                for j in 0..*octaves {
                    v.push(format!("{name}_sin{j}"));
                    v.push(format!("{name}_cos{j}"));
                }
                v
            }
            Encoding::Periodic { harmonics, .. } => (1..=*harmonics)
                .flat_map(|k| [format!("{name}_sin{k}"), format!("{name}_cos{k}")])
                .collect(),
        }
    }

    fn check(&self, name: &str) -> Result<()> {
        let ok = match self {
            Encoding::Standardise => true,
            Encoding::Scale { scale } => scale.is_finite() && *scale > 0.0,
            Encoding::Fourier { scale, octaves } => {
                scale.is_finite() && *scale > 0.0 && (1..=20).contains(octaves)
            }
            Encoding::Periodic { harmonics, period } => {
                (1..=64).contains(harmonics) && period.is_none_or(|p| p.is_finite() && p > 0.0)
            }
        };
        if !ok {
            bail!(
                "encoding of `{name}`: scale and period must be positive, octaves 1-20, harmonics 1-64; is {self:?}"
            );
        }
        Ok(())
    }
}

/// The running scalers' schedule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerSpec {
    /// Stop updating after this many values: later rows, fresh or replayed, are scaled alike.
    #[serde(default)]
    pub freeze_after: Option<u64>,
    /// One set of scalers per key (sites whose positions or volumes differ in scale); the
    /// stream-wide ones still judge absurd values.
    #[serde(default)]
    pub per_key: bool,
}

/// Past labels of the same key as inputs (classification: the last revealed beam tracks the
/// next one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelLagSpec {
    pub lags: Vec<usize>,
    pub encoding: LabelEncoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelEncoding {
    /// One input per class.
    OneHot,
    /// The class as an angle over a half turn, sin and cos at harmonics 1-4 (a codebook's
    /// beams are ordered by steering angle, so neighbouring classes get close inputs).
    Angle,
}

/// Harmonics of the `angle` label encoding.
pub const LABEL_ANGLE_HARMONICS: usize = 4;

/// Derived features, in the order they appear in the model input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Columns used as they are at the current row.
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub lags: Vec<LagSpec>,
    #[serde(default)]
    pub calendar: Option<CalendarSpec>,
    #[serde(default)]
    pub geo: Option<GeoSpec>,
    /// Running standardisation of every numeric feature (and of a regression target).
    #[serde(default = "yes")]
    pub normalise: bool,
    /// Regression: the model predicts the change from the key's last target value, so an
    /// untrained model starts at the persistence forecast and learns corrections to it.
    #[serde(default)]
    pub predict_change: bool,
    /// Columns modelled as ln(1 + v) (traffic volumes are multiplicative: a day's peak and
    /// its night differ by an order of magnitude). Metrics stay in the original units.
    #[serde(default)]
    pub log1p: Vec<String>,
    /// Per feature (an input column, or `east`, `north`, `range`, `bearing` of `geo`): how it
    /// enters the model. Unnamed features are standardised (bearing: sin/cos).
    #[serde(default)]
    pub encodings: BTreeMap<String, Encoding>,
    #[serde(default)]
    pub scaler: ScalerSpec,
    /// Classification only.
    #[serde(default)]
    pub label_lags: Option<LabelLagSpec>,
    /// Keys that are different sites: one input per key, so the first layer learns a vector
    /// per site (an embedding) and sites sharing a relative frame are told apart.
    #[serde(default)]
    pub key_embedding: Option<KeyEmbeddingSpec>,
}

/// One-hot key inputs: the first `slots` keys to arrive get a slot each; later keys share
/// them (key number modulo `slots`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEmbeddingSpec {
    pub slots: usize,
}

/// The geo features' names, as `encodings` knows them.
pub const GEO_FEATURES: [&str; 4] = ["east", "north", "range", "bearing"];

impl FeatureSpec {
    /// The encoding of a feature (`bearing` defaults to one sin/cos pair).
    pub fn encoding(&self, name: &str) -> Encoding {
        self.encodings
            .get(name)
            .cloned()
            .unwrap_or(if name == "bearing" {
                Encoding::Periodic {
                    harmonics: 1,
                    period: None,
                }
            } else {
                Encoding::Standardise
            })
    }
}

/// The longest lag (and seasonal lag) a schema may declare: each is history kept per key, and
/// a typo of a billion rows would reserve it at the first row.
pub const MAX_LAG: usize = 1 << 20;

/// Baselines reported beside a regression model, on the same rows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    /// Seasonal period in rows of one key (144 ten-minute slots = one day).
    #[serde(default)]
    pub seasonal_lag: Option<usize>,
}

/// Extra columns used only to evaluate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Per-class received power (beam selection): gives the power loss of the chosen beam.
    #[serde(default)]
    pub beam_power: Option<String>,
}

/// A workload schema (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Where the data of this workload comes from and whom to credit (printed in reports).
    #[serde(default)]
    pub attribution: String,
    pub task: TaskSpec,
    pub key: String,
    pub time: TimeSpec,
    pub target: String,
    pub columns: BTreeMap<String, ColumnSpec>,
    pub features: FeatureSpec,
    #[serde(default)]
    pub baselines: BaselineSpec,
    #[serde(default)]
    pub evaluation: EvalSpec,
}

impl Schema {
    /// Reads and validates a schema file; errors name the file and the offending field.
    pub fn load(path: &Path) -> Result<Schema> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read schema {}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let schema: Schema = serde_path_to_error::deserialize(de).map_err(|e| {
            anyhow::anyhow!("{}: key `{}`: {}", path.display(), e.path(), e.inner())
        })?;
        schema
            .validate()
            .with_context(|| format!("{}: invalid schema", path.display()))?;
        Ok(schema)
    }

    fn declared(&self, col: &str, role: &str) -> Result<&ColumnSpec> {
        self.columns
            .get(col)
            .with_context(|| format!("{role} column `{col}` is not declared in `columns`"))
    }

    fn validate(&self) -> Result<()> {
        self.validate_columns()?;
        self.validate_features()?;
        if self.input_width() == 0 {
            bail!("the schema derives no feature at all");
        }
        Ok(())
    }

    /// The declared columns: key, time, target and features present with fitting types,
    /// ranges well formed.
    fn validate_columns(&self) -> Result<()> {
        let key = self.declared(&self.key, "key")?;
        if !matches!(key.ty, ColumnType::String | ColumnType::Int) {
            bail!(
                "key `{}` must be declared string or int, is {:?}",
                self.key,
                key.ty
            );
        }
        let t = self.declared(&self.time.column, "time")?;
        let want = match self.time.kind {
            TimeKind::Timestamp => ColumnType::Timestamp,
            TimeKind::Index => ColumnType::Int,
        };
        if t.ty != want {
            bail!(
                "time column `{}` must be declared {want:?} for kind {:?}",
                self.time.column,
                self.time.kind
            );
        }
        let target = self.declared(&self.target, "target")?;
        match (&self.task, target.ty) {
            (TaskSpec::Regression, ColumnType::Float | ColumnType::Int) => {}
            // Labels are kept as u16.
            (TaskSpec::Classification { classes }, ColumnType::Int)
                if (2..=1 << 16).contains(classes) => {}
            (task, ty) => bail!(
                "target `{}` of type {ty:?} does not fit task {task:?}",
                self.target
            ),
        }
        for c in self.numeric_columns() {
            let spec = self.declared(&c, "feature")?;
            if !matches!(spec.ty, ColumnType::Float | ColumnType::Int) {
                bail!(
                    "feature column `{c}` must be int or float, is {:?}",
                    spec.ty
                );
            }
        }
        // Avro payloads name each field by its column, non-alphanumerics as `_`.
        let mut fields = std::collections::BTreeMap::new();
        for c in self.read_columns() {
            if let Some(other) = fields.insert(avro_name(&c), c.clone())
                && other != c
            {
                bail!(
                    "columns `{other}` and `{c}` take one Avro field name, `{}`; rename one",
                    avro_name(&c)
                );
            }
        }
        for (name, spec) in &self.columns {
            // A feed's lists of any length cannot make one fixed-size column.
            if spec.ty == ColumnType::FloatList && spec.size.is_none() {
                bail!("column `{name}`: a float_list needs `size`, its fixed length");
            }
            if spec.unit.is_some() && spec.ty != ColumnType::Timestamp {
                bail!("column `{name}`: a unit applies to timestamp columns only");
            }
            if let Some([lo, hi]) = spec.range {
                if !matches!(spec.ty, ColumnType::Float | ColumnType::Int) {
                    bail!("column `{name}`: a range applies to int and float columns only");
                }
                if lo.is_nan() || hi.is_nan() || lo >= hi {
                    bail!(
                        "column `{name}`: range must be [min, max] with min < max, is [{lo}, {hi}]"
                    );
                }
            }
        }
        if let Some(p) = &self.evaluation.beam_power {
            let spec = self.declared(p, "beam_power")?;
            if spec.ty != ColumnType::FloatList {
                bail!("beam_power column `{p}` must be float_list");
            }
            // One power per class, or the chosen class's power is another beam's.
            if let TaskSpec::Classification { classes } = self.task
                && spec.size != Some(classes)
            {
                bail!(
                    "beam_power column `{p}`: size must be the number of classes ({classes}), is {:?}",
                    spec.size
                );
            }
        }
        Ok(())
    }

    /// The derived features: lags, transforms, encodings and embeddings consistent with the
    /// columns and the task.
    fn validate_features(&self) -> Result<()> {
        for l in &self.features.lags {
            if l.lags.is_empty() || l.lags.iter().any(|&k| k == 0 || k > MAX_LAG) {
                bail!(
                    "lags of `{}` must be a non-empty list of integers from 1 to {MAX_LAG}",
                    l.column
                );
            }
        }
        if let Some(s) = self.baselines.seasonal_lag
            && !(1..=MAX_LAG).contains(&s)
        {
            bail!("baselines.seasonal_lag must be 1 to {MAX_LAG}, is {s}");
        }
        for c in &self.features.log1p {
            if !self.numeric_columns().contains(c) {
                bail!("log1p column `{c}` is not a numeric column the schema reads");
            }
        }
        if self.features.predict_change && self.task != TaskSpec::Regression {
            bail!("predict_change applies to regression targets only");
        }
        if self.calendar_needs_timestamp() && self.time.kind != TimeKind::Timestamp {
            bail!("calendar features need a timestamp time column");
        }
        for (name, e) in &self.features.encodings {
            let known = self.features.inputs.contains(name)
                || (self.features.geo.is_some() && GEO_FEATURES.contains(&name.as_str()));
            if !known {
                bail!(
                    "encodings: `{name}` is neither an input column nor a geo feature ({})",
                    GEO_FEATURES.join(", ")
                );
            }
            e.check(name)?;
        }
        if let Some(k) = &self.features.key_embedding
            && !(1..=1024).contains(&k.slots)
        {
            bail!("key_embedding.slots must be 1 to 1024, is {}", k.slots);
        }
        if let Some(l) = &self.features.label_lags {
            if !matches!(self.task, TaskSpec::Classification { .. }) {
                bail!("label_lags apply to classification only");
            }
            if l.lags.is_empty() || l.lags.iter().any(|&k| k == 0 || k > MAX_LAG) {
                bail!("label_lags.lags must be a non-empty list of integers from 1 to {MAX_LAG}");
            }
        }
        Ok(())
    }

    fn calendar_needs_timestamp(&self) -> bool {
        self.features.calendar.is_some()
    }

    /// Every numeric column read at a row (inputs, lagged columns, geo, and a regression target).
    pub fn numeric_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        let mut add = |c: &String| {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        };
        self.features.inputs.iter().for_each(&mut add);
        self.features.lags.iter().for_each(|l| add(&l.column));
        if let Some(g) = &self.features.geo {
            [&g.bs_lat, &g.bs_lon, &g.ue_lat, &g.ue_lon]
                .into_iter()
                .for_each(&mut add);
        }
        if self.task == TaskSpec::Regression {
            add(&self.target);
        }
        cols
    }

    /// Every column a pipeline reads from the data.
    pub fn read_columns(&self) -> Vec<String> {
        let mut cols = vec![self.key.clone(), self.time.column.clone()];
        for c in self.numeric_columns() {
            if !cols.contains(&c) {
                cols.push(c);
            }
        }
        if !cols.contains(&self.target) {
            cols.push(self.target.clone());
        }
        if let Some(p) = &self.evaluation.beam_power {
            cols.push(p.clone());
        }
        cols
    }

    /// Names of the model's input features, in order.
    pub fn feature_names(&self) -> Vec<String> {
        let f = &self.features;
        let mut names: Vec<String> = f
            .inputs
            .iter()
            .flat_map(|c| f.encoding(c).names(c))
            .collect();
        for l in &f.lags {
            names.extend(l.lags.iter().map(|k| format!("{}_lag{k}", l.column)));
        }
        if let Some(c) = &f.calendar {
            if c.hour_of_day {
                names.extend(["hour_sin".into(), "hour_cos".into()]);
            }
            if c.day_of_week {
                names.extend(["dow_sin".into(), "dow_cos".into()]);
            }
        }
        if f.geo.is_some() {
            for g in GEO_FEATURES {
                let name = match g {
                    "bearing" => "bearing".to_string(),
                    _ => format!("{g}_m"),
                };
                names.extend(f.encoding(g).names(&name));
            }
        }
        if let Some(k) = &f.key_embedding {
            names.extend((0..k.slots).map(|i| format!("key_slot{i}")));
        }
        if let (Some(l), TaskSpec::Classification { classes }) = (&f.label_lags, &self.task) {
            for k in &l.lags {
                match l.encoding {
                    LabelEncoding::OneHot => {
                        names.extend((0..*classes).map(|c| format!("label_lag{k}_c{c}")))
                    }
                    LabelEncoding::Angle => {
                        names.extend((1..=LABEL_ANGLE_HARMONICS).flat_map(|h| {
                            [
                                format!("label_lag{k}_sin{h}"),
                                format!("label_lag{k}_cos{h}"),
                            ]
                        }))
                    }
                }
            }
        }
        names
    }

    /// The figure a run on this schema is judged by: MAE for regression; for classification
    /// the beam power loss where rows carry per-beam power (top-1 is capped there by
    /// near-tied beams), else top-1. The run plot and `gradsift experiment --pipeline` use it.
    pub fn headline(&self) -> Headline {
        match self.task {
            TaskSpec::Regression => Headline::Mae,
            TaskSpec::Classification { .. } if self.evaluation.beam_power.is_some() => {
                Headline::PowerLossDb
            }
            TaskSpec::Classification { .. } => Headline::Top1,
        }
    }

    /// Width of the model input.
    pub fn input_width(&self) -> usize {
        self.feature_names().len()
    }

    /// Checks an Arrow schema against every declared column; one message per mismatch.
    pub fn mismatches(&self, arrow: &ArrowSchema) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (col, spec) in &self.columns {
            match arrow.field_with_name(col) {
                Err(_) => out.push((col.clone(), "missing".to_string())),
                Ok(f) => {
                    if let Some(expected) = spec.mismatch(f.data_type()) {
                        out.push((
                            col.clone(),
                            format!("expected {expected}, found {}", f.data_type()),
                        ));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_schemas_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        for name in ["milan_internet", "deepsense_beam", "lte_cell_kpi"] {
            let s = Schema::load(&dir.join(format!("{name}.json"))).unwrap();
            assert_eq!(s.name, name);
            assert!(s.input_width() > 0);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(&p, r#"{"name":"x","task":{"kind":"regression"},"key":1}"#).unwrap();
        let err = format!("{:#}", Schema::load(&p).unwrap_err());
        assert!(err.contains("s.json") && err.contains("key `key`"), "{err}");
    }

    /// A feed's lists of several lengths cannot fill one fixed-size column: the schema must
    /// say the length (the JSON decoder panicked on a list column without one).
    #[test]
    fn a_float_list_without_size_is_refused_at_load() {
        let err = refused("deepsense_beam.json", |v| {
            let cols = v["columns"].as_object_mut().unwrap();
            let list = cols
                .values_mut()
                .find(|c| c["type"] == "float_list")
                .unwrap();
            list.as_object_mut().unwrap().remove("size");
        });
        assert!(err.contains("needs `size`"), "{err}");
    }

    /// Two read columns that one Avro field name would stand for (the Avro schema builder
    /// panicked on the source thread) are refused at load.
    #[test]
    fn columns_sharing_an_avro_field_name_are_refused() {
        let err = refused("milan_internet.json", |v| {
            v["time"]["column"] = "square-id".into();
            let cols = v["columns"].as_object_mut().unwrap();
            let ts = cols.remove("ts").unwrap();
            cols.insert("square-id".into(), ts);
        });
        assert!(err.contains("one Avro field name, `square_id`"), "{err}");
    }

    /// A shipped schema with one edit, loaded: the error, which names the file.
    fn refused(file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(file);
        std::fs::write(&p, v.to_string()).unwrap();
        let err = format!("{:#}", Schema::load(&p).unwrap_err());
        assert!(err.contains(file), "{err}");
        err
    }

    /// Settings the features would panic on, abort on or silently corrupt are refused at
    /// load, naming the key.
    #[test]
    fn lags_classes_keys_and_powers_out_of_their_bounds_are_refused_at_load() {
        let milan = "milan_internet.json";
        let e = refused(milan, |v| v["baselines"]["seasonal_lag"] = 0.into());
        assert!(e.contains("seasonal_lag"), "{e}");
        let e = refused(milan, |v| {
            v["features"]["lags"][0]["lags"][0] = 1_000_000_000.into()
        });
        assert!(e.contains("lags of `internet`"), "{e}");
        let beam = "deepsense_beam.json";
        let e = refused(beam, |v| v["task"]["classes"] = 70_000.into());
        assert!(e.contains("target"), "{e}");
        let e = refused(beam, |v| {
            let key = v["key"].as_str().unwrap().to_string();
            v["columns"][key] = serde_json::json!({"type": "float_list", "size": 2});
        });
        assert!(e.contains("must be declared string or int"), "{e}");
        let e = refused(beam, |v| {
            let cols = v["columns"].as_object_mut().unwrap();
            let list = cols
                .values_mut()
                .find(|c| c["type"] == "float_list")
                .unwrap();
            list["size"] = 32.into();
        });
        assert!(e.contains("size must be the number of classes (64)"), "{e}");
    }
}
