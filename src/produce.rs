//! The producer tool: replay a Parquet archive into a Kafka topic, one JSON object per row,
//! keyed by the schema's key so that one cell's samples stay in one partition (and so in
//! order). It reuses the Parquet source, so pacing (`--rate`, `--speedup`) and the time
//! merge across files behave exactly as in a replay pipeline. Floats that JSON cannot spell
//! (NaN, ±∞) are written as the strings "NaN", "Infinity", "-Infinity".

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type, TimeUnit};
use std::sync::atomic::Ordering;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::producer::{DeliveryCount, KafkaProducer};
use crate::schema::{EpochUnit, Schema};
use crate::shutdown::Shutdown;
use crate::source::SourceEvent;
use crate::source::parquet::{self, Pace, ParquetSourceConfig};

/// What to produce where.
pub struct ProduceArgs {
    pub path: String,
    pub schema: Arc<Schema>,
    pub brokers: String,
    pub topic: String,
    pub pace: Option<Pace>,
    pub max_rows: Option<u64>,
    pub options: Vec<(String, String)>,
    pub format: crate::payload::PayloadFormat,
}

/// One column as JSON values, row by row; a timestamp as an integer of `unit` since the epoch
/// (truncated to whole units: `s` drops the fractions of a second).
fn column_json(col: &dyn Array, unit: EpochUnit) -> Result<Vec<Value>> {
    let n = col.len();
    let out = match col.data_type() {
        DataType::Timestamp(_, tz) => {
            let arrow_unit = match unit {
                EpochUnit::Seconds => TimeUnit::Second,
                EpochUnit::Millis => TimeUnit::Millisecond,
                EpochUnit::Micros => TimeUnit::Microsecond,
                EpochUnit::Nanos => TimeUnit::Nanosecond,
            };
            let t = cast(col, &DataType::Timestamp(arrow_unit, tz.clone()))?;
            let v = cast(t.as_ref(), &DataType::Int64)?;
            v.as_primitive::<Int64Type>()
                .iter()
                .map(|x| x.map_or(Value::Null, Value::from))
                .collect()
        }
        dt if dt.is_integer() => {
            let v = cast(col, &DataType::Int64)?;
            v.as_primitive::<Int64Type>()
                .iter()
                .map(|x| x.map_or(Value::Null, Value::from))
                .collect()
        }
        dt if dt.is_floating() => {
            let v = cast(col, &DataType::Float64)?;
            v.as_primitive::<Float64Type>()
                .iter()
                .map(|x| x.map_or(Value::Null, float))
                .collect()
        }
        DataType::FixedSizeList(_, _) => {
            let l = col.as_fixed_size_list();
            let w = l.value_length() as usize;
            let vals = cast(l.values().as_ref(), &DataType::Float32)?;
            let vals = vals.as_primitive::<Float32Type>();
            (0..n)
                .map(|i| {
                    if l.is_null(i) {
                        return Value::Null;
                    }
                    let start = l.value_offset_at(i);
                    Value::Array(
                        vals.values()[start..start + w]
                            .iter()
                            .map(|f| float(*f as f64))
                            .collect(),
                    )
                })
                .collect()
        }
        _ => {
            let v = cast(col, &DataType::Utf8)?;
            v.as_string::<i32>()
                .iter()
                .map(|x| x.map_or(Value::Null, |s| Value::String(s.to_string())))
                .collect()
        }
    };
    Ok(out)
}

fn float(f: f64) -> Value {
    if f.is_finite() {
        Value::from(f)
    } else if f.is_nan() {
        Value::String("NaN".into())
    } else if f > 0.0 {
        Value::String("Infinity".into())
    } else {
        Value::String("-Infinity".into())
    }
}

/// Rows of a batch as (key, payload): JSON, or Avro when `avro` is given; times in the unit
/// `schema` gives their column, as the decoder reads them.
pub fn encode_rows(
    batch: &RecordBatch,
    schema: &Schema,
    avro: Option<&apache_avro::Schema>,
) -> Result<Vec<(Option<String>, Vec<u8>)>> {
    let unit = |name: &str| {
        let spec = schema.columns.get(name);
        spec.and_then(|c| c.unit).unwrap_or(EpochUnit::Micros)
    };
    let cols: Vec<(String, Vec<Value>)> = batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| Ok((f.name().clone(), column_json(c.as_ref(), unit(f.name()))?)))
        .collect::<Result<_>>()?;
    let keys = batch
        .column_by_name(&schema.key)
        .map(|c| column_json(c.as_ref(), EpochUnit::Micros))
        .transpose()?;
    (0..batch.num_rows())
        .map(|i| {
            let obj: Map<String, Value> = cols
                .iter()
                .map(|(n, v)| (n.clone(), v[i].clone()))
                .collect();
            let k = keys.as_ref().and_then(|k| match &k[i] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                v => Some(v.to_string()),
            });
            let payload = match avro {
                Some(a) => crate::payload::encode_avro(a, schema, &obj)?,
                None => serde_json::to_vec(&Value::Object(obj))?,
            };
            Ok((k, payload))
        })
        .collect()
}

