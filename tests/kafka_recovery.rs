//! Failure and scale-out, against a real Kafka-protocol broker (Tansu) on loopback: the
//! gradsift process killed with SIGKILL mid-stream and restarted (nothing lost, duplicates
//! within one checkpoint interval), the broker killed and restarted mid-stream (the run
//! completes), and two gradsift processes in one consumer group splitting the partitions.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::BrokerKind;
use common::kafka::{committed, produce_bad, produce_command, terminate};
use common::{log_text, spawn_run, wait_until};

fn milan_sets(broker: &common::Broker, topic: &str, group: &str) -> Vec<String> {
    vec![
        format!("source.brokers=\"{}\"", broker.address()),
        format!("source.topics=[\"{topic}\"]"),
        format!("source.group_id=\"{group}\""),
        format!("source.dead_letter_topic=\"{topic}-dlq\""),
        // Static membership: the restarted process takes its partitions back at once (Tansu
        // does not expire a killed member's session).
        format!("source.instance_id=\"{group}-1\""),
    ]
}

/// (rows, distinct (source, position) pairs, pairs) of every score file of a run.
fn scored_pairs(out: &Path) -> (usize, BTreeSet<(String, u64)>) {
    let py = common::python(&format!(
        "{}for s, p in zip(t['source'].to_pylist(), t['position'].to_pylist()): print(s, p)",
        common::load_scores_py(out)
    ));
    let mut rows = 0;
    let mut pairs = BTreeSet::new();
    for line in py.lines() {
        let (s, p) = line.split_once(' ').unwrap();
        pairs.insert((s.to_string(), p.parse().unwrap()));
        rows += 1;
    }
    (rows, pairs)
}

