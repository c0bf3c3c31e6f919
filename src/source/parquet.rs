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

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, interleave_record_batch};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use serde::{Deserialize, Serialize};

use super::{RowOrigin, RunningSource, SourceContext, SourceEvent, Unreadable};
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
    /// A drift injected into the rows read (tests and experiments).
    #[serde(default)]
    pub inject: Option<super::Injection>,
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
        // One spelling per file (`pipelines/../data/x` and `/abs/data/x` are one file): a
        // checkpoint's positions are keyed by it.
        for f in &mut files {
            if let Ok(c) = std::fs::canonicalize(&*f) {
                *f = c;
            }
        }
        files.sort();
        files.dedup();
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

impl ParquetSourceConfig {
    pub(super) fn spawn(&self, ctx: SourceContext) -> Result<RunningSource> {
        let files = self.files(&ctx.schema)?;
        let fingerprints = same_files(&files, &ctx.checkpoint_files, &ctx.checkpoint_path)?;
        let total = self.max_rows.unwrap_or(u64::MAX).min(total_rows(&files));
        tracing::info!(pipeline = %ctx.pipeline, files = files.len(), rows = total, "replaying");
        let cfg = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let times = ctx.tx.times();
            times
                .source
                .on_thread(|| {
                    replay(
                        &cfg,
                        &ctx.schema,
                        &files,
                        ctx.covered,
                        ctx.tx,
                        &ctx.shutdown,
                    )
                })
                .map(|s| (s.rows, 0))
        });
        Ok(RunningSource {
            task,
            total_rows: Some(total),
            files: fingerprints,
        })
    }
}

/// Each file's fingerprint, refusing a file that changed since the checkpoint being resumed
/// recorded it (its covered rows would point into other data).
fn same_files(
    files: &[PathBuf],
    recorded: &std::collections::BTreeMap<String, String>,
    ckpt_path: &Path,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for f in files {
        let name = f.to_string_lossy().into_owned();
        let Some(fp) = fingerprint(f) else {
            continue;
        };
        if let Some(old) = recorded.get(&name)
            && *old != fp
        {
            bail!(
                "{name} changed since the checkpoint {} was written (size:footer CRC {old}, now {fp}): \
                 its covered rows would point into other data; delete the checkpoint, or restore the file",
                ckpt_path.display()
            );
        }
        out.insert(name, fp);
    }
    Ok(out)
}

/// What identifies a file's content for a resume: its size and a CRC-32 of its Parquet
/// footer (the schema, row groups and their statistics), without reading the data pages.
/// `None` when the file cannot be read.
pub fn fingerprint(file: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(file).ok()?;
    let size = f.metadata().ok()?.len();
    let tail = size.min(8);
    f.seek(SeekFrom::End(-(tail as i64))).ok()?;
    let mut end = vec![0u8; tail as usize];
    f.read_exact(&mut end).ok()?;
    let footer = if tail == 8 && &end[4..] == b"PAR1" {
        u32::from_le_bytes(end[..4].try_into().ok()?) as u64 + 8
    } else {
        tail
    };
    let footer = footer.min(size);
    f.seek(SeekFrom::End(-(footer as i64))).ok()?;
    let mut bytes = vec![0u8; footer as usize];
    f.read_exact(&mut bytes).ok()?;
    Some(format!("{size}:{:08x}", crc32fast::hash(&bytes)))
}

/// Totals of a replay.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReplayStats {
    pub files: u64,
    pub rows: u64,
    pub unreadable_rows: u64,
    /// Files, row groups or batches that could not be read (a file without a footer has no
    /// row count).
    pub unreadable_parts: u64,
}

/// Total rows of the files (from Parquet footers), for progress display.
pub fn total_rows(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| ParquetRecordBatchReaderBuilder::try_new(File::open(f).ok()?).ok())
        .map(|b| b.metadata().file_metadata().num_rows() as u64)
        .sum()
}

/// Rows of a file that cannot be read: from `first_row`, `rows` of them (0: unknown).
struct Lost {
    first_row: u64,
    rows: u64,
    reason: String,
    detail: String,
}

