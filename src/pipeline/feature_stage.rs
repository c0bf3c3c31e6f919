//! The feature stage: one thread that decodes the source's batches, checks their rows, turns
//! them into samples (lags, encodings, scalers, the neighbour memory) and cuts those into
//! micro-batches, so that the learner's thread only learns (decode and features were a fifth
//! of its CPU time). It also keeps the checkpoint clock: when a checkpoint is due it hands on
//! its own state, the partial micro-batch inside it, as one marker cut into the stream after
//! the rows it covers, so the learner stage writes a checkpoint of exactly those rows and
//! micro-batches begin where they would without checkpoints. With a model per key, each
//! key's rows make micro-batches of their own, however the keys interleave.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use anyhow::Result;
use arrow::array::RecordBatch;
use tokio::sync::mpsc;

use super::rows::{decode_rows, feature_engine};
use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::features::{FeatureEngine, FeatureState, KeyChange, Samples};
use crate::learner::per_key::ModelScope;
use crate::schema::Schema;
use crate::sink::dead_letter::DeadLetter;
use crate::source::{RowOrigin, SourceEvent, Unreadable};
use crate::stage_time::StageTime;

/// What the feature stage hands the learner stage, in stream order.
pub(crate) enum Featured {
    /// Input the source could not read, as it reported it.
    Unreadable(Unreadable),
    Batch(Box<FeaturedBatch>),
    /// A checkpoint is due: learn `rest` (a quiet feed's partial micro-batch; otherwise
    /// none, the partial micro-batch waits inside `state`), then save with `state`, the
    /// features after every row before this marker.
    Checkpoint {
        rest: Samples,
        state: Box<FeatureState>,
    },
    /// The source is done: learn `rest`; `state` is for the final checkpoint.
    End {
        rest: Samples,
        state: Box<FeatureState>,
        tally: FeatureTally,
    },
}

/// One source batch, featurised.
pub(crate) struct FeaturedBatch {
    /// Full micro-batches ready to learn, in order (a feed's batch: all of its rows).
    pub chunks: Vec<Samples>,
    /// Rows the source delivered, and those among them a resumed checkpoint already covers.
    pub delivered: u64,
    pub covered: u64,
    /// Per source: the position after the last message delivered.
    pub positions: Vec<(Arc<str>, u64)>,
    /// A feed's batch: acknowledge it once `chunks` are learnt.
    pub ack: bool,
    /// Rows that did not become samples, by reason and whether they are bad input.
    pub skips: Vec<(Cow<'static, str>, bool, u64)>,
    /// The dead letters of the bad rows.
    pub letters: Vec<Letter>,
    /// Keys started and forgotten while featurising this batch, in order.
    pub keys: Vec<KeyChange>,
    pub tally: FeatureTally,
}

/// A dead letter of one row, owned, on its way to the learner stage's dead-letter file.
pub(crate) struct Letter {
    pub reason: Cow<'static, str>,
    pub detail: String,
    pub origin: RowOrigin,
    pub key: Option<String>,
    pub time: Option<i64>,
}

impl Letter {
    pub fn dead_letter(&self) -> DeadLetter<'_> {
        DeadLetter {
            reason: &self.reason,
            detail: &self.detail,
            origin: &self.origin.source,
            row: self.origin.index,
            rows: 1,
            key: self.key.as_deref(),
            time: self.time,
        }
    }
}

/// The feature engine's counters the report and the metrics show.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FeatureTally {
    pub tracked_keys: usize,
    pub keys_evicted: u64,
    pub clipped: u64,
}

/// When the next checkpoint is due: every `every_rows` delivered messages or `every`.
struct CheckpointClock {
    enabled: bool,
    every_rows: u64,
    every: Duration,
    rows_since: u64,
    last: Instant,
}

impl CheckpointClock {
    fn due(&self) -> bool {
        self.enabled
            && self.rows_since > 0
            && (self.rows_since >= self.every_rows || self.last.elapsed() >= self.every)
    }

