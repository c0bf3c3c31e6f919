//! The wiring, in one place: source → decode → features → learner → sinks.
//!
//! ```text
//!  source thread ──(bounded: channels.batches)──▶ learner thread ──(bounded: 4)──▶ score sink thread
//!   Parquet replay    ◀──── acks (feeds commit) ──  decode, features,                 Parquet writer
//!   or Kafka group
//!                                                  score/select/train/buffer,
//!                                                  prequential metrics,
//!                                                  dead letters
//! ```
//! Each arrow is a bounded channel: a slow stage blocks the one before it (backpressure)
//! instead of queueing without limit. The learner owns all model state on one thread, so
//! nothing on the hot path takes a lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::features::{FeatureEngine, Samples};
use crate::learner::eval::{ClassificationEval, EvalSummary, RegressionEval, RegressionRow};
use crate::learner::model::Head;
use crate::learner::{FreshBatch, LearnerConfig, OnlineLearner};
use crate::report::{BufferReport, RunReport};
use crate::schema::{Schema, TimeKind};
use crate::shutdown::Shutdown;
use crate::sink::dead_letter::{DeadLetter, DeadLetterSink};
use crate::sink::scores::{ScoreRow, ScoreSink};
use crate::source::{RowOrigin, SourceConfig, SourceEvent, kafka, parquet};

/// How a run is shown.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

enum Metrics {
    Regression(RegressionEval),
    Classification(ClassificationEval),
}

impl Metrics {
    fn summary(&self) -> EvalSummary {
        match self {
            Metrics::Regression(r) => EvalSummary::Regression(r.summary()),
            Metrics::Classification(c) => EvalSummary::Classification(c.summary()),
        }
    }
    fn window_text(&self) -> String {
        match self {
            Metrics::Regression(r) => format!("window MAE {:.4}", r.window_mae()),
            Metrics::Classification(c) => format!("window top-1 {:.3}", 1.0 - c.window_error()),
        }
    }
}

/// Runs a pipeline to the end of its source (or a shutdown signal) and returns its report,
/// which is also written to `report.json` in the output folder.
pub async fn run(cfg: PipelineConfig, opts: RunOptions, shutdown: Shutdown) -> Result<RunReport> {
    let started = Instant::now();
    let cpu_start = cpu_time::ProcessTime::now();
    let schema = Arc::new(Schema::load(&cfg.schema)?);
    let out_dir = cfg.output_dir();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let (tx, rx) = mpsc::channel::<SourceEvent>(cfg.channels.batches);
    // Acknowledgements of fully processed batches flow back to a feed source, which commits
    // them; at most `channels.batches` + 1 batches are ever unacknowledged.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<Vec<RowOrigin>>();
    let (source, total) = match cfg.source.clone() {
        SourceConfig::Parquet(src) => {
            let files = src.files(&schema)?;
            let total = src
                .max_rows
                .unwrap_or(u64::MAX)
                .min(parquet::total_rows(&files));
            tracing::info!(pipeline = %cfg.name, files = files.len(), rows = total, "replaying");
            let (schema, shutdown) = (schema.clone(), shutdown.clone());
            let h = tokio::task::spawn_blocking(move || {
                parquet::replay(&src, &schema, &files, tx, &shutdown).map(|s| s.rows)
            });
            (h, Some(total))
        }
        SourceConfig::Kafka(src) => {
            tracing::info!(pipeline = %cfg.name, brokers = %src.brokers, topics = ?src.topics, group = %src.group_id, "consuming");
            let (schema, shutdown) = (schema.clone(), shutdown.clone());
            let h = tokio::task::spawn_blocking(move || {
                kafka::consume(&src, schema, tx, ack_rx, &shutdown)
            });
            (h, None)
        }
    };

    let scores_path = out_dir.join("scores.parquet");
    let (score_tx, score_rx) = sync_channel::<Vec<ScoreRow>>(4);
    let score_sink = if cfg.output.scores {
        let mut sink = ScoreSink::create(&scores_path, schema.time.kind == TimeKind::Timestamp)?;
        Some(std::thread::spawn(move || -> Result<u64> {
            for rows in score_rx {
                sink.write(&rows)?;
            }
            sink.finish()
        }))
    } else {
        drop(score_rx);
        None
    };

    let progress = if opts.progress {
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
    } else {
        ProgressBar::hidden()
    };

    let dead_path = out_dir.join("dead_letters.jsonl");
    let learn = {
        let (cfg, schema, progress) = (cfg.clone(), schema.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            learn_loop(&cfg, &schema, rx, ack_tx, score_tx, &dead_path, &progress)
        })
    };
    let mut tally = learn.await.context("learner thread panicked")??;
    let source_rows = source.await.context("source thread panicked")??;
    progress.finish_and_clear();
    let written = match score_sink {
        Some(h) => Some(
            h.join()
                .map_err(|_| anyhow::anyhow!("score sink panicked"))??,
        ),
        None => None,
    };

    let wall_s = started.elapsed().as_secs_f64();
    let active_s = tally
        .first_rows_at
        .map_or(0.0, |t| t.elapsed().as_secs_f64());
    let cpu_s = cpu_start.elapsed().as_secs_f64();
    let stats = tally.learner.stats();
    let buf = tally.learner.buffer();
    let mut outputs = BTreeMap::new();
    let report_path = out_dir.join("report.json");
    outputs.insert("report".to_string(), report_path.display().to_string());
    if written.is_some() {
        outputs.insert("scores".to_string(), scores_path.display().to_string());
    }
    if tally.dead.letters > 0 {
        outputs.insert(
            "dead_letters".to_string(),
            tally.dead.path().display().to_string(),
        );
    }
    tally.dead.finish()?;
    let skipped_total = tally.skipped.values().sum();
    let report = RunReport {
        pipeline: cfg.name.clone(),
        pipeline_file: cfg.file.display().to_string(),
        schema: schema.name.clone(),
        attribution: schema.attribution.clone(),
        importance: format!("{:?}", cfg.importance.method).to_lowercase(),
        keep: cfg.selection.keep,
        unbiased_q: cfg.selection.unbiased_q,
        backend: format!("{:?}", cfg.model.backend).to_lowercase(),
        hidden: cfg.model.hidden.clone(),
        micro_batch: cfg.training.micro_batch,
        interrupted: shutdown.is_triggered(),
        rows_read: tally.rows_read.max(source_rows),
        samples: stats.seen,
        skipped: tally.skipped.clone(),
        skipped_total,
        dead_lettered_rows: tally.dead.rows,
        keys_tracked: tally.keys_tracked,
        keys_forgotten: tally.keys_forgotten,
        scored: stats.seen,
        selected: stats.selected,
        trained: stats.trained_fresh,
        trained_fraction: stats.trained_fresh as f64 / stats.seen.max(1) as f64,
        trained_fraction_after_warmup: tally.trained_after_warmup as f64
            / tally.seen_after_warmup.max(1) as f64,
        replayed: stats.trained_replay,
        retained: buf.stats.admitted,
        buffer: BufferReport {
            policy: format!("{:?}", cfg.buffer.policy).to_lowercase(),
            len: buf.len(),
            bytes: buf.bytes(),
            capacity: cfg.buffer.capacity,
            max_bytes: cfg.buffer.max_bytes,
            stats: buf.stats,
        },
        backpropagated: stats.backpropagated,
        training_steps: stats.steps,
        last_train_loss: tally.last_loss,
        metrics: tally.metrics.summary(),
        wall_s,
        cpu_s,
        samples_per_s: stats.seen as f64 / wall_s.max(1e-9),
        active_s,
        outputs,
    };
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    Ok(report)
}

