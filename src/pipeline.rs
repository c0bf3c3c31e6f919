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
//! nothing on the hot path takes a lock. With checkpoints on, the learner also decides when a
//! checkpoint is due: it rolls the sinks (score segment closed, output topic flushed, dead
//! letters synced), writes the checkpoint, and only then tells a feed to commit the offsets
//! it covers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::checkpoint::{self, Checkpoint};
use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::energy::EnergyMeter;
use crate::features::{FeatureEngine, Samples};
use crate::learner::eval::{EvalSummary, Scoreboard};
use crate::learner::model::Head;
use crate::learner::{FreshBatch, LearnerConfig, OnlineLearner};
use crate::report::{BufferReport, CheckpointReport, RunReport};
use crate::schema::{Schema, TimeKind};
use crate::shutdown::Shutdown;
use crate::sink::dead_letter::{DeadLetter, DeadLetterSink};
use crate::sink::scores::{ScoreRow, ScoreSegments, ScoreSink};
use crate::sink::topic::SampleTopicSink;
use crate::source::{Ack, RowOrigin, SourceConfig, SourceEvent, kafka, parquet};
use crate::telemetry::{self, LearnerMetrics, LearnerView, StepView};
use crate::validate::RowCheck;

/// How a run is shown.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Counters that span restarts (kept in checkpoints).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunCounters {
    pub skipped: BTreeMap<String, u64>,
    pub rows_read: u64,
    pub seen_after_warmup: u64,
    pub trained_after_warmup: u64,
    pub last_loss: f64,
    pub dead_letters: u64,
    pub dead_rows: u64,
    pub resumes: u64,
}

/// What the sink thread is told.
enum SinkMsg {
    Rows(Vec<ScoreRow>),
    /// Make everything sent so far durable; reply with the next score segment number.
    Roll(SyncSender<Result<u64>>),
}

/// The per-sample score output: one file, or segments rolled at each checkpoint.
enum ScoreOut {
    File(ScoreSink),
    Segments(ScoreSegments),
}