    /// How long to wait for input before a checkpoint falls due (none: no limit).
    fn wait_limit(&self) -> Option<Duration> {
        (self.enabled && self.rows_since > 0)
            .then(|| self.every.saturating_sub(self.last.elapsed()))
    }
}

/// The feature stage's state (see the module doc).
pub(crate) struct FeatureStage {
    decoder: Decoder,
    features: FeatureEngine,
    micro_batch: usize,
    /// `model.scope = "per_key"`: micro-batches are cut per key ([`Samples::cut_by_key`]).
    per_key: bool,
    /// Samples waiting for a full micro-batch.
    pending: Samples,
    /// Positions a resumed checkpoint covers: rows before them are not featurised again.
    covered: HashMap<Arc<str>, u64>,
    clock: CheckpointClock,
    /// A feed's bad message came and the batch that acknowledges it has not: no checkpoint
    /// until it has (the letter would be saved without its position, and written again).
    awaiting_batch: bool,
}

impl FeatureStage {
    /// A stage for `cfg`, its features continuing from `resume` when given.
    pub fn new(
        cfg: &PipelineConfig,
        schema: &Arc<Schema>,
        covered: HashMap<Arc<str>, u64>,
        resume: Option<FeatureState>,
    ) -> Result<Self> {
        let decoder = Decoder::new(schema.clone());
        let mut features = feature_engine(cfg, schema, &decoder)
            .with_key_changes()
            .with_injection(cfg.source.injection())
            .map_err(|e| anyhow::anyhow!("{}: key `source.inject`: {e}", cfg.file.display()))?;
        let mut pending = Samples::default();
        if let Some(mut s) = resume {
            pending = s.take_pending();
            features
                .restore(s)
                .map_err(|e| anyhow::anyhow!("checkpoint does not fit this schema: {e}"))?;
        }
        Ok(FeatureStage {
            decoder,
            features,
            micro_batch: cfg.training.micro_batch.max(1),
            per_key: cfg.model.scope == ModelScope::PerKey,
            pending,
            covered,
            clock: CheckpointClock {
                enabled: cfg.checkpoint.enabled,
                every_rows: cfg.checkpoint.every_rows,
                every: Duration::from_secs_f64(cfg.checkpoint.every_seconds),
                rows_since: 0,
                last: Instant::now(),
            },
            awaiting_batch: false,
        })
    }

    /// Width of a sample's feature row.
    pub fn width(&self) -> usize {
        self.features.width()
    }

