//! Checkpoints: a learner restored from its saved state continues bit for bit (weights and
//! Adam's moments both come back, norm clipping's window and the reducible score's held-out
//! model); a replay stopped half-way and restarted resumes where its
//! checkpoint left off, skips what it covers and ends where an uninterrupted run ends; a
//! damaged checkpoint is refused with a clear error.

mod common;

use std::path::Path;

use gradsift::features::Samples;
use gradsift::learner::buffer::{BufferConfig, EvictionPolicy, ReplaySampling};
use gradsift::learner::eval::EvalSummary;
use gradsift::learner::importance::ImportanceMethod;
use gradsift::learner::model::Head;
use gradsift::learner::select::SelectionConfig;
use gradsift::learner::{FreshBatch, LearnerConfig, ModelConfig, OnlineLearner, TrainingConfig};

fn learner(d: usize) -> OnlineLearner {
    learner_with(d, ImportanceMethod::Exact, 0.0)
}

fn learner_with(d: usize, importance: ImportanceMethod, clip: f64) -> OnlineLearner {
    OnlineLearner::new(LearnerConfig {
        inputs: d,
        head: Head::Regression,
        model: ModelConfig::default(),
        importance,
        selection: SelectionConfig {
            keep: 0.8,
            warmup: 64,
            window: 512,
            unbiased_q: 0.0,
            clip,
            ..SelectionConfig::default()
        },
        buffer: BufferConfig {
            policy: EvictionPolicy::Importance,
            capacity: 256,
            max_bytes: 1 << 20,
            decay: 0.999,
            // No replay: the only random draws, so two learners in the same state stay equal.
            replay_ratio: 0.0,
            replay_sampling: ReplaySampling::Uniform,
            rescore_every: 4,
            rescore_slice: 32,
        },
        reference_replay_ratio: 1.0,
        holdout_every: 10,
        training: TrainingConfig {
            micro_batch: 32,
            learning_rate: 1e-2,
            seed: 3,
            ..TrainingConfig::default()
        },
    })
}

/// The bundled Milan file's first 2,048 samples and their width.
fn milan_rows() -> (Samples, usize) {
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    let (s, d, _) = common::feature_rows("milan_internet", &milan, 2048);
    (s, d)
}

/// The `k`-th micro-batch of 32 samples.
fn micro_batch(s: &Samples, d: usize, k: usize) -> FreshBatch<'_> {
    let r = k * 32..(k + 1) * 32;
    FreshBatch {
        x: &s.x[r.start * d..r.end * d],
        y: &s.y[r.clone()],
        keys: &s.keys[r.clone()],
        times: &s.times[r],
    }
}

#[test]
fn a_restored_learner_continues_bit_for_bit() {
    let (s, d) = milan_rows();
    let batch = |k: usize| micro_batch(&s, d, k);
    let mut a = learner(d);
    for k in 0..20 {
        a.learn_batch(batch(k));
    }
    // Through the same bytes a checkpoint file holds.
    let bytes = postcard::to_stdvec(&a.state().unwrap()).unwrap();
    let mut b = learner(d);
    b.restore(postcard::from_bytes(&bytes).unwrap()).unwrap();
    assert_eq!(a.stats().seen, b.stats().seen);
    assert_eq!(a.buffer().len(), b.buffer().len());
    for k in 20..40 {
        let (oa, ob) = (a.learn_batch(batch(k)), b.learn_batch(batch(k)));
        // Predictions are made before each update: equal outputs after several steps mean
        // equal weights *and* equal optimiser state (Adam's moments and step count).
        assert_eq!(oa.outputs, ob.outputs, "batch {k}");
        assert_eq!(oa.scores, ob.scores, "batch {k}");
        assert_eq!(oa.selected, ob.selected, "batch {k}");
    }
    // And a learner that only got the weights back would not: Adam restarts from zero.
    let mut c = learner(d);
    let mut state = a.state().unwrap();
    state.optimizer = learner(d).state().unwrap().optimizer;
    c.restore(state).unwrap();
    a.learn_batch(batch(40));
    c.learn_batch(batch(40));
    let (oa, oc) = (a.learn_batch(batch(41)), c.learn_batch(batch(41)));
    assert_ne!(oa.outputs, oc.outputs, "the optimiser state matters");
}

