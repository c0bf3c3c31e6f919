//! Kafka helpers shared by the Kafka test files: the producer tool and committed offsets.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::Broker;

/// `gradsift produce` of the bundled Milan archive into `topic`.
pub fn produce_command(broker: &Broker, topic: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradsift"));
    c.current_dir(super::repo())
        .args([
            "produce",
            "data/milan/internet_square5161.parquet",
            "--schema",
            "schemas/milan_internet.json",
            "--topic",
            topic,
            "--brokers",
        ])
        .arg(broker.address())
        .args(extra);
    c
}

pub fn produce_archive(broker: &Broker, topic: &str, extra: &[&str]) -> String {
    let out = produce_command(broker, topic, extra).output().unwrap();
    assert!(
        out.status.success(),
        "produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn committed(broker: &Broker, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Sends SIGTERM to a gradsift child (a graceful stop) and returns its exit status.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {}", child.id());
    child.wait().unwrap()
}

/// Produces `n` malformed messages to `partition` of `topic`, one every `every`, on a thread.
pub fn produce_bad(
    broker: &Broker,
    topic: &str,
    partition: i32,
    n: usize,
    every: Duration,
) -> std::thread::JoinHandle<()> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let (address, topic) = (broker.address(), topic.to_string());
    std::thread::spawn(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("linger.ms", "0")
            .create()
            .unwrap();
        for i in 0..n {
            let value = format!("{{\"not json {i}");
            p.send(
                BaseRecord::<(), String>::to(&topic)
                    .partition(partition)
                    .payload(&value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
            std::thread::sleep(every);
        }
        p.flush(Duration::from_secs(30)).unwrap();
    })
}