    /// Takes events until the source is done and hands on what they become, then the end.
    /// A learner stage that hung up ends this one quietly: its own error is the one to show.
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<SourceEvent>,
        tx: SyncSender<Featured>,
        time: &StageTime,
    ) -> Result<()> {
        let runtime = tokio::runtime::Handle::current();
        // Backpressure: a full channel blocks here until the learner takes a batch.
        let send = |f: Featured| time.waiting(|| tx.send(f).is_ok());
        loop {
            // A quiet feed still gets its checkpoint (and so its commit) on time; a feed's bad
            // message's batch follows at once, and is waited for.
            let limit = self.clock.wait_limit().filter(|_| !self.awaiting_batch);
            let ev = match limit {
                Some(left) => {
                    let next =
                        time.waiting(|| runtime.block_on(tokio::time::timeout(left, rx.recv())));
                    match next {
                        Ok(ev) => ev,
                        Err(_) => {
                            // A quiet source: its waiting rows are learnt (and predicted) now.
                            if !send(self.checkpoint(true)) {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
                None => time.waiting(|| rx.blocking_recv()),
            };
            let Some(ev) = ev else { break };
            for f in self.handle(ev)? {
                if !send(f) {
                    return Ok(());
                }
            }
        }
        send(self.end());
        Ok(())
    }

    /// One source event, as one or two things for the learner stage.
    pub fn handle(&mut self, ev: SourceEvent) -> Result<Vec<Featured>> {
        let (batch, origins, ack) = match ev {
            SourceEvent::Batch {
                batch,
                origins,
                ack,
            } => (batch, origins, ack),
            SourceEvent::Unreadable(u) => {
                self.awaiting_batch = u.acked_by_batch;
                return Ok(vec![Featured::Unreadable(u)]);
            }
        };
        self.awaiting_batch = false;
        let batch = self.batch(batch, origins, ack)?;
        let mut out = vec![Featured::Batch(Box::new(batch))];
        if self.clock.due() {
            out.push(self.checkpoint(false));
        }
        Ok(out)
    }

    fn batch(
        &mut self,
        batch: RecordBatch,
        origins: Vec<RowOrigin>,
        ack: Option<Vec<RowOrigin>>,
    ) -> Result<FeaturedBatch> {
        let delivered = batch.num_rows() as u64;
        let mut positions: Vec<(Arc<str>, u64)> = Vec::new();
        for o in ack.as_deref().unwrap_or(&origins) {
            match positions.iter_mut().find(|(s, _)| *s == o.source) {
                Some((_, p)) => *p = (*p).max(o.index + 1),
                None => positions.push((o.source.clone(), o.index + 1)),
            }
        }
        let mut b = FeaturedBatch {
            chunks: Vec::new(),
            delivered,
            covered: 0,
            positions,
            ack: ack.is_some(),
            skips: Vec::new(),
            letters: Vec::new(),
            keys: Vec::new(),
            tally: FeatureTally::default(),
        };
        let (batch, origins) = skip_covered(&self.covered, batch, origins)?;
        let n = batch.num_rows() as u64;
        b.covered = delivered - n;
        // Every delivered message counts towards the next checkpoint, bad ones too: a feed
        // of nothing but dead letters must still be committed.
        self.clock.rows_since += ack.as_ref().map_or(n, |a| a.len() as u64);
        let before = self.pending.len();
        if n > 0 {
            self.feed(&batch, &origins, &mut b)?;
        }
        if self.per_key {
            b.keys = self.features.take_key_changes();
            // A batch a resumed checkpoint covers whole was not seen by the run that wrote
            // the checkpoint: it must not move what waits.
            if n > 0 || b.ack {
                self.cut_by_key(before, &mut b);
            }
            b.tally = self.tally();
            return Ok(b);
        }
        let full = if b.ack {
            // A feed commits what it is acknowledged: nothing of this batch may wait in a
            // partial micro-batch.
            self.pending.len()
        } else {
            self.pending.len() / self.micro_batch * self.micro_batch
        };
        if full > 0 {
            let width = self.features.width();
            let ready = self.pending.take_front(full, width);
            b.chunks = ready.into_chunks(self.micro_batch, width);
        }
        b.keys = self.features.take_key_changes();
        b.tally = self.tally();
        Ok(b)
    }

    /// Cuts the waiting samples into micro-batches per key (`model.scope = "per_key"`; the
    /// batch's new samples start at `before`). A key's short micro-batch waits while the
    /// key keeps coming: until a batch without it (a site that has stopped), the end or a
    /// quiet feed's checkpoint. A feed's batch is handed on whole, and a key the batch
    /// forgot (`features.max_keys`) waits no more: the learner stage drops its parts after
    /// the batch.
    fn cut_by_key(&mut self, before: usize, b: &mut FeaturedBatch) {
        let here: foldhash::HashSet<Arc<str>> =
            self.pending.keys[before..].iter().cloned().collect();
        let gone = KeyChange::forgotten(&b.keys);
        let wait = |k: &str| !b.ack && here.contains(k) && !gone.contains(k);
        let all = std::mem::take(&mut self.pending);
        (b.chunks, self.pending) = all.cut_by_key(self.micro_batch, self.features.width(), wait);
    }

    /// Decodes a batch into samples; skips are counted by reason, bad rows dead-lettered.
    fn feed(
        &mut self,
        batch: &RecordBatch,
        origins: &[RowOrigin],
        b: &mut FeaturedBatch,
    ) -> Result<()> {
        let (skips, letters) = (&mut b.skips, &mut b.letters);
        decode_rows(
            &self.decoder,
            &mut self.features,
            batch,
            origins,
            &mut self.pending,
            |s| {
                match skips
                    .iter_mut()
                    .find(|(r, bad, _)| *r == s.reason && *bad == s.bad_input)
                {
                    Some(k) => k.2 += 1,
                    None => skips.push((s.reason.clone(), s.bad_input, 1)),
                }
                if s.bad_input {
                    letters.push(Letter {
                        reason: s.reason.clone(),
                        detail: s.detail.to_string(),
                        origin: s.origin.clone(),
                        key: s.key.map(str::to_string),
                        time: s.time,
                    });
                }
                Ok(())
            },
        )
    }

    fn tally(&self) -> FeatureTally {
        FeatureTally {
            tracked_keys: self.features.tracked_keys(),
            keys_evicted: self.features.keys_evicted,
            clipped: self.features.clipped,
        }
    }

    /// The checkpoint marker with the features' state. The partial micro-batch (an archive
    /// replay's: a feed's batches are handed on whole) stays waiting and goes into the state,
    /// so where a checkpoint falls (a row count reached at a batch's end, or the clock) does
    /// not move a micro-batch boundary, and a resume learns what an unstopped run learns. On
    /// a quiet source (`flush`) the waiting rows are learnt now instead: their predictions
    /// should not wait for rows that may not come.
    pub fn checkpoint(&mut self, flush: bool) -> Featured {
        self.clock.rows_since = 0;
        self.clock.last = Instant::now();
        let mut state = self.features.state();
        let rest = if flush {
            std::mem::take(&mut self.pending)
        } else {
            state.set_pending(self.pending.clone());
            Samples::default()
        };
        Featured::Checkpoint {
            rest,
            state: Box::new(state),
        }
    }

    /// The end of the stream.
    pub fn end(&mut self) -> Featured {
        Featured::End {
            rest: std::mem::take(&mut self.pending),
            state: Box::new(self.features.state()),
            tally: self.tally(),
        }
    }
}

/// Drops the rows a resumed-from checkpoint already covers (a feed redelivers from its last
/// commit, which can trail the checkpoint by the commit that a crash cut short).
fn skip_covered(
    covered: &HashMap<Arc<str>, u64>,
    batch: RecordBatch,
    origins: Vec<RowOrigin>,
) -> Result<(RecordBatch, Vec<RowOrigin>)> {
    if covered.is_empty() {
        return Ok((batch, origins));
    }
    let keep: Vec<bool> = origins
        .iter()
        .map(|o| covered.get(&o.source).is_none_or(|&p| o.index >= p))
        .collect();
    if keep.iter().all(|k| *k) {
        return Ok((batch, origins));
    }
    let mask = arrow::array::BooleanArray::from(keep.clone());
    let batch = arrow::compute::filter_record_batch(&batch, &mask)?;
    let origins = origins
        .into_iter()
        .zip(keep)
        .filter_map(|(o, k)| k.then_some(o))
        .collect();
    Ok((batch, origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milan_events(feed: bool) -> Vec<SourceEvent> {
        super::super::test_events::milan_events("s", feed)
    }

    fn stage(sets: &[&str], resume: Option<FeatureState>) -> FeatureStage {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/milan-replay.toml");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = PipelineConfig::load(&file, &sets).unwrap();
        let schema = Arc::new(Schema::load(&cfg.schema).unwrap());
        FeatureStage::new(&cfg, &schema, HashMap::new(), resume).unwrap()
    }

    /// Micro-batches of 12: 1,904 samples (2,048 rows less 144 of lag warm-up) leave 8
    /// waiting at the first marker.
    const CKPT: [&str; 3] = [
        "checkpoint.enabled=true",
        "checkpoint.every_rows=2048",
        "training.micro_batch=12",
    ];

    /// After a feed's bad message the stage waits for the batch that acknowledges it before
    /// a timed checkpoint may come (a file's lost rows do not make it wait).
    #[test]
    fn a_feed_letter_holds_checkpoints_until_its_batch() {
        let mut st = stage(&CKPT, None);
        let letter = |acked_by_batch| {
            SourceEvent::Unreadable(crate::source::Unreadable {
                origin: Arc::from("s"),
                first_row: 0,
                rows: 1,
                reason: "malformed_json".into(),
                detail: String::new(),
                acked_by_batch,
            })
        };
        st.handle(letter(true)).unwrap();
        assert!(st.awaiting_batch);
        let batch = milan_events(true).into_iter().next().unwrap();
        st.handle(batch).unwrap();
        assert!(!st.awaiting_batch);
        st.handle(letter(false)).unwrap();
        assert!(!st.awaiting_batch);
    }

    /// Each batch's samples, in order: the micro-batches, then a marker's partial one.
    fn samples(out: &[Featured]) -> Vec<Vec<f32>> {
        let mut all = Vec::new();
        for f in out {
            match f {
                Featured::Batch(b) => all.extend(b.chunks.iter().map(|c| c.x.clone())),
                Featured::Checkpoint { rest, .. } | Featured::End { rest, .. } => {
                    all.push(rest.x.clone())
                }
                Featured::Unreadable(_) => {}
            }
        }
        all
    }

    #[test]
    fn a_marker_follows_every_2048_rows_with_the_partial_micro_batch_in_a_state_to_resume() {
        let mut a = stage(&CKPT, None);
        let mut out = Vec::new();
        let mut markers = Vec::new();
        for (i, ev) in milan_events(false).into_iter().take(4).enumerate() {
            for f in a.handle(ev).unwrap() {
                if let Featured::Checkpoint { rest, .. } = &f {
                    assert!(
                        rest.is_empty(),
                        "the partial micro-batch waits in the state"
                    );
                    markers.push(i);
                }
                out.push((i, f));
            }
        }
        assert_eq!(markers, [1, 3], "after 2,048 and 4,096 rows");
        for (_, f) in &out {
            if let Featured::Batch(b) = f {
                assert!(
                    b.chunks.iter().all(|c| c.len() == 12),
                    "full micro-batches only"
                );
            }
        }
        // A quiet feed's marker hands the waiting rows on to be learnt now.
        let Featured::Checkpoint { rest, .. } = a.checkpoint(true) else {
            unreachable!()
        };
        assert_eq!(rest.len(), (4 * 1024 - 144) % 12);
        // A stage resumed from the first marker's state makes the same samples of what follows.
        let first = (out.iter())
            .position(|(i, f)| *i == 1 && matches!(f, Featured::Checkpoint { .. }))
            .unwrap();
        let Featured::Checkpoint { state, .. } = out.remove(first).1 else {
            unreachable!()
        };
        let later: Vec<Featured> = (out.into_iter())
            .filter(|(i, _)| *i >= 2)
            .map(|(_, f)| f)
            .collect();
        let mut b = stage(&CKPT, Some(*state));
        let mut again = Vec::new();
        for ev in milan_events(false).into_iter().skip(2).take(2) {
            again.extend(b.handle(ev).unwrap());
        }
        assert!(!samples(&later).is_empty());
        assert_eq!(samples(&again), samples(&later));
    }

    /// With a model per key, a stage resumed from a marker and fed the archive from its
    /// start (the batches the checkpoint covers arrive and are skipped whole) makes the
    /// samples the unstopped stage made after that marker: the covered batches move nothing
    /// that waits.
    #[test]
    fn a_per_key_resume_over_covered_batches_cuts_as_the_unstopped_run() {
        let sets = [CKPT[0], CKPT[1], CKPT[2], "model.scope=\"per_key\""];
        let mut a = stage(&sets, None);
        let mut out = Vec::new();
        for (i, ev) in milan_events(false).into_iter().take(4).enumerate() {
            out.extend(a.handle(ev).unwrap().into_iter().map(|f| (i, f)));
        }
        let first = (out.iter())
            .position(|(i, f)| *i == 1 && matches!(f, Featured::Checkpoint { .. }))
            .unwrap();
        let Featured::Checkpoint { state, .. } = out.remove(first).1 else {
            unreachable!()
        };
        let mut state = *state;
        let waiting = state.take_pending();
        assert!(!waiting.is_empty(), "rows wait at the marker");
        state.set_pending(waiting);
        let later: Vec<Featured> = (out.into_iter())
            .filter(|(i, _)| *i >= 2)
            .map(|(_, f)| f)
            .collect();
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/milan-replay.toml");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = PipelineConfig::load(&file, &sets).unwrap();
        let schema = Arc::new(Schema::load(&cfg.schema).unwrap());
        let covered = HashMap::from([(Arc::from("s"), 2048u64)]);
        let mut b = FeatureStage::new(&cfg, &schema, covered, Some(state)).unwrap();
        let mut again = Vec::new();
        for ev in milan_events(false).into_iter().take(4) {
            again.extend(b.handle(ev).unwrap());
        }
        assert!(!samples(&later).is_empty());
        assert_eq!(samples(&again), samples(&later));
    }

    /// A key the batch forgot (`features.max_keys`) does not wait: the learner stage drops
    /// its parts after the batch, so its rows are learnt within it.
    #[test]
    fn a_key_the_batch_forgot_waits_no_more() {
        let mut a = stage(&["model.scope=\"per_key\"", "training.micro_batch=2"], None);
        let width = a.width();
        let cut = |a: &mut FeatureStage, keys: Vec<KeyChange>| {
            a.pending = Samples::numbered(3, width, |_| "a".into());
            let mut b = FeaturedBatch {
                chunks: Vec::new(),
                delivered: 3,
                covered: 0,
                positions: Vec::new(),
                ack: false,
                skips: Vec::new(),
                letters: Vec::new(),
                keys,
                tally: FeatureTally::default(),
            };
            a.cut_by_key(0, &mut b);
            (b.chunks.len(), a.pending.len())
        };
        assert_eq!(cut(&mut a, Vec::new()), (1, 1), "a's third row waits");
        let forgot = vec![KeyChange::Forgotten(Arc::from("a"))];
        assert_eq!(cut(&mut a, forgot), (2, 0), "forgotten: nothing waits");
        let again = vec![
            KeyChange::Forgotten(Arc::from("a")),
            KeyChange::Tracked(Arc::from("a")),
        ];
        assert_eq!(cut(&mut a, again), (1, 1), "tracked again: it waits");
    }

    #[test]
    fn a_feed_batch_is_handed_on_whole_and_the_end_carries_nothing_left() {
        let mut a = stage(&["training.micro_batch=8"], None);
        let mut rows = 0;
        for ev in milan_events(true).into_iter().take(3) {
            let out = a.handle(ev).unwrap();
            assert_eq!(out.len(), 1, "no checkpoints: no markers");
            let Featured::Batch(b) = &out[0] else {
                panic!("a batch")
            };
            assert!(b.ack && b.delivered == 1024 && b.covered == 0);
            assert_eq!(b.positions, [(Arc::from("s"), rows + 1024)]);
            // All of its samples: full micro-batches and the partial one last.
            let (last, full) = b.chunks.split_last().unwrap();
            assert!(full.iter().all(|c| c.len() == 8) && last.len() <= 8);
            rows += 1024;
        }
        let Featured::End { rest, tally, .. } = a.end() else {
            panic!("the end")
        };
        assert!(rest.is_empty(), "a feed leaves nothing waiting");
        assert_eq!(tally.tracked_keys, 1);
    }

    #[test]
    fn rows_a_resumed_checkpoint_covers_are_dropped_before_the_features_see_them() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/milan-replay.toml");
        let cfg = PipelineConfig::load(&file, &[]).unwrap();
        let schema = Arc::new(Schema::load(&cfg.schema).unwrap());
        let covered = HashMap::from([(Arc::from("s"), 1500u64)]);
        let mut a = FeatureStage::new(&cfg, &schema, covered, None).unwrap();
        let mut seen = Vec::new();
        for ev in milan_events(false).into_iter().take(2) {
            let Featured::Batch(b) = a.handle(ev).unwrap().remove(0) else {
                panic!("a batch")
            };
            seen.push((b.delivered, b.covered));
        }
        assert_eq!(seen, [(1024, 1024), (1024, 476)]);
    }
}
