//! Decoding: an Arrow record batch → typed columns in the roles the schema gives them.
//!
//! Every numeric column is cast to f64, the key to UTF-8, the time to i64 (microseconds for
//! timestamps of any unit, the raw integer for an index). A batch whose column is missing or
//! of a type the schema does not accept is rejected as a whole with a [`BatchError`] naming
//! the column, so the caller can count and dead-letter its rows; row-level problems (nulls,
//! NaN) are left to [`crate::features`], which sees each row.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, FixedSizeListArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type, TimeUnit};

use crate::schema::{Schema, TimeKind};

/// Why a whole batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Short reason for counters: `missing_column:x` or `wrong_type:x`.
    pub reason: String,
    /// What was expected and found.
    pub detail: String,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.detail)
    }
}

/// The columns of one batch in their schema roles.
pub struct DecodedBatch {
    pub len: usize,
    pub key: StringArray,
    pub time: Int64Array,
    /// Aligned with [`Decoder::numeric_columns`].
    pub numeric: Vec<Float64Array>,
    /// Class labels (classification targets).
    pub class: Option<Int64Array>,
    /// Per-class received power rows (beam selection).
    pub power: Option<FixedSizeListArray>,
}

impl DecodedBatch {
    /// Row `i` of the power list, if present and non-null.
    pub fn power_row(&self, i: usize) -> Option<Box<[f32]>> {
        let p = self.power.as_ref()?;
        if p.is_null(i) {
            return None;
        }
        let w = p.value_length() as usize;
        let vals = p.values().as_primitive::<Float32Type>();
        let start = p.value_offset_at(i);
        Some(vals.values()[start..start + w].into())
    }
}

/// Decodes batches for one schema.
pub struct Decoder {
    schema: Arc<Schema>,
    numeric: Vec<String>,
}

impl Decoder {
    pub fn new(schema: Arc<Schema>) -> Self {
        let numeric = schema.numeric_columns();
        Decoder { schema, numeric }
    }

    pub fn numeric_columns(&self) -> &[String] {
        &self.numeric
    }

    fn column<'a>(
        &self,
        batch: &'a RecordBatch,
        name: &str,
    ) -> Result<&'a Arc<dyn Array>, BatchError> {
        let col = batch.column_by_name(name).ok_or_else(|| BatchError {
            reason: format!("missing_column:{name}"),
            detail: format!("column `{name}` is not in the data"),
        })?;
        if let Some(expected) = self.schema.columns[name].mismatch(col.data_type()) {
            return Err(BatchError {
                reason: format!("wrong_type:{name}"),
                detail: format!(
                    "column `{name}`: expected {expected}, found {}",
                    col.data_type()
                ),
            });
        }
        Ok(col)
    }

    fn cast_to(
        &self,
        name: &str,
        col: &dyn Array,
        to: &DataType,
    ) -> Result<Arc<dyn Array>, BatchError> {
        cast(col, to).map_err(|e| BatchError {
            reason: format!("wrong_type:{name}"),
            detail: format!("column `{name}` cannot be read as {to}: {e}"),
        })
    }

    pub fn decode(&self, batch: &RecordBatch) -> Result<DecodedBatch, BatchError> {
        let s = &self.schema;
        let key_col = self.column(batch, &s.key)?;
        let key = self
            .cast_to(&s.key, key_col.as_ref(), &DataType::Utf8)?
            .as_string::<i32>()
            .clone();
        let time_col = self.column(batch, &s.time.column)?;
        let time = match s.time.kind {
            TimeKind::Timestamp => {
                let tz = match time_col.data_type() {
                    DataType::Timestamp(_, tz) => tz.clone(),
                    _ => None,
                };
                let us = self.cast_to(
                    &s.time.column,
                    time_col.as_ref(),
                    &DataType::Timestamp(TimeUnit::Microsecond, tz),
                )?;
                self.cast_to(&s.time.column, us.as_ref(), &DataType::Int64)?
            }
            TimeKind::Index => self.cast_to(&s.time.column, time_col.as_ref(), &DataType::Int64)?,
        }
        .as_primitive::<Int64Type>()
        .clone();
        let numeric = self
            .numeric
            .iter()
            .map(|name| {
                let col = self.column(batch, name)?;
                Ok(self
                    .cast_to(name, col.as_ref(), &DataType::Float64)?
                    .as_primitive::<Float64Type>()
                    .clone())
            })
            .collect::<Result<Vec<Float64Array>, BatchError>>()?;
        let class = match s.task {
            crate::schema::TaskSpec::Classification { .. } => {
                let col = self.column(batch, &s.target)?;
                Some(
                    self.cast_to(&s.target, col.as_ref(), &DataType::Int64)?
                        .as_primitive::<Int64Type>()
                        .clone(),
                )
            }
            crate::schema::TaskSpec::Regression => None,
        };
        let power = match &s.evaluation.beam_power {
            Some(name) => {
                let col = self.column(batch, name)?;
                let list = col.as_fixed_size_list();
                let to = DataType::FixedSizeList(
                    Arc::new(arrow::datatypes::Field::new(
                        "item",
                        DataType::Float32,
                        true,
                    )),
                    list.value_length(),
                );
                Some(
                    self.cast_to(name, col.as_ref(), &to)?
                        .as_fixed_size_list()
                        .clone(),
                )
            }
            None => None,
        };
        Ok(DecodedBatch {
            len: batch.num_rows(),
            key,
            time,
            numeric,
            class,
            power,
        })
    }
}

/// A column's f64 value at a row, `None` when null.
pub fn value(col: &Float64Array, i: usize) -> Option<f64> {
    (!col.is_null(i)).then(|| col.value(i))
}
