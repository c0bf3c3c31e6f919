//! Row validation: the checks one decoded row must pass before it may become a sample, with
//! the reason when it fails. Stateless and schema-driven, so that a feed source can run them
//! where the original message still is (a Kafka dead letter carries the message itself and its
//! headers), and the feature stage runs the very same checks on archive rows.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float32Type;

use crate::decode::{DecodedBatch, value};
use crate::schema::{Schema, TaskSpec, TimeKind};

/// Why a row produced no sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A needed column is null at this row.
    Null(String),
    /// A needed column is NaN or ±∞ at this row.
    NonFinite(String),
    /// A value outside the domain of its transform (below −1 for log1p).
    OutOfDomain(String),
    /// A value outside its column's physical range (schema `range`, latitude ±90°,
    /// longitude ±180°, a time between 1980 and 2200).
    OutOfRange(String),
    /// A class label outside 0..classes.
    BadClass(i64),
    /// The key has too little history for the configured lags yet (not bad input).
    LagWarmup,
    /// The whole batch was unreadable (missing column, wrong type).
    Batch(String),
}

impl SkipReason {
    /// Counter label (borrowed when fixed: every row of a key waiting for its lags has one).
    pub fn label(&self) -> Cow<'static, str> {
        match self {
            SkipReason::Null(c) => format!("null:{c}").into(),
            SkipReason::NonFinite(c) => format!("non_finite:{c}").into(),
            SkipReason::OutOfDomain(c) => format!("out_of_domain:{c}").into(),
            SkipReason::OutOfRange(c) => format!("out_of_range:{c}").into(),
            SkipReason::BadClass(_) => "bad_class".into(),
            SkipReason::LagWarmup => "lag_warmup".into(),
            SkipReason::Batch(r) => r.clone().into(),
        }
    }

    /// Bad input goes to the dead-letter destination; a lag warm-up is expected and does not.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, SkipReason::LagWarmup)
    }
}

/// What a bad row held: the value of the column its reason names, so that a dead letter says
/// what was wrong without the source at hand (`numeric`: the decoder's numeric columns).
pub fn row_detail(
    schema: &Schema,
    numeric: &[String],
    d: &DecodedBatch,
    i: usize,
    reason: &SkipReason,
) -> String {
    let column = match reason {
        SkipReason::Null(c) => return format!("{c} is null"),
        SkipReason::NonFinite(c) | SkipReason::OutOfDomain(c) | SkipReason::OutOfRange(c) => c,
        SkipReason::BadClass(v) => return format!("class {v} is not one of the schema's classes"),
        SkipReason::LagWarmup | SkipReason::Batch(_) => return "row skipped".into(),
    };
    if *column == schema.time.column && !d.time.is_null(i) {
        return format!("{column} = {} µs since the epoch", d.time.value(i));
    }
    match numeric.iter().position(|c| c == column) {
        Some(c) => match value(&d.numeric[c], i) {
            Some(v) => format!("{column} = {v:?}"),
            None => format!("{column} is null"),
        },
        None if schema.columns.contains_key(column) => {
            format!("{column}: one of its list's values (the reason says what is wrong)")
        }
        // A derived value (`ue_distance`).
        None => format!("{column} (derived from the row's columns)"),
    }
}

/// What to do with a value outside its column's physical range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutOfRange {
    /// Dead-letter the row (reason `out_of_range:<column>`).
    #[default]
    DeadLetter,
    /// Clamp the value to the range and keep the row (counted as clipped).
    Clip,
}

/// Event times a timestamp schema accepts, in µs since the epoch: 1980-01-01 (before any
/// cellular network) to 2200-01-01. An epoch in milliseconds or seconds read as microseconds
/// lands in January 1970, so it is refused rather than taken as a time.
const TIME_RANGE_US: (i64, i64) = (315_532_800_000_000, 7_258_118_400_000_000);

/// A row that passed: its class (classification) and how many values were clipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checked {
    pub class: Option<i64>,
    pub clipped: u32,
}