/// Runs a pipeline to the end of its source (or a shutdown signal) and returns its report,
/// which is also written to `report.json` in the output folder.
pub async fn run(cfg: PipelineConfig, opts: RunOptions, shutdown: Shutdown) -> Result<RunReport> {
    let started = Instant::now();
    let cpu_start = cpu_time::ProcessTime::now();
    let schema = Arc::new(Schema::load(&cfg.schema)?);
    cfg.validate_with(schema.input_width())?;
    let backend = format!("{:?}", cfg.model.backend).to_lowercase();
    let importance = format!("{:?}", cfg.importance.method).to_lowercase();
    telemetry::build_info(&cfg.name, &backend, &importance);
    let meter = Arc::new(Mutex::new(EnergyMeter::start(cfg.energy.clone())));
    {
        let m = meter.lock().expect("meter");
        telemetry::energy_model(m.source(), &m.parameters());
    }
    // Unix ms of the last checkpoint (0: none yet), for the checkpoint-age gauge.
    let last_checkpoint_ms = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn(tick_process_metrics(
        meter.clone(),
        cfg.checkpoint.enabled.then(|| last_checkpoint_ms.clone()),
        started,
        Duration::from_millis(cfg.telemetry.publish_ms),
    ));
    let out_dir = cfg.output_dir();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let ckpt_path = cfg.checkpoint_path();
    let resume = if cfg.checkpoint.enabled {
        let c = checkpoint::load(&ckpt_path)?;
        if let Some(c) = &c {
            anyhow::ensure!(
                c.schema == schema.name,
                "{}: the checkpoint was written for schema `{}`, this pipeline reads `{}`",
                ckpt_path.display(),
                c.schema,
                schema.name
            );
            tracing::info!(checkpoint = %ckpt_path.display(), samples = c.learner.seen(), positions = ?c.positions, "resuming from checkpoint");
        }
        c
    } else {
        None
    };
    clear_stale_outputs(&out_dir, resume.is_some())?;
    let covered: HashMap<Arc<str>, u64> = resume
        .as_ref()
        .map(|c| {
            c.positions
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), *v))
                .collect()
        })
        .unwrap_or_default();

    let (tx, rx) = mpsc::channel::<SourceEvent>(cfg.channels.batches);
    // Acknowledgements flow back to a feed source: "a batch is processed" (flow control) and
    // "these positions are durable" (commit them). At most `channels.batches` + 1 batches are
    // ever unacknowledged.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<Ack>();
    let mut topic_brokers = None;
    let mut fingerprints = BTreeMap::new();
    let (source, total) = match cfg.source.clone() {
        SourceConfig::Parquet(src) => {
            let files = src.files(&schema)?;
            fingerprints = same_files_as_checkpoint(&files, resume.as_ref(), &ckpt_path)?;
            let total = src
                .max_rows
                .unwrap_or(u64::MAX)
                .min(parquet::total_rows(&files));
            tracing::info!(pipeline = %cfg.name, files = files.len(), rows = total, "replaying");
            let (schema, shutdown) = (schema.clone(), shutdown.clone());
            let h = tokio::task::spawn_blocking(move || {
                parquet::replay(&src, &schema, &files, tx, &shutdown).map(|s| (s.rows, 0))
            });
            (h, Some(total))
        }
        SourceConfig::Kafka(src) => {
            tracing::info!(pipeline = %cfg.name, brokers = %src.brokers, topics = ?src.topics, group = %src.group_id, "consuming");
            topic_brokers = Some(src.brokers.clone());
            let (schema, shutdown, covered) = (schema.clone(), shutdown.clone(), covered.clone());
            let numeric = Decoder::new(schema.clone()).numeric_columns().to_vec();
            let check = RowCheck::new(schema.clone(), &numeric, cfg.features.out_of_range);
            let h = tokio::task::spawn_blocking(move || {
                kafka::consume(&src, schema, tx, ack_rx, covered, &check, &shutdown)
            });
            (h, None)
        }
    };

    let scores_path = if cfg.checkpoint.enabled {
        out_dir.join("scores")
    } else {
        out_dir.join("scores.parquet")
    };
    let timestamps = schema.time.kind == TimeKind::Timestamp;
    let mut scores = if !cfg.output.scores {
        None
    } else if cfg.checkpoint.enabled {
        let next = resume.as_ref().map_or(1, |c| c.next_segment);
        Some(ScoreOut::Segments(ScoreSegments::open(
            &scores_path,
            timestamps,
            next,
        )?))
    } else {
        // Written under a temporary name, renamed when complete.
        let tmp = crate::durable::tmp_path(&scores_path);
        Some(ScoreOut::File(ScoreSink::create(&tmp, timestamps)?))
    };
    let mut topic = match &cfg.output.topic {
        Some(t) => {
            let brokers = t.brokers.clone().or(topic_brokers).unwrap_or_default();
            Some(SampleTopicSink::create(t, &brokers)?)
        }
        None => None,
    };
    let sinks_on = scores.is_some() || topic.is_some();
    let (score_tx, score_rx) = sync_channel::<SinkMsg>(4);
    let final_scores = scores_path.clone();
    let sink = std::thread::spawn(move || -> Result<(Option<u64>, Option<u64>)> {
        for msg in score_rx {
            match msg {
                SinkMsg::Rows(rows) => {
                    match &mut scores {
                        Some(ScoreOut::File(s)) => s.write(&rows)?,
                        Some(ScoreOut::Segments(s)) => s.write(&rows)?,
                        None => {}
                    }
                    if let Some(t) = &mut topic {
                        t.send(&rows)?;
                    }
                }
                SinkMsg::Roll(reply) => {
                    let done = (|| {
                        if let Some(t) = &topic {
                            t.flush()?;
                        }
                        match &mut scores {
                            Some(ScoreOut::Segments(s)) => s.roll(),
                            _ => Ok(0),
                        }
                    })();
                    let failed = done.is_err();
                    let _ = reply.send(done);
                    if failed {
                        anyhow::bail!("a sink could not make its output durable");
                    }
                }
            }
        }
        if let Some(t) = &topic {
            t.flush()?;
        }
        let written = match scores {
            Some(ScoreOut::File(s)) => {
                let rows = s.finish()?;
                let tmp = crate::durable::tmp_path(&final_scores);
                std::fs::rename(&tmp, &final_scores).with_context(|| {
                    format!(
                        "cannot rename {} to {}",
                        tmp.display(),
                        final_scores.display()
                    )
                })?;
                crate::durable::sync_dir(&final_scores);
                Some(rows)
            }
            Some(ScoreOut::Segments(mut s)) => {
                s.roll()?;
                Some(s.rows)
            }
            None => None,
        };
        Ok((written, topic.map(|t| t.records)))
    });

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
        let ctl = CheckpointCtl {
            path: cfg.checkpoint.enabled.then(|| ckpt_path.clone()),
            every_rows: cfg.checkpoint.every_rows,
            every: Duration::from_secs_f64(cfg.checkpoint.every_seconds),
            rows_since: 0,
            last: Instant::now(),
            written: 0,
            last_bytes: 0,
            seconds: 0.0,
            covered,
            already_covered: 0,
            next_segment: resume.as_ref().map_or(1, |c| c.next_segment),
            files: fingerprints,
        };
        tokio::task::spawn_blocking(move || {
            let io = LoopIo {
                ack_tx,
                sink_tx: sinks_on.then_some(score_tx),
                progress,
                last_checkpoint_ms,
            };
            learn_loop(&cfg, &schema, rx, io, &dead_path, ctl, resume)
        })
    };
    let learned = learn.await.context("learner thread panicked")?;
    let (source_rows, redelivered) = source.await.context("source thread panicked")??;
    let (written, topic_records) = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    let mut tally = learned?;
    progress.finish_and_clear();
    ticker.abort();
    let energy = meter.lock().expect("meter").read();
    telemetry::process(&process_view(&energy, 0.0, None));

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
    if tally.dead.letters > 0 || tally.counters.dead_letters > 0 {
        outputs.insert(
            "dead_letters".to_string(),
            tally.dead.path().display().to_string(),
        );
    }
    if let Some(t) = &cfg.output.topic {
        outputs.insert("topic".to_string(), t.topic.clone());
    }
    tally.dead.finish()?;
    let c = &tally.counters;
    let skipped_total = c.skipped.values().sum();
    let session_samples = stats.seen - tally.seen_at_start;
    let report = RunReport {
        pipeline: cfg.name.clone(),
        pipeline_file: cfg.file.display().to_string(),
        schema: schema.name.clone(),
        attribution: schema.attribution.clone(),
        importance,
        keep: cfg.selection.keep,
        unbiased_q: cfg.selection.unbiased_q,
        backend,
        hidden: cfg.model.hidden.clone(),
        micro_batch: cfg.training.micro_batch,
        interrupted: shutdown.is_triggered(),
        rows_read: c.rows_read.max(source_rows),
        samples: stats.seen,
        skipped: c.skipped.clone(),
        skipped_total,
        dead_lettered_rows: c.dead_rows,
        keys_tracked: tally.keys_tracked,
        keys_forgotten: tally.keys_forgotten,
        values_clipped: tally.values_clipped,
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
            len: buf.len(),
            bytes: buf.bytes(),
            capacity: cfg.buffer.capacity,
            max_bytes: cfg.buffer.max_bytes,
            stats: buf.stats,
        },
        backpropagated: stats.backpropagated,
        training_steps: stats.steps,
        nonfinite_steps: stats.nonfinite_steps,
        model_restores: stats.restores,
        diverged: stats.nonfinite_steps > 0 || tally.metrics.whole.nonfinite() > 0,
        last_train_loss: c.last_loss,
        metrics: tally.metrics.whole.summary(),
        periods: tally.metrics.periods(),
        compute: tally
            .learner
            .compute()
            .with_energy(cfg.energy.joules_per_cpu_second()),
        selection_policy: cfg.selection.policy.name().to_string(),
        replay_ratio: cfg.buffer.replay_ratio,
        replay_sampling: format!("{:?}", cfg.buffer.replay_sampling).to_lowercase(),
        wall_s,
        cpu_s,
        samples_per_s: session_samples as f64 / wall_s.max(1e-9),
        active_s,
        checkpoint: cfg.checkpoint.enabled.then(|| CheckpointReport {
            path: ckpt_path.display().to_string(),
            written: tally.ckpt.written,
            last_bytes: tally.ckpt.last_bytes,
            seconds: tally.ckpt.seconds,
            resumed_at_samples: (c.resumes > 0 && tally.seen_at_start > 0)
                .then_some(tally.seen_at_start),
            resumes: c.resumes,
            rows_already_covered: tally.ckpt.already_covered + redelivered,
        }),
        topic_records,
        energy,
        outputs,
    };
    crate::durable::write_atomic(
        &report_path,
        &[serde_json::to_string_pretty(&report)?.as_bytes()],
    )?;
    Ok(report)
}