/// One open file in the merge: its current row group's reader and its current batch, already
/// in the canonical column order and types. Row groups are read one reader each, so that a
/// corrupt one loses its own rows only.
struct Cursor {
    origin: Arc<str>,
    file: PathBuf,
    meta: ArrowReaderMetadata,
    mask: ProjectionMask,
    batch_size: usize,
    reader: Option<ParquetRecordBatchReader>,
    /// Row index in the file where each row group ends.
    group_ends: Vec<u64>,
    next_group: usize,
    batch: RecordBatch,
    times: Vec<i64>,
    pos: usize,
    /// Row index in the file of `batch`'s first row.
    base: u64,
    /// Rows in the file (from its footer).
    rows: u64,
    /// Rows a resumed checkpoint covers (released unpaced: the learner skips them).
    covered: u64,
    /// Unreadable ranges met by the last [`Cursor::refill`], to dead-letter.
    lost: Vec<Lost>,
}

/// The columns every emitted batch has, in this order and with these types, so that rows of
/// different files can be interleaved. Numeric, key and class columns take the schema's
/// widest type (int → Int64, float → Float64, string → Utf8), whatever the first file
/// holds; time and list columns take the first readable file's type. A file's column is
/// cast only when no value changes: otherwise its rows are dead-lettered (`lossy_cast`).
struct Canonical {
    names: Vec<String>,
    /// The schema's type per name, where it fixes one.
    fixed: Vec<Option<DataType>>,
    schema: Option<arrow::datatypes::SchemaRef>,
    time: String,
}

/// Integers from −2⁵³ to 2⁵³ are exactly representable as f64.
const EXACT_F64_INT: i64 = 1 << 53;

impl Canonical {
    fn new(schema: &Schema, names: Vec<String>) -> Self {
        use crate::schema::ColumnType as T;
        let fixed = names
            .iter()
            .map(|n| match schema.columns.get(n).map(|c| c.ty) {
                Some(T::Int) if *n != schema.time.column => Some(DataType::Int64),
                Some(T::Float) => Some(DataType::Float64),
                Some(T::String) => Some(DataType::Utf8),
                _ => None,
            })
            .collect();
        Canonical {
            names,
            fixed,
            schema: None,
            time: schema.time.column.clone(),
        }
    }

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
                .zip(&self.fixed)
                .map(|(n, fixed)| {
                    let f = src.field_with_name(n).expect("present");
                    let dt = fixed.clone().unwrap_or_else(|| f.data_type().clone());
                    Arc::new(arrow::datatypes::Field::new(n, dt, true))
                })
                .collect();
            Arc::new(arrow::datatypes::Schema::new(fields))
        });
        let cols = cols
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| lossless_cast(c, f.data_type(), f.name()))
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

