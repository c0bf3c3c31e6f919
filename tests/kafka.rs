//! Kafka, against a real Kafka-protocol broker (Tansu) started on loopback by the test, and
//! through rdkafka: the producer tool fills a topic from the Milan archive, a pipeline
//! consumes it in a consumer group, every offset is processed and committed; malformed
//! messages land in the dead-letter topic with their reason while good ones are unaffected.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::kafka::{committed, produce_archive, produce_command, terminate};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn kafka_pipeline(
    broker: &common::Broker,
    out: &std::path::Path,
    topic: &str,
    group: &str,
    dlq: &str,
) -> gradsift::config::PipelineConfig {
    common::pipeline(
        "milan-kafka.toml",
        out,
        &[
            &format!("source.brokers=\"{}\"", broker.address()),
            &format!("source.topics=[\"{topic}\"]"),
            &format!("source.group_id=\"{group}\""),
            &format!("source.dead_letter_topic=\"{dlq}\""),
            "source.stop_at_end=true",
        ],
    )
}

#[test]
fn archive_through_kafka_every_offset_processed_and_committed() {
    let broker = common::Broker::start();
    broker.create_topic("milan", 4);
    broker.create_topic("milan-dlq", 1);
    broker.create_topic("milan-scored", 2);
    let said = produce_archive(&broker, "milan", &[]);
    assert!(said.contains("produced 8928 messages"), "{said}");

    let out = tempfile::tempdir().unwrap();
    let mut cfg = kafka_pipeline(&broker, out.path(), "milan", "g-e2e", "milan-dlq");
    cfg.output.topic = Some(gradsift::sink::topic::TopicSinkConfig {
        brokers: None,
        topic: "milan-scored".into(),
        options: Default::default(),
    });
    let r = common::run(cfg);
    assert_eq!(r.rows_read, 8928);
    assert_eq!(r.topic_records, Some(8784));
    // Not a speed check: a stage that keeps the source channel open makes the source wait
    // out its 120 s drain limit before it commits and the run ends (a regression seen twice).
    assert!(
        r.active_s < 100.0,
        "the run waited {:.0} s: the source's drain hit its limit",
        r.active_s
    );
    let ck = r
        .checkpoint
        .as_ref()
        .expect("the Kafka pipelines checkpoint");
    assert!(ck.written >= 2, "every 5000 rows and at the end: {ck:?}");
    assert_eq!(r.skipped.get("lag_warmup"), Some(&144));
    assert_eq!(r.samples, 8784);

    // Every produced offset is accounted for: 8,784 scored samples with distinct
    // (partition, offset), plus the 144 lag-warm-up rows.
    let py = common::python(&format!(
        "{}pairs = set(zip(t['source'].to_pylist(), t['position'].to_pylist()))\n\
         srcs = sorted(set(t['source'].to_pylist()))\n\
         pos = sorted(p for _, p in pairs)\n\
         print(len(pairs), ','.join(srcs), pos[0], pos[-1])",
        common::load_scores_py(out.path())
    ));
    let f: Vec<&str> = py.split_whitespace().collect();
    assert_eq!(f[0], "8784", "distinct (partition, offset) pairs");
    // One square, one key: one partition, offsets 0..8927 (the first 144 warm the lags).
    assert!(
        f[1].starts_with("milan[") && !f[1].contains(','),
        "{}",
        f[1]
    );
    assert_eq!((f[2], f[3]), ("144", "8927"));

    let part: i32 = f[1]
        .trim_start_matches("milan[")
        .trim_end_matches(']')
        .parse()
        .unwrap();
    let c = committed(&broker, "g-e2e", "milan", 4);
    assert_eq!(c.get(&part), Some(&8928), "committed offsets {c:?}");

    // The output topic: one record per scored sample, keyed by the square.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "scored-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&["milan-scored"]).unwrap();
    let mut seen = BTreeSet::new();
    let mut records = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while records < 8784 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            records += 1;
            assert_eq!(m.key(), Some(&b"5161"[..]));
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert!(v["score"].as_f64().unwrap() >= 0.0);
            assert!(v["prediction"].as_f64().unwrap().is_finite());
            assert!(v["selected"].is_boolean() && v["retained"].is_boolean());
            assert!(v["time"].as_i64().unwrap() > 1_383_000_000_000_000);
            seen.insert(v["position"].as_u64().unwrap());
        }
    }
    assert_eq!(records, 8784, "one output record per scored sample");
    assert_eq!(seen.len(), 8784);
}