/// The files a run writes in its output folder.
const OUTPUT_FILES: [&str; 3] = ["report.json", "dead_letters.jsonl", "scores.parquet"];

/// A fresh run (nothing to resume) removes the outputs an earlier run left in its folder,
/// so that an old report or dead-letter file never sits beside new results; it says which.
/// An output name taken by a folder is refused at start, not after the replay.
fn clear_stale_outputs(out_dir: &std::path::Path, resuming: bool) -> Result<()> {
    for name in OUTPUT_FILES {
        let p = out_dir.join(name);
        if p.is_dir() {
            anyhow::bail!("{} is a folder; gradsift writes a file there", p.display());
        }
        if !resuming && p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove the stale {}", p.display()))?;
            tracing::info!(file = %p.display(), "removed an earlier run's output (a fresh run, no checkpoint to resume)");
        }
    }
    Ok(())
}

/// When to checkpoint, and what the last one covered.
struct CheckpointCtl {
    /// None: checkpoints are off.
    path: Option<PathBuf>,
    every_rows: u64,
    every: Duration,
    rows_since: u64,
    last: Instant,
    written: u64,
    last_bytes: u64,
    /// Time spent closing segments, syncing and writing checkpoints (not the partial-batch train).
    seconds: f64,
    /// Positions the checkpoint we resumed from covers: rows before them are skipped.
    covered: HashMap<Arc<str>, u64>,
    already_covered: u64,
    next_segment: u64,
    /// The replayed files' fingerprints, kept in every checkpoint.
    files: BTreeMap<String, String>,
}

