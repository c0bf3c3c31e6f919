//! Live network feeds: a Kafka consumer group, JSON messages decoded by the schema.
//!
//! The consumer runs on its own thread: it polls up to `batch_size` messages (or waits at
//! most `batch_timeout_ms`), decodes them into one record batch and hands it to the learner
//! through the bounded channel (backpressure: a slow learner stops the polling, and Kafka
//! keeps the rest). A message that cannot be decoded is sent, with its original key, value
//! and headers naming the reason and its topic, partition and offset, to the dead-letter
//! topic, and counted. Offsets are committed only for messages the learner has finished
//! with (it acknowledges each batch), so a crash replays what was not processed: at least
//! once. Any librdkafka option (security.protocol, sasl.*, ssl.*, …) passes through
//! `[source.options]`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;

use crate::producer::DeliveryCount;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{Ack, RowOrigin, RunningSource, SourceContext, SourceEvent, Unreadable};
use crate::decode::{BatchError, Decoder, JsonDecoder};
use crate::schema::Schema;
use crate::shutdown::Shutdown;
use crate::telemetry;
use crate::validate::RowCheck;

/// `[source]` with `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// bootstrap.servers
    pub brokers: String,
    /// A drift injected into the rows read (tests and experiments).
    #[serde(default)]
    pub inject: Option<super::Injection>,
    pub topics: Vec<String>,
    /// The consumer group; instances sharing it split the partitions.
    pub group_id: String,
    /// This instance's static member id in the group (`group.instance.id`, KIP-345), e.g.
    /// the pod or host name: a restarted instance takes its partitions back at once instead
    /// of waiting for the broker to expire its old session.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Messages per record batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Longest wait for a batch to fill.
    #[serde(default = "default_timeout")]
    pub batch_timeout_ms: u64,
    /// Topic for messages that cannot be decoded (none: counted and logged only).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Payload format: "json" (default) or "avro" (see `payload.rs`).
    #[serde(default)]
    pub format: crate::payload::PayloadFormat,
    /// Largest payload accepted, bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Stop once every assigned partition has reached its end (replays and tests).
    #[serde(default)]
    pub stop_at_end: bool,
    /// A partition silent this long while the broker holds messages past its next offset is
    /// reported and sought back (see `StallWatch`).
    #[serde(default = "default_stall_after")]
    pub stall_after_ms: u64,
    /// Passed to librdkafka as they are.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_batch() -> usize {
    1024
}
fn default_timeout() -> u64 {
    100
}
fn default_stall_after() -> u64 {
    30_000
}
fn default_max_message() -> usize {
    64 * 1024
}