/// Replays the archive into the topic; returns the number of messages produced.
pub async fn produce(args: ProduceArgs, shutdown: Shutdown) -> Result<u64> {
    let src = ParquetSourceConfig {
        inject: None,
        path: args.path.clone(),
        batch_size: 1024,
        pace: args.pace.clone(),
        max_rows: args.max_rows,
    };
    let files = src.files(&args.schema)?;
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(4);
    let schema = args.schema.clone();
    let sd = shutdown.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let tx = crate::source::EventSender::new(tx, Default::default());
        parquet::replay(&src, &schema, &files, Default::default(), tx, &sd)
    });
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5");
    for (k, v) in &args.options {
        cfg.set(k, v);
    }
    let producer: KafkaProducer = cfg
        .create_with_context(DeliveryCount::default())
        .context("cannot create the Kafka producer")?;
    let topic = args.topic.clone();
    let schema = args.schema.clone();
    let avro = (args.format == crate::payload::PayloadFormat::Avro)
        .then(|| crate::payload::avro_schema(&schema));
    let sent = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut sent = 0u64;
        let shutdown = shutdown;
        while let Some(ev) = rx.blocking_recv() {
            let SourceEvent::Batch { batch, .. } = ev else {
                continue;
            };
            for (key, payload) in encode_rows(&batch, &schema, avro.as_ref())? {
                let mut rec: BaseRecord<'_, String, Vec<u8>> =
                    BaseRecord::to(&topic).payload(&payload);
                if let Some(k) = &key {
                    rec = rec.key(k);
                }
                crate::producer::send(&producer, rec, &shutdown).context("produce failed")?;
                sent += 1;
            }
        }
        producer
            .flush(Duration::from_secs(30))
            .context("flush failed")?;
        let failed = producer.context().failed.load(Ordering::Relaxed);
        anyhow::ensure!(
            failed == 0,
            "{failed} of {sent} messages were not delivered"
        );
        Ok(sent)
    });
    let read = reader.await.context("reader panicked")??;
    let sent = sent.await.context("producer panicked")??;
    // What the archive could not give is not lost (it stays in the files), but the topic
    // does not hold the archive: say so, and fail.
    anyhow::ensure!(
        read.unreadable_parts == 0,
        "{sent} messages produced, but {} parts of the archive ({} rows counted) could not be read as the schema says (the log names each file and reason)",
        read.unreadable_parts,
        read.unreadable_rows
    );
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, JsonDecoder};
    use crate::payload::PayloadFormat;
    use arrow::array::{Float64Array, Int64Array, TimestampMicrosecondArray};

    /// What `produce` writes under a time column's `unit`, the decoder reads back as the
    /// archive's times, in JSON and in Avro.
    #[test]
    fn produced_times_decode_to_the_archives_in_every_unit() {
        let t = vec![1_383_264_000_000_000i64, 1_383_264_600_123_000];
        let batch = RecordBatch::try_from_iter([
            ("square_id", Arc::new(Int64Array::from(vec![1, 1])) as _),
            (
                "ts",
                Arc::new(TimestampMicrosecondArray::from(t.clone()).with_timezone("UTC")) as _,
            ),
            (
                "internet",
                Arc::new(Float64Array::from(vec![1.0, 2.0])) as _,
            ),
        ])
        .unwrap();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/milan_internet.json");
        for unit in ["ms", "us", "ns"] {
            let mut v = serde_json::to_value(Schema::load(&path).unwrap()).unwrap();
            v["columns"]["ts"]["unit"] = unit.into();
            let schema: Arc<Schema> = Arc::new(serde_json::from_value(v).unwrap());
            let avro = crate::payload::avro_schema(&schema);
            for (format, a) in [
                (PayloadFormat::Json, None),
                (PayloadFormat::Avro, Some(&avro)),
            ] {
                let rows = encode_rows(&batch, &schema, a).unwrap();
                let payloads: Vec<&[u8]> = rows.iter().map(|(_, p)| p.as_slice()).collect();
                let dec = JsonDecoder::with_format(schema.clone(), 1 << 16, format);
                let (b, good, bad) = dec.decode(&payloads);
                assert!(bad.is_empty() && good.len() == 2, "{unit} {format:?}");
                let d = Decoder::new(schema.clone()).decode(&b).unwrap();
                assert_eq!(d.time.values(), &t[..], "{unit} {format:?}");
            }
        }
    }
}
