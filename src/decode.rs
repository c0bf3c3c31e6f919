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

use crate::schema::{EpochUnit, Schema, TimeKind};

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

    pub fn schema(&self) -> &Schema {
        &self.schema
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

/// Decodes JSON messages (one object per message, fields named as in the schema) into a
/// record batch of the schema's columns. A message that is not an object, misses a field,
/// carries a value of the wrong type, a null or a non-finite number where a number is
/// needed, or is larger than the cap, is rejected on its own with a reason; the others go on.
pub struct JsonDecoder {
    columns: Vec<(String, crate::schema::ColumnSpec)>,
    max_bytes: usize,
    /// Set when the payloads are Avro datums (see [`crate::payload`]) rather than JSON.
    avro: Option<apache_avro::Schema>,
}

/// A message's integer time in microseconds, by its column's unit (default µs).
fn epoch_micros(name: &str, unit: Option<EpochUnit>, v: i64) -> Result<JsonValue, BatchError> {
    let unit = unit.unwrap_or(EpochUnit::Micros);
    unit.to_micros(v)
        .map(JsonValue::Int)
        .ok_or_else(|| BatchError {
            reason: format!("out_of_range:{name}"),
            detail: format!("field `{name}`: {v} {unit:?} overflows a microsecond time"),
        })
}

/// One decoded field value.
enum JsonValue {
    Str(String),
    Int(i64),
    Float(f64),
    List(Vec<f32>),
}

impl JsonDecoder {
    pub fn new(schema: Arc<Schema>, max_bytes: usize) -> Self {
        Self::with_format(schema, max_bytes, crate::payload::PayloadFormat::Json)
    }

    pub fn with_format(
        schema: Arc<Schema>,
        max_bytes: usize,
        format: crate::payload::PayloadFormat,
    ) -> Self {
        let columns = schema
            .read_columns()
            .into_iter()
            .map(|c| (c.clone(), schema.columns[&c].clone()))
            .collect();
        let avro = (format == crate::payload::PayloadFormat::Avro).then(|| {
            crate::payload::limit_avro_allocations(max_bytes);
            crate::payload::avro_schema(&schema)
        });
        JsonDecoder {
            columns,
            max_bytes,
            avro,
        }
    }

    /// One Avro field as the value its column needs, or why not.
    fn avro_field(
        name: &str,
        spec: &crate::schema::ColumnSpec,
        v: apache_avro::types::Value,
    ) -> Result<JsonValue, BatchError> {
        use crate::schema::ColumnType as T;
        use apache_avro::types::Value as A;
        let bad = |reason: &str, detail: String| BatchError {
            reason: format!("{reason}:{name}"),
            detail,
        };
        match (spec.ty, v) {
            (_, A::Null) => Err(bad("null", format!("field `{name}` is null"))),
            (T::Int, A::Long(i)) => Ok(JsonValue::Int(i)),
            // The reader's schema declares plain `long` (`payload::avro_schema`).
            (T::Timestamp, A::Long(i)) => epoch_micros(name, spec.unit, i),
            (T::String, A::String(s)) => Ok(JsonValue::Str(s)),
            (T::Float, A::Double(f)) if f.is_finite() => Ok(JsonValue::Float(f)),
            (T::Float, A::Double(_)) => {
                Err(bad("non_finite", format!("field `{name}` is not finite")))
            }
            (T::FloatList, A::Array(a)) => {
                let vals: Option<Vec<f32>> = a
                    .into_iter()
                    .map(|x| match x {
                        A::Float(f) => Some(f),
                        _ => None,
                    })
                    .collect();
                match vals {
                    Some(v) if spec.size.is_none_or(|n| n == v.len()) => Ok(JsonValue::List(v)),
                    _ => Err(bad(
                        "wrong_type",
                        format!("field `{name}`: expected a list of {:?} floats", spec.size),
                    )),
                }
            }
            (ty, v) => Err(bad(
                "wrong_type",
                format!("field `{name}`: expected {ty:?}, found {v:?}").to_lowercase(),
            )),
        }
    }

    fn field(
        &self,
        obj: &serde_json::Map<String, serde_json::Value>,
        name: &str,
        spec: &crate::schema::ColumnSpec,
    ) -> Result<JsonValue, BatchError> {
        use crate::schema::ColumnType as T;
        use serde_json::Value as V;
        let bad = |reason: &str, detail: String| BatchError {
            reason: format!("{reason}:{name}"),
            detail,
        };
        let v = obj
            .get(name)
            .ok_or_else(|| bad("missing_field", format!("field `{name}` is absent")))?;
        let number = |v: &V| -> Option<f64> {
            match v {
                V::Number(n) => n.as_f64(),
                // JSON has no NaN or infinity; producers spell them as strings.
                V::String(s)
                    if matches!(
                        s.as_str(),
                        "NaN" | "nan" | "Infinity" | "-Infinity" | "inf" | "-inf"
                    ) =>
                {
                    s.parse::<f64>().ok().or(Some(f64::NAN))
                }
                _ => None,
            }
        };
        match (spec.ty, v) {
            (_, V::Null) => Err(bad("null", format!("field `{name}` is null"))),
            (T::String, V::String(s)) => Ok(JsonValue::Str(s.clone())),
            (T::String, V::Number(n)) => Ok(JsonValue::Str(n.to_string())),
            (T::Int, V::Number(n)) if n.as_i64().is_some() => {
                Ok(JsonValue::Int(n.as_i64().expect("checked")))
            }
            (T::Timestamp, V::Number(n)) if n.as_i64().is_some() => {
                epoch_micros(name, spec.unit, n.as_i64().expect("checked"))
            }
            (T::Timestamp, V::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| JsonValue::Int(t.timestamp_micros()))
                .map_err(|e| {
                    bad(
                        "wrong_type",
                        format!("field `{name}`: `{s}` is not an RFC 3339 time ({e})"),
                    )
                }),
            (T::Float, v) => match number(v) {
                Some(f) if f.is_finite() => Ok(JsonValue::Float(f)),
                Some(_) => Err(bad("non_finite", format!("field `{name}` is not finite"))),
                None => Err(bad(
                    "wrong_type",
                    format!("field `{name}`: expected a number, found {v}"),
                )),
            },
            (T::FloatList, V::Array(a)) => {
                let vals: Option<Vec<f32>> =
                    a.iter().map(|x| number(x).map(|f| f as f32)).collect();
                match vals {
                    Some(v) if spec.size.is_none_or(|n| n == v.len()) => Ok(JsonValue::List(v)),
                    _ => Err(bad(
                        "wrong_type",
                        format!("field `{name}`: expected a list of {:?} numbers", spec.size),
                    )),
                }
            }
            (ty, v) => Err(bad(
                "wrong_type",
                format!("field `{name}`: expected {ty:?}, found {v}").to_lowercase(),
            )),
        }
    }

    /// Decodes one payload into its field values, in [`Schema::read_columns`] order.
    fn message(&self, payload: &[u8]) -> Result<Vec<JsonValue>, BatchError> {
        if payload.len() > self.max_bytes {
            return Err(BatchError {
                reason: "oversized".into(),
                detail: format!(
                    "{} bytes, more than the {} allowed",
                    payload.len(),
                    self.max_bytes
                ),
            });
        }
        if let Some(avro) = &self.avro {
            let fields =
                crate::payload::decode_avro(avro, payload).map_err(|detail| BatchError {
                    reason: "malformed_avro".into(),
                    detail,
                })?;
            return self
                .columns
                .iter()
                .zip(fields)
                .map(|((name, spec), v)| Self::avro_field(name, spec, v))
                .collect();
        }
        let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| BatchError {
            reason: "malformed_json".into(),
            detail: e.to_string(),
        })?;
        let obj = v.as_object().ok_or_else(|| BatchError {
            reason: "malformed_json".into(),
            detail: "not a JSON object".into(),
        })?;
        self.columns
            .iter()
            .map(|(name, spec)| self.field(obj, name, spec))
            .collect()
    }

    /// Decodes payloads; returns the batch of the good ones, the index of each good one in
    /// `payloads`, and the rejected ones with their reasons.
    pub fn decode(
        &self,
        payloads: &[&[u8]],
    ) -> (RecordBatch, Vec<usize>, Vec<(usize, BatchError)>) {
        use crate::schema::ColumnType as T;
        use arrow::array::{
            ArrayRef, FixedSizeListBuilder, Float32Builder, Float64Builder, Int64Builder,
            StringBuilder, TimestampMicrosecondBuilder,
        };
        let mut good = Vec::with_capacity(payloads.len());
        let mut rows = Vec::with_capacity(payloads.len());
        let mut bad = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            match self.message(p) {
                Ok(r) => {
                    good.push(i);
                    rows.push(r);
                }
                Err(e) => bad.push((i, e)),
            }
        }
        let mut fields = Vec::with_capacity(self.columns.len());
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (c, (name, spec)) in self.columns.iter().enumerate() {
            let (dt, col): (DataType, ArrayRef) = match spec.ty {
                T::String => {
                    let mut b = StringBuilder::new();
                    rows.iter().for_each(|r| {
                        if let JsonValue::Str(s) = &r[c] {
                            b.append_value(s)
                        }
                    });
                    (DataType::Utf8, Arc::new(b.finish()))
                }
                T::Int => {
                    let mut b = Int64Builder::new();
                    rows.iter().for_each(|r| {
                        if let JsonValue::Int(v) = r[c] {
                            b.append_value(v)
                        }
                    });
                    (DataType::Int64, Arc::new(b.finish()))
                }
                T::Timestamp => {
                    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
                    rows.iter().for_each(|r| {
                        if let JsonValue::Int(v) = r[c] {
                            b.append_value(v)
                        }
                    });
                    (
                        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                        Arc::new(b.finish()),
                    )
                }
                T::Float => {
                    let mut b = Float64Builder::new();
                    rows.iter().for_each(|r| {
                        if let JsonValue::Float(v) = r[c] {
                            b.append_value(v)
                        }
                    });
                    (DataType::Float64, Arc::new(b.finish()))
                }
                T::FloatList => {
                    let n = spec.size.unwrap_or(0) as i32;
                    let mut b = FixedSizeListBuilder::new(Float32Builder::new(), n);
                    for r in &rows {
                        if let JsonValue::List(v) = &r[c] {
                            b.values().append_slice(v);
                            b.append(true);
                        }
                    }
                    let a = b.finish();
                    (a.data_type().clone(), Arc::new(a))
                }
            };
            fields.push(arrow::datatypes::Field::new(name, dt, true));
            cols.push(col);
        }
        let batch = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols)
            .expect("columns built to the schema, one value per good message");
        (batch, good, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{PayloadFormat, avro_schema, encode_avro};

    fn milan() -> Arc<Schema> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/milan_internet.json");
        Arc::new(Schema::load(&path).unwrap())
    }

    /// The reason each payload is rejected for ("" when it is accepted).
    fn reasons(d: &JsonDecoder, payloads: &[&[u8]]) -> Vec<String> {
        let (batch, good, bad) = d.decode(payloads);
        assert_eq!(batch.num_rows(), good.len());
        let mut out = vec![String::new(); payloads.len()];
        for (i, e) in bad {
            assert!(!e.detail.is_empty(), "every rejection says why");
            out[i] = e.reason;
        }
        out
    }

    #[test]
    fn json_rejections_name_their_reason_and_field() {
        let d = JsonDecoder::new(milan(), 200);
        let long = format!(
            r#"{{"square_id": 1, "ts": 1, "internet": 1.0, "pad": "{}"}}"#,
            "x".repeat(300)
        );
        let payloads: Vec<&[u8]> = vec![
            br#"{"square_id": 1, "ts": 1383951600000000, "internet": 12.5}"#,
            br#"{"square_id": 1, "ts": "#,
            b"[1, 2, 3]",
            br#"{"square_id": 1, "ts": 1}"#,
            br#"{"square_id": 1, "ts": 1, "internet": "lots"}"#,
            br#"{"square_id": 1, "ts": 1, "internet": "NaN"}"#,
            br#"{"square_id": 1, "ts": 1, "internet": null}"#,
            br#"{"square_id": 1.5, "ts": 1, "internet": 1.0}"#,
            long.as_bytes(),
        ];
        assert_eq!(
            reasons(&d, &payloads),
            [
                "",
                "malformed_json",
                "malformed_json",
                "missing_field:internet",
                "wrong_type:internet",
                "non_finite:internet",
                "null:internet",
                "wrong_type:square_id",
                "oversized",
            ]
        );
    }

    /// The times a JSON or Avro message's `ts` decodes to, under the column's `unit`.
    fn times(unit: Option<&str>, format: PayloadFormat, ts: &[serde_json::Value]) -> Vec<String> {
        let mut v = serde_json::to_value(&*milan()).unwrap();
        if let Some(u) = unit {
            v["columns"]["ts"]["unit"] = u.into();
        }
        let schema: Arc<Schema> = Arc::new(serde_json::from_value(v).unwrap());
        let d = JsonDecoder::with_format(schema.clone(), 1 << 16, format);
        let avro = avro_schema(&schema);
        let payloads: Vec<Vec<u8>> = ts
            .iter()
            .map(|t| {
                let row = serde_json::json!({"square_id": 1, "ts": t, "internet": 3.0});
                match format {
                    PayloadFormat::Json => row.to_string().into_bytes(),
                    PayloadFormat::Avro => {
                        encode_avro(&avro, &schema, row.as_object().unwrap()).unwrap()
                    }
                }
            })
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let (batch, good, bad) = d.decode(&refs);
        let t = Decoder::new(schema).decode(&batch).unwrap().time;
        let mut out: Vec<String> = bad.into_iter().map(|(_, e)| e.reason).collect();
        out.extend(good.iter().enumerate().map(|(i, _)| t.value(i).to_string()));
        out
    }

    /// An epoch in milliseconds (the most common producer's choice) decodes to its
    /// microseconds when the schema says so; RFC 3339 strings are read in JSON.
    #[test]
    fn message_times_follow_the_columns_unit() {
        let us = "1383264000000000"; // 2013-11-01T00:00:00Z
        for f in [PayloadFormat::Json, PayloadFormat::Avro] {
            assert_eq!(times(Some("ms"), f, &[1_383_264_000_000i64.into()]), [us]);
            assert_eq!(times(Some("s"), f, &[1_383_264_000i64.into()]), [us]);
            assert_eq!(
                times(Some("ns"), f, &[1_383_264_000_000_000_000i64.into()]),
                [us]
            );
            assert_eq!(times(None, f, &[1_383_264_000_000_000i64.into()]), [us]);
            assert_eq!(
                times(Some("s"), f, &[i64::MAX.into()]),
                ["out_of_range:ts"],
                "an overflow is bad input, not a wrapped time"
            );
        }
        let json = PayloadFormat::Json;
        assert_eq!(
            times(None, json, &["2013-11-01T01:00:00+01:00".into()]),
            [us]
        );
        assert_eq!(times(None, json, &["yesterday".into()]), ["wrong_type:ts"]);
    }

    #[test]
    fn avro_rejections_name_their_reason_and_field() {
        let schema = milan();
        let d = JsonDecoder::with_format(schema.clone(), 1 << 16, PayloadFormat::Avro);
        let avro = avro_schema(&schema);
        let row =
            |v: serde_json::Value| encode_avro(&avro, &schema, v.as_object().unwrap()).unwrap();
        let good = row(serde_json::json!({"square_id": 1, "ts": 1, "internet": 3.0}));
        let null = row(serde_json::json!({"square_id": 1, "ts": 1, "internet": null}));
        let mut trailing = good.clone();
        trailing.push(7);
        let payloads: Vec<&[u8]> = vec![&good, &null, b"{\"json\": true}", &trailing];
        let got = reasons(&d, &payloads);
        assert_eq!(got[0], "");
        assert_eq!(got[1], "null:internet");
        assert_eq!(got[2], "malformed_avro");
        assert_eq!(got[3], "malformed_avro", "trailing bytes are refused");
    }
}