/// The checks of one schema (see the module doc).
#[derive(Debug, Clone)]
pub struct RowCheck {
    schema: Arc<Schema>,
    numeric: Vec<String>,
    ranges: Vec<Option<(f64, f64)>>,
    /// Columns modelled as ln(1 + v).
    pub(crate) log1p: Vec<bool>,
    out_of_range: OutOfRange,
}

impl RowCheck {
    /// Checks for `numeric` (the decoder's numeric columns, in its order).
    pub fn new(schema: Arc<Schema>, numeric: &[String], out_of_range: OutOfRange) -> Self {
        let pos = |c: &String| numeric.iter().position(|n| n == c);
        let mut ranges: Vec<Option<(f64, f64)>> = numeric
            .iter()
            .map(|n| {
                schema
                    .columns
                    .get(n)
                    .and_then(|s| s.range)
                    .map(|[a, b]| (a, b))
            })
            .collect();
        if let Some(g) = &schema.features.geo {
            for (c, r) in [
                (&g.bs_lat, (-90.0, 90.0)),
                (&g.ue_lat, (-90.0, 90.0)),
                (&g.bs_lon, (-180.0, 180.0)),
                (&g.ue_lon, (-180.0, 180.0)),
            ] {
                if let Some(i) = pos(c) {
                    ranges[i].get_or_insert(r);
                }
            }
        }
        RowCheck {
            log1p: numeric
                .iter()
                .map(|c| schema.features.log1p.contains(c))
                .collect(),
            numeric: numeric.to_vec(),
            ranges,
            out_of_range,
            schema,
        }
    }

    /// What row `i`, refused for `reason`, held (see [`row_detail`]).
    pub fn detail(&self, d: &DecodedBatch, i: usize, reason: &SkipReason) -> String {
        row_detail(&self.schema, &self.numeric, d, i, reason)
    }

    /// Checks row `i` and writes its modelled numeric values (log1p applied) to `vals`.
    pub fn row(&self, d: &DecodedBatch, i: usize, vals: &mut [f64]) -> Result<Checked, SkipReason> {
        let s = &self.schema;
        if d.key.is_null(i) {
            return Err(SkipReason::Null(s.key.clone()));
        }
        if d.time.is_null(i) {
            return Err(SkipReason::Null(s.time.column.clone()));
        }
        if s.time.kind == TimeKind::Timestamp
            && !(TIME_RANGE_US.0..=TIME_RANGE_US.1).contains(&d.time.value(i))
        {
            return Err(SkipReason::OutOfRange(s.time.column.clone()));
        }
        let mut clipped = 0;
        for (c, col) in d.numeric.iter().enumerate() {
            let name = || self.numeric[c].clone();
            let mut v = value(col, i).ok_or_else(|| SkipReason::Null(name()))?;
            if !v.is_finite() {
                return Err(SkipReason::NonFinite(name()));
            }
            if let Some((lo, hi)) = self.ranges[c]
                && !(lo..=hi).contains(&v)
            {
                if self.out_of_range == OutOfRange::DeadLetter {
                    return Err(SkipReason::OutOfRange(name()));
                }
                v = v.clamp(lo, hi);
                clipped += 1;
            }
            vals[c] = if self.log1p[c] {
                if v <= -1.0 {
                    return Err(SkipReason::OutOfDomain(name()));
                }
                v.ln_1p()
            } else {
                v
            };
        }
        // Received power is a non-negative number: an infinite one would make the run's
        // power loss infinite, a NaN one would hide the row's loss.
        if let (Some(p), Some(name)) = (&d.power, &s.evaluation.beam_power)
            && !p.is_null(i)
        {
            let w = p.value_length() as usize;
            let start = p.value_offset_at(i);
            let vals = &p.values().as_primitive::<Float32Type>().values()[start..start + w];
            if let Some(&v) = vals.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(if v.is_finite() {
                    SkipReason::OutOfRange(name.clone())
                } else {
                    SkipReason::NonFinite(name.clone())
                });
            }
        }
        let class = match &d.class {
            Some(c) if c.is_null(i) => return Err(SkipReason::Null(s.target.clone())),
            Some(c) => {
                let v = c.value(i);
                let TaskSpec::Classification { classes } = s.task else {
                    unreachable!("a class column belongs to a classification schema")
                };
                if v < 0 || v as usize >= classes {
                    return Err(SkipReason::BadClass(v));
                }
                Some(v)
            }
            None => None,
        };
        Ok(Checked { class, clipped })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use arrow::array::{
        ArrayRef, FixedSizeListBuilder, Float32Builder, Float64Array, Int64Array, RecordBatch,
    };

