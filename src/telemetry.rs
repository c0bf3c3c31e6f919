//! Every metric gradsift exports, in one table (name, kind, unit, help), the Prometheus
//! endpoint, and the handles the pipeline updates.
//!
//! Operators read gradsift through Prometheus and Grafana, so names follow Prometheus' rules
//! (base units in the name, `_total` on counters only; `promtool check metrics` runs on a live
//! scrape in the tests) and live here alone: a dashboard or alert written against this table
//! cannot silently lose a series to a renamed string elsewhere. Emitters take handles built
//! once (an atomic add per event, no key hashing on the hot path); without an endpoint the
//! `metrics` crate's no-op recorder makes them free. Counters count this process's work and
//! restart at zero with it, as Prometheus expects; state restored from a checkpoint shows in
//! gauges (buffer size, threshold), not as a counter jump.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use metrics::{Counter, Gauge, Histogram, Unit, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::{Deserialize, Serialize};

/// `[telemetry]`: the Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Serve `/metrics` while `gradsift run` runs.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Bind address; loopback unless you mean to expose it.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often gauges that cost a pass over a window (prequential metrics, buffer, energy)
    /// are refreshed, in milliseconds.
    #[serde(default = "default_publish_ms")]
    pub publish_ms: u64,
}

fn yes() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9898))
}

fn default_publish_ms() -> u64 {
    1000
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            listen: default_listen(),
            publish_ms: default_publish_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
}

const fn def(name: &'static str, kind: Kind, unit: Unit, help: &'static str) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        help,
    }
}

pub const BUILD_INFO: &str = "gradsift_build_info";
pub const ROWS: &str = "gradsift_rows_total";
pub const ROWS_SKIPPED: &str = "gradsift_rows_skipped_total";
pub const DEAD_LETTERS: &str = "gradsift_dead_letters_total";
pub const SCORE: &str = "gradsift_importance_score";
pub const THRESHOLD: &str = "gradsift_selection_threshold";
pub const SELECTED: &str = "gradsift_samples_selected_total";
pub const TRAINED: &str = "gradsift_samples_trained_total";
pub const BACKPROPAGATED: &str = "gradsift_samples_backpropagated_total";
pub const CLIPPED: &str = "gradsift_samples_clipped_total";
pub const DECISIONS: &str = "gradsift_decision_rows_total";
pub const BUFFER_SAMPLES: &str = "gradsift_buffer_samples";
pub const BUFFER_BYTES: &str = "gradsift_buffer_bytes";
pub const BUFFER_CAPACITY: &str = "gradsift_buffer_capacity_samples";
pub const BUFFER_ADMITTED: &str = "gradsift_buffer_admitted_total";
pub const BUFFER_EVICTIONS: &str = "gradsift_buffer_evictions_total";
pub const BUFFER_RESCORED: &str = "gradsift_buffer_rescored_total";
pub const STEPS: &str = "gradsift_training_steps_total";
pub const NONFINITE_STEPS: &str = "gradsift_nonfinite_steps_total";
pub const MODEL_RESTORES: &str = "gradsift_model_restores_total";
pub const STEP_SECONDS: &str = "gradsift_training_step_seconds";
pub const LOSS: &str = "gradsift_training_loss";
pub const MAE: &str = "gradsift_prequential_mae";
pub const RMSE: &str = "gradsift_prequential_rmse";
pub const TOP1: &str = "gradsift_prequential_top1_accuracy";
pub const TOP3: &str = "gradsift_prequential_top3_accuracy";
pub const WINDOW_SAMPLES: &str = "gradsift_prequential_window_samples";
pub const KEYS: &str = "gradsift_keys_tracked";
pub const DRIFT_EVENTS: &str = "gradsift_drift_events_total";
pub const DRIFT_RECOVERING: &str = "gradsift_drift_recovering";
pub const DRIFT_ADWIN_WINDOW: &str = "gradsift_drift_adwin_window_samples";
pub const DRIFT_PAGE_HINKLEY: &str = "gradsift_drift_page_hinkley_statistic";
pub const CHECKPOINTS: &str = "gradsift_checkpoints_total";
pub const CHECKPOINT_SECONDS: &str = "gradsift_checkpoint_duration_seconds";
pub const CHECKPOINT_BYTES: &str = "gradsift_checkpoint_bytes";
pub const CHECKPOINT_TIME: &str = "gradsift_checkpoint_last_success_timestamp_seconds";
pub const CHECKPOINT_AGE: &str = "gradsift_checkpoint_age_seconds";
pub const KAFKA_LAG: &str = "gradsift_kafka_consumer_lag_messages";
pub const KAFKA_COMMIT_LAG: &str = "gradsift_kafka_commit_lag_messages";
pub const ENERGY: &str = "gradsift_energy_joules";
pub const POWER: &str = "gradsift_power_watts";
pub const CO2: &str = "gradsift_co2_grams";
pub const CPU: &str = "gradsift_cpu_seconds";
pub const ENERGY_MODEL: &str = "gradsift_energy_model_info";
pub const RSS: &str = "process_resident_memory_bytes";

