//! The per-sample score file: for every sample, where it came from (file and row, or topic
//! partition and offset), its key, event time, importance score, the
//! threshold it was judged against, whether it was selected, trained and retained, and the
//! prequential prediction next to the target, and on request (`output.features`) the model's
//! input vector, so that a peer learner can be run on exactly the same inputs. Parquet,
//! snappy, written in row groups of a
//! bounded size by a thread of its own behind a bounded channel, readable by pyarrow.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float32Builder, Float64Array, Int64Array, ListBuilder,
    RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

/// One sample's line in the score file.
#[derive(Debug, Clone)]
pub struct ScoreRow {
    /// File, or `topic[partition]`, the sample came from; `position` is its row or offset.
    pub source: Arc<str>,
    pub position: u64,
    pub key: Arc<str>,
    pub time: i64,
    pub score: f32,
    pub threshold: f32,
    pub selected: bool,
    pub trained: bool,
    pub retained: bool,
    pub prediction: f64,
    pub target: f64,
    /// The model's inputs (empty unless `output.features`).
    pub features: Vec<f32>,
}

/// The element of the `features` list column: non-null float32.
fn feature_item() -> Field {
    Field::new("item", DataType::Float32, false)
}

/// Which optional columns a score file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreColumns {
    /// The time column is a UTC timestamp (else a plain integer index).
    pub timestamps: bool,
    /// A `features` column (list of float32): the model's input vector.
    pub features: bool,
}

/// Writes [`ScoreRow`]s to a Parquet file.
pub struct ScoreSink {
    writer: ArrowWriter<File>,
    schema: Arc<Schema>,
    columns: ScoreColumns,
    pub rows: u64,
}

impl ScoreSink {
    pub fn create(path: &Path, columns: ScoreColumns) -> Result<Self> {
        let time_type = if columns.timestamps {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        } else {
            DataType::Int64
        };
        let mut fields = vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("position", DataType::UInt64, false),
            Field::new("key", DataType::Utf8, false),
            Field::new("time", time_type, false),
            Field::new("score", DataType::Float32, false),
            Field::new("threshold", DataType::Float32, false),
            Field::new("selected", DataType::Boolean, false),
            Field::new("trained", DataType::Boolean, false),
            Field::new("retained", DataType::Boolean, false),
            Field::new("prediction", DataType::Float64, false),
            Field::new("target", DataType::Float64, false),
        ];
        if columns.features {
            fields.push(Field::new(
                "features",
                DataType::List(Arc::new(feature_item())),
                false,
            ));
        }
        let schema = Arc::new(Schema::new(fields));
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        // Dictionaries pay on the repeating columns (source, key, time, threshold). On the
        // nearly unique ones (positions, scores, predictions, targets, features) they only cost
        // hashing every value until the dictionary overflows: about three fifths of this
        // thread's CPU on a 10 M-row Milan run (4.9-5.0 s without them, 2.0-2.1 s with).
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(64 * 1024));
        let unique = [
            &["position"][..],
            &["score"],
            &["prediction"],
            &["target"],
            &["features", "list", "item"],
        ];
        for path in unique {
            let path = ColumnPath::new(path.iter().map(|p| p.to_string()).collect());
            props = props.set_column_dictionary_enabled(path, false);
        }
        let props = props.build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        Ok(ScoreSink {
            writer,
            schema,
            columns,
            rows: 0,
        })
    }

    pub fn write(&mut self, rows: &[ScoreRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let times: ArrayRef = if self.columns.timestamps {
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.time))
                    .with_timezone("UTC"),
            )
        } else {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.time)))
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &*r.source),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|r| r.position),
            )),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &*r.key))),
            times,
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.score))),
            Arc::new(Float32Array::from_iter_values(
                rows.iter().map(|r| r.threshold),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.selected)),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.trained)),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| Some(r.retained)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.prediction),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.target),
            )),
        ];
        if self.columns.features {
            let mut list = ListBuilder::new(Float32Builder::new()).with_field(feature_item());
            for r in rows {
                list.values().append_slice(&r.features);
                list.append(true);
            }
            cols.push(Arc::new(list.finish()));
        }
        self.writer
            .write(&RecordBatch::try_new(self.schema.clone(), cols)?)?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    pub fn finish(self) -> Result<u64> {
        self.writer.close()?;
        Ok(self.rows)
    }
}

