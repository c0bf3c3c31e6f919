//! The wiring, in one place: source → decode → features → learner → sinks.
//!
//! ```text
//!  source thread ──(bounded: channels.batches)──▶ feature stage ──(bounded: channels.batches)──▶
//!   Parquet replay                                  decode, row checks, features,
//!   or Kafka group                                  micro-batches, checkpoint clock
//!        ▲
//!        │                                          learner stage ──(bounded: 4)──▶ sink stage
//!        ├──── acks: batch processed ────────────── score/select/train/buffer,     score file,
//!        │                                          prequential metrics,           output topic
//!        │                                          dead letters, checkpoint copy
//!        │                                                │ (rendezvous)
//!        └──── acks: commit ──────────────────────── checkpoint writer: encode, write, fsync
//!  upkeep ticker: process gauges (energy, memory, checkpoint age) on a timer
//! ```
//! Each arrow is a bounded channel: a slow stage blocks the one before it (backpressure)
//! instead of queueing without limit. [`run`] starts the stages, joins them and hands their
//! parts to the report; each stage lives in a file of its own.

mod checkpoint_writer;
mod feature_stage;
mod learner_keys;
mod learner_stage;
mod outputs;
mod rows;
mod sink_stage;
#[cfg(test)]
mod test_events;
mod upkeep;

pub use rows::{Skipped, count_skip, decode_rows, feature_engine};

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::checkpoint::{self, Checkpoint};
use crate::config::PipelineConfig;
use crate::energy::EnergyMeter;
use crate::features::{FeatureState, SavedLearnerParts};
use crate::report::{BufferReport, CheckpointReport, RunReport};
use crate::schema::{Headline, Schema, TimeKind};
use crate::shutdown::Shutdown;
use crate::sink::scores::{ScoreColumns, ScoreSegments, ScoreSink};
use crate::sink::topic::SampleTopicSink;
use crate::source::{Ack, EventSender, SourceConfig, SourceContext, SourceEvent};
use crate::stage_time::{StageReport, StageTimes};
use crate::telemetry;
use feature_stage::{FeatureStage, Featured};
use learner_stage::{CheckpointCtl, LearnerStage, StageIo};
use sink_stage::{ScoreOut, SinkMsg, SinkStage};