/// The reducible score's held-out model comes back too (since format 17): the restored
/// learner scores as the uninterrupted one; without it, it fits the held-out model afresh
/// and scores otherwise.
#[test]
fn a_restored_learner_scores_the_reducible_loss_as_before() {
    let (s, d) = milan_rows();
    let batch = |k: usize| micro_batch(&s, d, k);
    let mut a = learner_with(d, ImportanceMethod::Reducible, 0.0);
    for k in 0..20 {
        a.learn_batch(batch(k));
    }
    let state = a.state().unwrap();
    assert!(state.irreducible.is_some());
    let bytes = postcard::to_stdvec(&state).unwrap();
    let mut b = learner_with(d, ImportanceMethod::Reducible, 0.0);
    b.restore(postcard::from_bytes(&bytes).unwrap()).unwrap();
    let mut c = learner_with(d, ImportanceMethod::Reducible, 0.0);
    let mut without = postcard::from_bytes::<gradsift::learner::LearnerState>(&bytes).unwrap();
    without.irreducible = None;
    c.restore(without).unwrap();
    let mut differs = false;
    for k in 20..30 {
        let (oa, ob, oc) = (
            a.learn_batch(batch(k)),
            b.learn_batch(batch(k)),
            c.learn_batch(batch(k)),
        );
        assert_eq!(oa.scores, ob.scores, "batch {k}");
        assert_eq!(oa.selected, ob.selected, "batch {k}");
        differs |= oa.scores != oc.scores;
    }
    assert!(differs, "the held-out model's state decides the scores");
}

/// Norm clipping's window and threshold come back too: the restored learner cuts the same
/// rows from its first step (without them it would not clip for 256 fresh rows).
#[test]
fn a_restored_learner_clips_as_before() {
    let (s, d) = milan_rows();
    let batch = |k: usize| micro_batch(&s, d, k);
    let clipping = || learner_with(d, ImportanceMethod::El2n, 0.7);
    let mut a = clipping();
    for k in 0..20 {
        a.learn_batch(batch(k));
    }
    let state = a.state().unwrap();
    let bytes = postcard::to_stdvec(&state).unwrap();
    let mut b = clipping();
    b.restore(postcard::from_bytes(&bytes).unwrap()).unwrap();
    let mut c = clipping();
    let mut no_clip = postcard::from_bytes::<gradsift::learner::LearnerState>(&bytes).unwrap();
    no_clip.clip = None;
    c.restore(no_clip).unwrap();
    let cut = a.stats().clipped;
    assert!(
        cut > 0 && b.stats().clipped == cut,
        "{cut} rows cut before the save"
    );
    let (oa, ob) = (a.learn_batch(batch(20)), b.learn_batch(batch(20)));
    c.learn_batch(batch(20));
    assert_eq!(oa.outputs, ob.outputs);
    assert!(a.stats().clipped > cut, "the step after the save clips");
    assert_eq!(a.stats().clipped, b.stats().clipped);
    assert_eq!(c.stats().clipped, cut, "without the window nothing is cut");
    let (oa, ob, oc) = (
        a.learn_batch(batch(21)),
        b.learn_batch(batch(21)),
        c.learn_batch(batch(21)),
    );
    assert_eq!(
        oa.outputs, ob.outputs,
        "the same weights after a clipped step"
    );
    assert_ne!(oa.outputs, oc.outputs);
}