impl KafkaSourceConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String, String)> {
        if self.topics.is_empty() {
            return Err((
                "source.topics".into(),
                "at least one topic".into(),
                "[]".into(),
            ));
        }
        if self.stall_after_ms < 1000 {
            return Err((
                "source.stall_after_ms".into(),
                "at least 1000 ms (a shorter silence is normal between fetches)".into(),
                self.stall_after_ms.to_string(),
            ));
        }
        if self.batch_size == 0 {
            return Err((
                "source.batch_size".into(),
                "at least 1 message".into(),
                "0".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn spawn(&self, ctx: SourceContext) -> Result<RunningSource> {
        tracing::info!(pipeline = %ctx.pipeline, brokers = %self.brokers, topics = ?self.topics, group = %self.group_id, "consuming");
        let numeric = Decoder::new(ctx.schema.clone()).numeric_columns().to_vec();
        let check = RowCheck::new(ctx.schema.clone(), &numeric, ctx.out_of_range);
        let cfg = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let times = ctx.tx.times();
            times.source.on_thread(|| {
                consume(
                    &cfg,
                    ctx.schema,
                    ctx.tx,
                    ctx.acks,
                    ctx.covered,
                    &check,
                    &ctx.shutdown,
                )
            })
        });
        Ok(RunningSource {
            task,
            total_rows: None,
            files: Default::default(),
        })
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// The consumer's settings: the pipeline's options, our defaults where it sets none, and
    /// the group and offset settings the source's at-least-once delivery depends on.
    fn consumer_client(&self) -> ClientConfig {
        let mut client = self.client();
        if !self.options.contains_key("statistics.interval.ms") {
            // Lag per partition comes from librdkafka's statistics.
            client.set("statistics.interval.ms", "5000");
        }
        // Fewer, fuller fetches: the broker answers once it has 1 MB for us or after 100 ms.
        // Against a Tansu broker on the same 2 cores (`cargo bench --bench kafka`), 246-327 k
        // samples/s against 170-193 k with librdkafka's defaults (1 byte, 500 ms). A quiet
        // feed's rows wait at most those 100 ms more. And a full local queue pauses fetching
        // for 10 ms, not 1 s (see FETCH_DEFAULTS). Options set in the pipeline win.
        for (key, value) in FETCH_DEFAULTS {
            if !self.options.contains_key(*key) {
                client.set(*key, *value);
            }
        }
        if let Some(id) = &self.instance_id {
            client.set("group.instance.id", id);
        }
        client
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            // Offsets are stored and committed by us, for processed messages only.
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        client
    }

    /// The dead-letter producer's settings: the same options minus the consumer-only ones
    /// (librdkafka warns about those on a producer).
    fn producer_client(&self) -> ClientConfig {
        const CONSUMER_ONLY: &[&str] = &[
            "session.",
            "group.",
            "heartbeat.",
            "auto.",
            "enable.auto.",
            "fetch.",
            "max.poll.",
            "partition.assignment.",
            "isolation.level",
            "queued.",
            "check.crcs",
        ];
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            if !CONSUMER_ONLY.iter().any(|p| k.starts_with(p)) {
                c.set(k, v);
            }
        }
        c
    }
}

/// One polled message, kept until its batch is decoded (and dead-lettered if bad).
struct Polled {
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    /// The message's own headers, copied to its dead letter.
    headers: Vec<(String, Option<Vec<u8>>)>,
    origin: RowOrigin,
    topic: String,
    partition: i32,
    offset: i64,
}

impl Polled {
    /// The message, copied out of librdkafka's buffer.
    fn copy(
        names: &mut HashMap<(String, i32), Arc<str>>,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Polled {
        let source = names
            .entry((m.topic().to_string(), m.partition()))
            .or_insert_with(|| source_name(m.topic(), m.partition()))
            .clone();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Polled {
            value: m.payload().unwrap_or_default().to_vec(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            origin: RowOrigin {
                source,
                index: m.offset() as u64,
            },
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        }
    }
}

/// Runs the row checks on the decoded messages (the same checks the feature stage runs on
/// archive rows): a message that fails joins `bad`, to be dead-lettered here with the
/// original message and headers, and leaves the batch. Batch-level problems are left to
/// the learner, which reports them.
fn check_rows(
    dec: &Decoder,
    check: &RowCheck,
    batch: arrow::array::RecordBatch,
    good: Vec<usize>,
    mut bad: Vec<(usize, BatchError)>,
) -> (
    arrow::array::RecordBatch,
    Vec<usize>,
    Vec<(usize, BatchError)>,
) {
    let Ok(d) = dec.decode(&batch) else {
        return (batch, good, bad);
    };
    let mut vals = vec![0.0; dec.numeric_columns().len()];
    let keep: Vec<bool> = good
        .iter()
        .enumerate()
        .map(|(j, &i)| match check.row(&d, j, &mut vals) {
            Ok(_) => true,
            Err(r) => {
                let (reason, detail) = (r.label().into_owned(), check.detail(&d, j, &r));
                bad.push((i, BatchError { reason, detail }));
                false
            }
        })
        .collect();
    if keep.iter().all(|k| *k) {
        return (batch, good, bad);
    }
    let mask = arrow::array::BooleanArray::from(keep.clone());
    let batch =
        arrow::compute::filter_record_batch(&batch, &mask).expect("a mask as long as the batch");
    let good = good
        .into_iter()
        .zip(keep)
        .filter_map(|(i, k)| k.then_some(i))
        .collect();
    bad.sort_by_key(|(i, _)| *i);
    (batch, good, bad)
}

/// Seek-backs tried when a fetch begins past the committed offset, and the first step (the
/// step doubles each try: 512, 1,024, … 16,384 messages back).
const MAX_SEEK_BACKS: u32 = 6;
const BATCH_STEP: i64 = 512;

/// This member's view of its group: it logs partition assignments (with several instances
/// in one group, which one owns which partitions is the first thing an operator asks),
/// remembers where each assigned partition must start, and exports lag.
#[derive(Default)]
pub struct GroupMember {
    /// Committed offset of each partition at its last assignment: where fetching must start.
    start: std::sync::Mutex<Starts>,
    /// Bumped at every assignment, so the consume loop re-checks each partition's start.
    generation: std::sync::atomic::AtomicU64,
}

/// Each assigned partition's committed offset (absent: none committed), and the partitions
/// whose offset could not be read at assignment (the coordinator away): this member commits
/// none of those until it has read them, since a position from an earlier ownership could
/// rewind the group.
#[derive(Default)]
struct Starts {
    known: HashMap<(String, i32), i64>,
    unknown: std::collections::HashSet<(String, i32)>,
}

/// The group's committed offsets of `tpl`'s partitions (those with one).
fn read_committed(
    consumer: &BaseConsumer<GroupMember>,
    tpl: TopicPartitionList,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<((String, i32), i64)>> {
    let c = consumer.committed_offsets(tpl, timeout)?;
    Ok(c.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
            _ => None,
        })
        .collect())
}

impl GroupMember {
    /// The partition's committed offset at its last assignment.
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.start
            .lock()
            .expect("start offsets")
            .known
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// Whether the partition's committed offset at assignment is not known yet.
    fn start_unknown(&self, topic: &str, partition: i32) -> bool {
        let starts = self.start.lock().expect("start offsets");
        starts.unknown.contains(&(topic.to_string(), partition))
    }

