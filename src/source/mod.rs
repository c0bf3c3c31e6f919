//! Sources: where samples come from, as a stream of Arrow record batches.
//!
//! A source runs on its own thread and pushes [`SourceEvent`]s into a bounded channel: when
//! the learner falls behind the channel fills and the source blocks (backpressure), so memory
//! stays at `channels.batches` × `batch_size` rows whatever the archive's size. Parquet
//! archives are the offline replay source, Kafka consumer groups the live one.

pub mod kafka;
pub mod parquet;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::schema::Schema;
use crate::shutdown::Shutdown;
use crate::validate::OutOfRange;

/// `[source.inject]`: from the `from_row`-th row the pipeline reads (0-based, every row
/// counted, good or bad), `column` reads as v·scale + shift: a known change point, so a test
/// or an experiment can measure how fast drift is detected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    pub column: String,
    pub from_row: u64,
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub shift: f64,
}

fn one() -> f64 {
    1.0
}

/// `[source]`: which source and its settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Parquet(parquet::ParquetSourceConfig),
    Kafka(kafka::KafkaSourceConfig),
}

impl SourceConfig {
    /// The source kind, as a metric label.
    pub fn kind_name(&self) -> &'static str {
        match self {
            SourceConfig::Parquet(_) => "parquet",
            SourceConfig::Kafka(_) => "kafka",
        }
    }

    /// The drift to inject, if any.
    pub fn injection(&self) -> Option<&Injection> {
        match self {
            SourceConfig::Parquet(p) => p.inject.as_ref(),
            SourceConfig::Kafka(k) => k.inject.as_ref(),
        }
    }

    /// Makes relative paths relative to the pipeline file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        match self {
            SourceConfig::Parquet(p) => p.resolve_paths(base),
            SourceConfig::Kafka(_) => {}
        }
    }

    /// `Err((key, expected, found))` for an out-of-range setting.
    pub fn validate(&self) -> Result<(), (String, String, String)> {
        match self {
            SourceConfig::Parquet(p) => p.validate(),
            SourceConfig::Kafka(k) => k.validate(),
        }
    }

    /// Starts the source on a blocking thread: the one way a source starts.
    pub fn spawn(&self, ctx: SourceContext) -> Result<RunningSource> {
        match self {
            SourceConfig::Parquet(p) => p.spawn(ctx),
            SourceConfig::Kafka(k) => k.spawn(ctx),
        }
    }
}

/// What a source is given to run (built by the pipeline's wiring).
pub struct SourceContext {
    pub pipeline: String,
    pub schema: Arc<Schema>,
    /// To the learner; bounded (backpressure).
    pub tx: EventSender,
    /// From the learner: batches processed, positions durable (feeds commit them).
    pub acks: std::sync::mpsc::Receiver<Ack>,
    /// Per source, the next position the checkpoint being resumed covers.
    pub covered: HashMap<Arc<str>, u64>,
    /// Per archive file, the fingerprint that checkpoint recorded, and where it is.
    pub checkpoint_files: BTreeMap<String, String>,
    pub checkpoint_path: PathBuf,
    /// What the row checks do with a value outside its physical range.
    pub out_of_range: OutOfRange,
    pub shutdown: Shutdown,
}

/// A started source.
pub struct RunningSource {
    /// Ends with (rows read, redelivered rows skipped).
    pub task: tokio::task::JoinHandle<Result<(u64, u64)>>,
    /// Rows it will read, when known (for the progress bar).
    pub total_rows: Option<u64>,
    /// Fingerprints of the archive files it reads, kept in every checkpoint.
    pub files: BTreeMap<String, String>,
}

/// What a source emits.
#[derive(Debug)]
pub enum SourceEvent {
    /// Rows in time order, with where each came from, and what to acknowledge to the
    /// source once every row of the batch has been processed (feeds commit it).
    Batch {
        batch: RecordBatch,
        origins: Vec<RowOrigin>,
        ack: Option<Vec<RowOrigin>>,
    },
    Unreadable(Unreadable),
}

/// Input that cannot be read as the schema says (a file, a row group, a message): its rows,
/// `first_row..first_row + rows` of `origin` (`rows` 0: a file without a readable footer, count
/// unknown), are counted and dead-lettered under `reason`, and the source goes on with the next.
#[derive(Debug)]
pub struct Unreadable {
    pub origin: Arc<str>,
    pub first_row: u64,
    pub rows: u64,
    pub reason: String,
    pub detail: String,
    /// A feed's message that the batch after it acknowledges: its position moves with that
    /// batch, not before it (a checkpoint between the two would otherwise cover the good
    /// messages of the batch before they are learnt). A file's lost rows move it at once.
    pub acked_by_batch: bool,
}

/// What the learner tells a feed source.
#[derive(Debug)]
pub enum Ack {
    /// One handed-over batch is fully processed (flow control, and a clean stop waits for it).
    Processed,
    /// Per source, the next position not needed again: covered by a checkpoint on disk (or
    /// simply processed, when checkpoints are off). A feed commits these.
    Commit(Vec<(Arc<str>, u64)>),
}

/// Where one row came from: a file and its row index (a topic partition and offset for a
/// feed), so a dead letter can point back at it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowOrigin {
    pub source: Arc<str>,
    pub index: u64,
}

/// The source's end of the channel to the learner, timing how long each send waits (a full
/// channel is the learner's backpressure); it also carries the stage counters the source
/// thread adds its CPU time to ([`EventSender::times`]).
// Not `Clone` on purpose: see `times`.
pub struct EventSender {
    tx: mpsc::Sender<SourceEvent>,
    time: std::sync::Arc<crate::stage_time::StageTimes>,
}

impl EventSender {
    pub fn new(
        tx: mpsc::Sender<SourceEvent>,
        time: std::sync::Arc<crate::stage_time::StageTimes>,
    ) -> Self {
        EventSender { tx, time }
    }

    /// Sends one event, waiting while the channel is full; `Err` when the learner is gone.
    pub fn blocking_send(
        &self,
        ev: SourceEvent,
    ) -> Result<(), mpsc::error::SendError<SourceEvent>> {
        self.time.source.waiting(|| self.tx.blocking_send(ev))
    }

    /// The stage counters, for timing the source's thread. Not a clone of the sender: a
    /// second sender alive while the source drains would keep the learner waiting for the
    /// channel to close, and a Kafka source's drain waits for the learner (a deadlock that
    /// only the drain's time limit ends).
    pub fn times(&self) -> std::sync::Arc<crate::stage_time::StageTimes> {
        self.time.clone()
    }
}