/// How a run is shown.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Runs a pipeline to the end of its source (or a shutdown signal) and returns its report,
/// which is also written to `report.json` in the output folder.
pub async fn run(cfg: PipelineConfig, opts: RunOptions, shutdown: Shutdown) -> Result<RunReport> {
    let started = Instant::now();
    let cpu_start = cpu_time::ProcessTime::now();
    let schema = Arc::new(Schema::load(&cfg.schema)?);
    cfg.validate_with(schema.input_width(), schema.evaluation.beam_power.is_some())?;
    if matches!(cfg.source, SourceConfig::Kafka(_)) && !cfg.checkpoint.enabled {
        // Without checkpoints, a learnt batch is as durable as it gets: its offsets are
        // committed at once, before its outputs are on disk or on the broker.
        tracing::warn!(pipeline = %cfg.name, "a Kafka source without [checkpoint]: offsets are committed as batches are learnt, so a crash loses the model and the score rows, topic records and dead letters not yet written; enable checkpoints for at-least-once outputs");
    }
    let (meter, last_checkpoint_ms, ticker) = start_process_metrics(&cfg, started);
    let out_dir = cfg.output_dir();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let resume = load_resume(&cfg, &schema)?;
    outputs::clear_stale(&out_dir, resume.is_some())?;

    let (tx, rx) = mpsc::channel::<SourceEvent>(cfg.channels.batches);
    // Acknowledgements flow back to a feed source: "a batch is processed" (flow control) and
    // "these positions are durable" (commit them). At most `channels.batches` + 1 batches are
    // ever unacknowledged.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<Ack>();
    let mut ckpt = CheckpointCtl::new(&cfg, resume.as_ref());
    let times = Arc::new(StageTimes::default());
    let source = cfg.source.spawn(SourceContext {
        pipeline: cfg.name.clone(),
        schema: schema.clone(),
        tx: EventSender::new(tx, times.clone()),
        acks: ack_rx,
        covered: ckpt.covered.clone(),
        checkpoint_files: resume.as_ref().map(|c| c.files.clone()).unwrap_or_default(),
        checkpoint_path: cfg.checkpoint_path(),
        out_of_range: cfg.features.out_of_range,
        shutdown: shutdown.clone(),
    })?;
    ckpt.files = source.files;
    let (source, total) = (source.task, source.total_rows);

    let stage = sink_stage(&cfg, &schema, &out_dir, resume.as_ref(), &shutdown)?;
    let sinks_on = stage.is_on();
    let (sink_tx, sink_rx) = sync_channel::<SinkMsg>(4);
    let sink = stage.spawn(sink_rx, times.clone());

    let (feature_state, resume) = split_resume(resume);
    let featurize = FeatureStage::new(&cfg, &schema, ckpt.covered.clone(), feature_state)?;
    let width = featurize.width();
    let (featured_tx, featured_rx) = sync_channel::<Featured>(cfg.channels.batches);
    let featurize = {
        let times = times.clone();
        tokio::task::spawn_blocking(move || {
            let time = &times.features;
            time.on_thread(|| featurize.run(rx, featured_tx, time))
        })
    };

    let progress = progress_bar(opts.progress, total);
    let learn = {
        let io = StageIo {
            ack_tx: Some(ack_tx),
            sink_tx: sinks_on.then_some(sink_tx),
            progress: progress.clone(),
            last_checkpoint_ms,
            shutdown: shutdown.clone(),
            writer_time: times.clone(),
        };
        let (cfg, schema) = (cfg.clone(), schema.clone());
        let dead_path = out_dir.join(outputs::DEAD_LETTERS);
        let times = times.clone();
        tokio::task::spawn_blocking(move || {
            let time = &times.learner;
            time.on_thread(|| {
                LearnerStage::new(&cfg, &schema, width, io, &dead_path, ckpt, resume)?
                    .run(featured_rx, time)
            })
        })
    };
    let threads = Threads {
        learn,
        featurize,
        source,
        sink,
    };
    let (stage, (source_rows, redelivered), (written, topic_records)) =
        threads.join(&shutdown).await?;
    progress.finish_and_clear();
    ticker.abort();
    let energy = meter.lock().expect("meter").read();
    telemetry::process(&upkeep::process_view(&energy, 0.0, None));
    let ends = Ends {
        started,
        cpu_s: cpu_start.elapsed().as_secs_f64(),
        interrupted: shutdown.is_triggered(),
        source_rows,
        redelivered,
        written,
        topic_records,
        energy,
        stages: times.report(),
    };
    let report = build_report(&cfg, &schema, &out_dir, &stage, ends);
    finish_report(&cfg, &schema, &out_dir, &stage, report)
}

/// The running stages of one pipeline.
struct Threads {
    learn: tokio::task::JoinHandle<Result<LearnerStage>>,
    featurize: tokio::task::JoinHandle<Result<()>>,
    source: tokio::task::JoinHandle<Result<(u64, u64)>>,
    sink: std::thread::JoinHandle<Result<sink_stage::SinkTotals>>,
}

impl Threads {
    /// Waits for every stage, the learner first; returns the learner stage, the source's
    /// (rows, redelivered) and the sink's totals. The first error that explains the others
    /// wins: the feature stage's explains a learner that found its stream cut short.
    async fn join(
        self,
        shutdown: &Shutdown,
    ) -> Result<(LearnerStage, (u64, u64), sink_stage::SinkTotals)> {
        let learned = self.learn.await.context("learner thread panicked")?;
        if learned.is_err() {
            // Stop the source: an idle feed would otherwise wait for messages for ever, and
            // the feature stage only finds a stopped learner when it next hands on a batch.
            shutdown.trigger();
        }
        self.featurize.await.context("feature thread panicked")??;
        let source = self.source.await.context("source thread panicked")??;
        let totals = self
            .sink
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
        Ok((learned?, source, totals))
    }
}

