//! Sources: where samples come from, as a stream of Arrow record batches.
//!
//! A source runs on its own thread and pushes [`SourceEvent`]s into a bounded channel: when
//! the learner falls behind the channel fills and the source blocks (backpressure), so memory
//! stays at `channels.batches` × `batch_size` rows whatever the archive's size. Parquet
//! archives are the offline replay source, Kafka consumer groups the live one.

pub mod kafka;
pub mod parquet;

use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};

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
    /// Input that cannot be read as the schema says (a file, a row group, a message): its
    /// rows, `first_row..first_row + rows` of `origin` (`rows` 0: a file without a readable
    /// footer, count unknown), are counted and dead-lettered under `reason`, and the source
    /// goes on with the next.
    Unreadable {
        origin: Arc<str>,
        first_row: u64,
        rows: u64,
        reason: String,
        detail: String,
    },
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
#[derive(Debug, Clone)]
pub struct RowOrigin {
    pub source: Arc<str>,
    pub index: u64,
}