/// The distinct samples scored, by (key, time): a message the producer wrote twice has two
/// offsets but is one sample.
fn scored_samples(out: &Path) -> BTreeSet<(String, String)> {
    let py = common::python(&format!(
        "{}for k, t in zip(t['key'].to_pylist(), t['time'].to_pylist()): print(k, t.isoformat())",
        common::load_scores_py(out)
    ));
    py.lines()
        .map(|l| {
            let (k, t) = l.split_once(' ').unwrap();
            (k.to_string(), t.to_string())
        })
        .collect()
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

/// The dead letters of a run: (origin, row) of each line; every line must be whole JSON.
fn dead_letters(out: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(out.join("dead_letters.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn letter {l:?}: {e}"));
            (
                v["origin"].as_str().unwrap().to_string(),
                v["row"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A commit refused while the feed is quiet is made good without a new message: the mock
/// cluster refuses every offset commit while the run reads and checkpoints the whole topic;
/// once it accepts them again, the group's offset reaches the end within seconds although
/// nothing new arrives. (CI once saw the offset stay where a broker outage left it, 1,536 of
/// 8,928, for two minutes: commits were only made after checkpoints, and a quiet feed takes
/// none.) The mock cluster only: Tansu cannot be told to refuse a request.
#[test]
fn a_commit_refused_while_the_feed_is_quiet_is_made_good() {
    let broker = common::Broker::of(BrokerKind::Mock);
    broker.create_topic("quiet", 1);
    broker.create_topic("quiet-dlq", 1);
    common::kafka::produce_archive(&broker, "quiet", &[]);
    broker.refuse_commits(true);
    let out = tempfile::tempdir().unwrap();
    let mut sets = milan_sets(&broker, "quiet", "g-quiet");
    sets.push("checkpoint.every_rows=500".into());
    let (mut run, log) = spawn_run("milan-kafka.toml", out.path(), &sets);
    let covered = || {
        gradsift::checkpoint::load(&out.path().join("checkpoint.bin"))
            .ok()
            .flatten()
            .and_then(|c| c.positions.get("quiet[0]").copied())
    };
    wait_until("a checkpoint covering the whole topic", 120, || {
        covered() == Some(8928)
    });
    // The commit after that checkpoint was refused too (librdkafka logs the failure).
    wait_until("the last commit refused", 30, || {
        log_text(&log)
            .lines()
            .any(|l| l.contains("COMMITFAIL") && l.contains("[0]@8928"))
    });
    let before = committed(&broker, "g-quiet", "quiet", 1);
    assert!(
        before.get(&0).is_none_or(|&o| o < 8928),
        "every commit was refused: {before:?}"
    );
    broker.refuse_commits(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(&broker, "g-quiet", "quiet", 1).get(&0) != Some(&8928) {
        assert!(
            Instant::now() < deadline,
            "the offset committed within 30 s with no new message: {:?}\n{}",
            committed(&broker, "g-quiet", "quiet", 1),
            log_text(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = terminate(&mut run);
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        log_text(&log)
    );
}

/// A mock cluster with `topic` (300 archive rows, then `extra`, keyed) and `topic`-dlq.
fn mock_feed_then(topic: &str, extra: &str) -> common::Broker {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = common::Broker::of(BrokerKind::Mock);
    broker.create_topic(topic, 1);
    broker.create_topic(&format!("{topic}-dlq"), 1);
    common::kafka::produce_archive(&broker, topic, &["--max-rows", "300"]);
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    p.send(BaseRecord::to(topic).key("5161").payload(extra))
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
    broker
}

/// The first message on `topic`, within 30 s; none if there is none.
fn first_message(broker: &common::Broker, topic: &str) -> Option<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            return Some(m.detach());
        }
    }
    None
}

/// A dead letter the dead-letter topic refuses stops the feed before the batch that carries
/// it is learnt: no checkpoint covers its offset and none is committed, so a restart reads
/// the message again and, once the topic takes it, delivers it. (Before, the run went on, a
/// checkpoint covered the offset, and a restart skipped the message: the topic never got it.)
/// The mock cluster only: Tansu cannot be told to refuse a request.
#[test]
fn a_refused_dead_letter_stops_the_feed_and_a_restart_delivers_it() {
    let broker = mock_feed_then("refused", "{\"square_id\": 5161, \"ts\": ");
    broker.refuse_produce(true);
    let out = tempfile::tempdir().unwrap();
    let run = || {
        to_the_end(
            &broker,
            "refused",
            out.path(),
            &["checkpoint.every_rows=50"],
        )
    };
    let (status, log) = run();
    assert!(
        !status.success(),
        "the feed stops: {status:?}\n{}",
        log_text(&log)
    );
    assert!(
        log_text(&log).contains("not delivered"),
        "{}",
        log_text(&log)
    );
    let covered = gradsift::checkpoint::load(&out.path().join("checkpoint.bin"))
        .ok()
        .flatten()
        .and_then(|c| c.positions.get("refused[0]").copied());
    assert!(
        covered.is_none_or(|c| c <= 300),
        "no checkpoint covers offset 300: {covered:?}"
    );
    let before = committed(&broker, "g-refused", "refused", 1);
    assert!(before.get(&0).is_none_or(|&o| o <= 300), "{before:?}");

    broker.refuse_produce(false);
    let (status, log) = run();
    assert!(status.success(), "{status:?}\n{}", log_text(&log));
    assert!(
        first_message(&broker, "refused-dlq").is_some(),
        "the restart delivered the letter"
    );
}

/// A dead letter too large for the dead-letter producer goes without its payload (its
/// length in a header) rather than stopping the feed: it could never be delivered, so the
/// feed would stop again on every restart. The producer's limit is lowered to 50,000 bytes
/// here, under the 70,000-byte message (itself over the feed's 64 KiB limit).
#[test]
fn a_dead_letter_too_large_to_send_goes_without_its_payload() {
    use rdkafka::message::{Headers, Message};
    let long = format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000));
    let broker = mock_feed_then("big", &long);
    let out = tempfile::tempdir().unwrap();
    let limit = "source.options={\"message.max.bytes\"=\"50000\"}";
    let (status, log) = to_the_end(&broker, "big", out.path(), &[limit]);
    assert!(status.success(), "{status:?}\n{}", log_text(&log));
    let letter = first_message(&broker, "big-dlq").expect("a letter on the topic");
    let header = |name: &str| {
        let h = letter.headers().expect("headers");
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("gradsift.reason").as_deref(), Some("oversized"));
    let bytes = long.len().to_string();
    assert_eq!(
        header("gradsift.payload_dropped_bytes").as_deref(),
        Some(bytes.as_str())
    );
    assert!(letter.payload().is_none_or(|p| p.is_empty()));
}

/// `milan-kafka` on `topic` (group `g-<topic>`) with these settings, until it stops at the
/// topic's end (at most 90 s): its exit status and log.
fn to_the_end(
    broker: &common::Broker,
    topic: &str,
    out: &Path,
    extra: &[&str],
) -> (std::process::ExitStatus, Arc<Mutex<Vec<String>>>) {
    let mut sets = milan_sets(broker, topic, &format!("g-{topic}"));
    sets.push("source.stop_at_end=true".into());
    sets.extend(extra.iter().map(|s| s.to_string()));
    let (mut run, log) = spawn_run("milan-kafka.toml", out, &sets);
    (wait_exit(&mut run, 90), log)
}

/// The exit status of a run that stops by itself, within `limit_s` seconds.
fn wait_exit(run: &mut common::RunChild, limit_s: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(limit_s);
    loop {
        if let Some(s) = run.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not end within {limit_s} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL of a consuming gradsift mid-stream, then a restart on the same output folder:
/// every produced offset scored, duplicates within one checkpoint interval, every malformed
/// message dead-lettered once and whole. `static_member`: with `source.instance_id` (the
/// restart takes the partitions back at once) or without (the broker must first expire the
/// killed member's session).
fn kill_9_then_restart(kind: BrokerKind, static_member: bool) {
    let broker = common::Broker::of(kind);
    broker.create_topic("crash", 4);
    broker.create_topic("crash-dlq", 1);
    let every_rows = 500u64;
    let out = tempfile::tempdir().unwrap();
    let mut sets = milan_sets(&broker, "crash", "g-crash");
    if !static_member {
        sets.retain(|s| !s.starts_with("source.instance_id"));
        // A short session, so that the restart does not wait long for the dead member.
        sets.push(
            "source.options={\"session.timeout.ms\"=\"6000\",\"heartbeat.interval.ms\"=\"1000\"}"
                .into(),
        );
    }
    sets.push(format!("checkpoint.every_rows={every_rows}"));
    sets.push("checkpoint.every_seconds=1".into());

    // A live feed: the archive at 1,000 messages/s, about 9 s, and a malformed message every
    // 25 ms on another partition for 6 s.
    let mut producer = produce_command(&broker, "crash", &["--rate", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let bad_partition = 0;
    let bad = produce_bad(
        &broker,
        "crash",
        bad_partition,
        240,
        Duration::from_millis(25),
    );
    let (mut first, log1) = spawn_run("milan-kafka.toml", out.path(), &sets);
    // Let it process and checkpoint a good part of the stream, then SIGKILL it: no chance
    // to flush, checkpoint or commit anything more.
    wait_until("2,000 offsets committed", 60, || {
        committed(&broker, "g-crash", "crash", 4)
            .values()
            .sum::<i64>()
            >= 2000
    });
    first.kill().unwrap();
    let status = first.wait().unwrap();
    assert!(!status.success(), "killed: {status:?}");
    let at_kill: i64 = committed(&broker, "g-crash", "crash", 4).values().sum();
    let letters_at_kill = dead_letters(out.path()).len();
    assert!(
        out.path().join("checkpoint.bin").exists(),
        "a checkpoint was on disk at the kill\n{}",
        log_text(&log1)
    );
    assert!(producer.wait().unwrap().success());
    bad.join().unwrap();
    assert!(
        at_kill < 8928 + 240,
        "killed mid-stream (committed {at_kill})"
    );

    // Restart on the same output folder: it resumes from the checkpoint and the committed
    // offsets, and drains the rest of the topic.
    sets.push("source.stop_at_end=true".into());
    let restarted = Instant::now();
    let (mut second, log2) = spawn_run("milan-kafka.toml", out.path(), &sets);
    // Bounded: a restart that never gets its partitions must fail here, not hang CI.
    wait_until("the restarted run drains the topic and exits", 120, || {
        second.try_wait().unwrap().is_some()
    });
    let status = second.wait().unwrap();
    let restart_s = restarted.elapsed().as_secs_f64();
    assert!(status.success(), "restart: {status:?}\n{}", log_text(&log2));
    assert!(
        log_text(&log2).contains("resuming from checkpoint"),
        "{}",
        log_text(&log2)
    );

    let r = report(out.path());
    assert_eq!(r["checkpoint"]["resumes"], 1);
    // Every produced offset was processed: the stream's 8,784 samples (the first 144 rows
    // only warm the lags, once: the lag windows are in the checkpoint).
    assert_eq!(
        r["samples"],
        8784,
        "committed at kill {at_kill}\n{r}\nrestart log:\n{}",
        log_text(&log2)
    );
    assert_eq!(r["skipped"]["lag_warmup"], 144);
    let (rows, pairs) = scored_pairs(out.path());
    // One square, one key, one partition: offsets 0..8928 were produced to it.
    let sources: BTreeSet<&String> = pairs.iter().map(|(s, _)| s).collect();
    assert_eq!(sources.len(), 1, "{sources:?}");
    let source = sources.into_iter().next().unwrap().clone();
    let partition: i32 = source[6..source.len() - 1].parse().unwrap();
    assert_ne!(
        partition, bad_partition,
        "the test needs the stream and the bad messages apart"
    );
    let produced: BTreeSet<(String, u64)> = (0..8928).map(|o| (source.clone(), o)).collect();
    let warm: BTreeSet<(String, u64)> = produced.iter().take(144).cloned().collect();
    let expected: BTreeSet<(String, u64)> = produced.difference(&warm).cloned().collect();
    assert_eq!(
        pairs, expected,
        "every produced (partition, offset) was scored"
    );
    let duplicates = rows - pairs.len();
    // Each malformed message has one whole letter, though the kill cut the file anywhere.
    let letters = dead_letters(out.path());
    let distinct: BTreeSet<(String, u64)> = letters.iter().cloned().collect();
    let bad_source = format!("crash[{bad_partition}]");
    let expected_letters: BTreeSet<(String, u64)> =
        (0..240).map(|o| (bad_source.clone(), o)).collect();
    assert_eq!(
        distinct, expected_letters,
        "a letter for every malformed message"
    );
    assert_eq!(letters.len(), 240, "no letter written twice");
    assert_eq!(r["dead_lettered_rows"], 240, "{r}");
    println!(
        "crash-resume on {kind:?} (static member: {static_member}): produced {} + 240 malformed, committed at kill {at_kill}, \
         letters at kill {letters_at_kill}, scored rows {rows}, distinct {}, duplicates {duplicates}, already covered on restart {}, \
         restart to end {restart_s:.1} s",
        produced.len(),
        pairs.len(),
        r["checkpoint"]["rows_already_covered"]
    );
    assert!(
        duplicates as u64 <= every_rows,
        "duplicates {duplicates} within one checkpoint interval ({every_rows})"
    );
    let c = committed(&broker, "g-crash", "crash", 4);
    assert_eq!(c.get(&partition), Some(&8928));
    assert_eq!(c.get(&bad_partition), Some(&240));
}

#[test]
fn kill_9_then_restart_loses_nothing_on_tansu() {
    kill_9_then_restart(BrokerKind::Tansu, true);
}

#[test]
fn kill_9_then_restart_loses_nothing_on_the_mock_cluster() {
    kill_9_then_restart(BrokerKind::Mock, true);
}

/// Reported: a restart without a static member id got no partitions from Tansu. Not so with
/// Tansu 0.6.0 here: both brokers hand the partitions over once the killed member's session
/// expires.
#[test]
fn kill_9_then_restart_without_static_membership_on_tansu() {
    kill_9_then_restart(BrokerKind::Tansu, false);
}

#[test]
fn kill_9_then_restart_without_static_membership_on_the_mock_cluster() {
    kill_9_then_restart(BrokerKind::Mock, false);
}

/// The broker goes away for three seconds mid-stream and comes back with its log and group
/// offsets: the producer and the pipeline ride it out, the outage is logged as a client
/// error, and every sample is scored.
fn broker_restart_mid_stream(kind: BrokerKind) {
    // One outage at a time: run side by side with the Tansu outage, the paced producer on
    // the mock cluster twice failed to deliver within its 30 s flush after the broker came
    // back (PurgeInflight); alone it passed every time. Not understood yet.
    static ONE_OUTAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let mut broker = common::Broker::start_persistent(kind);
    broker.create_topic("durable", 1);
    broker.create_topic("durable-dlq", 1);
    let out = tempfile::tempdir().unwrap();
    let mut sets = milan_sets(&broker, "durable", "g-durable");
    sets.push("checkpoint.every_rows=500".into());

    let producer_log = out.path().join("producer.log");
    let mut producer = produce_command(&broker, "durable", &["--rate", "1000"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&producer_log).unwrap())
        .spawn()
        .unwrap();
    let (mut run, log) = spawn_run("milan-kafka.toml", out.path(), &sets);
    wait_until("1,000 offsets committed", 60, || {
        committed(&broker, "g-durable", "durable", 1)
            .get(&0)
            .is_some_and(|&o| o >= 1000)
    });
    broker.kill();
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    let produced = producer.wait().unwrap();
    let said = || std::fs::read_to_string(&producer_log).unwrap_or_default();
    assert!(
        produced.success(),
        "the producer rode out the restart:\n{}",
        said()
    );
    // At least the 8,928 messages produced: a producer that retries across the outage may
    // have written a few twice (seen once on Tansu: committed 8,934), and those offsets are
    // processed and committed too; the scored pairs below must still be exactly the 8,784
    // samples, each once.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = committed(&broker, "g-durable", "durable", 1);
        if c.get(&0).is_some_and(|&o| o >= 8928) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every offset committed within 120 s of the restart: {c:?}\n{}",
            log_text(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = terminate(&mut run);
    let text = log_text(&log);
    assert!(status.success(), "clean exit: {status:?}\n{text}");
    let outage: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(" WARN ")
                && (l.contains("Kafka client error; librdkafka retries")
                    || l.contains("Kafka consumer error; retrying"))
        })
        .collect();
    println!(
        "broker restart on {kind:?}: {} outage warnings, first: {:?}",
        outage.len(),
        outage.first()
    );
    assert!(
        !outage.is_empty(),
        "the broker outage is reported in the log as a Kafka client error:\n{text}"
    );
    // A message the producer wrote twice is one sample at two offsets: every distinct sample
    // is scored, and no offset beyond those produced.
    let end = committed(&broker, "g-durable", "durable", 1)[&0] as usize;
    let (rows, pairs) = scored_pairs(out.path());
    assert_eq!(
        scored_samples(out.path()).len(),
        8784,
        "every sample scored"
    );
    assert!(
        (8784..=8784 + (end - 8928)).contains(&pairs.len()),
        "scored offsets {} for {} produced beyond the 8,928",
        pairs.len(),
        end - 8928
    );
    assert!(
        rows - pairs.len() <= 500,
        "duplicates {}",
        rows - pairs.len()
    );
}

#[test]
fn broker_killed_and_restarted_mid_stream_the_run_completes_on_tansu() {
    broker_restart_mid_stream(BrokerKind::Tansu);
}

#[test]
fn broker_down_and_up_mid_stream_the_run_completes_on_the_mock_cluster() {
    broker_restart_mid_stream(BrokerKind::Mock);
}

#[test]
fn two_instances_in_one_group_split_the_partitions() {
    let broker = common::Broker::start();
    let partitions = 4;
    broker.create_topic("beams", partitions as u32);
    broker.create_topic("beams-dlq", 1);
    let sets = |group: &str| {
        vec![
            format!("source.brokers=\"{}\"", broker.address()),
            "source.topics=[\"beams\"]".to_string(),
            format!("source.group_id=\"{group}\""),
            "source.dead_letter_topic=\"beams-dlq\"".to_string(),
        ]
    };
    let (out_a, out_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, log_a) = spawn_run("beam-kafka.toml", out_a.path(), &sets("g-split"));
    let (mut b, log_b) = spawn_run("beam-kafka.toml", out_b.path(), &sets("g-split"));
    // Both members hold half the partitions once the group has settled.
    let last_assignment = |log: &Arc<Mutex<Vec<String>>>| {
        log.lock()
            .unwrap()
            .iter()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .cloned()
    };
    wait_until("both members own two partitions", 90, || {
        [&log_a, &log_b]
            .iter()
            .all(|l| last_assignment(l).is_some_and(|s| s.contains("count=2")))
    });
    // Produce the four DeepSense scenarios; each scenario is one key and stays in one
    // partition.
    let files = common::shared_data().join("beam/*.parquet");
    let produced = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .current_dir(common::repo())
        .args([
            "produce",
            files.to_str().unwrap(),
            "--schema",
            "schemas/deepsense_beam.json",
            "--topic",
            "beams",
            "--brokers",
        ])
        .arg(broker.address())
        .output()
        .unwrap();
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    let said = String::from_utf8_lossy(&produced.stdout).into_owned();
    let total: i64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("produce said: {said}"));
    // Offsets start at 0, so the committed offsets of all partitions sum to what was produced.
    let mut hw = BTreeMap::new();
    wait_until("every offset committed", 120, || {
        hw = committed(&broker, "g-split", "beams", partitions);
        if std::env::var_os("GRADSIFT_TEST_ECHO").is_some() {
            eprintln!("committed {hw:?} of {total}");
        }
        hw.values().sum::<i64>() == total
    });
    assert!(terminate(&mut a).success(), "{}", log_text(&log_a));
    assert!(terminate(&mut b).success(), "{}", log_text(&log_b));

    let owned = |log: &Arc<Mutex<Vec<String>>>| -> BTreeSet<String> {
        let l = last_assignment(log).unwrap();
        let list = l.split("partitions=").nth(1).unwrap();
        let list = list.split_whitespace().next().unwrap();
        list.split(',').map(str::to_string).collect()
    };
    let (own_a, own_b) = (owned(&log_a), owned(&log_b));
    assert!(own_a.is_disjoint(&own_b), "{own_a:?} / {own_b:?}");
    assert_eq!(own_a.len() + own_b.len(), partitions as usize);

    // Each instance scored rows only from its own partitions, and together every row with
    // data was read exactly once.
    let (ra, rb) = (report(out_a.path()), report(out_b.path()));
    let read = ra["rows_read"].as_i64().unwrap() + rb["rows_read"].as_i64().unwrap();
    assert_eq!(read, total, "rows read by both = produced");
    let (_, pa) = scored_pairs(out_a.path());
    let (_, pb) = scored_pairs(out_b.path());
    let parts = |p: &BTreeSet<(String, u64)>| -> BTreeSet<String> {
        p.iter().map(|(s, _)| s.clone()).collect()
    };
    assert!(parts(&pa).is_subset(&own_a), "{:?} ⊄ {own_a:?}", parts(&pa));
    assert!(parts(&pb).is_subset(&own_b), "{:?} ⊄ {own_b:?}", parts(&pb));
    assert!(pa.is_disjoint(&pb));
    assert!(
        !pa.is_empty() && !pb.is_empty(),
        "both instances scored samples"
    );
    println!(
        "split: A owns {own_a:?} and read {}, B owns {own_b:?} and read {}; partitions with data {hw:?}",
        ra["rows_read"], rb["rows_read"]
    );
}

/// A broker with the bundled archive produced unpaced (large record batches) to a fresh
/// one-partition topic `name` (and `name-dlq`).
fn milan_topic(kind: BrokerKind, name: &str) -> common::Broker {
    let broker = common::Broker::of(kind);
    broker.create_topic(name, 1);
    broker.create_topic(&format!("{name}-dlq"), 1);
    produce_command(&broker, name, &[])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    broker
}

/// [`milan_topic`] "mid", and the group's offset set to `offset`.
fn topic_with_group_offset(kind: BrokerKind, offset: i64) -> common::Broker {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let broker = milan_topic(kind, "mid");
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "g-mid")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("mid", 0, rdkafka::Offset::Offset(offset))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
    assert_eq!(committed(&broker, "g-mid", "mid", 1).get(&0), Some(&offset));
    broker
}

/// Resuming from a committed offset inside a stored record batch: Tansu 0.6 serves such a
/// fetch from the next batch, which silently skipped the rest of the batch until the source
/// learned to seek back. The group's offset is set to 1,000 (inside a batch), and every
/// message from 1,000 on must be read, once.
fn resume_inside_a_record_batch(kind: BrokerKind) {
    let broker = topic_with_group_offset(kind, 1000);
    let out = tempfile::tempdir().unwrap();
    let mut sets = milan_sets(&broker, "mid", "g-mid");
    sets.push("source.stop_at_end=true".into());
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let r = common::run(common::pipeline("milan-kafka.toml", out.path(), &sets));
    assert_eq!(
        r.rows_read,
        8928 - 1000,
        "every message from offset 1,000 on"
    );
    let (rows, pairs) = scored_pairs(out.path());
    let first = pairs.iter().map(|(_, p)| *p).min();
    assert_eq!(rows, pairs.len(), "no message scored twice");
    assert_eq!(
        first,
        Some(1000 + 144),
        "scoring starts after the lag warm-up at 1,000"
    );
    assert_eq!(committed(&broker, "g-mid", "mid", 1).get(&0), Some(&8928));
}

#[test]
fn resume_from_an_offset_inside_a_record_batch_reads_every_message_on_tansu() {
    resume_inside_a_record_batch(BrokerKind::Tansu);
}

#[test]
fn resume_from_an_offset_inside_a_record_batch_reads_every_message_on_the_mock_cluster() {
    resume_inside_a_record_batch(BrokerKind::Mock);
}

/// The group's offset inside the *last* record batch, nothing after it: Tansu 0.6 serves
/// nothing at all to that fetch (the run idled with no word; librdkafka's mock cluster serves
/// the 28 messages at once), or, once in CI, messages from past the offset. The stall watch
/// (or the seek-back at the start) must notice, say so, seek back, and read exactly the 28
/// messages.
fn resume_in_the_last_record_batch(kind: BrokerKind) {
    let broker = topic_with_group_offset(kind, 8900);
    let out = tempfile::tempdir().unwrap();
    let mut sets = milan_sets(&broker, "mid", "g-mid");
    sets.push("source.stop_at_end=true".into());
    sets.push("source.stall_after_ms=2000".into());
    let started = Instant::now();
    let (mut run, log) = spawn_run("milan-kafka.toml", out.path(), &sets);
    wait_until("the run ends", 90, || run.try_wait().unwrap().is_some());
    let text = log_text(&log);
    assert!(run.wait().unwrap().success(), "{text}");
    let r = report(out.path());
    assert_eq!(r["rows_read"], 28, "the 28 messages from 8,900 on\n{text}");
    assert_eq!(committed(&broker, "g-mid", "mid", 1).get(&0), Some(&8928));
    let stalls: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("partition makes no progress"))
        .collect();
    println!(
        "last-batch resume on {kind:?}: {:.1} s, stall warnings {}: {:?}",
        started.elapsed().as_secs_f64(),
        stalls.len(),
        stalls.first()
    );
    match kind {
        // The broker fault the watch works around: reported, with the offsets and the seek.
        // Tansu shows it one of two ways, depending on how the producer's batches were laid
        // down: no answer to the fetch (the stall watch), or an answer that starts past the
        // committed offset (the seek-back at the start; seen once in CI, 2026-12-01).
        BrokerKind::Tansu => {
            let sought_back = text.lines().any(|l| {
                l.contains(" WARN ")
                    && l.contains("fetch began past the committed offset")
                    && l.contains("committed=8900")
            });
            assert!(
                sought_back
                    || stalls
                        .first()
                        .is_some_and(|l| l.contains("next=8900") && l.contains("seek_to=")),
                "{text}"
            )
        }
        // A broker that serves the fetch: no false alarm.
        BrokerKind::Mock => assert!(stalls.is_empty(), "{text}"),
    }
}

#[test]
fn resume_in_the_last_record_batch_is_noticed_and_read_on_tansu() {
    resume_in_the_last_record_batch(BrokerKind::Tansu);
}

#[test]
fn resume_in_the_last_record_batch_reads_the_tail_on_the_mock_cluster() {
    resume_in_the_last_record_batch(BrokerKind::Mock);
}

/// A checkpoint that cannot be written ends the run with an error naming the file, also when
/// the feed then goes quiet (with no rows, no next checkpoint would ever report it), and
/// nothing is committed.
#[test]
fn a_failed_checkpoint_write_ends_the_run_on_a_quiet_feed_and_commits_nothing() {
    let broker = milan_topic(BrokerKind::Mock, "quiet");
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-folder/checkpoint.bin");
    let mut sets = milan_sets(&broker, "quiet", "g-quiet");
    sets.push(format!("checkpoint.path=\"{}\"", missing.display()));
    // No checkpoint by rows: the first one falls due on time, 8 s after the start, when the
    // 8,928 messages were read long ago (the group join takes about 3 s) and the feed is quiet.
    sets.push("checkpoint.every_rows=1000000".into());
    sets.push("checkpoint.every_seconds=8".into());
    let (mut run, log) = spawn_run("milan-kafka.toml", out.path(), &sets);
    wait_until("the run ends", 90, || run.try_wait().unwrap().is_some());
    let text = log_text(&log);
    assert!(!run.wait().unwrap().success(), "{text}");
    assert!(text.contains("no-such-folder"), "{text}");
    assert!(!missing.exists());
    assert_eq!(
        committed(&broker, "g-quiet", "quiet", 1).get(&0),
        None,
        "{text}"
    );
}

/// `gradsift produce` from a folder holding a file it cannot read produces the rest, then
/// fails saying so: the topic does not hold the archive (it exited 0 before).
#[test]
fn produce_fails_when_part_of_the_archive_cannot_be_read() {
    let broker = common::Broker::of(BrokerKind::Mock);
    broker.create_topic("partial", 1);
    let dir = tempfile::tempdir().unwrap();
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    std::fs::copy(&milan, dir.path().join("a.parquet")).unwrap();
    std::fs::write(dir.path().join("b.parquet"), b"not a parquet file").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .current_dir(common::repo())
        .arg("produce")
        .arg(dir.path())
        .args([
            "--schema",
            "schemas/milan_internet.json",
            "--topic",
            "partial",
        ])
        .args(["--max-rows", "100", "--brokers"])
        .arg(broker.address())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("100 messages produced") && err.contains("1 parts of the archive"),
        "{err}"
    );
}