/// `col` as `to`, or `lossy_cast:<name>` when a value would change: an overflow, a float
/// becoming an integer, an integer beyond 2⁵³ becoming a float, or a value becoming null.
fn lossless_cast(
    col: &Arc<dyn Array>,
    to: &DataType,
    name: &str,
) -> Result<Arc<dyn Array>, String> {
    if col.data_type() == to {
        return Ok(col.clone());
    }
    let lossy = || format!("lossy_cast:{name}");
    let from = col.data_type();
    if from.is_floating() && to.is_integer() {
        return Err(lossy());
    }
    if from.is_integer() && to.is_floating() {
        let as_i64 = cast(col.as_ref(), &DataType::Int64).map_err(|_| lossy())?;
        let exact = as_i64
            .as_primitive::<Int64Type>()
            .iter()
            .flatten()
            .all(|v| (-EXACT_F64_INT..=EXACT_F64_INT).contains(&v));
        if !exact || as_i64.null_count() != col.null_count() {
            return Err(lossy());
        }
    }
    let opts = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    let out = arrow::compute::cast_with_options(col.as_ref(), to, &opts).map_err(|_| {
        if arrow::compute::can_cast_types(from, to) {
            lossy()
        } else {
            format!("wrong_type:{name}")
        }
    })?;
    if out.null_count() != col.null_count() {
        return Err(lossy());
    }
    Ok(out)
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
    /// Opens a file for the merge; `Err` when it is not a Parquet file at all (no footer).
    fn open(file: &Path, wanted: &[String], batch_size: usize) -> Result<Self, String> {
        let f = File::open(file).map_err(|e| format!("cannot open: {e}"))?;
        let meta = ArrowReaderMetadata::load(&f, Default::default())
            .map_err(|e| format!("not a readable Parquet file: {e}"))?;
        let roots: Vec<usize> = wanted
            .iter()
            .filter_map(|c| meta.schema().index_of(c).ok())
            .collect();
        let mask = ProjectionMask::roots(meta.parquet_schema(), roots);
        let group_ends = meta
            .metadata()
            .row_groups()
            .iter()
            .scan(0u64, |end, g| {
                *end += g.num_rows().max(0) as u64;
                Some(*end)
            })
            .collect();
        Ok(Cursor {
            origin: Arc::from(file.to_string_lossy().as_ref()),
            file: file.to_path_buf(),
            rows: meta.metadata().file_metadata().num_rows().max(0) as u64,
            meta,
            mask,
            batch_size,
            reader: None,
            group_ends,
            next_group: 0,
            batch: RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty())),
            times: Vec::new(),
            pos: 0,
            base: 0,
            covered: 0,
            lost: Vec::new(),
        })
    }

    /// A reader over the next row group, positioned at its first row.
    fn open_group(&mut self) -> Result<(), Lost> {
        let g = self.next_group;
        self.next_group += 1;
        self.base = if g == 0 { 0 } else { self.group_ends[g - 1] };
        let end = self.group_ends[g];
        let reader = File::open(&self.file)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                ParquetRecordBatchReaderBuilder::new_with_metadata(f, self.meta.clone())
                    .with_projection(self.mask.clone())
                    .with_batch_size(self.batch_size)
                    .with_row_groups(vec![g])
                    .build()
                    .map_err(|e| e.to_string())
            });
        match reader {
            Ok(r) => {
                self.reader = Some(r);
                Ok(())
            }
            Err(e) => Err(self.lost_group(g, end, &e)),
        }
    }

    /// The rest of row group `g` (from `base` to `end`) cannot be read.
    fn lost_group(&mut self, g: usize, end: u64, error: &str) -> Lost {
        let first_row = self.base + self.pos as u64;
        self.reader = None;
        self.base = end;
        self.pos = 0;
        Lost {
            first_row,
            rows: end - first_row,
            reason: "unreadable_file".into(),
            detail: format!(
                "{}: row group {g} (rows {first_row}..{end}) cannot be read: {error}",
                self.origin
            ),
        }
    }

    /// Loads the next batch once the current one is used up; false at the end of the file.
    /// Unreadable row groups are skipped and recorded in `lost`; a batch with a value its cast
    /// would change is lost alone, and a column of another type loses the rest of the file.
    fn refill(&mut self, canon: &mut Canonical) -> bool {
        if self.pos < self.batch.num_rows() {
            return true;
        }
        loop {
            self.base += self.batch.num_rows() as u64;
            self.pos = 0;
            self.batch = RecordBatch::new_empty(self.batch.schema());
            if self.reader.is_none() {
                if self.next_group >= self.group_ends.len() {
                    return false;
                }
                if let Err(lost) = self.open_group() {
                    self.lost.push(lost);
                    continue;
                }
            }
            let next = self.reader.as_mut().expect("opened above").next();
            match next {
                None => self.reader = None,
                Some(Err(e)) => {
                    let g = self.next_group - 1;
                    let lost = self.lost_group(g, self.group_ends[g], &e.to_string());
                    self.lost.push(lost);
                }
                Some(Ok(b)) => match canon.conform(&b) {
                    // A value that would change in the cast (an integer beyond 2⁵³, an
                    // overflow) loses its batch; the next batches may hold none.
                    Err(r) if r.starts_with("lossy_cast:") => {
                        let rows = b.num_rows() as u64;
                        let (first, end) = (self.base, self.base + rows);
                        self.lost.push(Lost {
                            first_row: first,
                            rows,
                            detail: format!(
                                "{}: rows {first}..{end}: a value would change in the cast: {r}",
                                self.origin
                            ),
                            reason: r,
                        });
                        self.base = end;
                    }
                    // A column of another type loses the rest of the file: every batch
                    // would fail alike.
                    Err(r) => {
                        self.lost.push(Lost {
                            first_row: self.base,
                            rows: self.rows.saturating_sub(self.base),
                            detail: format!("{}: cannot conform a batch: {r}", self.origin),
                            reason: r,
                        });
                        self.next_group = self.group_ends.len();
                        self.reader = None;
                        return false;
                    }
                    Ok(b) if b.num_rows() == 0 => {}
                    Ok(b) => {
                        self.times = canon.times(&b);
                        self.batch = b;
                        return true;
                    }
                },
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
    covered: HashMap<Arc<str>, u64>,
    tx: super::EventSender,
    shutdown: &Shutdown,
) -> Result<ReplayStats> {
    let mut r = Replay {
        covered,
        unpaced: 0,
        cfg,
        schema,
        wanted: schema.read_columns(),
        canon: Canonical::new(schema, schema.read_columns()),
        cursors: Vec::new(),
        active: Vec::new(),
        pacer: cfg.pace.clone().map(|pace| Pacer {
            pace,
            start: None,
            t0: None,
        }),
        tx,
        stats: ReplayStats::default(),
    };
    if r.open(files) && r.start() {
        r.run(shutdown)?;
    }
    Ok(r.stats)
}

/// A replay's state: a cursor per readable file, the ones that still hold rows, the pacer.
/// Every method that talks to the learner returns false once the learner has gone.
struct Replay<'a> {
    /// Per file, the rows the checkpoint being resumed covers (each cursor takes its own
    /// at open): released unpaced, and the pace starts at the first row after them.
    covered: HashMap<Arc<str>, u64>,
    /// Covered rows released so far.
    unpaced: u64,
    cfg: &'a ParquetSourceConfig,
    schema: &'a Schema,
    wanted: Vec<String>,
    canon: Canonical,
    cursors: Vec<Cursor>,
    /// Indices of the cursors holding a non-empty batch.
    active: Vec<usize>,
    pacer: Option<Pacer>,
    tx: super::EventSender,
    stats: ReplayStats,
}

/// Rows picked for one emitted batch: (index into `active`, row) each, their origins, and
/// the `active` slot whose batch ran out.
struct Picks {
    rows: Vec<(usize, usize)>,
    origins: Vec<RowOrigin>,
    exhausted: Option<usize>,
}

impl Replay<'_> {
    /// Dead-letters what a file or a row group lost.
    fn unreadable(&mut self, origin: &Arc<str>, lost: Lost) -> bool {
        tracing::warn!(file = %origin, reason = %lost.reason, detail = %lost.detail, first_row = lost.first_row, rows = lost.rows, "input cannot be read as the schema says; its rows are dead-lettered");
        self.stats.unreadable_rows += lost.rows;
        self.stats.unreadable_parts += 1;
        self.tx
            .blocking_send(SourceEvent::Unreadable(Unreadable {
                origin: origin.clone(),
                first_row: lost.first_row,
                rows: lost.rows,
                reason: lost.reason,
                detail: lost.detail,
                acked_by_batch: false,
            }))
            .is_ok()
    }

    /// Opens every file; one that cannot be read, or lacks a column or has it in the wrong
    /// type, is dead-lettered whole and the others go on.
    fn open(&mut self, files: &[PathBuf]) -> bool {
        for file in files {
            self.stats.files += 1;
            let cursor = match Cursor::open(file, &self.wanted, self.cfg.batch_size) {
                Ok(c) => c,
                Err(e) => {
                    // No footer: the row count is unknown (0 in the letter).
                    let origin: Arc<str> = Arc::from(file.to_string_lossy().as_ref());
                    let lost = Lost {
                        first_row: 0,
                        rows: 0,
                        reason: "unreadable_file".into(),
                        detail: format!("{}: {e}", file.display()),
                    };
                    if !self.unreadable(&origin, lost) {
                        return false;
                    }
                    continue;
                }
            };
            match self.column_problems(&cursor) {
                Some(lost) => {
                    if !self.unreadable(&cursor.origin, lost) {
                        return false;
                    }
                }
                None => {
                    let mut cursor = cursor;
                    cursor.covered = self.covered.get(&cursor.origin).copied().unwrap_or(0);
                    self.cursors.push(cursor);
                }
            }
        }
        true
    }

    /// The whole file's letter when a column it must have is missing or of the wrong type.
    fn column_problems(&self, cursor: &Cursor) -> Option<Lost> {
        let problems: Vec<(String, String)> = self
            .schema
            .mismatches(cursor.meta.schema())
            .into_iter()
            .filter(|(c, _)| self.wanted.contains(c))
            .collect();
        let (col, what) = problems.first()?;
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
        Some(Lost {
            first_row: 0,
            rows: cursor.rows,
            reason,
            detail,
        })
    }

    /// Refills cursor `i` and dead-letters what it lost: (has rows, learner still there).
    fn refill(&mut self, i: usize) -> (bool, bool) {
        let more = self.cursors[i].refill(&mut self.canon);
        let origin = self.cursors[i].origin.clone();
        for lost in std::mem::take(&mut self.cursors[i].lost) {
            if !self.unreadable(&origin, lost) {
                return (more, false);
            }
        }
        (more, true)
    }

    /// Loads every cursor's first batch.
    fn start(&mut self) -> bool {
        for i in 0..self.cursors.len() {
            match self.refill(i) {
                (_, false) => return false,
                (true, true) => self.active.push(i),
                (false, true) => {}
            }
        }
        true
    }

    fn run(&mut self, shutdown: &Shutdown) -> Result<()> {
        while !self.active.is_empty() && !shutdown.is_triggered() {
            let want = match self.cfg.max_rows {
                Some(max) if self.stats.rows >= max => break,
                Some(max) => (max - self.stats.rows).min(self.cfg.batch_size as u64) as usize,
                None => self.cfg.batch_size,
            };
            let Some(picks) = self.pick(want, shutdown) else {
                return Ok(());
            };
            let refs: Vec<&RecordBatch> = self
                .active
                .iter()
                .map(|&i| &self.cursors[i].batch)
                .collect();
            let batch = interleave_record_batch(&refs, &picks.rows)?;
            self.stats.rows += batch.num_rows() as u64;
            let ev = SourceEvent::Batch {
                batch,
                origins: picks.origins,
                ack: None,
            };
            if self.tx.blocking_send(ev).is_err() {
                return Ok(());
            }
            if let Some(slot) = picks.exhausted {
                match self.refill(self.active[slot]) {
                    (_, false) => return Ok(()),
                    (true, true) => {}
                    (false, true) => {
                        self.active.remove(slot);
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes up to `want` rows in event-time order: always the earliest current row among
    /// the files (files of an index-time schema play one after another), until the batch is
    /// full, a file's batch runs out (it is refilled after the emit), or, paced, the next row
    /// is not due yet. None when a shutdown interrupted a pacing sleep.
    fn pick(&mut self, want: usize, shutdown: &Shutdown) -> Option<Picks> {
        let sequential = self.schema.time.kind == TimeKind::Index;
        let mut p = Picks {
            rows: Vec::with_capacity(want),
            origins: Vec::with_capacity(want),
            exhausted: None,
        };
        while p.rows.len() < want {
            let slot = if sequential {
                0
            } else {
                (0..self.active.len())
                    .min_by_key(|&k| {
                        let c = &self.cursors[self.active[k]];
                        c.times[c.pos]
                    })
                    .expect("non-empty")
            };
            let c = &self.cursors[self.active[slot]];
            if c.base + (c.pos as u64) < c.covered {
                self.unpaced += 1;
            } else if let Some(pacer) = self.pacer.as_mut() {
                let row = self.stats.rows + p.rows.len() as u64 - self.unpaced;
                let due = pacer.due(row, c.times[c.pos]);
                let now = pacer.elapsed();
                if due > now {
                    if !p.rows.is_empty() {
                        break; // emit the rows already due
                    }
                    if !shutdown.sleep(due - now) {
                        return None;
                    }
                }
            }
            let cur = &mut self.cursors[self.active[slot]];
            p.rows.push((slot, cur.pos));
            p.origins.push(RowOrigin {
                source: cur.origin.clone(),
                index: cur.base + cur.pos as u64,
            });
            cur.pos += 1;
            if cur.pos >= cur.batch.num_rows() {
                p.exhausted = Some(slot);
                break;
            }
        }
        Some(p)
    }
}

/// When each row is due under a [`Pace`]: row by row, so a slow pace releases rows one at a
/// time as they fall due, never a whole batch at once.
struct Pacer {
    pace: Pace,
    /// When the first paced row came (after a resume's covered rows, which are not paced).
    start: Option<Instant>,
    /// Event time of the first row (speed-up pacing).
    t0: Option<i64>,
}

impl Pacer {
    /// Wall time since the first paced row.
    fn elapsed(&self) -> Duration {
        self.start.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Wall time since the start at which row number `row` (event time `time`, µs) is due.
    fn due(&mut self, row: u64, time: i64) -> Duration {
        self.start.get_or_insert_with(Instant::now);
        if let Some(rate) = self.pace.rows_per_second {
            Duration::from_secs_f64(row as f64 / rate)
        } else if let Some(speedup) = self.pace.speedup {
            let base = *self.t0.get_or_insert(time);
            Duration::from_secs_f64(((time - base).max(0) as f64 / 1e6) / speedup)
        } else {
            Duration::ZERO
        }
    }
}
