//! Kafka → scored samples per second, end to end, against a real Kafka-protocol broker
//! (Tansu, started here on loopback, as in the tests). The Milan archive is produced
//! `GRADSIFT_BENCH_COPIES` times (default 40: 357,120 JSON messages) into one topic, then a
//! Kafka pipeline consumes it in a consumer group, decodes, builds features, scores every
//! sample by its exact gradient norm, selects, trains and commits. Throughput is counted
//! from the first message received (the group join is start-up, not throughput). Side by
//! side, in the same run, the same learner settings replay the archive from Parquet: the
//! ratio of the two says what Kafka + JSON cost.
//!
//! `cargo bench --bench kafka` (needs `tansu` on the PATH, see the README, or TANSU=path);
//! `GRADSIFT_BENCH_SET='source.options."fetch.min.bytes"="1"'` adds settings to its Kafka runs;
//! `GRADSIFT_BENCH_FORMAT=avro` produces and consumes Avro instead of JSON (a Milan row is 21
//! bytes against 61: less for the broker to store and serve, less to decode).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use gradsift::produce::{ProduceArgs, produce};
use gradsift::schema::Schema;
use gradsift::shutdown::Shutdown;

const LEARNER: [&str; 5] = [
    "training.micro_batch=256",
    "buffer.replay_ratio=0.25",
    "selection.warmup=1000",
    "output.scores=false",
    "evaluation.window=1000",
];