/// What the learner thread hands back.
struct Tally {
    learner: OnlineLearner,
    metrics: Metrics,
    skipped: BTreeMap<String, u64>,
    dead: DeadLetterSink,
    rows_read: u64,
    seen_after_warmup: u64,
    trained_after_warmup: u64,
    last_loss: f64,
    keys_tracked: usize,
    keys_forgotten: u64,
    /// When the first rows arrived (throughput without start-up and group-join time).
    first_rows_at: Option<Instant>,
}

fn learn_loop(
    cfg: &PipelineConfig,
    schema: &Arc<Schema>,
    mut rx: mpsc::Receiver<SourceEvent>,
    ack_tx: std::sync::mpsc::Sender<Vec<RowOrigin>>,
    score_tx: std::sync::mpsc::SyncSender<Vec<ScoreRow>>,
    dead_path: &std::path::Path,
    progress: &ProgressBar,
) -> Result<Tally> {
    let decoder = Decoder::new(schema.clone());
    let mut features = FeatureEngine::new(
        schema.clone(),
        decoder.numeric_columns(),
        cfg.features.max_keys,
    );
    let head = schema.task.head();
    let width = features.width();
    let learner = OnlineLearner::new(LearnerConfig {
        inputs: width,
        head,
        model: cfg.model.clone(),
        importance: cfg.importance.method,
        selection: cfg.selection.clone(),
        buffer: cfg.buffer.clone(),
        training: cfg.training.clone(),
    });
    let metrics = match head {
        Head::Regression => Metrics::Regression(RegressionEval::new(cfg.evaluation.window)),
        Head::Classification { .. } => {
            Metrics::Classification(ClassificationEval::new(cfg.evaluation.window))
        }
    };
    let mut t = Tally {
        learner,
        metrics,
        skipped: BTreeMap::new(),
        dead: DeadLetterSink::new(dead_path),
        rows_read: 0,
        seen_after_warmup: 0,
        trained_after_warmup: 0,
        last_loss: f64::NAN,
        keys_tracked: 0,
        keys_forgotten: 0,
        first_rows_at: None,
    };
    let mut pending = Samples::default();
    let mb = cfg.training.micro_batch;
    let scores_on = cfg.output.scores;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            SourceEvent::Unreadable {
                origin,
                rows,
                reason,
                detail,
            } => {
                *t.skipped.entry(reason.clone()).or_default() += rows;
                t.rows_read += rows;
                t.dead.send(&DeadLetter {
                    reason: &reason,
                    detail: &detail,
                    origin: &origin,
                    row: 0,
                    rows,
                    key: None,
                    time: None,
                })?;
                progress.inc(rows);
            }
            SourceEvent::Batch {
                batch,
                origins,
                ack,
            } => {
                t.first_rows_at.get_or_insert_with(Instant::now);
                let n = batch.num_rows() as u64;
                t.rows_read += n;
                match decoder.decode(&batch) {
                    Err(e) => {
                        tracing::warn!(origin = %origins[0].source, row = origins[0].index, error = %e, "batch rejected");
                        *t.skipped.entry(e.reason.clone()).or_default() += n;
                        for o in &origins {
                            t.dead.send(&DeadLetter {
                                reason: &e.reason,
                                detail: &e.detail,
                                origin: &o.source,
                                row: o.index,
                                rows: 1,
                                key: None,
                                time: None,
                            })?;
                        }
                    }
                    Ok(d) => {
                        let (skipped, dead) = (&mut t.skipped, &mut t.dead);
                        let mut io: Result<()> = Ok(());
                        features.push_batch(&d, &origins, &mut pending, |i, reason| {
                            let label = reason.label();
                            if reason.is_bad_input() && io.is_ok() {
                                let key = (!arrow::array::Array::is_null(&d.key, i)).then(|| d.key.value(i));
                                let time = (!arrow::array::Array::is_null(&d.time, i)).then(|| d.time.value(i));
                                let o = &origins[i];
                                tracing::debug!(origin = %o.source, row = o.index, reason = %label, "row dead-lettered");
                                io = dead.send(&DeadLetter { reason: &label, detail: "row skipped", origin: &o.source, row: o.index, rows: 1, key, time });
                            }
                            *skipped.entry(label).or_default() += 1;
                        });
                        io?;
                    }
                }
                while pending.len() >= mb {
                    let chunk = pending.take_front(mb, width);
                    step(cfg, &mut t, chunk, head, &score_tx, scores_on)?;
                }
                if let Some(done) = ack {
                    // A feed commits what it is acknowledged: nothing of this batch may wait
                    // in a partial micro-batch, so train the remainder now.
                    if !pending.is_empty() {
                        let chunk = pending.take_front(pending.len(), width);
                        step(cfg, &mut t, chunk, head, &score_tx, scores_on)?;
                    }
                    let _ = ack_tx.send(done);
                }
                progress.inc(n);
                progress.set_message(t.metrics.window_text());
            }
        }
    }
    if !pending.is_empty() {
        let n = pending.len();
        let chunk = pending.take_front(n, width);
        step(cfg, &mut t, chunk, head, &score_tx, scores_on)?;
    }
    if features.keys_evicted > 0 {
        tracing::info!(
            forgotten = features.keys_evicted,
            "keys forgotten at features.max_keys"
        );
    }
    t.keys_tracked = features.tracked_keys();
    t.keys_forgotten = features.keys_evicted;
    Ok(t)
}

