//! The per-sample output topic: one JSON record per scored sample (key, event time,
//! prediction, score, threshold, selected, trained, retained, and the sample's source and
//! position), keyed by the sample's key so one cell's records stay in one partition.
//!
//! Records are handed to librdkafka's queue as they come (bounded by
//! `queue.buffering.max.messages`: a full queue makes `send` wait, which is backpressure on
//! the learner, bounded once a shutdown is asked for) and flushed before every checkpoint, so every sample a checkpoint covers has
//! its record on the broker: at least once, like the source.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};

use super::scores::ScoreRow;
use crate::producer::DeliveryCount;
use crate::shutdown::Shutdown;

/// `[output.topic]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSinkConfig {
    /// bootstrap.servers (default: the Kafka source's).
    #[serde(default)]
    pub brokers: Option<String>,
    pub topic: String,
    /// Passed to librdkafka as they are (e.g. security settings).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Record<'a> {
    key: &'a str,
    time: i64,
    prediction: f64,
    target: f64,
    score: f32,
    threshold: f32,
    selected: bool,
    trained: bool,
    retained: bool,
    source: &'a str,
    position: u64,
}

/// A producer for the per-sample topic.
pub struct SampleTopicSink {
    producer: ThreadedProducer<DeliveryCount>,
    topic: String,
    pub records: u64,
    shutdown: Shutdown,
}

impl SampleTopicSink {
    pub fn create(cfg: &TopicSinkConfig, brokers: &str, shutdown: &Shutdown) -> Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in &cfg.options {
            c.set(k, v);
        }
        let producer = c
            .create_with_context(DeliveryCount::default())
            .context("cannot create the output topic producer")?;
        Ok(SampleTopicSink {
            producer,
            topic: cfg.topic.clone(),
            records: 0,
            shutdown: shutdown.clone(),
        })
    }

    pub fn send(&mut self, rows: &[ScoreRow]) -> Result<()> {
        for r in rows {
            let value = serde_json::to_vec(&Record {
                key: &r.key,
                time: r.time,
                prediction: r.prediction,
                target: r.target,
                score: r.score,
                threshold: r.threshold,
                selected: r.selected,
                trained: r.trained,
                retained: r.retained,
                source: &r.source,
                position: r.position,
            })?;
            let rec = BaseRecord::to(&self.topic).key(&*r.key).payload(&value);
            crate::producer::send(&self.producer, rec, &self.shutdown)
                .context("cannot queue an output record")?;
            self.records += 1;
        }
        Ok(())
    }

    /// Waits until every queued record is delivered (before a checkpoint). A record the
    /// broker refused after librdkafka's retries fails the checkpoint: its offsets must not
    /// be committed. A broker away for longer than a minute is waited for, a minute at a
    /// time, until a shutdown is asked for (a broker restart must not end the run).
    pub fn flush(&self) -> Result<()> {
        loop {
            match self.producer.flush(Duration::from_secs(60)) {
                Ok(()) => break,
                Err(e) if !self.shutdown.is_triggered() => {
                    tracing::warn!(error = %e, topic = %self.topic, "output topic records not delivered within 60 s; waiting on");
                }
                Err(e) => {
                    return Err(e).context("output topic records not delivered within 60 s");
                }
            }
        }
        let failed = self
            .producer
            .context()
            .failed
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        anyhow::ensure!(
            failed == 0,
            "{failed} output topic records were not delivered"
        );
        Ok(())
    }
}