/// The whole table: the endpoint describes each, the tests check each against a scrape.
pub const METRICS: &[MetricDef] = &[
    def(
        BUILD_INFO,
        Kind::Gauge,
        Unit::Count,
        "Always 1; labels name the version, the pipeline, the model backend and the importance method.",
    ),
    def(
        ROWS,
        Kind::Counter,
        Unit::Count,
        "Rows (messages) received, by source kind and outcome: sample (went to the learner), skipped (expected, e.g. lag warm-up), dead_lettered (bad input), already_covered (redelivered, already in the checkpoint).",
    ),
    def(
        ROWS_SKIPPED,
        Kind::Counter,
        Unit::Count,
        "Rows that are not samples by design (e.g. lag_warmup: a key's lag window is not full yet), by reason.",
    ),
    def(
        DEAD_LETTERS,
        Kind::Counter,
        Unit::Count,
        "Rows sent to the dead-letter destination, by reason (malformed_json, wrong_type, non_finite, missing_field, oversized, ...).",
    ),
    def(
        SCORE,
        Kind::Histogram,
        Unit::Count,
        "Importance score of each fresh sample: the L2 norm of its per-sample loss gradient (or the configured proxy).",
    ),
    def(
        THRESHOLD,
        Kind::Gauge,
        Unit::Count,
        "Current selection threshold: the streaming (1 - keep) quantile of recent scores.",
    ),
    def(
        SELECTED,
        Kind::Counter,
        Unit::Count,
        "Fresh samples whose score passed the threshold (or were drawn by the unbiased sampler).",
    ),
    def(
        TRAINED,
        Kind::Counter,
        Unit::Count,
        "Samples that entered an optimiser step, by origin: fresh or replay (from the buffer).",
    ),
    def(
        CLIPPED,
        Kind::Counter,
        Unit::Count,
        "Trained samples whose loss weight norm clipping (selection.clip) cut to the running threshold.",
    ),
    def(
        DECISIONS,
        Kind::Counter,
        Unit::Count,
        "model.decision = \"switch\": rows on which the most probable class and the least expected loss differed, by the rule acted on (most_probable, least_expected_loss).",
    ),
    def(
        BACKPROPAGATED,
        Kind::Counter,
        Unit::Count,
        "Samples that went through a backward pass (scoring or training): the compute the selection saves.",
    ),
    def(
        BUFFER_SAMPLES,
        Kind::Gauge,
        Unit::Count,
        "Samples held in the replay buffer.",
    ),
    def(
        BUFFER_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        "Bytes held by the replay buffer's samples (capped by buffer.max_bytes).",
    ),
    def(
        BUFFER_CAPACITY,
        Kind::Gauge,
        Unit::Count,
        "Replay buffer capacity in samples (buffer.capacity).",
    ),
    def(
        BUFFER_ADMITTED,
        Kind::Counter,
        Unit::Count,
        "Samples admitted to the replay buffer.",
    ),
    def(
        BUFFER_EVICTIONS,
        Kind::Counter,
        Unit::Count,
        "Samples evicted from the replay buffer to make room.",
    ),
    def(
        BUFFER_RESCORED,
        Kind::Counter,
        Unit::Count,
        "Buffered samples whose stored score was refreshed with the current model.",
    ),
    def(STEPS, Kind::Counter, Unit::Count, "Optimiser steps taken."),
    def(
        NONFINITE_STEPS,
        Kind::Counter,
        Unit::Count,
        "Updates skipped because their gradient was not finite (the model is diverging).",
    ),
    def(
        MODEL_RESTORES,
        Kind::Counter,
        Unit::Count,
        "Returns to the last good weights after training.max_nonfinite_steps non-finite steps in a row.",
    ),
    def(
        STEP_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "Wall time of one learner step: score the micro-batch and its replay rows, select, train.",
    ),
    def(
        LOSS,
        Kind::Gauge,
        Unit::Count,
        "Weighted training loss of the last step (MSE on standardised targets, or cross-entropy).",
    ),
    def(
        MAE,
        Kind::Gauge,
        Unit::Count,
        "Prequential (test-then-train) mean absolute error over the last evaluation.window samples, in target units, by predictor: model or persistence (last value).",
    ),
    def(
        RMSE,
        Kind::Gauge,
        Unit::Count,
        "Prequential root mean squared error over the last evaluation.window samples, in target units, by predictor.",
    ),
    def(
        TOP1,
        Kind::Gauge,
        Unit::Count,
        "Prequential top-1 accuracy (0 to 1) over the last evaluation.window samples (classification).",
    ),
    def(
        TOP3,
        Kind::Gauge,
        Unit::Count,
        "Prequential top-3 accuracy (0 to 1) over the last evaluation.window samples (classification).",
    ),
    def(
        WINDOW_SAMPLES,
        Kind::Gauge,
        Unit::Count,
        "Samples in the prequential window behind the gradsift_prequential_* gauges.",
    ),
    def(
        KEYS,
        Kind::Gauge,
        Unit::Count,
        "Keys (cells, squares, scenarios) with feature state (capped by features.max_keys).",
    ),
    def(
        DRIFT_EVENTS,
        Kind::Counter,
        Unit::Count,
        "Drift detections, by detector (adwin and page_hinkley on the prequential loss, rises only; score_shift on the importance scores) and scope (global: the stream's detectors; key: a key's own, with drift.per_key).",
    ),
    def(
        DRIFT_RECOVERING,
        Kind::Gauge,
        Unit::Count,
        "1 while the learner is within drift.recovery_samples of its last reaction to a detected change, else 0.",
    ),
    def(
        DRIFT_ADWIN_WINDOW,
        Kind::Gauge,
        Unit::Count,
        "Samples in ADWIN's adaptive window of the prequential loss: it drops to the samples since a change when it detects one.",
    ),
    def(
        DRIFT_PAGE_HINKLEY,
        Kind::Gauge,
        Unit::Count,
        "Page-Hinkley's statistic on the prequential loss (cumulative rise above the running mean); a detection when it passes drift.page_hinkley_threshold.",
    ),
    def(
        CHECKPOINTS,
        Kind::Counter,
        Unit::Count,
        "Checkpoints written.",
    ),
    def(
        CHECKPOINT_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "Time to write one checkpoint: close the score segment, sync dead letters, encode, write, fsync, rename.",
    ),
    def(
        CHECKPOINT_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        "Size of the last checkpoint.",
    ),
    def(
        CHECKPOINT_TIME,
        Kind::Gauge,
        Unit::Seconds,
        "Unix time of the last checkpoint written (0: none yet).",
    ),
    def(
        CHECKPOINT_AGE,
        Kind::Gauge,
        Unit::Seconds,
        "Seconds since the last checkpoint (or since start when none was written yet).",
    ),
    def(
        KAFKA_LAG,
        Kind::Gauge,
        Unit::Count,
        "Messages on the broker not yet handed to gradsift (high watermark - next offset to process), per owned partition; from librdkafka statistics.",
    ),
    def(
        KAFKA_COMMIT_LAG,
        Kind::Gauge,
        Unit::Count,
        "Messages on the broker past the committed offset (committed only once a checkpoint covers them), per owned partition.",
    ),
    def(
        ENERGY,
        Kind::Gauge,
        Unit::Count,
        "Estimated energy used since the process started, in joules (cumulative; the model is in gradsift_energy_model_info).",
    ),
    def(
        POWER,
        Kind::Gauge,
        Unit::Count,
        "Estimated power over the last publish interval, in watts.",
    ),
    def(
        CO2,
        Kind::Gauge,
        Unit::Count,
        "Estimated CO2 emitted since the process started, in grams (energy x grid intensity; cumulative).",
    ),
    def(
        CPU,
        Kind::Gauge,
        Unit::Seconds,
        "CPU time (user + system) used by the process since it started (cumulative).",
    ),
    def(
        ENERGY_MODEL,
        Kind::Gauge,
        Unit::Count,
        "Always 1; labels state the energy model: source (rapl or cpu_time), watts per core, memory watts per GiB, PUE, grid gCO2/kWh.",
    ),
    def(
        RSS,
        Kind::Gauge,
        Unit::Bytes,
        "Resident memory of the process.",
    ),
];