#[test]
fn malformed_messages_go_to_the_dead_letter_topic_with_their_reason() {
    let broker = common::Broker::start();
    broker.create_topic("feed", 1);
    broker.create_topic("feed-dlq", 1);
    produce_archive(&broker, "feed", &["--max-rows", "300"]);

    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    let ts = 1_383_951_600_000_000i64; // 2013-11-08 23:00 UTC, after the archive's first 300 slots
    let long = format!(
        "{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": 1.0, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let bad: Vec<(&str, String)> = vec![
        (
            "malformed_json",
            "{\"square_id\": 5161, \"ts\": ".to_string(),
        ),
        (
            "wrong_type:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": \"lots\"}}"),
        ),
        (
            "non_finite:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": \"NaN\"}}"),
        ),
        (
            "non_finite:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": \"Infinity\"}}"),
        ),
        (
            "missing_field:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}}}"),
        ),
        ("oversized", long),
        // A message of another schema (an LTE KPI row).
        (
            "missing_field:square_id",
            format!("{{\"site\": \"ElBorn\", \"time\": {ts}, \"down\": 1.0, \"up\": 2.0}}"),
        ),
        // Rows that decode but fail the schema's row checks (issue 10, defect 10: these were
        // counted but never reached the dead-letter topic).
        (
            "out_of_range:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": 1e300}}"),
        ),
        (
            "out_of_range:internet",
            format!("{{\"square_id\": 5161, \"ts\": {ts}, \"internet\": -5.0}}"),
        ),
        (
            "out_of_range:ts",
            format!(
                "{{\"square_id\": 5161, \"ts\": {}, \"internet\": 1.0}}",
                i64::MAX
            ),
        ),
    ];
    for (_, payload) in &bad {
        // Each carries a header of its own, which its dead letter must keep.
        let trace = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "trace-id",
            value: Some(&b"t-42"[..]),
        });
        p.send(
            BaseRecord::to("feed")
                .key("5161")
                .payload(payload)
                .headers(trace),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    // And good rows after the bad ones: produce the next slots by hand.
    for k in 1..=5 {
        let good = format!(
            "{{\"square_id\": 5161, \"ts\": {}, \"internet\": 1000.0}}",
            ts + k * 600_000_000
        );
        p.send(BaseRecord::to("feed").key("5161").payload(&good))
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut cfg = kafka_pipeline(&broker, out.path(), "feed", "g-bad", "feed-dlq");
    cfg.source = match cfg.source {
        gradsift::source::SourceConfig::Kafka(mut k) => {
            k.max_message_bytes = 64 * 1024;
            gradsift::source::SourceConfig::Kafka(k)
        }
        other => other,
    };
    let r = common::run(cfg);
    println!("{:?}", r.skipped);
    assert_eq!(r.rows_read, 300 + bad.len() as u64 + 5);
    // Good rows unaffected: 300 + 5 rows, the first 144 warm the lags.
    assert_eq!(r.samples, 300 + 5 - 144);
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for (reason, _) in &bad {
        *want.entry(reason).or_default() += 1;
    }
    for (reason, n) in &want {
        assert_eq!(r.skipped.get(*reason), Some(n), "{reason}: {:?}", r.skipped);
    }

    // The dead-letter topic holds each original message with its reason and origin.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&["feed-dlq"]).unwrap();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < bad.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            let h = m.headers().expect("headers");
            let header = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(
                header("trace-id").as_deref(),
                Some("t-42"),
                "original headers kept"
            );
            letters.push((
                header("gradsift.reason").unwrap(),
                header("gradsift.source.topic").unwrap(),
                header("gradsift.source.offset")
                    .unwrap()
                    .parse::<i64>()
                    .unwrap(),
                m.payload().map(|p| p.len()).unwrap_or(0),
                m.key().map(|k| k.to_vec()),
                header("gradsift.detail").unwrap_or_default(),
            ));
        }
    }
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    let offsets: BTreeSet<i64> = letters.iter().map(|l| l.2).collect();
    assert_eq!(
        offsets,
        (300..300 + bad.len() as i64).collect(),
        "each letter names its source offset"
    );
    for ((reason, payload), (got, topic, _, len, key, _)) in bad.iter().zip(&letters) {
        assert_eq!(
            (got.as_str(), topic.as_str(), *len),
            (*reason, "feed", payload.len())
        );
        assert_eq!(key.as_deref(), Some(&b"5161"[..]), "original key kept");
    }
    // A row check's letter names the value it refused.
    let details: BTreeSet<&str> = letters.iter().map(|l| l.5.as_str()).collect();
    for want in [
        "internet = 1e300",
        "internet = -5.0",
        "ts = 9223372036854775807 µs since the epoch",
    ] {
        assert!(details.contains(want), "{want}: {details:?}");
    }
}

