//! Parquet archive replay: a file, a folder or a glob, streamed batch by batch in time order.
//!
//! Only the columns the schema reads are decoded, `batch_size` rows at a time; the files are
//! open together and merged row by row on event time (a k-way merge over one current batch
//! per file), so memory is bounded by `batch_size` × files and never by the archive, and the
//! stream is in time order across files as well as within them. (With an index time, which
//! has no meaning across files, the files play one after another in name order.) A file
//! whose columns do not match the schema is reported as [`SourceEvent::Unreadable`] and
//! skipped. Replay can be paced at a fixed row rate, or at a speed-up factor over event
//! time, or run flat out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, interleave_record_batch};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{RowOrigin, SourceEvent};
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
        .first()
        .copied()
        .flatten()
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

/// One open file in the merge: its reader and its current batch, already in the canonical
/// column order and types.
struct Cursor {
    origin: Arc<str>,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    batch: RecordBatch,
    times: Vec<i64>,
    pos: usize,
    /// Row index in the file of `batch`'s first row.
    base: u64,
    /// Rows in the file (from its footer).
    rows: u64,
}

/// The columns every emitted batch has, in this order and with these types (those of the
/// first readable file), so that rows of different files can be interleaved.
struct Canonical {
    names: Vec<String>,
    schema: Option<arrow::datatypes::SchemaRef>,
    time: String,
}