fn main() {
    let copies: usize = std::env::var("GRADSIFT_BENCH_COPIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let broker = common::Broker::start();
    broker.create_topic("bench", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let schema =
        Arc::new(Schema::load(&common::repo().join("schemas/milan_internet.json")).unwrap());
    let archive = common::repo().join("data/milan/internet_square5161.parquet");
    // The payload format's own names (as `source.format` and `gradsift produce --format`).
    let format_name = std::env::var("GRADSIFT_BENCH_FORMAT").unwrap_or_else(|_| "json".into());
    let format: gradsift::payload::PayloadFormat = clap::ValueEnum::from_str(&format_name, false)
        .unwrap_or_else(|e| panic!("GRADSIFT_BENCH_FORMAT={format_name}: {e}"));

    let t = Instant::now();
    let mut produced = 0;
    for _ in 0..copies {
        let args = ProduceArgs {
            path: archive.display().to_string(),
            schema: schema.clone(),
            brokers: broker.address(),
            topic: "bench".into(),
            pace: None,
            max_rows: None,
            options: Vec::new(),
            format,
        };
        produced += rt.block_on(produce(args, Shutdown::new())).unwrap();
    }
    let produce_s = t.elapsed().as_secs_f64();

    let out = tempfile::tempdir().unwrap();
    let mut o: Vec<String> = LEARNER.iter().map(|s| s.to_string()).collect();
    o.extend([
        format!("source.brokers=\"{}\"", broker.address()),
        "source.topics=[\"bench\"]".into(),
        "source.group_id=\"bench\"".into(),
        "source.dead_letter_topic=\"bench-dlq\"".into(),
        "source.stop_at_end=true".into(),
        "source.batch_size=4096".into(),
        format!("source.format=\"{format_name}\""),
    ]);
    // More settings for every Kafka run, to try consumer options: GRADSIFT_BENCH_SET='k=v;k=v'.
    if let Ok(extra) = std::env::var("GRADSIFT_BENCH_SET") {
        o.extend(
            extra
                .split(';')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    let o2: Vec<&str> = o.iter().map(String::as_str).collect();
    let kafka = common::run(common::pipeline("milan-kafka.toml", out.path(), &o2));
    assert_eq!(kafka.rows_read, produced, "every message consumed");

    // The same topic again in a second group with checkpoints off: what durability costs.
    o.extend([
        "source.group_id=\"bench-no-checkpoint\"".into(),
        "checkpoint.enabled=false".into(),
    ]);
    let o3: Vec<&str> = o.iter().map(String::as_str).collect();
    let out3 = tempfile::tempdir().unwrap();
    let bare = common::run(common::pipeline("milan-kafka.toml", out3.path(), &o3));
    assert_eq!(bare.rows_read, produced, "every message consumed");

    let out2 = tempfile::tempdir().unwrap();
    let parquet = common::run(common::pipeline("milan-replay.toml", out2.path(), &LEARNER));

    let k_rate = kafka.rows_read as f64 / kafka.active_s;
    let p_rate = parquet.rows_read as f64 / parquet.active_s;
    println!(
        "messages produced            {produced} in {produce_s:.2} s ({:.0} msg/s, {} encode + rdkafka)",
        produced as f64 / produce_s,
        format_name
    );
    println!(
        "Kafka → scored samples       {} rows in {:.2} s active ({k_rate:.0} rows/s; {:.2} s CPU; group join and start-up {:.2} s)",
        kafka.rows_read,
        kafka.active_s,
        kafka.cpu_s,
        kafka.wall_s - kafka.active_s
    );
    let st = &kafka.stages;
    println!(
        "per stage (Kafka run)        CPU / waiting s: source {:.2} / {:.2}, features {:.2} / {:.2}, learner {:.2} / {:.2}, checkpoint writer {:.2} / {:.2}",
        st.source.cpu_s,
        st.source.wait_s,
        st.features.cpu_s,
        st.features.wait_s,
        st.learner.cpu_s,
        st.learner.wait_s,
        st.checkpoint.cpu_s,
        st.checkpoint.wait_s
    );
    if let Some(c) = &kafka.checkpoint {
        println!(
            "checkpoints (Kafka run)      {} written, {:.3} s in all ({:.1} % of active time), last {} bytes",
            c.written,
            c.seconds,
            100.0 * c.seconds / kafka.active_s,
            c.last_bytes
        );
    }
    println!(
        "Parquet → scored samples     {} rows in {:.3} s active ({p_rate:.0} rows/s), same learner settings",
        parquet.rows_read, parquet.active_s
    );
    // Once more with the Prometheus recorder installed (process-wide, so last): what the
    // metrics cost. The endpoint is scraped once during the run to show it is live.
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    rt.block_on(async {
        gradsift::telemetry::serve(&gradsift::telemetry::TelemetryConfig {
            listen,
            ..Default::default()
        })
    })
    .unwrap();
    o.truncate(o.len() - 2);
    o.push("source.group_id=\"bench-metrics\"".into());
    let o4: Vec<&str> = o.iter().map(String::as_str).collect();
    let out4 = tempfile::tempdir().unwrap();
    let scraper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        common::http_get(&listen.to_string(), "/metrics").map_or(0, |s| s.lines().count())
    });
    let metered = common::run(common::pipeline("milan-kafka.toml", out4.path(), &o4));
    assert_eq!(metered.rows_read, produced, "every message consumed");
    let scrape_lines = scraper.join().unwrap();

    let b_rate = bare.rows_read as f64 / bare.active_s;
    let m_rate = metered.rows_read as f64 / metered.active_s;
    println!(
        "Kafka, checkpoints off       {} rows in {:.2} s active ({b_rate:.0} rows/s; {:.2} s CPU)",
        bare.rows_read, bare.active_s, bare.cpu_s
    );
    println!("Kafka / Parquet throughput   {:.2}", k_rate / p_rate);
    println!("checkpoints on / off         {:.2}", k_rate / b_rate);
    println!(
        "Kafka, checkpoints + metrics {} rows in {:.2} s active ({m_rate:.0} rows/s; {:.2} s CPU; a scrape mid-run had {scrape_lines} lines)",
        metered.rows_read, metered.active_s, metered.cpu_s
    );
    println!("metrics on / off             {:.2}", m_rate / k_rate);
    println!(
        "back-propagated rows         Kafka {} / Parquet {}",
        kafka.backpropagated, parquet.backpropagated
    );
}