#[test]
fn sigterm_mid_stream_drains_commits_what_it_processed_and_exits_zero() {
    let broker = common::Broker::start();
    broker.create_topic("live", 1);
    broker.create_topic("live-dlq", 1);
    // A paced feed: 8,928 slots at 800 messages/s, about 11 s.
    let mut producer = produce_command(&broker, "live", &["--rate", "800"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args: Vec<String> = vec![
        "run".into(),
        "pipelines/milan-kafka.toml".into(),
        "--quiet".into(),
        "--output".into(),
        out.path().display().to_string(),
    ];
    for kv in [
        format!("source.brokers=\"{}\"", broker.address()),
        "source.topics=[\"live\"]".to_string(),
        "source.group_id=\"g-term\"".to_string(),
        "source.dead_letter_topic=\"live-dlq\"".to_string(),
        "telemetry.enabled=false".to_string(),
    ] {
        args.extend(set(kv));
    }
    let mut run = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .current_dir(common::repo())
        .args(&args)
        .spawn()
        .unwrap();
    // Wait until the group has committed something, then ask it to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while committed(&broker, "g-term", "live", 1)
        .get(&0)
        .copied()
        .unwrap_or(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing committed within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = terminate(&mut run);
    assert!(status.success(), "graceful exit on SIGTERM: {status:?}");
    assert!(producer.wait().unwrap().success());

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true);
    let read = report["rows_read"].as_i64().unwrap();
    assert!(
        read > 0 && read < 8928,
        "stopped mid-stream after {read} messages"
    );
    // Everything handed to the learner was processed and committed; nothing beyond it.
    assert_eq!(committed(&broker, "g-term", "live", 1).get(&0), Some(&read));
    let py = common::python(&format!(
        "{}print(t.num_rows, max(t['position'].to_pylist()))",
        common::load_scores_py(out.path())
    ));
    let f: Vec<i64> = py.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(
        f[1] + 1,
        read,
        "the last scored offset is the last committed one"
    );
}

#[test]
fn avro_payloads_train_like_json_and_bad_ones_are_dead_lettered() {
    // Sizes first: the Avro datum of a Milan row against its JSON object.
    let schema =
        gradsift::schema::Schema::load(&common::repo().join("schemas/milan_internet.json"))
            .unwrap();
    let avro = gradsift::payload::avro_schema(&schema);
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(common::repo().join("data/milan/internet_square5161.parquet")).unwrap(),
    )
    .unwrap()
    .with_batch_size(1000)
    .build()
    .unwrap()
    .next()
    .unwrap()
    .unwrap();
    let json = gradsift::produce::encode_rows(&batch, &schema, None).unwrap();
    let binary = gradsift::produce::encode_rows(&batch, &schema, Some(&avro)).unwrap();
    let mean = |v: &[(Option<String>, Vec<u8>)]| {
        v.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / v.len() as f64
    };
    println!(
        "bytes per Milan message: JSON {:.1}, Avro {:.1}",
        mean(&json),
        mean(&binary)
    );
    assert!(mean(&binary) * 2.0 < mean(&json));

    let broker = common::Broker::start();
    broker.create_topic("avro", 1);
    broker.create_topic("avro-dlq", 1);
    let said = produce_archive(&broker, "avro", &["--format", "avro"]);
    assert!(said.contains("produced 8928 messages"), "{said}");
    // After the archive: a JSON object, a truncated datum, and a datum of another schema.
    let lte =
        gradsift::schema::Schema::load(&common::repo().join("schemas/lte_cell_kpi.json")).unwrap();
    let mut row = serde_json::Map::new();
    row.insert("site".into(), "ElBorn".into());
    row.insert("time".into(), 1_522_252_560_000_000i64.into());
    for c in lte.read_columns().into_iter().skip(2) {
        row.insert(c, 1.5.into());
    }
    let other =
        gradsift::payload::encode_avro(&gradsift::payload::avro_schema(&lte), &lte, &row).unwrap();
    let bad: Vec<Vec<u8>> = vec![
        br#"{"square_id": 5161, "ts": 1, "internet": 1.0}"#.to_vec(),
        binary[0].1[..5].to_vec(),
        other,
    ];
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    for b in &bad {
        p.send(BaseRecord::to("avro").key("5161").payload(b))
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut cfg = kafka_pipeline(&broker, out.path(), "avro", "g-avro", "avro-dlq");
    cfg.source = match cfg.source {
        gradsift::source::SourceConfig::Kafka(mut k) => {
            k.format = gradsift::payload::PayloadFormat::Avro;
            gradsift::source::SourceConfig::Kafka(k)
        }
        other => other,
    };
    let r = common::run(cfg);
    println!("{:?}", r.skipped);
    assert_eq!(r.rows_read, 8928 + 3);
    assert_eq!(r.samples, 8784, "the same samples as from JSON");
    assert_eq!(r.skipped.get("lag_warmup"), Some(&144));
    assert!(
        r.skipped.get("malformed_avro").copied().unwrap_or(0) >= 2,
        "{:?}",
        r.skipped
    );
    assert_eq!(r.skipped_total, 144 + 3, "every bad datum is counted");
    assert_eq!(r.dead_lettered_rows, 3);
}