/// Adds the windowed metric's trace and plot (when asked for, or when the pipeline declares
/// known changes) to the report, and writes it to `report.json`.
fn finish_report(
    cfg: &PipelineConfig,
    schema: &Schema,
    out_dir: &std::path::Path,
    stage: &LearnerStage,
    mut report: RunReport,
) -> Result<RunReport> {
    let metric = match schema.headline() {
        Headline::Mae => "MAE",
        Headline::PowerLossDb => "power loss (dB)",
        Headline::Top1 => "1 - top-1",
    };
    if cfg.output.plot || !stage.trace.changes.is_empty() {
        report.trace = Some(crate::report::TraceReport {
            metric: metric.to_string(),
            window: cfg.evaluation.window,
            points: stage.trace.points.clone(),
        });
    }
    if cfg.output.plot {
        let plot = crate::sink::metric_plot::MetricPlot::run(
            format!(
                "{}: prequential {metric} over the last {} samples, drift detections",
                cfg.name, cfg.evaluation.window
            ),
            metric.to_string(),
            &stage.trace.points,
            &stage.drift.events,
            &stage.trace.changes,
        );
        // The report is written whatever befalls the picture (a font, a full disk).
        match crate::sink::metric_plot::write(out_dir, &plot) {
            Ok(png) => {
                report
                    .outputs
                    .insert("plot".into(), png.display().to_string());
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "the run plot was not written"),
        }
    }
    let report_path = out_dir.join(outputs::REPORT);
    crate::durable::write_atomic(
        &report_path,
        &[serde_json::to_string_pretty(&report)?.as_bytes()],
    )?;
    Ok(report)
}

/// The energy meter, the checkpoint-age clock (Unix ms of the last checkpoint, 0: none yet)
/// and the task that publishes the process's metrics from them every `telemetry.publish_ms`.
fn start_process_metrics(
    cfg: &PipelineConfig,
    started: Instant,
) -> (
    Arc<Mutex<EnergyMeter>>,
    Arc<AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let meter = Arc::new(Mutex::new(EnergyMeter::start(cfg.energy.clone())));
    telemetry::build_info(&cfg.name, &cfg.backend_name(), &cfg.importance_name());
    {
        let m = meter.lock().expect("meter");
        telemetry::energy_model(m.source(), &m.parameters());
    }
    let last_checkpoint_ms = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn(upkeep::tick_process_metrics(
        meter.clone(),
        cfg.checkpoint.enabled.then(|| last_checkpoint_ms.clone()),
        started,
        Duration::from_millis(cfg.telemetry.publish_ms),
    ));
    (meter, last_checkpoint_ms, ticker)
}

/// A resumed checkpoint's features, for the feature stage; the rest, and the per-key parts
/// the learner stage keeps (blend weights, detectors), for the learner stage.
fn split_resume(
    resume: Option<Checkpoint>,
) -> (
    Option<FeatureState>,
    Option<(Checkpoint, SavedLearnerParts)>,
) {
    let Some(mut c) = resume else {
        return (None, None);
    };
    let mut features = std::mem::take(&mut c.features);
    let parts = features.take_learner_parts();
    (Some(features), Some((c, parts)))
}