/// The fingerprints of `files`; an error naming the file when one the checkpoint covers has
/// changed since (its positions would point into other data).
fn same_files_as_checkpoint(
    files: &[std::path::PathBuf],
    resume: Option<&Checkpoint>,
    ckpt_path: &std::path::Path,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in files {
        let name = f.to_string_lossy().into_owned();
        let Some(fp) = parquet::fingerprint(f) else {
            continue;
        };
        if let Some(old) = resume.and_then(|c| c.files.get(&name))
            && *old != fp
        {
            anyhow::bail!(
                "{name} changed since the checkpoint {} was written (size:footer CRC {old}, now {fp}): \
                 its covered rows would point into other data; delete the checkpoint, or restore the file",
                ckpt_path.display()
            );
        }
        out.insert(name, fp);
    }
    Ok(out)
}

impl CheckpointCtl {
    fn due(&self) -> bool {
        self.path.is_some()
            && self.rows_since > 0
            && (self.rows_since >= self.every_rows || self.last.elapsed() >= self.every)
    }
}

/// The learner thread's channels to the rest of the pipeline.
struct LoopIo {
    ack_tx: std::sync::mpsc::Sender<Ack>,
    /// Unix ms of the last checkpoint, read by the process-metrics ticker.
    last_checkpoint_ms: Arc<AtomicU64>,
    sink_tx: Option<SyncSender<SinkMsg>>,
    progress: ProgressBar,
}

/// What the learner thread hands back.
struct Tally {
    learner: OnlineLearner,
    features: FeatureEngine,
    metrics: Scoreboard,
    counters: RunCounters,
    dead: DeadLetterSink,
    /// Per source: the position after the last row processed.
    positions: BTreeMap<Arc<str>, u64>,
    ckpt: CheckpointCtl,
    seen_at_start: u64,
    keys_tracked: usize,
    keys_forgotten: u64,
    /// Values clamped to their column's range (`features.out_of_range = "clip"`).
    values_clipped: u64,
    /// When the first rows arrived (throughput without start-up and group-join time).
    first_rows_at: Option<Instant>,
    telemetry: LearnerMetrics,
}