/// Bucket upper bounds: scores span orders of magnitude, so buckets are 10^(k/2).
fn log_buckets(from_exp: i32, to_exp: i32) -> Vec<f64> {
    (from_exp * 2..=to_exp * 2)
        .map(|k| 10f64.powf(k as f64 / 2.0))
        .collect()
}

/// Starts the Prometheus endpoint and installs the process-wide recorder. Call once, from
/// within the Tokio runtime (the HTTP listener runs on it).
pub fn serve(cfg: &TelemetryConfig) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(cfg.listen)
        // Histogram samples wait in a lock-free queue until upkeep folds them into buckets:
        // upkeep every second bounds that queue to one second of samples.
        .upkeep_timeout(Duration::from_secs(1))
        .set_buckets_for_metric(Matcher::Full(SCORE.into()), &log_buckets(-5, 4))?
        .set_buckets_for_metric(Matcher::Full(STEP_SECONDS.into()), &log_buckets(-5, 1))?
        .set_buckets_for_metric(
            Matcher::Full(CHECKPOINT_SECONDS.into()),
            &log_buckets(-4, 2),
        )?
        .install()
        .with_context(|| {
            format!(
                "cannot serve metrics on telemetry.listen = {} (another gradsift on that port? set [telemetry] listen or enabled = false)",
                cfg.listen
            )
        })?;
    for m in METRICS {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
    tracing::info!(listen = %cfg.listen, "Prometheus metrics on http://{}/metrics", cfg.listen);
    Ok(())
}