/// The checkpoint to resume from, if checkpoints are on and one exists for this schema.
fn load_resume(cfg: &PipelineConfig, schema: &Schema) -> Result<Option<Checkpoint>> {
    if !cfg.checkpoint.enabled {
        return Ok(None);
    }
    let path = cfg.checkpoint_path();
    let c = checkpoint::load(&path)?;
    if let Some(c) = &c {
        anyhow::ensure!(
            c.schema == schema.name,
            "{}: the checkpoint was written for schema `{}`, this pipeline reads `{}`",
            path.display(),
            c.schema,
            schema.name
        );
        anyhow::ensure!(
            c.pipeline == cfg.name,
            "{}: the checkpoint was written by pipeline `{}`, this is `{}`; delete it to start afresh, or set checkpoint.path",
            path.display(),
            c.pipeline,
            cfg.name
        );
        tracing::info!(checkpoint = %path.display(), samples = c.learner.seen(), positions = ?c.positions, "resuming from checkpoint");
    }
    Ok(c)
}

/// The sinks `[output]` asks for: the score file (segments when checkpoints are on), the
/// output topic.
fn sink_stage(
    cfg: &PipelineConfig,
    schema: &Schema,
    out_dir: &std::path::Path,
    resume: Option<&Checkpoint>,
    shutdown: &Shutdown,
) -> Result<SinkStage> {
    let columns = ScoreColumns {
        timestamps: schema.time.kind == TimeKind::Timestamp,
        features: cfg.output.features,
    };
    let scores = if !cfg.output.scores {
        None
    } else if cfg.checkpoint.enabled {
        let next = resume.map_or(1, |c| c.next_segment);
        let dir = out_dir.join(outputs::SCORE_SEGMENTS);
        Some(ScoreOut::Segments(ScoreSegments::open(
            &dir, columns, next,
        )?))
    } else {
        // Written under a temporary name, renamed when complete.
        let path = out_dir.join(outputs::SCORES);
        let sink = ScoreSink::create(&crate::durable::tmp_path(&path), columns)?;
        Some(ScoreOut::File { sink, path })
    };
    let topic = match &cfg.output.topic {
        Some(t) => {
            let feed = match &cfg.source {
                SourceConfig::Kafka(k) => Some(k.brokers.clone()),
                SourceConfig::Parquet(_) => None,
            };
            let brokers = t.brokers.clone().or(feed).unwrap_or_default();
            Some(SampleTopicSink::create(t, &brokers, shutdown)?)
        }
        None => None,
    };
    Ok(SinkStage { scores, topic })
}

fn progress_bar(shown: bool, total: Option<u64>) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} rows {per_sec} eta {eta} {msg}",
        )
        .expect("static template"),
    );
    pb
}

/// What the stages and the process report at the end of a run.
struct Ends {
    started: Instant,
    cpu_s: f64,
    interrupted: bool,
    source_rows: u64,
    redelivered: u64,
    written: Option<u64>,
    topic_records: Option<u64>,
    energy: crate::energy::EnergyReading,
    stages: StageReport,
}

/// Where the run's outputs went, by kind.
fn output_files(
    cfg: &PipelineConfig,
    out_dir: &std::path::Path,
    t: &LearnerStage,
    scores_written: bool,
) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut add = |kind: &str, path: std::path::PathBuf| {
        files.insert(kind.to_string(), path.display().to_string());
    };
    add("report", out_dir.join(outputs::REPORT));
    if scores_written {
        let scores = if cfg.checkpoint.enabled {
            outputs::SCORE_SEGMENTS
        } else {
            outputs::SCORES
        };
        add("scores", out_dir.join(scores));
    }
    if t.dead.letters > 0 || t.counters.dead_letters > 0 {
        add("dead_letters", t.dead.path().to_path_buf());
    }
    if let Some(topic) = &cfg.output.topic {
        files.insert("topic".to_string(), topic.topic.clone());
    }
    files
}