fn learn_loop(
    cfg: &PipelineConfig,
    schema: &Arc<Schema>,
    mut rx: mpsc::Receiver<SourceEvent>,
    io: LoopIo,
    dead_path: &std::path::Path,
    ckpt: CheckpointCtl,
    resume: Option<Checkpoint>,
) -> Result<Tally> {
    let decoder = Decoder::new(schema.clone());
    let features = FeatureEngine::new(
        schema.clone(),
        decoder.numeric_columns(),
        cfg.features.max_keys,
    )
    .with_out_of_range(cfg.features.out_of_range);
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
        reference_replay_ratio: cfg.reference_replay_ratio(),
        holdout_every: cfg.importance.holdout_every,
    });
    let metrics = Scoreboard::new(head, cfg.evaluation.window, &cfg.evaluation.boundaries());
    let mut t = Tally {
        learner,
        features,
        metrics,
        counters: RunCounters {
            last_loss: f64::NAN,
            ..RunCounters::default()
        },
        dead: DeadLetterSink::new(dead_path, resume.as_ref().map(|c| c.dead_letter_bytes)),
        positions: BTreeMap::new(),
        ckpt,
        seen_at_start: 0,
        keys_tracked: 0,
        keys_forgotten: 0,
        values_clipped: 0,
        first_rows_at: None,
        telemetry: LearnerMetrics::new(
            cfg.source.kind_name(),
            cfg.buffer.capacity,
            cfg.telemetry.publish_ms,
        ),
    };
    if let Some(c) = resume {
        restore(&mut t, c)?;
    }
    // Baseline: learner work restored from a checkpoint is not this process's.
    publish_metrics(&mut t);
    let mut pending = Samples::default();
    let mb = cfg.training.micro_batch;
    let runtime = tokio::runtime::Handle::current();
    loop {
        // A quiet feed still gets its checkpoint (and so its commit) on time: wait for the
        // next event at most until the checkpoint is due.
        let ev = if t.ckpt.path.is_some() && t.ckpt.rows_since > 0 {
            let left = t.ckpt.every.saturating_sub(t.ckpt.last.elapsed());
            match runtime.block_on(tokio::time::timeout(left, rx.recv())) {
                Ok(ev) => ev,
                Err(_) => {
                    take_checkpoint(cfg, &mut t, &mut pending, width, head, &io)?;
                    continue;
                }
            }
        } else {
            rx.blocking_recv()
        };
        let Some(ev) = ev else { break };
        match ev {
            SourceEvent::Unreadable {
                origin,
                first_row,
                rows,
                reason,
                detail,
            } => {
                // A file without a footer has no row count: it is covered as a whole.
                let end = if rows == 0 {
                    u64::MAX
                } else {
                    first_row + rows
                };
                let p = t.positions.entry(origin.clone()).or_insert(0);
                *p = (*p).max(end);
                if t.ckpt.covered.get(&origin).is_some_and(|&c| c >= end) {
                    // Dead-lettered before the checkpoint we resumed from: not again.
                    t.ckpt.already_covered += rows;
                    t.telemetry.rows_already_covered(rows);
                    io.progress.inc(rows);
                    continue;
                }
                *t.counters.skipped.entry(reason.clone()).or_default() += rows;
                t.counters.rows_read += rows;
                send_dead(
                    &mut t,
                    &DeadLetter {
                        reason: &reason,
                        detail: &detail,
                        origin: &origin,
                        row: first_row,
                        rows,
                        key: None,
                        time: None,
                    },
                )?;
                io.progress.inc(rows);
            }
            SourceEvent::Batch {
                batch,
                origins,
                ack,
            } => {
                t.first_rows_at.get_or_insert_with(Instant::now);
                let delivered = batch.num_rows() as u64;
                for o in ack.as_deref().unwrap_or(&origins) {
                    let p = t.positions.entry(o.source.clone()).or_insert(0);
                    *p = (*p).max(o.index + 1);
                }
                let (batch, origins) = skip_covered(&mut t.ckpt, batch, origins)?;
                let n = batch.num_rows() as u64;
                if n < delivered {
                    t.telemetry.rows_already_covered(delivered - n);
                }
                t.counters.rows_read += n;
                // Every delivered message counts towards the next checkpoint, bad ones too:
                // a feed of nothing but dead letters must still be committed.
                t.ckpt.rows_since += ack.as_ref().map_or(n, |a| a.len() as u64);
                if n > 0 {
                    feed(&mut t, &decoder, &batch, &origins, &mut pending)?;
                }
                while pending.len() >= mb {
                    let chunk = pending.take_front(mb, width);
                    step(cfg, &mut t, chunk, head, io.sink_tx.as_ref())?;
                }
                if ack.is_some() && !pending.is_empty() {
                    // A feed commits what it is acknowledged: nothing of this batch may wait
                    // in a partial micro-batch, so train the remainder now.
                    let chunk = pending.take_front(pending.len(), width);
                    step(cfg, &mut t, chunk, head, io.sink_tx.as_ref())?;
                }
                if ack.is_some() {
                    let _ = io.ack_tx.send(Ack::Processed);
                    if t.ckpt.path.is_none() {
                        // No checkpoints: processed is as durable as it gets.
                        let _ = io.ack_tx.send(Ack::Commit(positions(&t)));
                    }
                }
                if t.ckpt.due() {
                    take_checkpoint(cfg, &mut t, &mut pending, width, head, &io)?;
                }
                io.progress.inc(delivered);
                io.progress.set_message(t.metrics.whole.window_text());
            }
        }
    }
    if !pending.is_empty() {
        let n = pending.len();
        let chunk = pending.take_front(n, width);
        step(cfg, &mut t, chunk, head, io.sink_tx.as_ref())?;
    }
    if t.ckpt.path.is_some() {
        t.ckpt.rows_since = t.ckpt.rows_since.max(1);
        take_checkpoint(cfg, &mut t, &mut pending, width, head, &io)?;
    }
    if t.features.keys_evicted > 0 {
        tracing::info!(
            forgotten = t.features.keys_evicted,
            "keys forgotten at features.max_keys"
        );
    }
    t.keys_tracked = t.features.tracked_keys();
    t.keys_forgotten = t.features.keys_evicted;
    t.values_clipped = t.features.clipped;
    publish_metrics(&mut t);
    Ok(t)
}