/// `gradsift_build_info`, set once per run.
pub fn build_info(pipeline: &str, backend: &str, importance: &str) {
    gauge!(BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "pipeline" => pipeline.to_string(),
        "backend" => backend.to_string(),
        "importance" => importance.to_string())
    .set(1.0);
}

/// Rows delivered again but already with this process (the Kafka source skips them before
/// they reach the learner).
pub fn rows_already_covered(source: &'static str, rows: u64) {
    counter!(ROWS, "source" => source, "outcome" => "already_covered").increment(rows);
}

/// Kafka lag of one owned partition (from librdkafka's statistics callback).
pub fn kafka_lag(topic: &str, partition: i32, to_process: i64, to_commit: i64) {
    let labels = [
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ];
    gauge!(KAFKA_LAG, &labels).set(to_process.max(0) as f64);
    gauge!(KAFKA_COMMIT_LAG, &labels).set(to_commit.max(0) as f64);
}

/// What one learner step did, as the pipeline saw it.
pub struct StepView<'a> {
    pub fresh_scores: &'a [f32],
    pub threshold: f32,
    pub loss: f32,
    pub seconds: f64,
}

/// Learner-side state, published every `publish_ms` (the prequential window summary is a
/// pass over the window).
pub struct LearnerView {
    pub selected: u64,
    pub trained_fresh: u64,
    pub trained_replay: u64,
    pub backpropagated: u64,
    pub clipped: u64,
    /// `model.decision = "switch"`: rows on which the two rules differed, acted on the most
    /// probable class and on the least expected loss.
    pub decided: [u64; 2],
    pub steps: u64,
    pub nonfinite_steps: u64,
    pub restores: u64,
    pub buffer_len: usize,
    pub buffer_bytes: usize,
    pub buffer_admitted: u64,
    pub buffer_evicted: u64,
    pub buffer_rescored: u64,
    pub keys: usize,
    pub drift_recovering: bool,
    pub adwin_window: u64,
    pub page_hinkley: f64,
}