#[test]
fn a_replay_stopped_half_way_resumes_from_its_checkpoint() {
    let sets = ["checkpoint.enabled=true", "checkpoint.every_rows=1000"];
    let whole = tempfile::tempdir().unwrap();
    let a = common::run(common::pipeline("milan-replay.toml", whole.path(), &sets));
    // Checkpoints are encoded and written on the writer's thread, whose time is reported.
    let w = a.stages.checkpoint;
    assert!(w.cpu_s > 0.0 && w.wait_s >= 0.0, "{w:?}");

    let halves = tempfile::tempdir().unwrap();
    let mut first = sets.to_vec();
    first.push("source.max_rows=4000");
    let b1 = common::run(common::pipeline("milan-replay.toml", halves.path(), &first));
    assert_eq!(b1.rows_read, 4000);
    let b2 = common::run(common::pipeline("milan-replay.toml", halves.path(), &sets));
    let ck = b2.checkpoint.as_ref().unwrap();
    assert_eq!(ck.resumes, 1);
    assert_eq!(
        ck.rows_already_covered, 4000,
        "the rows the checkpoint covers are skipped"
    );
    assert_eq!(
        b2.samples, a.samples,
        "the same samples over the two halves"
    );
    assert_eq!(b2.skipped, a.skipped, "lag warm-up happens once");
    let (EvalSummary::Regression(ma), EvalSummary::Regression(mb)) = (&a.metrics, &b2.metrics)
    else {
        panic!("regression")
    };
    assert_eq!(ma.model.n, mb.model.n);
    // The same run to the last bit: the checkpoint holds everything that learns, the random
    // generator's state included (since format 10; before, a resume drew fresh random replay
    // samples and only came within 3% of the uninterrupted MAE).
    assert_eq!(
        (mb.model.mae.to_bits(), mb.model.rmse.to_bits()),
        (ma.model.mae.to_bits(), ma.model.rmse.to_bits()),
        "resumed MAE {} vs uninterrupted {}",
        mb.model.mae,
        ma.model.mae
    );

    // Score segments over both halves: every sample once.
    let py = common::python(&format!(
        "{}print(t.num_rows, len(set(zip(t['source'].to_pylist(), t['position'].to_pylist()))))",
        common::load_scores_py(halves.path())
    ));
    assert_eq!(py.trim(), format!("{} {}", a.samples, a.samples));
}

/// The same on the beam pipeline, whose learning state is the most spread out: a model per
/// site, the learnt blend's weights per key, the neighbours' memory, the loss table (shared,
/// and one per key, whose memory of 30 rows is configuration a checkpoint does not keep) and
/// each key's switch record. Stopped in the second site, resumed, it ends with the
/// uninterrupted run's figures to the last bit.
#[test]
fn a_beam_replay_resumed_mid_site_ends_as_the_uninterrupted_run() {
    common::shared_data();
    for scope in ["shared", "per_key"] {
        beam_replay_resumed_mid_site(&format!("model.decision_scope=\"{scope}\""));
    }
}

fn beam_replay_resumed_mid_site(scope: &str) {
    let sets = [
        "checkpoint.enabled=true",
        "checkpoint.every_rows=1000",
        "output.scores=false",
        scope,
    ];
    let figures = |r: &gradsift::report::RunReport| {
        let EvalSummary::Classification(m) = &r.metrics else {
            panic!("classification")
        };
        [
            m.model.top1,
            m.model.top3,
            m.model.power_loss_db,
            m.mlp_alone.top1,
        ]
        .map(f64::to_bits)
    };
    let whole = tempfile::tempdir().unwrap();
    let a = common::run(common::pipeline("beam-replay.toml", whole.path(), &sets));
    // Checkpoints fall at batch ends (every 1,024 rows within a file), where a micro-batch
    // of 16 is often partial; it waits inside the checkpoint. Each site's micro-batches
    // start at its own first row (2,422 for the second site), so the first half stops at
    // 2,422 + 99 × 16 = 4,006 rows, where none is partial: a run that ends learns its
    // partial micro-batch, which the whole run would not have learnt there.
    let halves = tempfile::tempdir().unwrap();
    let mut first = sets.to_vec();
    first.push("source.max_rows=4006");
    common::run(common::pipeline("beam-replay.toml", halves.path(), &first));
    let b = common::run(common::pipeline("beam-replay.toml", halves.path(), &sets));
    assert_eq!(b.checkpoint.as_ref().unwrap().rows_already_covered, 4006);
    assert_eq!(b.checkpoint.as_ref().unwrap().resumes, 1);
    assert_eq!(b.samples, a.samples);
    assert_eq!(
        figures(&b),
        figures(&a),
        "resumed vs uninterrupted, {scope}"
    );
    // The changes met before the checkpoint keep their detection and their own-rows
    // recovery (the mark's running total was lost on a resume).
    let changes = |r: &gradsift::report::RunReport| serde_json::to_value(&r.changes).unwrap();
    assert!(a.changes[0].recovery_samples_own_rows.is_some());
    assert_eq!(changes(&b), changes(&a), "{scope}");
}