    /// Reads the offsets that could not be read at assignment (a second at most).
    fn retry_unknown(&self, consumer: &BaseConsumer<GroupMember>) {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.start.lock().expect("start offsets").unknown {
            tpl.add_partition(t, *p);
        }
        if tpl.count() == 0 {
            return;
        }
        if let Ok(read) = read_committed(consumer, tpl, Duration::from_secs(1)) {
            let mut starts = self.start.lock().expect("start offsets");
            starts.unknown.clear();
            starts.known.extend(read);
            tracing::info!("committed offsets read after the assignment; commits resume");
        }
    }
}

impl ClientContext for GroupMember {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            // The end of a partition is news, not an error: it drives `stop_at_end`.
            KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {
                tracing::trace!(reason, "end of partition")
            }
            e => tracing::warn!(error = %e, reason, "Kafka client error; librdkafka retries"),
        }
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): per-partition lag for the
    /// partitions this member consumes.
    fn stats(&self, s: Statistics) {
        for (topic, t) in &s.topics {
            for (&partition, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; offsets < 0 are unknown.
                if partition < 0 || !p.desired || p.hi_offset < 0 {
                    continue;
                }
                let next = if p.app_offset >= 0 {
                    p.app_offset
                } else {
                    p.committed_offset
                };
                let to_process = if next >= 0 { p.hi_offset - next } else { 0 };
                let to_commit = if p.committed_offset >= 0 {
                    p.hi_offset - p.committed_offset
                } else {
                    p.hi_offset - p.lo_offset.max(0)
                };
                telemetry::kafka_lag(topic, partition, to_process, to_commit);
            }
        }
    }
}