    use super::*;
    use crate::decode::Decoder;

    /// Beam rows with these UE latitudes and best beams, under the shipped beam schema.
    pub(crate) fn beam(ue_lat: &[f64], best: &[i64]) -> (RowCheck, DecodedBatch) {
        beam_with(ue_lat, best, |_, _| 1.0)
    }

    /// The same, with `power(row, beam)` as each row's received power.
    fn beam_with(
        ue_lat: &[f64],
        best: &[i64],
        power_of: impl Fn(usize, usize) -> f32,
    ) -> (RowCheck, DecodedBatch) {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/deepsense_beam.json");
        let schema = Arc::new(Schema::load(&path).unwrap());
        let n = ue_lat.len();
        let int = |v: i64| Arc::new(Int64Array::from(vec![v; n])) as ArrayRef;
        let float = |v: f64| Arc::new(Float64Array::from(vec![v; n])) as ArrayRef;
        let mut power = FixedSizeListBuilder::new(Float32Builder::new(), 64);
        for row in 0..n {
            (0..64).for_each(|b| power.values().append_value(power_of(row, b)));
            power.append(true);
        }
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("scenario", int(1)),
            ("seq_index", int(1)),
            (
                "sample_index",
                Arc::new(Int64Array::from((0..n as i64).collect::<Vec<_>>())),
            ),
            ("bs_lat", float(33.42)),
            ("bs_lon", float(-111.93)),
            ("ue_lat", Arc::new(Float64Array::from(ue_lat.to_vec()))),
            ("ue_lon", float(-111.93)),
            ("best_beam", Arc::new(Int64Array::from(best.to_vec()))),
            ("beam_power", Arc::new(power.finish())),
        ];
        let dec = Decoder::new(schema.clone());
        let d = dec
            .decode(&RecordBatch::try_from_iter(cols).unwrap())
            .unwrap();
        (
            RowCheck::new(schema, dec.numeric_columns(), OutOfRange::DeadLetter),
            d,
        )
    }

    #[test]
    fn a_latitude_off_the_globe_and_a_beam_past_the_codebook_are_refused() {
        // Issue 10, defect 6: `ue_lat = 1e300` made the beam model NaN for good.
        let (check, d) = beam(&[33.4201, 1e300, 33.4202], &[5, 7, 64]);
        let mut vals = vec![0.0; 6];
        let got: Vec<Result<Option<i64>, String>> = (0..3)
            .map(|i| {
                check
                    .row(&d, i, &mut vals)
                    .map(|c| c.class)
                    .map_err(|r| r.label().into_owned())
            })
            .collect();
        assert_eq!(
            got,
            [
                Ok(Some(5)),
                Err("out_of_range:ue_lat".into()),
                Err("bad_class".into())
            ]
        );
    }

    /// Received power is a non-negative number: an infinite one made the run's power loss
    /// infinite (the metric, not just the row).
    #[test]
    fn a_beam_power_that_is_not_a_non_negative_number_is_refused() {
        let odd = |row: usize, beam: usize| match (row, beam) {
            (1, 3) => f32::INFINITY,
            (2, 0) => f32::NAN,
            (3, 9) => -1.0,
            _ => 1.0,
        };
        let (check, d) = beam_with(&[33.4201; 4], &[5; 4], odd);
        let mut vals = vec![0.0; 6];
        let got: Vec<String> = (0..4)
            .map(|i| match check.row(&d, i, &mut vals) {
                Ok(_) => "ok".into(),
                Err(r) => r.label().into_owned(),
            })
            .collect();
        assert_eq!(
            got,
            [
                "ok",
                "non_finite:beam_power",
                "non_finite:beam_power",
                "out_of_range:beam_power"
            ]
        );
    }
}
