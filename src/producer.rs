//! Kafka producing, one way for every writer (the archive producer, the dead-letter topic, the
//! output topic): a threaded producer whose context counts deliveries that failed after
//! librdkafka's own retries, and a send that waits while librdkafka's queue is full. That
//! wait is the backpressure from the broker to whoever produces.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};

/// Counts deliveries that failed after librdkafka's own retries.
#[derive(Default)]
pub struct DeliveryCount {
    pub failed: AtomicU64,
}

impl ClientContext for DeliveryCount {}

impl ProducerContext for DeliveryCount {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r {
            tracing::error!(error = %e, "message not delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The producer every gradsift writer uses.
pub type KafkaProducer = ThreadedProducer<DeliveryCount>;

/// Queues `rec`, waiting while librdkafka's queue is full (backpressure); any other error is
/// returned.
pub fn send<K, P>(producer: &KafkaProducer, mut rec: BaseRecord<'_, K, P>) -> Result<(), KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