/// The run report, from the learner stage's state and the other stages' totals.
fn build_report(
    cfg: &PipelineConfig,
    schema: &Schema,
    out_dir: &std::path::Path,
    t: &LearnerStage,
    e: Ends,
) -> RunReport {
    let wall_s = e.started.elapsed().as_secs_f64();
    let stats = t.learner.stats();
    let buf = t.learner.buffers();
    let files = output_files(cfg, out_dir, t, e.written.is_some());
    let c = &t.counters;
    let session_samples = stats.seen - t.seen_at_start;
    RunReport {
        pipeline: cfg.name.clone(),
        pipeline_file: cfg.file.display().to_string(),
        schema: schema.name.clone(),
        attribution: schema.attribution.clone(),
        importance: cfg.importance_name(),
        keep: cfg.selection.keep,
        unbiased_q: cfg.selection.unbiased_q,
        backend: cfg.backend_name(),
        hidden: cfg.model.hidden.clone(),
        micro_batch: cfg.training.micro_batch,
        interrupted: e.interrupted,
        rows_read: c.rows_read.max(e.source_rows),
        samples: stats.seen,
        skipped: c.skipped.clone(),
        skipped_total: c.skipped.values().sum(),
        dead_lettered_rows: c.dead_rows,
        keys_tracked: t.tally.tracked_keys,
        keys_forgotten: t.tally.keys_evicted,
        models: t.learner.models(),
        models_dropped: t.learner.evicted,
        drift: crate::report::DriftReport::new(&cfg.drift, &t.drift),
        trace: None,
        changes: crate::learner::recovery::recoveries(
            &t.trace.changes,
            &t.trace.points,
            &t.drift.events,
            stats.seen,
            cfg.evaluation.window as u64,
        ),
        values_clipped: t.tally.clipped,
        decision_switch: (cfg.model.decision == crate::learner::decision::Decision::Switch)
            .then_some(t.switch_rows),
        scored: stats.seen,
        selected: stats.selected,
        trained: stats.trained_fresh,
        trained_fraction: stats.trained_fresh as f64 / stats.seen.max(1) as f64,
        trained_fraction_after_warmup: c.trained_after_warmup as f64
            / c.seen_after_warmup.max(1) as f64,
        replayed: stats.trained_replay,
        retained: buf.stats.admitted,
        buffer: BufferReport {
            policy: format!("{:?}", cfg.buffer.policy).to_lowercase(),
            len: buf.len,
            bytes: buf.bytes,
            capacity: cfg.buffer.capacity,
            max_bytes: cfg.buffer.max_bytes,
            stats: buf.stats,
        },
        backpropagated: stats.backpropagated,
        training_steps: stats.steps,
        rows_clipped: stats.clipped,
        rows_averaged: stats.averaged,
        nonfinite_steps: stats.nonfinite_steps,
        model_restores: stats.restores,
        diverged: stats.nonfinite_steps > 0 || t.metrics.whole.nonfinite() > 0,
        last_train_loss: c.last_loss,
        metrics: t.metrics.whole.summary(),
        periods: t.metrics.periods(),
        compute: t
            .learner
            .compute()
            .with_energy(cfg.energy.joules_per_cpu_second()),
        selection_policy: cfg.selection.policy.name().to_string(),
        replay_ratio: cfg.buffer.replay_ratio,
        replay_sampling: format!("{:?}", cfg.buffer.replay_sampling).to_lowercase(),
        wall_s,
        cpu_s: e.cpu_s,
        stages: e.stages,
        samples_per_s: session_samples as f64 / wall_s.max(1e-9),
        active_s: t.first_rows_at.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        checkpoint: cfg.checkpoint.enabled.then(|| CheckpointReport {
            path: cfg.checkpoint_path().display().to_string(),
            written: t.ckpt.written,
            last_bytes: t.ckpt.last_bytes,
            seconds: t.ckpt.seconds,
            write_seconds: t.ckpt.write_seconds,
            resumed_at_samples: (c.resumes > 0 && t.seen_at_start > 0).then_some(t.seen_at_start),
            resumes: c.resumes,
            rows_already_covered: t.ckpt.already_covered + e.redelivered,
        }),
        topic_records: e.topic_records,
        energy: e.energy,
        outputs: files,
    }
}