/// The learner's throttled gauges and counters: one place, called after steps and at the end.
fn publish_metrics(t: &mut Tally) {
    let stats = t.learner.stats();
    let buf = t.learner.buffer();
    t.telemetry.publish(LearnerView {
        selected: stats.selected,
        trained_fresh: stats.trained_fresh,
        trained_replay: stats.trained_replay,
        backpropagated: stats.backpropagated,
        steps: stats.steps,
        nonfinite_steps: stats.nonfinite_steps,
        restores: stats.restores,
        buffer_len: buf.len(),
        buffer_bytes: buf.bytes(),
        buffer_admitted: buf.stats.admitted,
        buffer_evicted: buf.stats.evicted,
        buffer_rescored: buf.stats.rescored,
        keys: t.features.tracked_keys(),
    });
    // An empty window has no error to report (a resumed run's window is restored).
    match t.metrics.whole.summary() {
        EvalSummary::Regression(r) if r.model_last_window.valid() => {
            let w = r.model_last_window;
            let p = r.persistence_last_window;
            telemetry::prequential_regression(
                w.mae,
                w.rmse,
                p.valid().then_some((p.mae, p.rmse)),
                w.n,
            );
        }
        EvalSummary::Classification(c) if c.model_last_window.valid() => {
            let w = c.model_last_window;
            telemetry::prequential_classification(w.top1, w.top3, w.n);
        }
        _ => {}
    }
}

/// Refreshes the process-wide gauges (energy, power, CPU, memory, checkpoint age) every
/// `every` until aborted.
async fn tick_process_metrics(
    meter: Arc<Mutex<EnergyMeter>>,
    last_checkpoint_ms: Option<Arc<AtomicU64>>,
    started: Instant,
    every: Duration,
) {
    let mut interval = tokio::time::interval(every);
    let mut prev: Option<(Instant, f64)> = None;
    loop {
        interval.tick().await;
        let now = Instant::now();
        let r = meter.lock().expect("meter").read();
        let power = prev.map_or(0.0, |(t, j)| {
            (r.joules - j) / now.duration_since(t).as_secs_f64().max(1e-3)
        });
        prev = Some((now, r.joules));
        let age = last_checkpoint_ms
            .as_ref()
            .map(|ms| match ms.load(Ordering::Relaxed) {
                0 => started.elapsed().as_secs_f64(),
                last => unix_ms().saturating_sub(last) as f64 / 1000.0,
            });
        telemetry::process(&process_view(&r, power, age));
    }
}

fn process_view(
    e: &crate::energy::EnergyReading,
    power_w: f64,
    checkpoint_age_s: Option<f64>,
) -> telemetry::ProcessView {
    telemetry::ProcessView {
        joules: e.joules,
        co2_grams: e.co2_grams,
        cpu_s: e.cpu_s,
        rss_bytes: e.rss_bytes,
        power_w,
        checkpoint_age_s,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn positions(t: &Tally) -> Vec<(Arc<str>, u64)> {
    t.positions.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// Drops the rows a resumed-from checkpoint already covers (a feed redelivers from its last
/// commit, which can trail the checkpoint by the commit that a crash cut short).
fn skip_covered(
    ckpt: &mut CheckpointCtl,
    batch: arrow::array::RecordBatch,
    origins: Vec<RowOrigin>,
) -> Result<(arrow::array::RecordBatch, Vec<RowOrigin>)> {
    if ckpt.covered.is_empty() {
        return Ok((batch, origins));
    }
    let keep: Vec<bool> = origins
        .iter()
        .map(|o| ckpt.covered.get(&o.source).is_none_or(|&p| o.index >= p))
        .collect();
    let dropped = keep.iter().filter(|k| !**k).count();
    if dropped == 0 {
        return Ok((batch, origins));
    }
    ckpt.already_covered += dropped as u64;
    let mask = arrow::array::BooleanArray::from(keep.clone());
    let batch = arrow::compute::filter_record_batch(&batch, &mask)?;
    let origins = origins
        .into_iter()
        .zip(keep)
        .filter_map(|(o, k)| k.then_some(o))
        .collect();
    Ok((batch, origins))
}

fn send_dead(t: &mut Tally, letter: &DeadLetter<'_>) -> Result<()> {
    t.dead.send(letter)?;
    t.telemetry.rows_skipped(letter.reason, true, letter.rows);
    t.counters.dead_letters += 1;
    t.counters.dead_rows += letter.rows;
    Ok(())
}

/// A row (or a whole batch) that did not become a sample, and why.
pub(crate) struct Skipped<'a> {
    pub reason: String,
    pub detail: &'a str,
    /// Bad input (dead-lettered), not a skip by design such as `lag_warmup`.
    pub bad_input: bool,
    pub origin: &'a RowOrigin,
    pub key: Option<&'a str>,
    pub time: Option<i64>,
}

impl Skipped<'_> {
    /// The dead letter of a skipped row.
    pub fn letter(&self) -> DeadLetter<'_> {
        DeadLetter {
            reason: &self.reason,
            detail: self.detail,
            origin: &self.origin.source,
            row: self.origin.index,
            rows: 1,
            key: self.key,
            time: self.time,
        }
    }
}

