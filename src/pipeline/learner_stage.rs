//! The learner stage: one thread that owns all model state (so nothing on the hot path takes
//! a lock). It takes the feature stage's micro-batches, steps the learner on each, records the
//! prequential metrics, sends score rows to the sink stage, dead-letters bad input, and
//! checkpoints where the feature stage cut a marker into the stream. A checkpoint is taken in
//! a fixed order: a quiet source's partial micro-batch trained (otherwise it waits inside the
//! features' state), sinks rolled, dead letters synced,
//! checkpoint written atomically, and only then is a feed told to commit the positions it
//! covers.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use crate::shutdown::Shutdown;
use crate::stage_time::{StageTime, StageTimes};

use super::checkpoint_writer::{CheckpointWriter, Written};
use super::feature_stage::{FeatureTally, Featured, FeaturedBatch, Letter};
use super::learner_keys::LearnerKeys;
use super::rows::count_skip;
use super::sink_stage::SinkMsg;
use super::upkeep::unix_ms;
use crate::checkpoint::{Checkpoint, RunCounters};
use crate::config::PipelineConfig;
use crate::features::{FeatureState, RowEval, Samples, SavedLearnerParts};
use crate::learner::blend::{BlendConfig, Blender, ExpertWeights};
use crate::learner::decision::{Decision, LossTable};
use crate::learner::drift::{Detector, DriftMonitor};
use crate::learner::eval::{EvalSummary, Observation, Scoreboard};
use crate::learner::model::Head;
use crate::learner::per_key::{Learners, ModelScope};
use crate::learner::trace::{MetricTrace, TracePoint};
use crate::learner::{FreshBatch, StepOutcome};
use crate::report::SwitchReport;
use crate::schema::Schema;
use crate::sink::dead_letter::{DeadLetter, DeadLetterSink};
use crate::sink::scores::ScoreRow;
use crate::source::Ack;
use crate::telemetry::{self, LearnerMetrics, LearnerView, StepView};

/// Score rows per message to the sink thread.
const SINK_BATCH: usize = 1024;

/// Where checkpoints go, and what the last one covered (the feature stage says when).
pub(crate) struct CheckpointCtl {
    /// None: checkpoints are off.
    pub path: Option<PathBuf>,
    pub written: u64,
    pub last_bytes: u64,
    /// Time the learner's thread spent on checkpoints: closing segments, syncing dead
    /// letters, copying its state (not the partial-batch train).
    pub seconds: f64,
    /// Whole checkpoints, the writer thread's encoding, writing and syncing included.
    pub write_seconds: f64,
    /// Positions the checkpoint we resumed from covers: rows before them are skipped.
    pub covered: HashMap<Arc<str>, u64>,
    pub already_covered: u64,
    pub next_segment: u64,
    /// The replayed files' fingerprints, kept in every checkpoint.
    pub files: BTreeMap<String, String>,
}

impl CheckpointCtl {
    /// Checkpoints as `[checkpoint]` says, continuing a resumed run's segment numbering.
    pub fn new(cfg: &PipelineConfig, resume: Option<&Checkpoint>) -> Self {
        CheckpointCtl {
            path: cfg.checkpoint.enabled.then(|| cfg.checkpoint_path()),
            written: 0,
            last_bytes: 0,
            seconds: 0.0,
            write_seconds: 0.0,
            covered: resume
                .map(|c| {
                    c.positions
                        .iter()
                        .map(|(k, v)| (Arc::from(k.as_str()), *v))
                        .collect()
                })
                .unwrap_or_default(),
            already_covered: 0,
            next_segment: resume.map_or(1, |c| c.next_segment),
            files: BTreeMap::new(),
        }
    }
}

/// The stage's channels to the rest of the pipeline.
pub(crate) struct StageIo {
    /// To a feed source: batches processed, positions to commit. Dropped by `finish`: a
    /// source drains acknowledgements until this hangs up.
    pub ack_tx: Option<Sender<Ack>>,
    /// Unix ms of the last checkpoint, read by the upkeep ticker.
    pub last_checkpoint_ms: Arc<AtomicU64>,
    pub sink_tx: Option<SyncSender<SinkMsg>>,
    pub progress: ProgressBar,
    /// Triggered by a failed checkpoint write, so that a quiet feed stops too.
    pub shutdown: Shutdown,
    /// Where the checkpoint writer's thread books its CPU and waiting time.
    pub writer_time: Arc<StageTimes>,
}