/// The learner thread's handles. Counters of learner work are published as deltas of the
/// learner's own cumulative stats, so there is one source of truth for them.
pub struct LearnerMetrics {
    samples: Counter,
    scores: Histogram,
    threshold: Gauge,
    loss: Gauge,
    step_seconds: Histogram,
    selected: Counter,
    trained_fresh: Counter,
    trained_replay: Counter,
    backpropagated: Counter,
    clipped: Counter,
    decided: [Counter; 2],
    steps: Counter,
    nonfinite_steps: Counter,
    restores: Counter,
    buffer_samples: Gauge,
    buffer_bytes: Gauge,
    buffer_admitted: Counter,
    buffer_evictions: Counter,
    buffer_rescored: Counter,
    keys: Gauge,
    /// By [`crate::learner::drift::Detector`] order; per key: ADWIN, Page-Hinkley.
    drift: [Counter; 3],
    drift_key: [Counter; 2],
    drift_gauges: [Gauge; 3],
    checkpoints: Counter,
    checkpoint_seconds: Histogram,
    checkpoint_bytes: Gauge,
    checkpoint_time: Gauge,
    last: Option<LearnerView>,
    every: Duration,
    published: Option<Instant>,
    /// The source kind label of the row counters.
    source: &'static str,
}

impl LearnerMetrics {
    pub fn new(source: &'static str, buffer_capacity: usize, publish_ms: u64) -> Self {
        gauge!(BUFFER_CAPACITY).set(buffer_capacity as f64);
        gauge!(CHECKPOINT_TIME).set(0.0);
        LearnerMetrics {
            samples: counter!(ROWS, "source" => source, "outcome" => "sample"),
            scores: histogram!(SCORE),
            threshold: gauge!(THRESHOLD),
            loss: gauge!(LOSS),
            step_seconds: histogram!(STEP_SECONDS),
            selected: counter!(SELECTED),
            trained_fresh: counter!(TRAINED, "origin" => "fresh"),
            trained_replay: counter!(TRAINED, "origin" => "replay"),
            backpropagated: counter!(BACKPROPAGATED),
            clipped: counter!(CLIPPED),
            decided: ["most_probable", "least_expected_loss"]
                .map(|r| counter!(DECISIONS, "rule" => r)),
            steps: counter!(STEPS),
            nonfinite_steps: counter!(NONFINITE_STEPS),
            restores: counter!(MODEL_RESTORES),
            buffer_samples: gauge!(BUFFER_SAMPLES),
            buffer_bytes: gauge!(BUFFER_BYTES),
            buffer_admitted: counter!(BUFFER_ADMITTED),
            buffer_evictions: counter!(BUFFER_EVICTIONS),
            buffer_rescored: counter!(BUFFER_RESCORED),
            keys: gauge!(KEYS),
            drift: ["adwin", "page_hinkley", "score_shift"]
                .map(|d| counter!(DRIFT_EVENTS, "detector" => d, "scope" => "global")),
            drift_key: ["adwin", "page_hinkley"]
                .map(|d| counter!(DRIFT_EVENTS, "detector" => d, "scope" => "key")),
            drift_gauges: [DRIFT_RECOVERING, DRIFT_ADWIN_WINDOW, DRIFT_PAGE_HINKLEY]
                .map(|n| gauge!(n)),
            checkpoints: counter!(CHECKPOINTS),
            checkpoint_seconds: histogram!(CHECKPOINT_SECONDS),
            checkpoint_bytes: gauge!(CHECKPOINT_BYTES),
            checkpoint_time: gauge!(CHECKPOINT_TIME),
            last: None,
            every: Duration::from_millis(publish_ms.max(1)),
            published: None,
            source,
        }
    }

