//! Metrics as operators see them, checked with the real tools: live scrapes of the HTTP
//! endpoint during a Kafka run (against Tansu) and a paced beam replay pass `promtool check
//! metrics` with nothing to say, hold every metric of the table in `src/telemetry.rs`, and
//! hold every series the Grafana dashboard in `docker/` queries; a real Prometheus server
//! scrapes a run and its HTTP API shows the series arrive and move.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::kafka::{produce_command, terminate};
use common::{free_port, http_get, log_text, poll_until, spawn_run, url_encode, wait_until};
use gradsift::telemetry::METRICS;

/// Series names in a Prometheus text scrape (`name{labels} value` or `name value`).
fn series_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// `promtool check metrics` on a scrape: must succeed and print nothing (no lint warnings).
fn promtool_check(scrape: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: `apt-get install prometheus` (.ci/run does)");
    p.stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = p.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check metrics: exit {:?}, output {:?}",
        out.status.code(),
        said
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

/// Metric names a dashboard's panels query, per panel title.
fn dashboard_queries(path: &Path) -> Vec<(String, BTreeSet<String>)> {
    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut out = Vec::new();
    let mut panels: Vec<serde_json::Value> = d["panels"].as_array().unwrap().clone();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner.iter().cloned());
        }
        let Some(targets) = p["targets"].as_array() else {
            continue;
        };
        let mut names = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            // Identifiers outside quotes that name our series.
            let mut in_quote = false;
            let mut word = String::new();
            for c in expr.chars().chain(std::iter::once(' ')) {
                if c == '"' {
                    in_quote = !in_quote;
                }
                if !in_quote && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    word.push(c);
                } else {
                    if word.starts_with("gradsift_") || word.starts_with("process_") {
                        names.insert(word.clone());
                    }
                    word.clear();
                }
            }
        }
        out.push((p["title"].as_str().unwrap().to_string(), names));
    }
    out
}

/// `sets` plus the overrides that turn the metrics endpoint on, on a free loopback port;
/// returns the endpoint's address with them.
fn with_endpoint(mut sets: Vec<String>) -> (String, Vec<String>) {
    let addr = format!("127.0.0.1:{}", free_port());
    sets.extend([
        "telemetry.enabled=true".into(),
        format!("telemetry.listen=\"{addr}\""),
        "telemetry.publish_ms=200".into(),
    ]);
    (addr, sets)
}

/// Scrapes until `ready` holds for the scrape; after `secs` fails with what the last scrape
/// held (its series, and the samples of the counters the tests wait on), so a timeout says
/// which condition was missing.
fn scrape_until(addr: &str, secs: u64, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let ready = poll_until(secs, || {
        if let Some(s) = http_get(addr, "/metrics") {
            last = s;
        }
        ready(&last)
    });
    if !ready {
        let waited_on = [
            "gradsift_dead_letters_total",
            "gradsift_decision_rows_total",
        ];
        let samples: Vec<&str> = (last.lines())
            .filter(|l| waited_on.iter().any(|p| l.starts_with(p)))
            .collect();
        panic!(
            "timed out after {secs} s: {what}\nlast scrape's series: {:?}\nits samples of {waited_on:?}:\n{}",
            series_names(&last),
            samples.join("\n")
        );
    }
    last
}