/// The learner stage's state (see the module doc).
pub(crate) struct LearnerStage {
    cfg: PipelineConfig,
    io: StageIo,
    head: Head,
    width: usize,
    schema_name: String,
    /// Score rows not yet handed to the sink thread, sent in batches of [`SINK_BATCH`]: one
    /// message per micro-batch of 8 cost a thread wake-up per 8 samples (12% of the learner
    /// thread's time in `perf`, in futex and task switches).
    sink_rows: Vec<ScoreRow>,
    /// This micro-batch's predictions, for its score rows.
    predictions: Vec<f64>,
    /// A row's prediction blended with the baselines (`model.blend`), and its scratch.
    blender: Blender,
    blended: Vec<f32>,
    /// `model.decision = "min_expected_loss"`: the learnt loss table, and its scores.
    losses: Option<LossTable>,
    decided: Vec<f32>,
    /// `model.decision = "switch"` (this process): rows on which the two rules chose
    /// different classes, and of those the rows acted on the most probable one.
    pub switch_rows: SwitchReport,
    pub learner: Learners,
    /// Per key: the blend's weights and the loss detectors, for the feature stage's keys.
    keys: LearnerKeys,
    /// The feature engine's counters, as of the last batch.
    pub tally: FeatureTally,
    pub metrics: Scoreboard,
    /// The drift detectors and their findings.
    pub drift: DriftMonitor,
    /// The windowed metric over the stream (the run plot).
    pub trace: MetricTrace,
    pub counters: RunCounters,
    pub dead: DeadLetterSink,
    /// Per source: the position after the last row processed.
    pub positions: BTreeMap<Arc<str>, u64>,
    pub ckpt: CheckpointCtl,
    /// Writes checkpoints on its own thread (none: checkpoints are off).
    writer: Option<CheckpointWriter>,
    pub seen_at_start: u64,
    /// When the first rows arrived (throughput without start-up and group-join time).
    pub first_rows_at: Option<Instant>,
    telemetry: LearnerMetrics,
}

impl LearnerStage {
    /// A stage for `cfg` learning rows `width` features wide, continuing from `resume` when
    /// given (whose features went to the feature stage, their per-key learner parts here).
    pub fn new(
        cfg: &PipelineConfig,
        schema: &Arc<Schema>,
        width: usize,
        io: StageIo,
        dead_path: &std::path::Path,
        ckpt: CheckpointCtl,
        resume: Option<(Checkpoint, SavedLearnerParts)>,
    ) -> Result<Self> {
        let head = schema.task.head();
        let config = cfg.learner_config(width, head, cfg.reference_replay_ratio());
        let learner = Learners::new(config, cfg.model.scope, cfg.model.max_models);
        let metrics = Scoreboard::new(head, cfg.evaluation.window, &cfg.evaluation.boundaries());
        let dead =
            DeadLetterSink::new(dead_path, resume.as_ref().map(|(c, _)| c.dead_letter_bytes));
        let writer = ckpt.path.clone().map(|p| {
            let (acks, last_ms) = (io.ack_tx.clone(), io.last_checkpoint_ms.clone());
            let (stop, times) = (io.shutdown.clone(), io.writer_time.clone());
            CheckpointWriter::start(p, acks, last_ms, stop, times)
        });
        let mut stage = LearnerStage {
            cfg: cfg.clone(),
            io,
            head,
            width,
            schema_name: schema.name.clone(),
            sink_rows: Vec::new(),
            predictions: Vec::new(),
            blender: Blender::default(),
            blended: Vec::new(),
            losses: LossTable::for_model(cfg.model.decision, cfg.model.decision_memory, head),
            decided: Vec::new(),
            switch_rows: SwitchReport::default(),
            learner,
            keys: LearnerKeys::default(),
            tally: FeatureTally::default(),
            metrics,
            drift: DriftMonitor::new(&cfg.drift),
            trace: MetricTrace::with_changes(&cfg.evaluation.change_points()),
            counters: RunCounters {
                last_loss: f64::NAN,
                ..RunCounters::default()
            },
            dead,
            positions: BTreeMap::new(),
            ckpt,
            writer,
            seen_at_start: 0,
            first_rows_at: None,
            telemetry: LearnerMetrics::new(
                cfg.source.kind_name(),
                cfg.buffer.capacity,
                cfg.telemetry.publish_ms,
            ),
        };
        if let Some((c, parts)) = resume {
            stage.restore(c)?;
            stage.keys = LearnerKeys::restored(parts, &stage.cfg.drift);
        }
        // Baseline: learner work restored from a checkpoint is not this process's.
        stage.publish_metrics();
        Ok(stage)
    }

    /// Takes the feature stage's output until its end, which trains what is left and takes
    /// the final checkpoint. Runs on a blocking thread inside a tokio runtime.
    pub fn run(mut self, rx: Receiver<Featured>, time: &StageTime) -> Result<Self> {
        while let Ok(f) = time.waiting(|| rx.recv()) {
            if self.handle(f)? {
                return Ok(self);
            }
        }
        anyhow::bail!("the feature stage stopped before the end of the stream")
    }