impl Canonical {
    /// Projects and casts a file's batch to the canonical layout.
    fn conform(&mut self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        let src = batch.schema();
        let cols: Vec<Arc<dyn Array>> = self
            .names
            .iter()
            .map(|n| {
                batch
                    .column_by_name(n)
                    .cloned()
                    .ok_or_else(|| format!("missing_column:{n}"))
            })
            .collect::<Result<_, _>>()?;
        let schema = self.schema.get_or_insert_with(|| {
            let fields: Vec<arrow::datatypes::FieldRef> = self
                .names
                .iter()
                .map(|n| {
                    Arc::new(
                        src.field_with_name(n)
                            .expect("present")
                            .clone()
                            .with_nullable(true),
                    )
                })
                .collect();
            Arc::new(arrow::datatypes::Schema::new(fields))
        });
        let cols = cols
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c.clone())
                } else {
                    cast(c.as_ref(), f.data_type()).map_err(|_| format!("wrong_type:{}", f.name()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(schema.clone(), cols).map_err(|e| format!("wrong_type:{e}"))
    }

    fn times(&self, batch: &RecordBatch) -> Vec<i64> {
        let col = batch
            .column_by_name(&self.time)
            .expect("canonical time column");
        let raw = time_micros(col.as_ref());
        // A null time keeps its row in place: it sorts with the row before it (and is
        // dead-lettered downstream).
        let mut last = i64::MIN;
        raw.into_iter()
            .map(|t| {
                last = t.unwrap_or(last);
                last
            })
            .collect()
    }
}

/// A time column as i64 per row (microseconds for timestamps), `None` where null.
fn time_micros(col: &dyn Array) -> Vec<Option<i64>> {
    let c = match col.data_type() {
        DataType::Timestamp(_, tz) => {
            cast(col, &DataType::Timestamp(TimeUnit::Microsecond, tz.clone())).ok()
        }
        _ => cast(col, &DataType::Int64).ok(),
    };
    match c.and_then(|c| cast(c.as_ref(), &DataType::Int64).ok()) {
        Some(c) => c.as_primitive::<Int64Type>().iter().collect(),
        None => vec![None; col.len()],
    }
}

impl Cursor {
    /// Rows not yet emitted (what a failure now would lose, and so must dead-letter).
    fn remaining(&self) -> u64 {
        self.rows.saturating_sub(self.base + self.pos as u64)
    }

    /// Loads the next batch once the current one is used up; false at the end of the file.
    fn refill(&mut self, canon: &mut Canonical) -> Result<bool, (String, String)> {
        if self.pos < self.batch.num_rows() {
            return Ok(true);
        }
        loop {
            self.base += self.batch.num_rows() as u64;
            self.pos = 0;
            self.batch = RecordBatch::new_empty(self.batch.schema());
            match self.reader.next() {
                None => return Ok(false),
                Some(Err(e)) => {
                    return Err(("unreadable_file".into(), format!("{}: {e}", self.origin)));
                }
                Some(Ok(b)) => {
                    let b = canon.conform(&b).map_err(|r| {
                        (
                            r.clone(),
                            format!("{}: cannot conform a batch: {r}", self.origin),
                        )
                    })?;
                    if b.num_rows() == 0 {
                        continue;
                    }
                    self.times = canon.times(&b);
                    self.batch = b;
                    return Ok(true);
                }
            }
        }
    }
}

/// Replays the files into `tx` until done or shut down. Runs on a blocking thread.
///
/// All readable files are open at once and merged row by row on event time (a k-way merge
/// over one current batch per file), so the stream is in time order across files too; a
/// schema with an index time replays its files one after another.
pub fn replay(
    cfg: &ParquetSourceConfig,
    schema: &Schema,
    files: &[PathBuf],
    tx: mpsc::Sender<SourceEvent>,
    shutdown: &Shutdown,
) -> Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    let wanted = schema.read_columns();
    let mut canon = Canonical {
        names: wanted.clone(),
        schema: None,
        time: schema.time.column.clone(),
    };
    let mut cursors: Vec<Cursor> = Vec::new();
    let unreadable = |tx: &mpsc::Sender<SourceEvent>,
                      stats: &mut ReplayStats,
                      origin: Arc<str>,
                      rows: u64,
                      reason: String,
                      detail: String| {
        tracing::warn!(file = %origin, %reason, %detail, rows, "input does not match the schema; its rows are dead-lettered");
        stats.unreadable_rows += rows;
        tx.blocking_send(SourceEvent::Unreadable {
            origin,
            rows,
            reason,
            detail,
        })
        .is_ok()
    };
    for file in files {
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
            if !unreadable(&tx, &mut stats, origin, rows, reason, detail) {
                return Ok(stats);
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
        cursors.push(Cursor {
            origin,
            reader,
            batch: RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty())),
            times: Vec::new(),
            pos: 0,
            base: 0,
            rows,
        });
    }
    // Files of an index-time schema play one after another: merge only within timestamps.
    let sequential = schema.time.kind == TimeKind::Index;
    let start = Instant::now();
    let mut t0: Option<i64> = None;
    let mut active: Vec<usize> = Vec::new();
    for (i, cursor) in cursors.iter_mut().enumerate() {
        match cursor.refill(&mut canon) {
            Ok(true) => active.push(i),
            Ok(false) => {}
            Err((reason, detail)) => {
                let lost = cursor.remaining();
                if !unreadable(&tx, &mut stats, cursor.origin.clone(), lost, reason, detail) {
                    return Ok(stats);
                }
            }
        }
    }
    while !active.is_empty() && !shutdown.is_triggered() {
        let want = match cfg.max_rows {
            Some(max) if stats.rows >= max => break,
            Some(max) => (max - stats.rows).min(cfg.batch_size as u64) as usize,
            None => cfg.batch_size,
        };
        // Take rows in event-time order: always the earliest current row among the files,
        // until the batch is full or one file's batch runs out (it is refilled after the emit).
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(want);
        let mut origins = Vec::with_capacity(want);
        let mut exhausted = None;
        while picks.len() < want {
            let slot = if sequential {
                0
            } else {
                (0..active.len())
                    .min_by_key(|&k| {
                        let c = &cursors[active[k]];
                        c.times[c.pos]
                    })
                    .expect("non-empty")
            };
            let cur = &mut cursors[active[slot]];
            picks.push((active[slot], cur.pos));
            origins.push(RowOrigin {
                source: cur.origin.clone(),
                index: cur.base + cur.pos as u64,
            });
            cur.pos += 1;
            if cur.pos >= cur.batch.num_rows() {
                exhausted = Some(slot);
                break;
            }
        }
        let refs: Vec<&RecordBatch> = cursors.iter().map(|c| &c.batch).collect();
        let batch = interleave_record_batch(&refs, &picks)?;
        if let Some(p) = &cfg.pace {
            pace(p, &batch, schema, start, stats.rows, &mut t0);
        }
        stats.rows += batch.num_rows() as u64;
        if tx
            .blocking_send(SourceEvent::Batch {
                batch,
                origins,
                ack: None,
            })
            .is_err()
        {
            return Ok(stats);
        }
        if let Some(slot) = exhausted {
            let c = active[slot];
            match cursors[c].refill(&mut canon) {
                Ok(true) => {}
                Ok(false) => {
                    active.remove(slot);
                }
                Err((reason, detail)) => {
                    active.remove(slot);
                    let (o, lost) = (cursors[c].origin.clone(), cursors[c].remaining());
                    if !unreadable(&tx, &mut stats, o, lost, reason, detail) {
                        return Ok(stats);
                    }
                }
            }
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
        let Some(first) = time_micros(col.as_ref()).into_iter().flatten().next() else {
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
