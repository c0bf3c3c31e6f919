//! Parquet archive replay: a file, a folder or a glob, streamed batch by batch in time order.
//!
//! Only the columns the schema reads are decoded, `batch_size` rows at a time, one file open
//! at a time, so memory is bounded by the batch size and never by the archive. Files are
//! replayed one after another, ordered by their first event time (by name when the schema's
//! time is an index); rows inside a file keep the writer's order. A file whose columns do not
//! match the schema is reported as [`SourceEvent::Unreadable`] and skipped. Replay can be
//! paced at a fixed row rate, or at a speed-up factor over event time, or run flat out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::SourceEvent;
use crate::schema::{Schema, TimeKind};
use crate::shutdown::Shutdown;

/// How fast to replay.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Pace {
    /// Fixed rate in rows per second.
    #[serde(default)]
    pub rows_per_second: Option<f64>,
    /// Event time runs this many times faster than wall time (timestamp schemas only).
    #[serde(default)]
    pub speedup: Option<f64>,
}

/// `[source]` with `kind = "parquet"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSourceConfig {
    /// A file, a folder of `*.parquet`, or a glob.
    pub path: String,
    /// Rows per record batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Absent: as fast as possible.
    #[serde(default)]
    pub pace: Option<Pace>,
    /// Stop after this many rows (for smoke runs).
    #[serde(default)]
    pub max_rows: Option<u64>,
}

fn default_batch_size() -> usize {
    4096
}