impl ConsumerContext for GroupMember {
    fn post_rebalance(&self, consumer: &BaseConsumer<GroupMember>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                    .collect();
                tracing::info!(partitions = %parts.join(","), count = parts.len(), "partitions assigned");
                // Where each partition must start: the consume loop checks the first message
                // against it (see `StartCheck`), and no commit goes below it.
                let read = read_committed(consumer, (*tpl).clone(), Duration::from_secs(10));
                let mut starts = self.start.lock().expect("start offsets");
                // An eager assignment is the whole assignment. A cooperative one adds
                // partitions to those kept: their unread offsets stay unread, and their
                // starts are dropped, since every partition's start check runs again after
                // an assignment and a kept partition is far past its old start.
                if matches!(
                    consumer.rebalance_protocol(),
                    RebalanceProtocol::Cooperative
                ) {
                    starts.known.clear();
                } else {
                    *starts = Starts::default();
                }
                let parts = tpl.elements();
                let parts = parts.iter().map(|e| (e.topic().to_string(), e.partition()));
                match read {
                    Ok(read) => {
                        for p in parts {
                            starts.unknown.remove(&p);
                            starts.known.remove(&p);
                        }
                        starts.known.extend(read);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the group's committed offsets of the assigned partitions; this member commits none of them until it can");
                        starts.unknown.extend(parts);
                    }
                }
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(count = tpl.count(), "partitions revoked");
                let mut starts = self.start.lock().expect("start offsets");
                // Another member reports these now: this one's lag for them is nil.
                for e in tpl.elements() {
                    telemetry::kafka_lag(e.topic(), e.partition(), 0, 0);
                    let p = (e.topic().to_string(), e.partition());
                    starts.known.remove(&p);
                    starts.unknown.remove(&p);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

/// The first message of a partition after an assignment must be the one at its committed
/// offset. Tansu 0.6 serves a fetch from an offset inside a stored record batch from the
/// *next* batch (measured: a fetch from 3,584 began at 4,096), which would lose the rest of
/// that batch. So a later first message makes the source seek back, further each time, until
/// the fetch covers the committed offset; what comes before it is then skipped as already
/// handed. After [`MAX_SEEK_BACKS`] tries the gap is accepted as real (compaction,
/// retention) and logged. Costs one set lookup per message once a partition is settled.
#[derive(Default)]
struct StartCheck {
    /// The assignment generation the sets below belong to.
    generation: u64,
    /// Partitions whose first message was at or before the committed offset.
    settled: std::collections::HashSet<Arc<str>>,
    /// Seek-backs made per partition since the assignment.
    tries: HashMap<Arc<str>, u32>,
}

impl StartCheck {
    /// Whether `m` must be dropped because the source sought back before it.
    fn sought_back(
        &mut self,
        consumer: &BaseConsumer<GroupMember>,
        handed: &mut HashMap<Arc<str>, u64>,
        source: &Arc<str>,
        m: &Polled,
    ) -> bool {
        let generation = consumer.context().generation.load(Ordering::Relaxed);
        if generation != self.generation {
            self.generation = generation;
            self.settled.clear();
            self.tries.clear();
        }
        if self.settled.contains(source) {
            return false;
        }
        let start = consumer.context().committed(&m.topic, m.partition);
        let tries = self.tries.get(source).copied().unwrap_or(0);
        match start {
            Some(start) if m.offset > start && tries < MAX_SEEK_BACKS => {
                let back = seek_back(
                    consumer,
                    handed,
                    source,
                    (&m.topic, m.partition),
                    start,
                    start,
                    tries,
                );
                tracing::warn!(partition = %source, committed = start, got = m.offset, seek_to = back, "fetch began past the committed offset; sought back");
                self.tries.insert(source.clone(), tries + 1);
                return true;
            }
            Some(start) if m.offset > start => {
                tracing::error!(partition = %source, committed = start, got = m.offset, "offsets between the committed one and the first fetched are not on the broker");
            }
            _ => {}
        }
        self.settled.insert(source.clone());
        false
    }
}

/// The seek-back both broker workarounds make: to 512 × 2^`tries` messages before `below`,
/// with everything before `needed` marked as already handed (skipped when it comes again).
/// Returns the offset sought to.
fn seek_back(
    consumer: &BaseConsumer<GroupMember>,
    handed: &mut HashMap<Arc<str>, u64>,
    source: &Arc<str>,
    (topic, partition): (&str, i32),
    needed: i64,
    below: i64,
    tries: u32,
) -> i64 {
    let back = below - (BATCH_STEP << tries).min(below);
    let h = handed.entry(source.clone()).or_insert(0);
    *h = (*h).max(needed as u64);
    if let Err(e) = consumer.seek(
        topic,
        partition,
        Offset::Offset(back),
        Duration::from_secs(10),
    ) {
        tracing::warn!(error = %e, topic, partition, offset = back, "seek failed");
    }
    back
}

/// Assigned partitions that make no progress while their next offset is not the broker's
/// high watermark. Tansu 0.6 serves nothing to a fetch from inside the *last* stored record
/// batch and reports a high watermark short of the partition's end (measured: group offset
/// 8,900 of 8,928, high watermark 6,117, and the fetch idled for minutes with no error, while
/// librdkafka's mock cluster served the 28 messages at once); `StartCheck` cannot help, as no
/// message ever arrives. A partition silent for `stall_after_ms` whose high watermark is not
/// its next offset is reported, and the source seeks back before both (further each time) so
/// that the fetch begins at a batch boundary; what comes before the needed offset is skipped
/// as already handed. A partition that is merely idle (next offset at the high watermark) is
/// left alone.
struct StallWatch {
    after: Duration,
    /// Per source: the last message, or when the watch first saw the partition silent.
    heard: HashMap<Arc<str>, Instant>,
    /// Seek-backs made per source since its last message.
    tries: HashMap<Arc<str>, u32>,
    last_look: Instant,
    generation: u64,
}

/// Longest wait, at the end, for the learner to acknowledge what it was sent.
const DRAIN_LIMIT_S: u64 = 120;
/// While a batch's dead letters wait for a broker, a warning every this many seconds.
const DEAD_LETTER_WARN_S: u64 = 30;

impl StallWatch {
    fn new(after: Duration) -> Self {
        StallWatch {
            after,
            heard: HashMap::new(),
            tries: HashMap::new(),
            last_look: Instant::now(),
            generation: 0,
        }
    }

    fn progress(&mut self, source: &Arc<str>) {
        self.heard.insert(source.clone(), Instant::now());
        self.tries.remove(source);
    }

    /// Looks at the silent partitions (at most four times per `after`).
    fn check(
        &mut self,
        consumer: &BaseConsumer<GroupMember>,
        handed: &mut HashMap<Arc<str>, u64>,
        names: &HashMap<(String, i32), Arc<str>>,
        at_end: &HashMap<i32, bool>,
    ) {
        if self.last_look.elapsed() < (self.after / 4).max(Duration::from_millis(250)) {
            return;
        }
        self.last_look = Instant::now();
        let generation = consumer.context().generation.load(Ordering::Relaxed);
        if generation != self.generation {
            // A new assignment: every partition starts with a clean slate.
            self.generation = generation;
            self.heard.clear();
            self.tries.clear();
        }
        let Ok(assigned) = consumer.assignment() else {
            return;
        };
        for e in assigned.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            if at_end.get(&partition) == Some(&true) {
                continue;
            }
            let source = names
                .get(&(topic.to_string(), partition))
                .cloned()
                .unwrap_or_else(|| source_name(topic, partition));
            let heard = *self
                .heard
                .entry(source.clone())
                .or_insert_with(Instant::now);
            if heard.elapsed() < self.after {
                continue;
            }
            self.heard.insert(source.clone(), Instant::now());
            let Ok((low, high)) =
                consumer.fetch_watermarks(topic, partition, Duration::from_secs(5))
            else {
                continue;
            };
            // The further of the two: the group may have committed past what this process
            // handed on (another member had the partition), and seeking back below its
            // offset would learn those messages twice.
            let committed = consumer.context().committed(topic, partition);
            let next = match (handed.get(&source).map(|&h| h as i64), committed) {
                (Some(h), Some(c)) => h.max(c),
                (h, c) => h.or(c).unwrap_or(low),
            };
            if high == next {
                // Idle: nothing to fetch.
                continue;
            }
            let tries = self.tries.get(&source).copied().unwrap_or(0);
            let silent_s = heard.elapsed().as_secs();
            if tries >= MAX_SEEK_BACKS {
                tracing::warn!(partition = %source, next, high_watermark = high, silent_s, "partition makes no progress while its next offset is not the broker's high watermark, after {MAX_SEEK_BACKS} seek-backs");
                continue;
            }
            // Below both: a high watermark under the next offset is as wrong as one above it
            // (Tansu 0.6 reports one short of the end), and the fetch must begin before it.
            let below = next.min(high);
            let back = seek_back(
                consumer,
                handed,
                &source,
                (topic, partition),
                next,
                below,
                tries,
            );
            tracing::warn!(partition = %source, next, high_watermark = high, silent_s, seek_to = back, "partition makes no progress while its next offset is not the broker's high watermark; sought back so that the fetch starts at a record-batch boundary (Tansu 0.6 serves nothing from inside the last record batch and reports a high watermark short of the partition's end)");
            self.tries.insert(source, tries + 1);
        }
    }
}

/// "topic[partition]" as used in row origins.
fn source_name(topic: &str, partition: i32) -> Arc<str> {
    Arc::from(format!("{topic}[{partition}]").as_str())
}

/// Consumes until shut down (or, with `stop_at_end`, until every assigned partition is
/// drained). Runs on a blocking thread. Returns the messages read and the redelivered ones
/// skipped because this process already had them.
pub fn consume(
    cfg: &KafkaSourceConfig,
    schema: Arc<Schema>,
    tx: super::EventSender,
    acks: std::sync::mpsc::Receiver<Ack>,
    handed: HashMap<Arc<str>, u64>,
    check: &RowCheck,
    shutdown: &Shutdown,
) -> Result<(u64, u64)> {
    KafkaSource::connect(cfg, schema, handed, shutdown)?.run(tx, acks, check)
}

/// The consumer thread's state: the group member, the dead-letter producer, what was
/// handed to the learner and what it has made durable.
struct KafkaSource<'a> {
    cfg: &'a KafkaSourceConfig,
    consumer: BaseConsumer<GroupMember>,
    dlq: Option<ThreadedProducer<DeliveryCount>>,
    row_decoder: Decoder,
    decoder: JsonDecoder,
    names: HashMap<(String, i32), Arc<str>>,
    /// Per source, the offset after the last message handed on (or skipped as covered).
    handed: HashMap<Arc<str>, u64>,
    /// Partition → drained (end-of-partition seen after its last message). librdkafka's EOF
    /// names the partition only, so `stop_at_end` is meant for single-topic replays.
    at_end: HashMap<i32, bool>,
    rows: u64,
    redelivered: u64,
    backoff: Duration,
    /// Batches handed to the learner and not yet acknowledged as processed.
    in_flight: usize,
    done: Done,
    /// When `done` was last committed: it is committed again every [`RECOMMIT_EVERY`], so
    /// that a commit that failed (a broker or coordinator away, a member fenced during a
    /// rebalance) is made good even when no new message comes to trigger the next one.
    last_commit: Instant,
    starts: StartCheck,
    stalls: StallWatch,
    shutdown: Shutdown,
}

/// Consumer fetch settings unless the pipeline's `[source.options]` names them.
/// `fetch.queue.backoff.ms`: once librdkafka's local queue holds `queued.min.messages`
/// (100,000) it stops fetching for this long, 1 s by default; a consumer that drains the
/// queue in a fraction of that then sits idle. Measured against Tansu (`cargo bench --bench
/// kafka`, checkpoints on, 1 s and 10 ms alternating, three runs each, 2026-12-01): Avro
/// 115-117 k samples/s (the consumer and the broker both mostly idle) against 216-248 k;
/// JSON 141-329 k against 242-268 k (median 288 k against 250 k; over the three settings of
/// each run 255 k against 250 k), without the stalled runs. The queue stays bounded by the
/// same thresholds.
const FETCH_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.min.bytes", "1000000"),
    ("fetch.wait.max.ms", "100"),
    ("fetch.queue.backoff.ms", "10"),
];