/// Where checkpoints fall does not change what is learnt: a partial micro-batch waits
/// inside the checkpoint instead of being learnt early. Milan in micro-batches of 12 with a
/// checkpoint after every batch of 1,024 rows (most of them cut a micro-batch) ends with
/// the figures, to the last bit, of the same run without checkpoints.
#[test]
fn checkpoints_do_not_move_micro_batch_boundaries() {
    let run = |sets: &[&str]| {
        let out = tempfile::tempdir().unwrap();
        let mut all = vec!["training.micro_batch=12", "output.scores=false"];
        all.extend_from_slice(sets);
        let r = common::run(common::pipeline("milan-replay.toml", out.path(), &all));
        let EvalSummary::Regression(m) = r.metrics else {
            panic!("regression")
        };
        (
            r.checkpoint.map(|c| c.written),
            [m.model.mae, m.model.rmse].map(f64::to_bits),
        )
    };
    let (none, plain) = run(&[]);
    let (written, checkpointed) = run(&["checkpoint.enabled=true", "checkpoint.every_rows=1000"]);
    assert_eq!(none, None);
    assert!(written.is_some_and(|n| n >= 8), "{written:?} checkpoints");
    assert_eq!(checkpointed, plain, "with checkpoints vs without");
}

/// A checkpoint in the output folder that another pipeline wrote is refused at start,
/// naming both (a resume would have learnt on in another configuration's state).
#[test]
fn a_checkpoint_of_another_pipeline_is_refused() {
    let sets = [
        "checkpoint.enabled=true",
        "source.max_rows=2000",
        "output.scores=false",
    ];
    let mut other = sets.to_vec();
    other.push("name=\"milan-other\"");
    let msg = refused_resume(&sets, |_| {}, &other);
    assert!(
        msg.contains("checkpoint.bin")
            && msg.contains("`milan-replay`")
            && msg.contains("`milan-other`"),
        "{msg}"
    );
}

/// A first checkpointed Milan run with `first`, then `edit` of its folder, then a resume
/// with `then`, which must be refused: its error.
fn refused_resume(first: &[&str], edit: impl FnOnce(&Path), then: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    common::run(common::pipeline("milan-replay.toml", out.path(), first));
    edit(out.path());
    match common::try_run(common::pipeline("milan-replay.toml", out.path(), then)) {
        Ok(_) => panic!("the resume must be refused"),
        Err(e) => format!("{e:#}"),
    }
}

/// A fresh run leaves nothing of an earlier one beside its outputs: the score segments of a
/// checkpointed run and a plot are removed when a run without checkpoints starts there.
#[test]
fn a_fresh_run_removes_an_earlier_runs_segments_and_plot() {
    let out = tempfile::tempdir().unwrap();
    let with = [
        "checkpoint.enabled=true",
        "checkpoint.every_rows=1000",
        "source.max_rows=3000",
    ];
    common::run(common::pipeline("milan-replay.toml", out.path(), &with));
    let segments = out.path().join("scores");
    assert!(std::fs::read_dir(&segments).unwrap().count() >= 2);
    std::fs::write(out.path().join("metric.png"), b"old").unwrap();
    std::fs::remove_file(out.path().join("checkpoint.bin")).unwrap();
    common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["source.max_rows=3000"],
    ));
    assert_eq!(std::fs::read_dir(&segments).unwrap().count(), 0);
    assert!(!out.path().join("metric.png").exists());
    assert!(out.path().join("scores.parquet").exists());
}