impl ParquetSourceConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        if Path::new(&self.path).is_relative() {
            self.path = base.join(&self.path).to_string_lossy().into_owned();
        }
    }

    pub(crate) fn validate(&self) -> Result<(), (String, String, String)> {
        if self.batch_size == 0 {
            return Err((
                "source.batch_size".into(),
                "at least 1 row".into(),
                "0".into(),
            ));
        }
        if let Some(p) = &self.pace {
            let ok = |v: Option<f64>| v.is_none_or(|v| v > 0.0 && v.is_finite());
            match (p.rows_per_second, p.speedup) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err((
                        "source.pace".into(),
                        "exactly one of rows_per_second or speedup".into(),
                        format!("{p:?}"),
                    ));
                }
                _ if !ok(p.rows_per_second) || !ok(p.speedup) => {
                    return Err((
                        "source.pace".into(),
                        "a positive rate".into(),
                        format!("{p:?}"),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The files this source replays, in replay order.
    pub fn files(&self, schema: &Schema) -> Result<Vec<PathBuf>> {
        let p = Path::new(&self.path);
        let mut files: Vec<PathBuf> = if p.is_dir() {
            std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
                .collect()
        } else if self.path.contains(['*', '?', '[']) {
            glob::glob(&self.path)
                .with_context(|| format!("bad glob {}", self.path))?
                .filter_map(|e| e.ok())
                .collect()
        } else {
            if !p.exists() {
                bail!("source.path: {} does not exist", p.display());
            }
            vec![p.to_path_buf()]
        };
        if files.is_empty() {
            bail!("source.path: no Parquet file matches {}", self.path);
        }
        files.sort();
        if schema.time.kind == TimeKind::Timestamp {
            // Files in order of their first event; unreadable files keep their name order.
            let mut keyed: Vec<(i64, PathBuf)> = files
                .into_iter()
                .map(|f| (first_time(&f, schema).unwrap_or(i64::MAX), f))
                .collect();
            keyed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            files = keyed.into_iter().map(|(_, f)| f).collect();
        }
        Ok(files)
    }
}

/// Event time of a file's first row, in microseconds.
fn first_time(file: &Path, schema: &Schema) -> Option<i64> {
    let b = ParquetRecordBatchReaderBuilder::try_new(File::open(file).ok()?).ok()?;
    let idx = b.schema().index_of(&schema.time.column).ok()?;
    let mask = ProjectionMask::roots(b.parquet_schema(), [idx]);
    let batch = b
        .with_projection(mask)
        .with_batch_size(1)
        .build()
        .ok()?
        .next()?
        .ok()?;
    time_micros(batch.column(0).as_ref())
        .filter(|t| !t.is_empty())?
        .first()
        .copied()
}

/// A time column as i64 (microseconds for timestamps).
fn time_micros(col: &dyn Array) -> Option<Vec<i64>> {
    let c = match col.data_type() {
        DataType::Timestamp(_, tz) => {
            cast(col, &DataType::Timestamp(TimeUnit::Microsecond, tz.clone())).ok()?
        }
        _ => cast(col, &DataType::Int64).ok()?,
    };
    let c = cast(c.as_ref(), &DataType::Int64).ok()?;
    Some(c.as_primitive::<Int64Type>().iter().flatten().collect())
}

/// Totals of a replay.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReplayStats {
    pub files: u64,
    pub rows: u64,
    pub unreadable_rows: u64,
}

/// Total rows of the files (from Parquet footers), for progress display.
pub fn total_rows(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| ParquetRecordBatchReaderBuilder::try_new(File::open(f).ok()?).ok())
        .map(|b| b.metadata().file_metadata().num_rows() as u64)
        .sum()
}

/// Replays the files into `tx` until done or shut down. Runs on a blocking thread.
pub fn replay(
    cfg: &ParquetSourceConfig,
    schema: &Schema,
    files: &[PathBuf],
    tx: mpsc::Sender<SourceEvent>,
    shutdown: &Shutdown,
) -> Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    let start = Instant::now();
    let mut t0: Option<i64> = None;
    let wanted = schema.read_columns();
    for file in files {
        if shutdown.is_triggered() {
            break;
        }
        let origin: Arc<str> = Arc::from(file.to_string_lossy().as_ref());
        let builder = ParquetRecordBatchReaderBuilder::try_new(
            File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        )
        .with_context(|| format!("{} is not a readable Parquet file", file.display()))?;
        stats.files += 1;
        let rows = builder.metadata().file_metadata().num_rows() as u64;
        let arrow_schema = builder.schema().clone();
        let problems: Vec<(String, String)> = schema
            .mismatches(&arrow_schema)
            .into_iter()
            .filter(|(c, _)| wanted.contains(c))
            .collect();
        if let Some((col, what)) = problems.first() {
            let reason = if what == "missing" {
                format!("missing_column:{col}")
            } else {
                format!("wrong_type:{col}")
            };
            let detail = problems
                .iter()
                .map(|(c, w)| format!("{c}: {w}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(file = %origin, %reason, %detail, rows, "file does not match the schema; its rows are dead-lettered");
            stats.unreadable_rows += rows;
            if tx
                .blocking_send(SourceEvent::Unreadable {
                    origin,
                    rows,
                    reason,
                    detail,
                })
                .is_err()
            {
                break;
            }
            continue;
        }
        let roots: Vec<usize> = wanted
            .iter()
            .filter_map(|c| arrow_schema.index_of(c).ok())
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(cfg.batch_size)
            .build()?;
        let mut first_row = 0u64;
        for batch in reader {
            if shutdown.is_triggered() {
                break;
            }
            let mut batch = batch.with_context(|| format!("reading {}", file.display()))?;
            if let Some(max) = cfg.max_rows {
                let left = max.saturating_sub(stats.rows);
                if left == 0 {
                    return Ok(stats);
                }
                if (batch.num_rows() as u64) > left {
                    batch = batch.slice(0, left as usize);
                }
            }
            if let Some(p) = &cfg.pace {
                pace(p, &batch, schema, start, stats.rows, &mut t0);
            }
            let n = batch.num_rows() as u64;
            if tx
                .blocking_send(SourceEvent::Batch {
                    batch,
                    origin: origin.clone(),
                    first_row,
                })
                .is_err()
            {
                return Ok(stats);
            }
            first_row += n;
            stats.rows += n;
        }
    }
    Ok(stats)
}

/// Sleeps until the batch is due.
fn pace(
    p: &Pace,
    batch: &RecordBatch,
    schema: &Schema,
    start: Instant,
    rows_before: u64,
    t0: &mut Option<i64>,
) {
    let due = if let Some(rate) = p.rows_per_second {
        Duration::from_secs_f64(rows_before as f64 / rate)
    } else if let Some(speedup) = p.speedup {
        let Ok(col) = batch.column_by_name(&schema.time.column).ok_or(()) else {
            return;
        };
        let Some(first) = time_micros(col.as_ref()).and_then(|v| v.first().copied()) else {
            return;
        };
        let base = *t0.get_or_insert(first);
        Duration::from_secs_f64(((first - base).max(0) as f64 / 1e6) / speedup)
    } else {
        return;
    };
    let elapsed = start.elapsed();
    if due > elapsed {
        std::thread::sleep(due - elapsed);
    }
}
