//! Kafka producing, one way for every writer (the archive producer, the dead-letter topic, the
//! output topic): a threaded producer whose context counts deliveries that failed after
//! librdkafka's own retries, and a send that waits while librdkafka's queue is full. That
//! wait is the backpressure from the broker to whoever produces; once a shutdown is asked
//! for it is bounded, so a broker that stays down cannot hold the exit for librdkafka's
//! message timeout (5 minutes by default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};

use crate::shutdown::Shutdown;

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

/// How long a send still waits on a full queue once a shutdown has been asked for.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Queues `rec`, waiting while librdkafka's queue is full (backpressure), until
/// [`SHUTDOWN_WAIT`] after `shutdown` was triggered (counted from the trigger, so a run of
/// sends gives up together): then the queue-full error is returned, and the caller keeps the
/// record uncommitted as for any refused one. Any other error is returned at once.
pub fn send<K, P>(
    producer: &KafkaProducer,
    rec: BaseRecord<'_, K, P>,
    shutdown: &Shutdown,
) -> Result<(), KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    send_within(producer, rec, shutdown, SHUTDOWN_WAIT)
}

fn send_within<K, P>(
    producer: &KafkaProducer,
    mut rec: BaseRecord<'_, K, P>,
    shutdown: &Shutdown,
    grace: Duration,
) -> Result<(), KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if shutdown.since().is_some_and(|t| t >= grace) {
                    return Err(e);
                }
                rec = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    /// A producer whose queue holds one message, pointed at a port where no broker listens.
    fn stuck_producer() -> KafkaProducer {
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("queue.buffering.max.messages", "1")
            .set("log_level", "0")
            .create_with_context(DeliveryCount::default())
            .expect("producer")
    }

    #[test]
    fn a_send_on_a_full_queue_waits_until_a_shutdown_then_gives_up_with_the_error() {
        let producer = std::sync::Arc::new(stuck_producer());
        let shutdown = Shutdown::new();
        let rec = || BaseRecord::<str, str>::to("t").payload("x");
        send_within(&producer, rec(), &shutdown, Duration::ZERO).expect("the first fits");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Detached, so that a send that never gives up fails the test instead of hanging it.
        std::thread::spawn({
            let (producer, shutdown) = (producer.clone(), shutdown.clone());
            move || {
                let r = send_within(&producer, rec(), &shutdown, Duration::from_secs(1));
                let _ = done_tx.send(r);
            }
        });
        // Backpressure: the second send is still waiting on the full queue.
        let waiting = done_rx.recv_timeout(Duration::from_millis(300));
        assert!(waiting.is_err(), "returned without a shutdown: {waiting:?}");
        shutdown.trigger();
        let r = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("gave up");
        assert!(
            matches!(
                r,
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
            ),
            "{r:?}"
        );
        // The grace counts from the trigger: a later send on the full queue gives up at once
        // (a batch of dead letters does not wait its grace once per letter; a grace of its
        // own would keep it a whole second).
        let t = std::time::Instant::now();
        let r = send_within(&producer, rec(), &shutdown, Duration::from_secs(1));
        assert!(
            r.is_err() && t.elapsed() < Duration::from_millis(500),
            "{r:?}"
        );
    }
}