    /// Rows that did not become samples, from the one place each is decided: bad input
    /// (dead-lettered) or skipped by design (e.g. lag warm-up).
    pub fn rows_skipped(&self, reason: &str, bad: bool, rows: u64) {
        let (outcome, by_reason) = if bad {
            ("dead_lettered", DEAD_LETTERS)
        } else {
            ("skipped", ROWS_SKIPPED)
        };
        counter!(ROWS, "source" => self.source, "outcome" => outcome).increment(rows);
        counter!(by_reason, "reason" => reason.to_string()).increment(rows);
    }

    /// Detections of one sample, by detector.
    pub fn drift(&self, fired: [bool; 3]) {
        for (c, f) in self.drift.iter().zip(fired) {
            if f {
                c.increment(1);
            }
        }
    }

    /// Per-key detections of one sample (ADWIN, Page-Hinkley).
    pub fn drift_key(&self, fired: [bool; 2]) {
        for (c, f) in self.drift_key.iter().zip(fired) {
            if f {
                c.increment(1);
            }
        }
    }

    /// Rows the checkpoint this run resumed from already covers.
    pub fn rows_already_covered(&self, rows: u64) {
        rows_already_covered(self.source, rows);
    }

    /// One step: per-sample scores into the histogram, the step's own figures.
    pub fn step(&mut self, s: &StepView<'_>) {
        self.samples.increment(s.fresh_scores.len() as u64);
        for &v in s.fresh_scores {
            if v.is_finite() {
                self.scores.record(v as f64);
            }
        }
        self.threshold.set(s.threshold as f64);
        if s.loss.is_finite() {
            self.loss.set(s.loss as f64);
        }
        self.step_seconds.record(s.seconds);
    }