/// One micro-batch through the learner, the metrics and the score sink.
fn step(
    cfg: &PipelineConfig,
    t: &mut Tally,
    s: Samples,
    head: Head,
    score_tx: &std::sync::mpsc::SyncSender<Vec<ScoreRow>>,
    scores_on: bool,
) -> Result<()> {
    let seen_before = t.learner.stats().seen;
    let out = t.learner.learn_batch(FreshBatch {
        x: &s.x,
        y: &s.y,
        keys: &s.keys,
        times: &s.times,
    });
    if out.train_loss.is_finite() {
        t.last_loss = out.train_loss as f64;
    }
    let k = head.outputs();
    let mut rows = Vec::with_capacity(if scores_on { s.len() } else { 0 });
    for (i, ev) in s.eval.iter().enumerate() {
        let prediction = match &mut t.metrics {
            Metrics::Regression(r) => {
                let p = ev.prediction(out.outputs[i]);
                r.record(RegressionRow {
                    prediction: p,
                    target: ev.target,
                    persistence: ev.persistence,
                    seasonal: ev.seasonal,
                });
                p
            }
            Metrics::Classification(c) => {
                let logits = &out.outputs[i * k..(i + 1) * k];
                c.record(logits, ev.target as usize, ev.power.as_deref());
                crate::learner::eval::argmax(logits) as f64
            }
        };
        if seen_before + i as u64 >= cfg.selection.warmup {
            t.seen_after_warmup += 1;
            t.trained_after_warmup += out.trained[i] as u64;
        }
        if scores_on {
            rows.push(ScoreRow {
                source: s.origins[i].source.clone(),
                position: s.origins[i].index,
                key: s.keys[i].clone(),
                time: s.times[i],
                score: out.scores[i],
                threshold: out.threshold,
                selected: out.selected[i],
                trained: out.trained[i],
                retained: out.retained[i],
                prediction,
                target: ev.target,
            });
        }
    }
    if scores_on {
        score_tx.send(rows).context("score sink stopped")?;
    }
    Ok(())
}