/// Decodes a batch and turns its rows into samples appended to `pending`; every row that does
/// not become one is handed to `skip` (a batch of the wrong shape: each of its rows).
pub(crate) fn decode_rows(
    decoder: &Decoder,
    features: &mut FeatureEngine,
    batch: &arrow::array::RecordBatch,
    origins: &[RowOrigin],
    pending: &mut Samples,
    mut skip: impl FnMut(Skipped<'_>) -> Result<()>,
) -> Result<()> {
    let d = match decoder.decode(batch) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(origin = %origins[0].source, row = origins[0].index, error = %e, "batch rejected");
            for origin in origins {
                let (reason, detail) = (e.reason.clone(), e.detail.as_str());
                skip(Skipped {
                    reason,
                    detail,
                    bad_input: true,
                    origin,
                    key: None,
                    time: None,
                })?;
            }
            return Ok(());
        }
    };
    let mut skipped: Vec<(usize, String, bool)> = Vec::new();
    features.push_batch(&d, origins, pending, |i, reason| {
        skipped.push((i, reason.label(), reason.is_bad_input()));
    });
    for (i, reason, bad_input) in skipped {
        let key = (!arrow::array::Array::is_null(&d.key, i)).then(|| d.key.value(i));
        let time = (!arrow::array::Array::is_null(&d.time, i)).then(|| d.time.value(i));
        let origin = &origins[i];
        if bad_input {
            tracing::debug!(origin = %origin.source, row = origin.index, reason = %reason, "row dead-lettered");
        }
        skip(Skipped {
            reason,
            detail: "row skipped",
            bad_input,
            origin,
            key,
            time,
        })?;
    }
    Ok(())
}

/// Decodes a batch into samples; skips are counted, bad input dead-lettered.
fn feed(
    t: &mut Tally,
    decoder: &Decoder,
    batch: &arrow::array::RecordBatch,
    origins: &[RowOrigin],
    pending: &mut Samples,
) -> Result<()> {
    let features = &mut t.features;
    let (counters, telemetry, dead) = (&mut t.counters, &t.telemetry, &mut t.dead);
    let mut letters = 0u64;
    decode_rows(decoder, features, batch, origins, pending, |s| {
        *counters.skipped.entry(s.reason.clone()).or_default() += 1;
        telemetry.rows_skipped(&s.reason, s.bad_input, 1);
        if !s.bad_input {
            return Ok(());
        }
        letters += 1;
        dead.send(&s.letter())
    })?;
    t.counters.dead_letters += letters;
    t.counters.dead_rows += letters;
    Ok(())
}

/// Restores the learner, features, metrics and counters from a checkpoint.
fn restore(t: &mut Tally, c: Checkpoint) -> Result<()> {
    t.learner.restore(c.learner)?;
    t.features
        .restore(c.features)
        .map_err(|e| anyhow::anyhow!("checkpoint does not fit this schema: {e}"))?;
    anyhow::ensure!(
        c.metrics.whole.same_task(&t.metrics.whole),
        "checkpoint was written for another task"
    );
    // The periods come from this configuration; a saved period of the same name continues.
    let mut saved = c.metrics.periods;
    for p in &mut t.metrics.periods {
        if let Some(i) = saved
            .iter()
            .position(|s| s.name == p.name && s.start == p.start)
        {
            p.metrics = saved.swap_remove(i).metrics;
        }
    }
    t.metrics.whole = c.metrics.whole;
    t.counters = c.counters;
    t.counters.resumes += 1;
    t.positions = c
        .positions
        .into_iter()
        .map(|(k, v)| (Arc::from(k.as_str()), v))
        .collect();
    t.seen_at_start = t.learner.stats().seen;
    Ok(())
}