    /// Whether the throttled gauges are due.
    pub fn due(&self) -> bool {
        self.published.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// Publishes learner counters (as deltas since the last call) and gauges.
    pub fn publish(&mut self, v: LearnerView) {
        let prev = self.last.take();
        let d = |now: u64, before: Option<u64>| now.saturating_sub(before.unwrap_or(now));
        // The first call only sets the baseline: a resumed learner's restored totals are not
        // this process's work.
        let p = prev.as_ref();
        self.selected
            .increment(d(v.selected, p.map(|p| p.selected)));
        self.trained_fresh
            .increment(d(v.trained_fresh, p.map(|p| p.trained_fresh)));
        self.trained_replay
            .increment(d(v.trained_replay, p.map(|p| p.trained_replay)));
        self.backpropagated
            .increment(d(v.backpropagated, p.map(|p| p.backpropagated)));
        self.clipped.increment(d(v.clipped, p.map(|p| p.clipped)));
        for (i, c) in self.decided.iter().enumerate() {
            c.increment(d(v.decided[i], p.map(|p| p.decided[i])));
        }
        self.steps.increment(d(v.steps, p.map(|p| p.steps)));
        self.nonfinite_steps
            .increment(d(v.nonfinite_steps, p.map(|p| p.nonfinite_steps)));
        self.restores
            .increment(d(v.restores, p.map(|p| p.restores)));
        self.buffer_admitted
            .increment(d(v.buffer_admitted, p.map(|p| p.buffer_admitted)));
        self.buffer_evictions
            .increment(d(v.buffer_evicted, p.map(|p| p.buffer_evicted)));
        self.buffer_rescored
            .increment(d(v.buffer_rescored, p.map(|p| p.buffer_rescored)));
        self.buffer_samples.set(v.buffer_len as f64);
        self.buffer_bytes.set(v.buffer_bytes as f64);
        self.keys.set(v.keys as f64);
        let [recovering, adwin, ph] = &self.drift_gauges;
        recovering.set(f64::from(u8::from(v.drift_recovering)));
        adwin.set(v.adwin_window as f64);
        ph.set(v.page_hinkley);
        self.last = Some(v);
        self.published = Some(Instant::now());
    }

    pub fn checkpoint(&self, seconds: f64, bytes: u64, unix_s: f64) {
        self.checkpoints.increment(1);
        self.checkpoint_seconds.record(seconds);
        self.checkpoint_bytes.set(bytes as f64);
        self.checkpoint_time.set(unix_s);
    }
}

/// Prequential window gauges for a regression head.
pub fn prequential_regression(
    model_mae: f64,
    model_rmse: f64,
    persistence: Option<(f64, f64)>,
    n: u64,
) {
    gauge!(MAE, "predictor" => "model").set(model_mae);
    gauge!(RMSE, "predictor" => "model").set(model_rmse);
    if let Some((mae, rmse)) = persistence {
        gauge!(MAE, "predictor" => "persistence").set(mae);
        gauge!(RMSE, "predictor" => "persistence").set(rmse);
    }
    gauge!(WINDOW_SAMPLES).set(n as f64);
}

/// Prequential window gauges for a classification head.
pub fn prequential_classification(top1: f64, top3: f64, n: u64) {
    gauge!(TOP1).set(top1);
    gauge!(TOP3).set(top3);
    gauge!(WINDOW_SAMPLES).set(n as f64);
}

/// Process-wide figures, refreshed by the pipeline's ticker.
pub struct ProcessView {
    pub joules: f64,
    pub co2_grams: f64,
    pub cpu_s: f64,
    pub rss_bytes: Option<u64>,
    pub power_w: f64,
    /// None when checkpoints are off.
    pub checkpoint_age_s: Option<f64>,
}

pub fn process(v: &ProcessView) {
    gauge!(ENERGY).set(v.joules);
    gauge!(CO2).set(v.co2_grams);
    gauge!(CPU).set(v.cpu_s);
    gauge!(POWER).set(v.power_w);
    if let Some(rss) = v.rss_bytes {
        gauge!(RSS).set(rss as f64);
    }
    if let Some(age) = v.checkpoint_age_s {
        gauge!(CHECKPOINT_AGE).set(age);
    }
}

/// `gradsift_energy_model_info`, set once per run: the model's parameters as labels.
pub fn energy_model(source: &str, parameters: &[(&'static str, f64)]) {
    let mut labels = vec![("source", source.to_string())];
    labels.extend(parameters.iter().map(|(k, v)| (*k, v.to_string())));
    gauge!(ENERGY_MODEL, &labels).set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_prometheus_rules() {
        let mut seen = std::collections::HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn score_buckets_span_the_scale() {
        let b = log_buckets(-5, 4);
        assert_eq!(b.len(), 19);
        assert!((b[0] - 1e-5).abs() < 1e-12 && (b[18] - 1e4).abs() < 1e-6);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