const RECOMMIT_EVERY: Duration = Duration::from_secs(5);

impl<'a> KafkaSource<'a> {
    fn connect(
        cfg: &'a KafkaSourceConfig,
        schema: Arc<Schema>,
        handed: HashMap<Arc<str>, u64>,
        shutdown: &Shutdown,
    ) -> Result<Self> {
        let consumer: BaseConsumer<GroupMember> = cfg
            .consumer_client()
            .create_with_context(GroupMember::default())
            .context("cannot create the Kafka consumer")?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).context("cannot subscribe")?;
        let dlq = match &cfg.dead_letter_topic {
            Some(_) => Some(
                cfg.producer_client()
                    .create_with_context(DeliveryCount::default())
                    .context("cannot create the dead-letter producer")?,
            ),
            None => None,
        };
        Ok(KafkaSource {
            cfg,
            consumer,
            dlq,
            row_decoder: Decoder::new(schema.clone()),
            decoder: JsonDecoder::with_format(schema, cfg.max_message_bytes, cfg.format),
            names: HashMap::new(),
            handed,
            at_end: HashMap::new(),
            rows: 0,
            redelivered: 0,
            backoff: Duration::from_millis(100),
            in_flight: 0,
            done: HashMap::new(),
            last_commit: Instant::now(),
            starts: StartCheck::default(),
            stalls: StallWatch::new(Duration::from_millis(cfg.stall_after_ms)),
            shutdown: shutdown.clone(),
        })
    }

    fn run(
        mut self,
        tx: super::EventSender,
        acks: std::sync::mpsc::Receiver<Ack>,
        check: &RowCheck,
    ) -> Result<(u64, u64)> {
        while !self.shutdown.is_triggered() {
            // Commit what the learner has made durable.
            while let Ok(ack) = acks.try_recv() {
                self.take(ack);
            }
            if self.last_commit.elapsed() >= RECOMMIT_EVERY && !self.done.is_empty() {
                self.take(Ack::Commit(Vec::new()));
            }
            let payloads = self.poll_batch();
            self.stalls
                .check(&self.consumer, &mut self.handed, &self.names, &self.at_end);
            if payloads.is_empty() {
                if self.cfg.stop_at_end && self.in_flight == 0 && self.drained() {
                    break;
                }
                continue;
            }
            match self.hand_over(payloads, &tx, check) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::error!(error = %e, "dead letters not delivered");
                    // What the learner already has is still checkpointed and committed: its
                    // letters were delivered before it was handed over.
                    self.drain(tx, acks);
                    return Err(e);
                }
            }
        }
        self.drain(tx, acks);
        Ok((self.rows, self.redelivered))
    }

    fn take(&mut self, ack: Ack) {
        match ack {
            Ack::Processed => self.in_flight = self.in_flight.saturating_sub(1),
            Ack::Commit(p) => {
                self.last_commit = Instant::now();
                commit(&self.consumer, &mut self.done, &p, CommitMode::Async)
            }
        }
    }

    /// Up to `batch_size` new messages, waiting at most `batch_timeout_ms`.
    fn poll_batch(&mut self) -> Vec<Polled> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.batch_timeout_ms);
        let mut payloads: Vec<Polled> = Vec::new();
        while payloads.len() < self.cfg.batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            let polled = match self.consumer.poll(left.max(Duration::from_millis(1))) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.at_end.insert(p, true);
                    None
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, backoff_ms = self.backoff.as_millis() as u64, "Kafka consumer error; retrying");
                    std::thread::sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                    break;
                }
                Some(Ok(m)) => Some(Polled::copy(&mut self.names, &m)),
            };
            if let Some(p) = polled.and_then(|p| self.accept(p)) {
                payloads.push(p);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        payloads
    }

    /// The message if it is new to this process; None when it must be skipped.
    fn accept(&mut self, p: Polled) -> Option<Polled> {
        self.backoff = Duration::from_millis(100);
        self.at_end.insert(p.partition, false);
        self.stalls.progress(&p.origin.source);
        let source = &p.origin.source;
        if self
            .starts
            .sought_back(&self.consumer, &mut self.handed, source, &p)
        {
            return None;
        }
        let next = self.handed.entry(source.clone()).or_insert(0);
        if (p.offset as u64) < *next {
            // Already with this process: in the checkpoint it resumed from (whose commit a
            // crash cut short), or handed to the learner before a rebalance or broker restart
            // rewound the partition to its last commit. The model must not learn it twice.
            self.redelivered += 1;
            telemetry::rows_already_covered("kafka", 1);
            return None;
        }
        *next = p.offset as u64 + 1;
        Some(p)
    }

    /// Every assigned partition has reported its end since its last message.
    fn drained(&self) -> bool {
        let assigned: Vec<i32> = self
            .consumer
            .assignment()
            .map(|a| a.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        !assigned.is_empty() && assigned.iter().all(|p| self.at_end.get(p) == Some(&true))
    }

    /// Decodes and checks the messages, dead-letters the bad ones and hands the batch to the
    /// learner. False when the learner is gone; an error when a dead letter was not
    /// delivered (the batch is not handed over, so no checkpoint covers its offsets).
    fn hand_over(
        &mut self,
        payloads: Vec<Polled>,
        tx: &super::EventSender,
        check: &RowCheck,
    ) -> Result<bool> {
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.value.as_slice()).collect();
        let (batch, good, bad) = self.decoder.decode(&refs);
        let (batch, good, bad) = check_rows(&self.row_decoder, check, batch, good, bad);
        for (i, e) in &bad {
            self.dead_letter(&payloads[*i], e);
        }
        if !bad.is_empty() {
            self.deliver_dead_letters()?;
        }
        for (i, e) in bad {
            let p = &payloads[i];
            let ev = SourceEvent::Unreadable(Unreadable {
                origin: p.origin.source.clone(),
                first_row: p.origin.index,
                rows: 1,
                reason: e.reason,
                detail: e.detail,
                acked_by_batch: true,
            });
            if tx.blocking_send(ev).is_err() {
                return Ok(false);
            }
        }
        // Bad messages are dealt with (queued as dead letters, delivered before any commit
        // that covers them): their offsets are committed like the good ones.
        let origins: Vec<RowOrigin> = good.iter().map(|&i| payloads[i].origin.clone()).collect();
        let all: Vec<RowOrigin> = payloads.iter().map(|p| p.origin.clone()).collect();
        self.rows += payloads.len() as u64;
        // A batch goes to the learner even when no message in it was good: the learner owns
        // the positions a checkpoint covers.
        self.in_flight += 1;
        Ok(tx
            .blocking_send(SourceEvent::Batch {
                batch,
                origins,
                ack: Some(all),
            })
            .is_ok())
    }

    /// Waits until every queued dead letter is on its topic. Why here, before the batch is
    /// handed over: a checkpoint covers what the learner saw, and a restart skips what a
    /// checkpoint covers, so a letter the topic never took would be lost for good.
    fn deliver_dead_letters(&self) -> Result<()> {
        let Some(p) = &self.dlq else {
            return Ok(());
        };
        // A broker away is waited for, a flush at a time, until a shutdown or until
        // librdkafka gives a letter up (`message.timeout.ms`, 5 minutes by default): a broker
        // restart must not end the run.
        // A second at a time, so that a shutdown is seen at once.
        let waited = Instant::now();
        let mut warned = 0;
        let flushed = loop {
            match p.flush(Duration::from_secs(1)) {
                Err(_)
                    if !self.shutdown.is_triggered()
                        && p.context().failed.load(Ordering::Relaxed) == 0 =>
                {
                    let s = waited.elapsed().as_secs();
                    if s / DEAD_LETTER_WARN_S > warned {
                        warned = s / DEAD_LETTER_WARN_S;
                        tracing::warn!(
                            waited_s = s,
                            "dead letters not delivered yet; waiting on the broker"
                        );
                    }
                }
                r => break r,
            }
        };
        let failed = p.context().failed.load(Ordering::Relaxed);
        if flushed.is_err() || failed > 0 {
            anyhow::bail!(
                "{} dead letter(s) not delivered to `{}` ({}): the feed stops before their \
                 batch is learnt; a restart reads them again",
                failed.max(1),
                self.cfg.dead_letter_topic.as_deref().unwrap_or_default(),
                match flushed {
                    Err(e) => format!("flush: {e}"),
                    Ok(()) => "the broker refused them".into(),
                }
            );
        }
        Ok(())
    }

    /// Queues the original message, with its own headers plus the reason and where it came
    /// from, on the dead-letter topic (when there is one).
    fn dead_letter<'m>(&'m self, p: &'m Polled, e: &BatchError) {
        let (Some(producer), Some(topic)) = (&self.dlq, &self.cfg.dead_letter_topic) else {
            return;
        };
        let original = p.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: v.as_deref(),
            })
        });
        let (partition, offset) = (p.partition.to_string(), p.offset.to_string());
        let ours = [
            ("gradsift.reason", e.reason.as_bytes()),
            ("gradsift.detail", e.detail.as_bytes()),
            ("gradsift.source.topic", p.topic.as_bytes()),
            ("gradsift.source.partition", partition.as_bytes()),
            ("gradsift.source.offset", offset.as_bytes()),
        ];
        let headers = ours.iter().fold(original, |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        let record = |payload: &'m [u8], headers: OwnedHeaders| {
            let rec = BaseRecord::<'m, [u8], [u8]>::to(topic)
                .payload(payload)
                .headers(headers);
            match &p.key {
                Some(k) => rec.key(k.as_slice()),
                None => rec,
            }
        };
        let sent = match crate::producer::send(
            producer,
            record(&p.value, headers.clone()),
            &self.shutdown,
        ) {
            // Too large for the producer whatever happens: the letter goes without the
            // payload (its length in a header), or it would stop the feed on every restart.
            Err(KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
            )) => {
                let bytes = p.value.len().to_string();
                let cut = headers.insert(Header {
                    key: "gradsift.payload_dropped_bytes",
                    value: Some(bytes.as_bytes()),
                });
                crate::producer::send(producer, record(&[], cut), &self.shutdown)
            }
            other => other,
        };
        if let Err(err) = sent {
            tracing::error!(error = %err, "cannot queue a dead letter");
            producer.context().failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops feeding, lets the learner finish what it has (and write its last checkpoint),
    /// and commits what it reports durable until it hangs up; then one synchronous commit.
    fn drain(&mut self, tx: super::EventSender, acks: std::sync::mpsc::Receiver<Ack>) {
        drop(tx);
        let stop = Instant::now() + Duration::from_secs(DRAIN_LIMIT_S);
        let mut hung_up = false;
        while Instant::now() < stop {
            match acks.recv_timeout(Duration::from_millis(200)) {
                Ok(ack) => self.take(ack),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    hung_up = true;
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        if !hung_up {
            tracing::warn!(
                limit_s = DRAIN_LIMIT_S,
                "the learner did not hang up within the drain limit (a stage still holds the channel?)"
            );
        }
        if self.redelivered > 0 {
            tracing::info!(
                redelivered = self.redelivered,
                "messages redelivered from an older commit were skipped (already processed)"
            );
        }
        if self.in_flight > 0 {
            tracing::warn!(
                batches = self.in_flight,
                "stopped without the learner finishing every batch; their offsets stay uncommitted"
            );
        }
        commit(&self.consumer, &mut self.done, &[], CommitMode::Sync);
    }
}

/// Offsets processed so far: per "topic[partition]", the offset after the highest one.
type Done = HashMap<Arc<str>, i64>;

/// Records durable positions and commits every partition's next offset (the whole map, so
/// an asynchronous commit that failed is made good by the next one).
fn commit(
    consumer: &BaseConsumer<GroupMember>,
    done: &mut Done,
    durable: &[(Arc<str>, u64)],
    mode: CommitMode,
) {
    for (source, next) in durable {
        let e = done.entry(source.clone()).or_insert(0);
        *e = (*e).max(*next as i64);
    }
    // Only partitions this member owns now: a stale position of a partition that moved to
    // another member must not rewind that member's commits.
    let owned: Vec<(String, i32)> = consumer
        .assignment()
        .map(|a| {
            a.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect()
        })
        .unwrap_or_default();
    consumer.context().retry_unknown(consumer);
    let mut tpl = TopicPartitionList::new();
    for (source, off) in done.iter() {
        // "topic[partition]"
        let Some((topic, rest)) = source.rsplit_once('[') else {
            continue;
        };
        let Ok(partition) = rest.trim_end_matches(']').parse::<i32>() else {
            continue;
        };
        if !owned.iter().any(|(t, p)| t == topic && *p == partition)
            || consumer.context().start_unknown(topic, partition)
        {
            continue;
        }
        // Not behind what the group had committed when this member was (re)assigned the
        // partition: another member may have taken it further in between.
        if consumer
            .context()
            .committed(topic, partition)
            .is_some_and(|c| c >= *off)
        {
            continue;
        }
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(*off));
    }
    if tpl.count() == 0 {
        return;
    }
    tracing::debug!(offsets = ?done, "committing");
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "offset commit failed; it is retried with the next batch");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(options: &str) -> KafkaSourceConfig {
        toml::from_str(&format!(
            "brokers = \"127.0.0.1:9\"\ntopics = [\"t\"]\ngroup_id = \"g\"\n{options}"
        ))
        .expect("a source config")
    }

    /// The consumer asks for fuller fetches unless the pipeline says otherwise, and the
    /// settings at-least-once delivery rests on cannot be overridden by an option.
    #[test]
    fn the_consumer_takes_the_fetch_defaults_unless_the_pipeline_sets_them() {
        let plain = config("").consumer_client();
        assert_eq!(plain.get("fetch.min.bytes"), Some("1000000"));
        assert_eq!(plain.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(plain.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(plain.get("statistics.interval.ms"), Some("5000"));
        let set =
            config("[options]\n\"fetch.min.bytes\" = \"1\"\n\"enable.auto.commit\" = \"true\"")
                .consumer_client();
        assert_eq!(
            set.get("fetch.min.bytes"),
            Some("1"),
            "the pipeline's option wins"
        );
        assert_eq!(set.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(
            set.get("enable.auto.commit"),
            Some("false"),
            "commits stay ours"
        );
        assert_eq!(set.get("group.id"), Some("g"));
        assert_eq!(config("").producer_client().get("fetch.min.bytes"), None);
    }
}