    /// One thing from the feature stage; true at the end of the stream.
    pub fn handle(&mut self, f: Featured) -> Result<bool> {
        match f {
            Featured::Unreadable(u) => {
                self.unreadable(&DeadLetter::unreadable(&u), !u.acked_by_batch)?
            }
            Featured::Batch(b) => self.batch(*b)?,
            Featured::Checkpoint { rest, state } => {
                self.step_rest(rest)?;
                self.checkpoint(*state)?;
            }
            Featured::End { rest, state, tally } => {
                self.tally = tally;
                self.step_rest(rest)?;
                self.finish(*state)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Input that cannot be read: counted and dead-lettered once, also across a resume.
    /// `advance`: the position moves past it now (else its batch's acknowledgement moves it).
    fn unreadable(&mut self, letter: &DeadLetter<'_>, advance: bool) -> Result<()> {
        let (origin, rows) = (letter.origin, letter.rows);
        // A file without a footer has no row count: it is covered as a whole.
        let end = if rows == 0 {
            u64::MAX
        } else {
            letter.row + rows
        };
        if advance {
            let p = self.positions.entry(Arc::from(origin)).or_insert(0);
            *p = (*p).max(end);
        }
        self.io.progress.inc(rows);
        if self.ckpt.covered.get(origin).is_some_and(|&c| c >= end) {
            // Dead-lettered before the checkpoint we resumed from: not again.
            self.ckpt.already_covered += rows;
            self.telemetry.rows_already_covered(rows);
            return Ok(());
        }
        count_skip(&mut self.counters.skipped, letter.reason, rows);
        self.counters.rows_read += rows;
        self.dead.send(letter)?;
        self.telemetry.rows_skipped(letter.reason, true, rows);
        self.counters.dead_letters += 1;
        self.counters.dead_rows += rows;
        Ok(())
    }

    fn batch(&mut self, b: FeaturedBatch) -> Result<()> {
        self.first_rows_at.get_or_insert_with(Instant::now);
        for (source, at) in b.positions {
            let p = self.positions.entry(source).or_insert(0);
            *p = (*p).max(at);
        }
        if b.covered > 0 {
            self.ckpt.already_covered += b.covered;
            self.telemetry.rows_already_covered(b.covered);
        }
        self.counters.rows_read += b.delivered - b.covered;
        self.skipped(&b.skips, &b.letters)?;
        self.keys.track(&b.keys);
        self.tally = b.tally;
        for chunk in b.chunks {
            self.step(chunk)?;
        }
        self.keys.forget(&b.keys);
        if b.ack {
            self.ack(Ack::Processed);
            if self.ckpt.path.is_none() {
                // No checkpoints: processed is as durable as it gets.
                self.ack(Ack::Commit(self.commit_positions()));
            }
        }
        self.io.progress.inc(b.delivered);
        // The window's summary costs a pass over its rows: only for a bar that is drawn.
        if !self.io.progress.is_hidden() {
            self.io
                .progress
                .set_message(self.metrics.whole.window_text());
        }
        Ok(())
    }

    /// Rows that did not become samples: counted by reason, bad input dead-lettered. The
    /// metrics are told once per batch and reason: a counter lookup per row cost 5% of the
    /// learner thread while 1,000 keys warmed up their lags.
    fn skipped(
        &mut self,
        skips: &[(Cow<'static, str>, bool, u64)],
        letters: &[Letter],
    ) -> Result<()> {
        for (reason, bad, rows) in skips {
            count_skip(&mut self.counters.skipped, reason, *rows);
            self.telemetry.rows_skipped(reason, *bad, *rows);
        }
        for letter in letters {
            self.dead.send(&letter.dead_letter())?;
        }
        self.counters.dead_letters += letters.len() as u64;
        self.counters.dead_rows += letters.len() as u64;
        Ok(())
    }

    /// Steps a partial micro-batch (nothing when it is empty).
    fn step_rest(&mut self, rest: Samples) -> Result<()> {
        if rest.is_empty() {
            return Ok(());
        }
        self.step(rest)
    }

    /// The prediction of one row of `key` (the MLP, blended with the baselines where
    /// configured; the class acted on by `model.decision`), scored on the scoreboard at
    /// `(sample, time)`; returns it in the target's units (the class for classification).
    fn score_row(
        &mut self,
        ev: &RowEval,
        mlp: &[f32],
        (blend, w): (Option<&BlendConfig>, &ExpertWeights),
        (sample, time): (u64, i64),
        key: &str,
    ) -> f64 {
        if let Some(b) = blend {
            self.blender
                .blend(b, &ev.baselines, mlp, w, &mut self.blended);
        }
        let row = if blend.is_some() { &self.blended } else { mlp };
        let (mut prediction, mut obs) = ev.observe(self.head, row);
        // Under `switch`, the two rules' classes, to book into the key's record.
        let mut rules = None;
        if let Observation::Classification {
            mlp_alone, choice, ..
        } = &mut obs
        {
            if blend.is_some() {
                *mlp_alone = Some(mlp);
            }
            if let Some(t) = &mut self.losses {
                let switch = self.cfg.model.decision == Decision::Switch;
                let record = switch.then(|| self.keys.rules(key));
                let a = t.choose(row, blend.is_none(), record.as_ref(), &mut self.decided);
                // A non-finite prediction (the decision scores are NaN) acts on no class: it
                // is counted as such, and teaches the key's record nothing.
                let acted = self.decided.iter().all(|v| v.is_finite());
                if switch && acted && a.most != a.least {
                    self.switch_rows.rows_differing += 1;
                    self.switch_rows.acted_most_probable += u64::from(a.on_most);
                }
                // Acting on the most probable class leaves `choice` unset: the ranking's top.
                if !a.on_most || !acted {
                    *choice = Some(&self.decided);
                }
                prediction = if acted { a.class() as f64 } else { f64::NAN };
                rules = (switch && acted).then_some(a);
            }
        }
        self.metrics.record(sample, time, obs);
        if let (Some(t), Some(p)) = (&mut self.losses, &ev.power) {
            t.learn(p);
            if let (Some(a), Some(r)) = (rules, self.keys.rules_mut(key)) {
                r.learn(self.cfg.model.decision_decay, p, a.most, a.least);
            }
        }
        prediction
    }

    /// Under `model.decision_scope = "per_key"`, puts `key`'s loss table in use, or back
    /// (see [`LearnerKeys::swap_losses`]).
    fn swap_key_losses(&mut self, key: &str) {
        let m = &self.cfg.model;
        if m.decision_scope != ModelScope::PerKey || self.losses.is_none() {
            return;
        }
        let (head, memory) = (self.head, m.decision_memory);
        self.keys.swap_losses(key, &mut self.losses, || {
            LossTable::for_model(m.decision, memory, head)
        });
        if let Some(t) = &mut self.losses {
            t.set_memory(memory);
        }
    }

    /// One micro-batch through the learner, the metrics and the sinks.
    pub fn step(&mut self, s: Samples) -> Result<()> {
        let seen_before = self.learner.stats().seen;
        let t0 = Instant::now();
        let out = self.learner.learn_batch(FreshBatch {
            x: &s.x,
            y: &s.y,
            keys: &s.keys,
            times: &s.times,
        });
        self.telemetry.step(&StepView {
            fresh_scores: &out.scores[..s.len()],
            threshold: out.threshold,
            loss: out.train_loss,
            seconds: t0.elapsed().as_secs_f64(),
        });
        if self.telemetry.due() {
            self.publish_metrics();
        }
        if out.train_loss.is_finite() {
            self.counters.last_loss = out.train_loss as f64;
        }
        let k = self.head.outputs();
        let width = self.width;
        let traced = self.cfg.output.plot || !self.trace.changes.is_empty();
        let sinks_on = self.io.sink_tx.is_some();
        let blend = self
            .cfg
            .model
            .blend
            .filter(|_| self.head != Head::Regression);
        for (i, ev) in s.eval.iter().enumerate() {
            let mlp = &out.outputs[i * k..(i + 1) * k];
            let mut w = ExpertWeights::default();
            if blend.is_some() {
                w = self.keys.expert_weights(&s.keys[i]);
            }
            let at = (seen_before + i as u64, s.times[i]);
            self.swap_key_losses(&s.keys[i]);
            // Only until every change point is reached: the total is read for the mark.
            if self.trace.changes.iter().any(|c| c.at.is_none()) {
                let before = self.metrics.whole.running_total();
                self.trace.mark(seen_before + i as u64, s.times[i], before);
            }
            let prediction = self.score_row(ev, mlp, (blend.as_ref(), &w), at, &s.keys[i]);
            self.swap_key_losses(&s.keys[i]);
            let sample = seen_before + i as u64 + 1;
            if traced && self.trace.due(sample) {
                let (model, baseline) = self.metrics.whole.window_point();
                self.trace.record(TracePoint {
                    sample,
                    model,
                    baseline,
                    total: self.metrics.whole.running_total(),
                });
            }
            if self.cfg.drift.enabled {
                let at = (seen_before + i as u64, s.times[i]);
                self.watch_drift(at, &s.keys[i], out.losses[i], out.scores[i]);
            }
            if let Some(b) = &blend {
                self.blender.learn(b, ev.target as usize, &mut w);
                self.keys.set_expert_weights(&s.keys[i], w);
            }
            if seen_before + i as u64 >= self.cfg.selection.warmup {
                self.counters.seen_after_warmup += 1;
                self.counters.trained_after_warmup += out.trained[i] as u64;
            }
            if sinks_on {
                self.predictions.push(prediction);
            }
        }
        if sinks_on {
            self.gather_rows(s, &out, width);
        }
        if self.sink_rows.len() >= SINK_BATCH {
            self.flush_rows()?;
        }
        Ok(())
    }

    /// The micro-batch's score rows (with `predictions`, which it empties). The rows take the
    /// samples' keys and sources instead of cloning them: those `Arc`s are shared with the
    /// feature stage's thread, and each clone and drop here moved a reference count between the
    /// cores (a file's source is one `Arc` for every row).
    fn gather_rows(&mut self, s: Samples, out: &StepOutcome, width: usize) {
        let keep_x = self.cfg.output.features;
        let rows =
            (s.keys.into_iter().zip(s.origins).enumerate()).map(|(i, (key, origin))| ScoreRow {
                source: origin.source,
                position: origin.index,
                key,
                time: s.times[i],
                score: out.scores[i],
                threshold: out.threshold,
                selected: out.selected[i],
                trained: out.trained[i],
                retained: out.retained[i],
                prediction: self.predictions[i],
                target: s.eval[i].target,
                features: if keep_x {
                    s.x[i * width..(i + 1) * width].to_vec()
                } else {
                    Vec::new()
                },
            });
        self.sink_rows.extend(rows);
        self.predictions.clear();
    }

    /// One row's prequential loss and score through the drift detectors (global, and the
    /// key's own when asked), and a reaction when one is due. `at` is (sample, time).
    fn watch_drift(&mut self, (sample, time): (u64, i64), key: &Arc<str>, loss: f32, score: f32) {
        let fired = self.drift.update(sample, time, loss, score);
        self.telemetry.drift(fired);
        if let Some(d) = Detector::ALL.into_iter().find(|&d| fired[d as usize]) {
            self.trace.detected(sample, d);
        }
        if self.cfg.drift.per_key
            && let Some(d) = self.keys.detectors(key, &self.cfg.drift)
        {
            let found = d.update(loss);
            let key_fired = self.drift.record_key(sample, time, key, found);
            self.telemetry.drift_key(key_fired);
        }
        if self.drift.should_react(&self.cfg.drift, sample, fired) {
            self.learner.react(&self.cfg.drift);
        }
    }

    /// Hands the score rows gathered so far to the sink thread.
    fn flush_rows(&mut self) -> Result<()> {
        if let Some(tx) = &self.io.sink_tx
            && !self.sink_rows.is_empty()
        {
            let rows = std::mem::replace(&mut self.sink_rows, Vec::with_capacity(SINK_BATCH));
            tx.send(SinkMsg::Rows(rows))
                .context("sink thread stopped")?;
        }
        Ok(())
    }

    /// Makes everything processed so far durable, in order (a quiet source's pending rows
    /// were trained just before; otherwise they are in `features`): sinks
    /// rolled, dead letters synced, checkpoint written (atomically), and then the feed told
    /// to commit.
    pub fn checkpoint(&mut self, mut features: FeatureState) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        self.flush_rows()?;
        let t0 = Instant::now();
        if let Some(sink) = &self.io.sink_tx {
            let (reply_tx, reply_rx) = sync_channel(1);
            sink.send(SinkMsg::Roll(reply_tx))
                .context("sink thread stopped")?;
            if let Some(next) = reply_rx.recv().context("sink thread stopped")?? {
                self.ckpt.next_segment = next;
            }
        }
        self.dead.sync()?;
        self.keys.save_into(&mut features);
        let ckpt = Checkpoint {
            pipeline: self.cfg.name.clone(),
            schema: self.schema_name.clone(),
            written_ms: unix_ms(),
            positions: self
                .positions
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            next_segment: self.ckpt.next_segment,
            dead_letter_bytes: self.dead.len(),
            files: self.ckpt.files.clone(),
            learner: self.learner.state()?,
            features,
            metrics: self.metrics.clone(),
            counters: self.counters.clone(),
            drift: self.drift.clone(),
            trace: self.trace.clone(),
            decision: self.losses.clone(),
            blend_gate: self.blender.gate,
        };
        let commit = self.commit_positions();
        let before_s = t0.elapsed().as_secs_f64();
        let writer = self.writer.as_mut().expect("checkpoints on");
        // Encoded, written and synced on the writer's thread, which commits it when on disk.
        writer.write(ckpt, commit, before_s)?;
        self.ckpt.seconds += t0.elapsed().as_secs_f64();
        let written = writer.written()?;
        self.checkpoints_written(&written);
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            samples = self.learner.stats().seen,
            positions = ?self.positions,
            "checkpoint handed to the writer"
        );
        Ok(())
    }

    /// Counts checkpoints now on disk, and tells the metrics.
    fn checkpoints_written(&mut self, written: &[Written]) {
        for w in written {
            self.telemetry
                .checkpoint(w.seconds, w.bytes, w.written_ms as f64 / 1000.0);
            self.ckpt.written += 1;
            self.ckpt.last_bytes = w.bytes;
            self.ckpt.write_seconds += w.seconds;
        }
    }

    /// The end of the source (its last partial micro-batch learnt): the final checkpoint,
    /// the last metrics, the dead-letter file flushed.
    fn finish(&mut self, features: FeatureState) -> Result<()> {
        self.checkpoint(features)?;
        if let Some(w) = &mut self.writer {
            let written = w.finish()?;
            self.checkpoints_written(&written);
        }
        if self.tally.keys_evicted > 0 {
            tracing::info!(
                forgotten = self.tally.keys_evicted,
                "keys forgotten at features.max_keys"
            );
        }
        self.publish_metrics();
        self.flush_rows()?;
        // The sink completes its outputs only when told the run finished (a stage that fails
        // drops its sender without this); a feed source stops draining acknowledgements when
        // this one is gone: this stage outlives the run, so hang up now.
        if let Some(tx) = self.io.sink_tx.take() {
            tx.send(SinkMsg::Finish).context("sink thread stopped")?;
        }
        self.io.ack_tx = None;
        self.dead.finish()
    }

    /// To the source; a source that is gone has nothing left to commit.
    fn ack(&self, a: Ack) {
        if let Some(tx) = &self.io.ack_tx {
            let _ = tx.send(a);
        }
    }

    fn commit_positions(&self) -> Vec<(Arc<str>, u64)> {
        self.positions
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Restores the learner, features, metrics and counters from a checkpoint.
    fn restore(&mut self, c: Checkpoint) -> Result<()> {
        self.learner.restore(c.learner)?;
        anyhow::ensure!(
            c.metrics.whole.same_task(&self.metrics.whole),
            "checkpoint was written for another task"
        );
        // The periods come from this configuration; a saved period of the same name continues.
        let mut saved = c.metrics.periods;
        for p in &mut self.metrics.periods {
            if let Some(i) = saved
                .iter()
                .position(|s| s.name == p.name && s.start == p.start)
            {
                p.metrics = saved.swap_remove(i).metrics;
            }
        }
        self.metrics.whole = c.metrics.whole;
        self.counters = c.counters;
        self.drift.restore(c.drift, &self.cfg.drift);
        // The change points come from this configuration; a saved one keeps where it was met.
        let marks = std::mem::take(&mut self.trace.changes);
        self.trace = c.trace;
        let saved = std::mem::replace(&mut self.trace.changes, marks);
        for m in &mut self.trace.changes {
            if let Some(s) = saved
                .iter()
                .find(|s| s.name == m.name && s.start == m.start)
            {
                (m.at, m.total, m.detected) = (s.at, s.total, s.detected);
            }
        }
        if let (Some(t), Some(saved)) = (&mut self.losses, c.decision)
            && saved.classes() == t.classes()
        {
            t.restore(saved);
        }
        self.blender.gate = c.blend_gate;
        self.counters.resumes += 1;
        self.positions = c
            .positions
            .into_iter()
            .map(|(k, v)| (Arc::from(k.as_str()), v))
            .collect();
        self.seen_at_start = self.learner.stats().seen;
        Ok(())
    }

    /// The learner's throttled gauges and counters: one place, called after steps and at the end.
    fn publish_metrics(&mut self) {
        let stats = self.learner.stats();
        let buf = self.learner.buffers();
        self.telemetry.publish(LearnerView {
            selected: stats.selected,
            trained_fresh: stats.trained_fresh,
            trained_replay: stats.trained_replay,
            backpropagated: stats.backpropagated,
            clipped: stats.clipped,
            decided: [
                self.switch_rows.acted_most_probable,
                self.switch_rows.rows_differing - self.switch_rows.acted_most_probable,
            ],
            steps: stats.steps,
            nonfinite_steps: stats.nonfinite_steps,
            restores: stats.restores,
            buffer_len: buf.len,
            buffer_bytes: buf.bytes,
            buffer_admitted: buf.stats.admitted,
            buffer_evicted: buf.stats.evicted,
            buffer_rescored: buf.stats.rescored,
            keys: self.tally.tracked_keys,
            drift_recovering: self.drift.recovering(&self.cfg.drift, stats.seen),
            adwin_window: self.drift.adwin_width(),
            page_hinkley: self.drift.page_hinkley_statistic(),
        });
        // An empty window has no error to report (a resumed run's window is restored).
        match self.metrics.whole.summary() {
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
}

/// The stage driven in-process, as a component test driver would: a list of source events
/// in, the acknowledgements, sink messages and files it produces captured. No broker, no
/// Python: the bundled Milan archive is read with the parquet crate.
#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, channel};
    use std::sync::{Arc, Mutex};

    use super::super::feature_stage::FeatureStage;
    use super::*;
    use crate::checkpoint;
    use crate::source::{SourceEvent, Unreadable};

    /// The bundled archive as feed-like batches of 1,024 messages of partition `t[0]`.
    fn milan_events() -> Vec<SourceEvent> {
        super::super::test_events::milan_events("t[0]", true)
    }

    /// The feature and learner stages, driven in turn on the test's thread.
    struct Driver {
        features: FeatureStage,
        stage: LearnerStage,
        acks: Receiver<Ack>,
        /// What the sink stage was told, in order: "rows" or "roll".
        sink_log: Arc<Mutex<Vec<&'static str>>>,
        out: tempfile::TempDir,
    }

    fn driver(out: tempfile::TempDir, sets: &[&str]) -> Driver {
        let mut o: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        o.push(format!("output.dir=\"{}\"", out.path().display()));
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/milan-replay.toml");
        let cfg = PipelineConfig::load(&file, &o).unwrap();
        let schema = Arc::new(Schema::load(&cfg.schema).unwrap());
        let (ack_tx, acks) = channel();
        let (sink_tx, sink_rx) = sync_channel::<SinkMsg>(4);
        let sink_log = Arc::new(Mutex::new(Vec::new()));
        let log = sink_log.clone();
        std::thread::spawn(move || {
            let mut segment = 1;
            for m in sink_rx {
                match m {
                    SinkMsg::Rows(_) => log.lock().unwrap().push("rows"),
                    SinkMsg::Finish => log.lock().unwrap().push("finish"),
                    SinkMsg::Roll(reply) => {
                        log.lock().unwrap().push("roll");
                        segment += 1;
                        let _ = reply.send(Ok(Some(segment)));
                    }
                }
            }
        });
        let io = StageIo {
            ack_tx: Some(ack_tx),
            last_checkpoint_ms: Arc::new(AtomicU64::new(0)),
            sink_tx: Some(sink_tx),
            progress: ProgressBar::hidden(),
            shutdown: Shutdown::new(),
            writer_time: Arc::default(),
        };
        let resume = checkpoint::load(&cfg.checkpoint_path()).unwrap();
        let ckpt = CheckpointCtl::new(&cfg, resume.as_ref());
        let (state, resume) = super::super::split_resume(resume);
        let features = FeatureStage::new(&cfg, &schema, ckpt.covered.clone(), state).unwrap();
        let dead = out.path().join("dead_letters.jsonl");
        let width = features.width();
        let stage = LearnerStage::new(&cfg, &schema, width, io, &dead, ckpt, resume).unwrap();
        Driver {
            features,
            stage,
            acks,
            sink_log,
            out,
        }
    }

    impl Driver {
        /// One event through both stages, and every checkpoint it caused on disk.
        fn handle(&mut self, ev: SourceEvent) {
            for f in self.features.handle(ev).unwrap() {
                assert!(!self.stage.handle(f).unwrap(), "not the end yet");
            }
            if let Some(w) = &mut self.stage.writer {
                let written = w.wait().unwrap();
                self.stage.checkpoints_written(&written);
            }
        }

        fn finish(&mut self) {
            assert!(self.stage.handle(self.features.end()).unwrap());
        }
    }

    const CKPT: [&str; 2] = ["checkpoint.enabled=true", "checkpoint.every_rows=2048"];

    #[test]
    fn a_checkpoint_rolls_the_sinks_syncs_saves_and_only_then_commits() {
        let mut d = driver(tempfile::tempdir().unwrap(), &CKPT);
        let path = d.out.path().join("checkpoint.bin");
        let mut commits = 0;
        for (k, ev) in milan_events().into_iter().take(4).enumerate() {
            d.handle(ev);
            // Every batch is acknowledged as processed; a commit follows a checkpoint only.
            assert!(matches!(d.acks.try_recv(), Ok(Ack::Processed)));
            match d.acks.try_recv() {
                Ok(Ack::Commit(p)) => {
                    commits += 1;
                    let saved = checkpoint::load(&path)
                        .unwrap()
                        .expect("saved before commit");
                    assert_eq!(p, vec![(Arc::from("t[0]"), 1024 * (k as u64 + 1))]);
                    assert_eq!(saved.positions["t[0]"], 1024 * (k as u64 + 1));
                    // The segment number the roll replied with: the roll came first.
                    assert_eq!(saved.next_segment, commits + 1);
                }
                Ok(Ack::Processed) => panic!("one Processed per batch"),
                Err(_) => {}
            }
        }
        assert_eq!(commits, 2, "every 2,048 rows");
        let log = d.sink_log.lock().unwrap().clone();
        assert_eq!(log.iter().filter(|m| **m == "roll").count(), 2);
        assert_eq!(
            log.last(),
            Some(&"roll"),
            "rows are sent before the roll that covers them"
        );
    }

    /// A feed source drains acknowledgements until the stage hangs up: a stage that kept
    /// its sender after `finish` held every Kafka run with `stop_at_end` for two minutes.
    #[test]
    fn finish_sends_the_last_commit_then_hangs_up() {
        let mut d = driver(tempfile::tempdir().unwrap(), &CKPT);
        for ev in milan_events().into_iter().take(3) {
            d.handle(ev);
        }
        d.finish();
        let acks: Vec<Ack> = std::iter::from_fn(|| d.acks.try_recv().ok()).collect();
        assert!(
            matches!(acks.last(), Some(Ack::Commit(p)) if p == &vec![(Arc::from("t[0]"), 3 * 1024)]),
            "the final checkpoint's positions are committed last"
        );
        assert!(
            matches!(
                d.acks.try_recv(),
                Err(std::sync::mpsc::TryRecvError::Disconnected)
            ),
            "the source sees the stage hang up while the stage itself lives on"
        );
    }

    #[test]
    fn a_resumed_stage_skips_covered_rows_and_letters_and_counts_them_once() {
        let events = milan_events;
        let mut a = driver(tempfile::tempdir().unwrap(), &CKPT);
        let bad = || {
            SourceEvent::Unreadable(Unreadable {
                origin: Arc::from("t[0]"),
                first_row: 100,
                rows: 1,
                reason: "malformed_json".into(),
                detail: "test".into(),
                acked_by_batch: false,
            })
        };
        a.handle(bad());
        for ev in events().into_iter().take(3) {
            a.handle(ev);
        }
        a.finish();
        let seen = a.stage.learner.stats().seen;
        assert_eq!(a.stage.counters.dead_letters, 1);

        let mut b = driver(a.out, &CKPT);
        assert_eq!(b.stage.learner.stats().seen, seen, "the learner resumed");
        b.handle(bad());
        for ev in events() {
            b.handle(ev);
        }
        b.finish();
        assert_eq!(b.stage.ckpt.already_covered, 3 * 1024 + 1);
        assert_eq!(
            b.stage.counters.rows_read,
            8928 + 1,
            "every row once over both runs"
        );
        assert_eq!(
            b.stage.counters.dead_letters, 1,
            "the letter is not counted twice"
        );
        let letters = std::fs::read_to_string(b.out.path().join("dead_letters.jsonl")).unwrap();
        assert_eq!(letters.lines().count(), 1);
    }

    /// A feed's bad message is dead-lettered at once, but its position waits for the batch
    /// that acknowledges it: a checkpoint in between must not cover the good messages before
    /// it, which that batch still carries. A file's lost rows are covered at once.
    #[test]
    fn a_feed_letter_leaves_the_position_to_its_batch() {
        let mut d = driver(tempfile::tempdir().unwrap(), &CKPT);
        let letter = |origin: &str, acked_by_batch| {
            SourceEvent::Unreadable(Unreadable {
                origin: Arc::from(origin),
                first_row: 1000,
                rows: 1,
                reason: "malformed_json".into(),
                detail: "test".into(),
                acked_by_batch,
            })
        };
        d.handle(letter("t[0]", true));
        d.handle(letter("file.parquet", false));
        assert_eq!(d.stage.counters.dead_letters, 2);
        assert_eq!(d.stage.positions.get("t[0]"), None);
        assert_eq!(d.stage.positions.get("file.parquet"), Some(&1001));
    }

    #[test]
    fn a_non_finite_step_is_skipped_and_counted_not_learned() {
        let mut d = driver(
            tempfile::tempdir().unwrap(),
            &[
                "training.learning_rate=1e30",
                "training.max_nonfinite_steps=3",
            ],
        );
        for ev in milan_events().into_iter().take(2) {
            d.handle(ev);
        }
        let s = d.stage.learner.stats();
        assert!(s.nonfinite_steps > 0 && s.restores > 0, "{s:?}");
        assert!(
            d.stage.metrics.whole.nonfinite() > 0,
            "the metrics know it diverged"
        );
    }

    /// The per-key detectors live in the learner stage while running; a checkpoint keeps
    /// them inside the features' per-key state, and a resume hands them back.
    #[test]
    fn a_checkpoint_keeps_the_per_key_detectors_and_a_resume_hands_them_back() {
        let sets = [CKPT[0], CKPT[1], "drift.per_key=true"];
        let mut a = driver(tempfile::tempdir().unwrap(), &sets);
        for ev in milan_events().into_iter().take(3) {
            a.handle(ev);
        }
        a.finish();
        let path = a.out.path().join("checkpoint.bin");
        let mut saved = checkpoint::load(&path).unwrap().unwrap();
        let parts = saved.features.take_learner_parts();
        assert_eq!(parts.len(), 1, "one key, square 5161");
        let (key, part) = &parts[0];
        let saved = part.drift.as_deref().expect("detectors saved");
        let json = serde_json::to_string(saved).unwrap();

        let cfg = a.stage.cfg.drift.clone();
        let mut b = driver(a.out, &sets);
        let restored = b.stage.keys.detectors(key, &cfg).unwrap();
        assert_eq!(serde_json::to_string(restored).unwrap(), json);
    }

    /// Checkpoints are written on their own thread; one that fails is an error of the run,
    /// and no position is committed without a checkpoint on disk.
    #[test]
    fn a_failed_checkpoint_write_is_an_error_and_nothing_is_committed() {
        let out = tempfile::tempdir().unwrap();
        let missing = out.path().join("no-such-folder/checkpoint.bin");
        let at = format!("checkpoint.path=\"{}\"", missing.display());
        let mut d = driver(out, &[CKPT[0], CKPT[1], &at]);
        let mut failed = None;
        'events: for ev in milan_events().into_iter().take(4) {
            for f in d.features.handle(ev).unwrap() {
                if let Err(e) = d.stage.handle(f) {
                    failed = Some(e);
                    break 'events;
                }
            }
            if let Err(e) = d.stage.writer.as_mut().unwrap().wait() {
                failed = Some(e);
                break;
            }
        }
        let err = format!("{:#}", failed.expect("the failed write is reported"));
        assert!(err.contains("no-such-folder"), "{err}");
        let acks: Vec<Ack> = std::iter::from_fn(|| d.acks.try_recv().ok()).collect();
        assert!(!acks.is_empty());
        assert!(
            acks.iter().all(|a| matches!(a, Ack::Processed)),
            "nothing committed: {acks:?}"
        );
    }
}