/// Score rows as numbered Parquet segments in a folder (`part-000001.parquet`, …), one per
/// checkpoint interval, used when checkpoints are on. A segment is written under a temporary
/// name and renamed when the checkpoint that covers its rows is taken, so a crash never
/// leaves a torn file behind: segments numbered past the last checkpoint are deleted on
/// restart, and their rows, whose offsets were not committed, are scored again.
pub struct ScoreSegments {
    dir: std::path::PathBuf,
    columns: ScoreColumns,
    next: u64,
    current: Option<ScoreSink>,
    pub rows: u64,
}

impl ScoreSegments {
    /// Opens the folder, continuing at segment `next` (from the checkpoint, 1 when fresh).
    /// Every segment below `next` must be there: the checkpoint covers their rows, which a
    /// resume will not score again.
    pub fn open(dir: &Path, columns: ScoreColumns, next: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for entry in std::fs::read_dir(dir)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let stale = name.ends_with(".tmp") || Self::number(name).is_some_and(|n| n >= next);
            if stale {
                tracing::info!(file = %p.display(), "removing a score segment the checkpoint does not cover");
                std::fs::remove_file(&p)?;
            }
        }
        let segments = ScoreSegments {
            dir: dir.to_path_buf(),
            columns,
            next,
            current: None,
            rows: 0,
        };
        if let Some(gone) = (1..next).find(|&n| !segments.path(n).exists()) {
            anyhow::bail!(
                "{}: the checkpoint covers score segments 1 to {} but {} is gone; its rows would not be scored again (delete the checkpoint to start afresh)",
                dir.display(),
                next - 1,
                segments.path(gone).display()
            );
        }
        Ok(segments)
    }

    fn number(name: &str) -> Option<u64> {
        name.strip_prefix("part-")?
            .strip_suffix(".parquet")?
            .parse()
            .ok()
    }

    fn path(&self, n: u64) -> std::path::PathBuf {
        self.dir.join(format!("part-{n:06}.parquet"))
    }

    pub fn write(&mut self, rows: &[ScoreRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            let tmp = self.path(self.next).with_extension("parquet.tmp");
            self.current = Some(ScoreSink::create(&tmp, self.columns)?);
        }
        self.current.as_mut().expect("just opened").write(rows)?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Closes the open segment (footer, fsync, rename) and returns the number the next one
    /// will take.
    pub fn roll(&mut self) -> Result<u64> {
        if let Some(sink) = self.current.take() {
            let path = self.path(self.next);
            let tmp = path.with_extension("parquet.tmp");
            sink.finish()?;
            File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot rename {}", tmp.display()))?;
            crate::durable::sync_dir(&path)?;
            self.next += 1;
        }
        Ok(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    /// The nearly unique columns are written without a dictionary (hashing every value for a
    /// dictionary that overflows was three fifths of the sink thread's CPU); the repeating ones
    /// keep theirs. A renamed list item would silently bring the features' dictionary back.
    #[test]
    fn only_the_repeating_columns_have_dictionaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.parquet");
        let columns = ScoreColumns {
            timestamps: true,
            features: true,
        };
        let mut sink = ScoreSink::create(&path, columns).unwrap();
        let (source, key): (Arc<str>, Arc<str>) = (Arc::from("file.parquet"), Arc::from("k"));
        let rows: Vec<ScoreRow> = (0..1000u32)
            .map(|i| ScoreRow {
                source: source.clone(),
                position: u64::from(i),
                key: key.clone(),
                time: i64::from(i % 10),
                score: i as f32 * 0.5,
                threshold: 1.0,
                selected: i % 2 == 0,
                trained: true,
                retained: false,
                prediction: f64::from(i) * 1.5,
                target: f64::from(i) * 2.5,
                features: vec![i as f32, -(i as f32)],
            })
            .collect();
        sink.write(&rows).unwrap();
        assert_eq!(sink.finish().unwrap(), 1000);
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let group = reader.metadata().row_group(0);
        // Booleans are never dictionary-encoded.
        let plain = [
            "position",
            "score",
            "prediction",
            "target",
            "features.list.item",
            "selected",
            "trained",
            "retained",
        ];
        for c in group.columns() {
            let name = c.column_path().string();
            let dictionary = c.encodings().any(|e| e == Encoding::RLE_DICTIONARY);
            assert_eq!(dictionary, !plain.contains(&name.as_str()), "{name}");
        }
        assert_eq!(group.num_columns(), 12);
    }
}