#[test]
fn live_scrapes_pass_promtool_and_feed_every_metric_and_dashboard_panel() {
    common::shared_data();
    // A Kafka run: Milan, live at 2,000 msg/s, with bad messages for the dead-letter series.
    let broker = common::Broker::start();
    broker.create_topic("tele", 2);
    broker.create_topic("tele-dlq", 1);
    let mut producer = produce_command(&broker, "tele", &["--rate", "2000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (kafka_addr, sets) = with_endpoint(vec![
        format!("source.brokers=\"{}\"", broker.address()),
        "source.topics=[\"tele\"]".into(),
        "source.group_id=\"tele\"".into(),
        "source.dead_letter_topic=\"tele-dlq\"".into(),
        "checkpoint.every_rows=1000".into(),
    ]);
    let out = tempfile::tempdir().unwrap();
    let (mut kafka_run, kafka_log) = spawn_run("milan-kafka.toml", out.path(), &sets);
    {
        use rdkafka::ClientConfig;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .create()
            .unwrap();
        for bad in ["{\"square_id\": 5161, \"ts\": ", "[1, 2, 3]"] {
            p.send(BaseRecord::to("tele").key("5161").payload(bad))
                .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }

    // A beam replay (classification: the top-1/top-3 series), paced so it is scraped live.
    let (beam_addr, sets) = with_endpoint(vec!["source.pace.rows_per_second=1000".into()]);
    let out_b = tempfile::tempdir().unwrap();
    let (mut beam_run, beam_log) = spawn_run("beam-replay.toml", out_b.path(), &sets);

    let kafka_needs: Vec<&str> = vec![
        "gradsift_kafka_consumer_lag_messages",
        "gradsift_dead_letters_total",
        "gradsift_checkpoint_duration_seconds_bucket",
        "gradsift_prequential_mae",
        "gradsift_buffer_samples",
    ];
    // Both bad messages counted, by reason: the scrape waits for the value it checks.
    let both_letters = "gradsift_dead_letters_total{reason=\"malformed_json\"} 2";
    let kafka_scrape = scrape_until(
        &kafka_addr,
        90,
        "a Kafka scrape with lag, both dead letters and a checkpoint",
        |s| {
            let names = series_names(s);
            kafka_needs.iter().all(|n| names.contains(*n)) && s.contains(both_letters)
        },
    );
    // The shipped beam pipeline acts by the switch: both rules' counts move.
    let counted = |s: &str, rule: &str| {
        let series = format!("gradsift_decision_rows_total{{rule=\"{rule}\"}} ");
        (s.lines().find_map(|l| l.strip_prefix(series.as_str())))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
    };
    let beam_scrape = scrape_until(
        &beam_addr,
        60,
        "a beam scrape with top-1 accuracy and both rules' decisions",
        |s| {
            let names = series_names(s);
            names.contains("gradsift_prequential_top1_accuracy")
                && names.contains("gradsift_importance_score_bucket")
                && counted(s, "most_probable")
                && counted(s, "least_expected_loss")
        },
    );
    println!(
        "--- Kafka run scrape (excerpt) ---\n{}",
        kafka_scrape
            .lines()
            .filter(|l| !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    promtool_check(&kafka_scrape);
    promtool_check(&beam_scrape);

    let mut names = series_names(&kafka_scrape);
    names.extend(series_names(&beam_scrape));
    // Every metric of the table is exported, with its HELP text.
    for m in METRICS {
        let rendered = match m.kind {
            gradsift::telemetry::Kind::Histogram => format!("{}_bucket", m.name),
            _ => m.name.to_string(),
        };
        assert!(names.contains(&rendered), "{} not in any scrape", m.name);
        let help = format!("# HELP {} ", m.name);
        assert!(
            kafka_scrape.contains(&help) || beam_scrape.contains(&help),
            "no HELP for {}",
            m.name
        );
    }
    // No dead panel: every series a panel queries is in a real scrape.
    let panels = dashboard_queries(&common::repo().join("docker/grafana/dashboards/gradsift.json"));
    assert!(panels.len() >= 12, "{} panels", panels.len());
    for (title, queried) in &panels {
        assert!(
            !queried.is_empty(),
            "panel `{title}` queries no gradsift series"
        );
        for q in queried {
            assert!(
                names.contains(q),
                "panel `{title}` queries `{q}`, absent from the scrapes"
            );
        }
    }

    producer.wait().unwrap();
    assert!(
        terminate(&mut kafka_run).success(),
        "{}",
        log_text(&kafka_log)
    );
    assert!(
        terminate(&mut beam_run).success(),
        "{}",
        log_text(&beam_log)
    );
}

/// A Prometheus server on loopback, stopped on drop.
struct PrometheusServer {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    fn start(target: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gradsift\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus not found: `apt-get install prometheus` (.ci/run does)");
        let server = PrometheusServer {
            child,
            addr,
            _dir: dir,
        };
        wait_until("Prometheus ready", 60, || {
            http_get(&server.addr, "/-/ready").is_some()
        });
        server
    }

    /// An instant query: (labels, value) per series.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let Some(body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(q)),
        ) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{q}: {body}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"].clone(),
                    r["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
                )
            })
            .collect()
    }

    fn value(&self, q: &str) -> Option<f64> {
        self.query(q).first().map(|r| r.1)
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_prometheus_server_scrapes_a_run_and_sees_the_series_move() {
    common::shared_data();
    // 8,750 beam samples at 400 rows/s: about 22 s of live stream.
    let (target, sets) = with_endpoint(vec!["source.pace.rows_per_second=400".into()]);
    let out = tempfile::tempdir().unwrap();
    let (mut run, log) = spawn_run("beam-replay.toml", out.path(), &sets);
    let prom = PrometheusServer::start(&target);

    let samples = "sum(gradsift_rows_total{outcome=\"sample\"})";
    let mut first = 0.0;
    wait_until("Prometheus has scraped samples from gradsift", 60, || {
        first = prom.value(samples).unwrap_or(0.0);
        first > 0.0
    });
    let mut later = first;
    wait_until("the sample counter moves in Prometheus", 60, || {
        later = prom.value(samples).unwrap_or(0.0);
        later > first
    });
    let up = prom.value("up{job=\"gradsift\"}");
    let trained = prom
        .value("sum(gradsift_samples_trained_total)")
        .unwrap_or(0.0);
    let buffer = prom.value("gradsift_buffer_samples").unwrap_or(0.0);
    let top1 = prom.value("gradsift_prequential_top1_accuracy");
    let rate = prom.value("sum(rate(gradsift_rows_total{outcome=\"sample\"}[5s]))");
    let p50 = prom
        .value("histogram_quantile(0.5, sum by (le) (rate(gradsift_importance_score_bucket[5s])))");
    let threshold = prom.value("gradsift_selection_threshold");
    let series = prom.query("count by (__name__) ({job=\"gradsift\"})").len();
    println!(
        "Prometheus saw: up={up:?}; samples {first} then {later}; rate {rate:?}/s; trained {trained}; buffer {buffer}; top-1 {top1:?}; score p50 {p50:?}; threshold {threshold:?}; {series} metric names from job gradsift"
    );
    assert_eq!(up, Some(1.0));
    assert!(trained > 0.0 && buffer > 0.0);
    assert!(top1.is_some_and(|v| (0.0..=1.0).contains(&v)));
    assert!(rate.is_some_and(|v| v > 0.0));
    assert!(p50.is_some_and(|v| v.is_finite() && v > 0.0), "{p50:?}");
    assert!(series >= 25, "{series} metric names");
    assert!(terminate(&mut run).success(), "{}", log_text(&log));
}

#[test]
fn the_compose_stack_is_wired_to_the_endpoint_and_the_dashboard() {
    // No Docker engine here: check what can be checked with the real tools and the files.
    let docker = common::repo().join("docker");
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(docker.join("prometheus/prometheus.yml"))
        .output()
        .expect("promtool not found: `apt-get install prometheus` (.ci/run does)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prom = std::fs::read_to_string(docker.join("prometheus/prometheus.yml")).unwrap();
    let compose = std::fs::read_to_string(docker.join("compose.yaml")).unwrap();
    // Prometheus scrapes the gradsift service on the port gradsift listens on in the stack.
    assert!(prom.contains("\"gradsift:9898\""), "{prom}");
    assert!(compose.contains("telemetry.listen=0.0.0.0:9898") && compose.contains("\"9898:9898\""));
    // The pipeline and archive the stack runs exist in the image's layout.
    for f in [
        "pipelines/milan-kafka.toml",
        "data/milan/internet_square5161.parquet",
        "schemas/milan_internet.json",
    ] {
        assert!(compose.contains(f), "{f} not in compose.yaml");
        assert!(common::repo().join(f).exists(), "{f}");
    }
    // Grafana's provisioned datasource is the one every panel names.
    let ds =
        std::fs::read_to_string(docker.join("grafana/provisioning/datasources/prometheus.yaml"))
            .unwrap();
    assert!(ds.contains("uid: prometheus") && ds.contains("http://prometheus:9090"));
    let d: serde_json::Value = serde_json::from_slice(
        &std::fs::read(docker.join("grafana/dashboards/gradsift.json")).unwrap(),
    )
    .unwrap();
    for p in d["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
    }
    // The Kafka pipeline's settings the stack overrides are real keys.
    let cfg = gradsift::config::PipelineConfig::load(
        &common::repo().join("pipelines/milan-kafka.toml"),
        &[
            "source.brokers=kafka:9092".into(),
            "source.instance_id=gradsift-1".into(),
            "telemetry.listen=0.0.0.0:9898".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.telemetry.listen.to_string(), "0.0.0.0:9898");
}
