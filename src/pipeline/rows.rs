//! Rows that do not become samples: a batch is decoded and its rows turned into samples,
//! and every row that is not one is handed on with its reason and origin (shared by the
//! streaming learner stage and offline training, so both count and dead-letter alike).

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::Result;

use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::features::{FeatureEngine, Samples};
use crate::schema::Schema;
use crate::sink::dead_letter::DeadLetter;
use crate::source::RowOrigin;

/// A row (or a whole batch) that did not become a sample, and why.
pub struct Skipped<'a> {
    pub reason: Cow<'static, str>,
    /// What was wrong, with the offending value where there is one.
    pub detail: Cow<'a, str>,
    /// Bad input (dead-lettered), not a skip by design such as `lag_warmup`.
    pub bad_input: bool,
    pub origin: &'a RowOrigin,
    pub key: Option<&'a str>,
    pub time: Option<i64>,
}

impl Skipped<'_> {
    /// The dead letter of a skipped row.
    pub fn letter(&self) -> DeadLetter<'_> {
        DeadLetter {
            reason: &self.reason,
            detail: &self.detail,
            origin: &self.origin.source,
            row: self.origin.index,
            rows: 1,
            key: self.key,
            time: self.time,
        }
    }
}

/// Adds `rows` skips of `reason` to a run's counters. The reason is copied only the first
/// time it is seen: at the start of a stream every row of a thousand keys waiting for its lags
/// is a skip.
pub fn count_skip(skipped: &mut BTreeMap<String, u64>, reason: &str, rows: u64) {
    match skipped.get_mut(reason) {
        Some(n) => *n += rows,
        None => {
            skipped.insert(reason.to_string(), rows);
        }
    }
}

/// The feature engine `cfg`'s `[features]` asks for, over `decoder`'s columns.
pub fn feature_engine(
    cfg: &PipelineConfig,
    schema: &std::sync::Arc<Schema>,
    decoder: &Decoder,
) -> FeatureEngine {
    FeatureEngine::new(
        schema.clone(),
        decoder.numeric_columns(),
        cfg.features.max_keys,
    )
    .with_out_of_range(cfg.features.out_of_range)
    .with_max_deviations(cfg.features.max_deviations)
}

/// Decodes a batch and turns its rows into samples appended to `pending`; every row that does
/// not become one is handed to `skip` (a batch of the wrong shape: each of its rows).
pub fn decode_rows(
    decoder: &Decoder,
    features: &mut FeatureEngine,
    batch: &arrow::array::RecordBatch,
    origins: &[RowOrigin],
    pending: &mut Samples,
    mut skip: impl FnMut(Skipped<'_>) -> Result<()>,
) -> Result<()> {
    let d = match decoder.decode(batch) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(origin = %origins[0].source, row = origins[0].index, error = %e, "batch rejected");
            for origin in origins {
                skip(Skipped {
                    reason: e.reason.clone().into(),
                    detail: Cow::Borrowed(&e.detail),
                    bad_input: true,
                    origin,
                    key: None,
                    time: None,
                })?;
            }
            return Ok(());
        }
    };
    let mut skipped: Vec<(usize, Cow<'static, str>, bool, Cow<'static, str>)> = Vec::new();
    features.push_batch(&d, origins, pending, |i, reason| {
        let detail = if reason.is_bad_input() {
            crate::validate::row_detail(decoder.schema(), decoder.numeric_columns(), &d, i, &reason)
                .into()
        } else {
            Cow::Borrowed("row skipped")
        };
        skipped.push((i, reason.label(), reason.is_bad_input(), detail));
    });
    for (i, reason, bad_input, detail) in skipped {
        let key = (!arrow::array::Array::is_null(&d.key, i)).then(|| d.key.value(i));
        let time = (!arrow::array::Array::is_null(&d.time, i)).then(|| d.time.value(i));
        let origin = &origins[i];
        if bad_input {
            tracing::debug!(origin = %origin.source, row = origin.index, reason = %reason, "row dead-lettered");
        }
        skip(Skipped {
            reason,
            detail,
            bad_input,
            origin,
            key,
            time,
        })?;
    }
    Ok(())
}