/// A resume whose checkpoint covers score segments that are gone (removed by hand, or by a
/// fresh run without checkpoints in the same folder) is refused: their rows would not be
/// scored again.
#[test]
fn a_resume_missing_a_covered_score_segment_is_refused() {
    let sets = ["checkpoint.enabled=true", "checkpoint.every_rows=1000"];
    let mut first = sets.to_vec();
    first.push("source.max_rows=3000");
    let gone = |out: &Path| std::fs::remove_file(out.join("scores/part-000001.parquet")).unwrap();
    let msg = refused_resume(&first, gone, &sets);
    assert!(msg.contains("covers score segments 1 to"), "{msg}");
}

#[test]
fn a_damaged_checkpoint_is_refused_with_a_clear_error() {
    let sets = [
        "checkpoint.enabled=true",
        "source.max_rows=2000",
        "output.scores=false",
    ];
    let flip = |out: &Path| {
        let path = out.join("checkpoint.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
    };
    let msg = refused_resume(&sets, flip, &sets);
    assert!(
        msg.contains("checkpoint.bin") && msg.contains("damaged"),
        "{msg}"
    );
}

#[test]
fn a_resume_through_another_spelling_of_the_path_learns_no_row_twice() {
    // Issue 10, defect 4: positions were keyed by the literal path, so resuming through an
    // absolute path re-learned the 4,096 covered rows (rows_read 13,024 of 8,928).
    let out = tempfile::tempdir().unwrap();
    let dotted = common::repo().join("pipelines/../data/milan/internet_square5161.parquet");
    let absolute = std::fs::canonicalize(&dotted).unwrap();
    let path = |p: &std::path::Path| format!("source.path=\"{}\"", p.display());
    let (first, second) = (path(&dotted), path(&absolute));
    let a = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["checkpoint.enabled=true", "source.max_rows=4096", &first],
    ));
    assert_eq!(a.rows_read, 4096);
    let b = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["checkpoint.enabled=true", &second],
    ));
    assert_eq!(
        b.rows_read, 8928,
        "every row of the file once over both runs"
    );
    assert_eq!(b.checkpoint.as_ref().unwrap().rows_already_covered, 4096);
}

#[test]
fn a_resume_refuses_a_file_that_changed_under_its_name() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("milan.parquet");
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    std::fs::copy(&milan, &file).unwrap();
    let out = tempfile::tempdir().unwrap();
    let src = format!("source.path=\"{}\"", file.display());
    let sets = [
        "checkpoint.enabled=true",
        "source.max_rows=2000",
        src.as_str(),
    ];
    common::run(common::pipeline("milan-replay.toml", out.path(), &sets));
    // pyarrow rewrites the file with other content under the same name.
    common::python(&format!(
        "import pyarrow.parquet as pq\n\
         t = pq.read_table('{m}')\n\
         pq.write_table(t.slice(1000), '{f}')\n",
        m = milan.display(),
        f = file.display()
    ));
    let Err(err) = common::try_run(common::pipeline("milan-replay.toml", out.path(), &sets)) else {
        panic!("a changed file must be refused on resume")
    };
    let msg = format!("{err:#}");
    assert!(
        msg.contains("milan.parquet") && msg.contains("changed since the checkpoint"),
        "{msg}"
    );
}

/// A checkpoint that cannot be written is an error of the run, naming the file (written on
/// the checkpoint writer's thread, it still stops the run).
#[test]
fn a_checkpoint_that_cannot_be_written_is_an_error_naming_the_file() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-folder/checkpoint.bin");
    let at = format!("checkpoint.path=\"{}\"", missing.display());
    let sets = ["checkpoint.enabled=true", "checkpoint.every_rows=200", &at];
    let cfg = common::pipeline("milan-replay.toml", out.path(), &sets);
    let Err(err) = common::try_run(cfg) else {
        panic!("the run must fail")
    };
    let err = format!("{err:#}");
    assert!(err.contains("no-such-folder"), "{err}");
    assert!(!missing.exists());
}