/// Makes everything processed so far durable, in order: pending rows trained, sinks rolled,
/// dead letters synced, checkpoint written (atomically), and then the feed told to commit.
fn take_checkpoint(
    cfg: &PipelineConfig,
    t: &mut Tally,
    pending: &mut Samples,
    width: usize,
    head: Head,
    io: &LoopIo,
) -> Result<()> {
    let Some(path) = t.ckpt.path.clone() else {
        return Ok(());
    };
    if !pending.is_empty() {
        let n = pending.len();
        let chunk = pending.take_front(n, width);
        step(cfg, t, chunk, head, io.sink_tx.as_ref())?;
    }
    let t0 = Instant::now();
    if let Some(sink) = &io.sink_tx {
        let (reply_tx, reply_rx) = sync_channel(1);
        sink.send(SinkMsg::Roll(reply_tx))
            .context("sink thread stopped")?;
        t.ckpt.next_segment = reply_rx.recv().context("sink thread stopped")??;
    }
    t.dead.sync()?;
    let ckpt = Checkpoint {
        pipeline: cfg.name.clone(),
        schema: t.features.schema_name().to_string(),
        written_ms: unix_ms(),
        positions: t
            .positions
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        next_segment: t.ckpt.next_segment,
        dead_letter_bytes: t.dead.len(),
        files: t.ckpt.files.clone(),
        learner: t.learner.state()?,
        features: t.features.state(),
        metrics: t.metrics.clone(),
        counters: t.counters.clone(),
    };
    let bytes = checkpoint::save(&path, &ckpt)?;
    let _ = io.ack_tx.send(Ack::Commit(positions(t)));
    let seconds = t0.elapsed().as_secs_f64();
    io.last_checkpoint_ms
        .store(ckpt.written_ms, Ordering::Relaxed);
    t.telemetry
        .checkpoint(seconds, bytes, ckpt.written_ms as f64 / 1000.0);
    t.ckpt.written += 1;
    t.ckpt.last_bytes = bytes;
    t.ckpt.seconds += seconds;
    t.ckpt.rows_since = 0;
    t.ckpt.last = Instant::now();
    tracing::debug!(
        bytes,
        ms = t0.elapsed().as_millis() as u64,
        samples = t.learner.stats().seen,
        positions = ?t.positions,
        "checkpoint written"
    );
    Ok(())
}

/// One micro-batch through the learner, the metrics and the sinks.
fn step(
    cfg: &PipelineConfig,
    t: &mut Tally,
    s: Samples,
    head: Head,
    sink_tx: Option<&SyncSender<SinkMsg>>,
) -> Result<()> {
    let seen_before = t.learner.stats().seen;
    let t0 = Instant::now();
    let out = t.learner.learn_batch(FreshBatch {
        x: &s.x,
        y: &s.y,
        keys: &s.keys,
        times: &s.times,
    });
    t.telemetry.step(&StepView {
        fresh_scores: &out.scores[..s.len()],
        threshold: out.threshold,
        loss: out.train_loss,
        seconds: t0.elapsed().as_secs_f64(),
    });
    if t.telemetry.due() {
        publish_metrics(t);
    }
    if out.train_loss.is_finite() {
        t.counters.last_loss = out.train_loss as f64;
    }
    let k = head.outputs();
    let sinks_on = sink_tx.is_some();
    let mut rows = Vec::with_capacity(if sinks_on { s.len() } else { 0 });
    for (i, ev) in s.eval.iter().enumerate() {
        let (prediction, obs) = ev.observe(head, &out.outputs[i * k..(i + 1) * k]);
        t.metrics.record(seen_before + i as u64, s.times[i], obs);
        if seen_before + i as u64 >= cfg.selection.warmup {
            t.counters.seen_after_warmup += 1;
            t.counters.trained_after_warmup += out.trained[i] as u64;
        }
        if sinks_on {
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
    if let Some(tx) = sink_tx {
        tx.send(SinkMsg::Rows(rows))
            .context("sink thread stopped")?;
    }
    Ok(())
}
