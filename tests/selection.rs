//! Selection and its cost, on the bundled Milan archive (no broker, no Python): the compute
//! ledger adds up for every policy, the saving against every-row training is what the counts
//! say, exact scoring back-propagates only what it must, and the offline mode trains,
//! stops early on validation and reports the test period.

mod common;

use gradsift::learner::buffer::{BufferConfig, EvictionPolicy, ReplaySampling};
use gradsift::learner::compute::ComputeReport;
use gradsift::learner::importance::ImportanceMethod;
use gradsift::learner::model::Head;
use gradsift::learner::select::{PolicyKind, SelectionConfig};
use gradsift::learner::{FreshBatch, LearnerConfig, ModelConfig, OnlineLearner, TrainingConfig};

const MB: usize = 16;

/// One pass of the learner over the Milan features; returns its compute report and counters.
fn stream(
    policy: PolicyKind,
    method: ImportanceMethod,
    keep: f64,
    replay: f64,
) -> (ComputeReport, gradsift::learner::LearnerStats) {
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    let (s, d, _) = common::feature_rows("milan_internet", &milan, 4000);
    let mut l = OnlineLearner::new(LearnerConfig {
        inputs: d,
        head: Head::Regression,
        model: ModelConfig::default(),
        importance: method,
        selection: SelectionConfig {
            policy,
            keep,
            warmup: 320,
            window: 1024,
            ..SelectionConfig::default()
        },
        buffer: BufferConfig {
            policy: EvictionPolicy::Fifo,
            capacity: 1024,
            max_bytes: 1 << 20,
            decay: 1.0,
            replay_ratio: replay,
            replay_sampling: ReplaySampling::Uniform,
            rescore_every: 0,
            rescore_slice: 0,
        },
        training: TrainingConfig {
            micro_batch: MB,
            learning_rate: 2e-3,
            seed: 3,
            ..TrainingConfig::default()
        },
        reference_replay_ratio: 2.0,
        holdout_every: 10,
    });
    for k in 0..s.len() / MB {
        let r = k * MB..(k + 1) * MB;
        l.learn_batch(FreshBatch {
            x: &s.x[r.start * d..r.end * d],
            y: &s.y[r.clone()],
            keys: &s.keys[r.clone()],
            times: &s.times[r],
        });
    }
    (l.compute(), l.stats())
}

#[test]
fn the_ledger_adds_up_for_every_policy() {
    for (policy, method) in [
        (PolicyKind::Random, ImportanceMethod::Exact),
        (PolicyKind::TopK, ImportanceMethod::Exact),
        (PolicyKind::TopK, ImportanceMethod::El2n),
        (PolicyKind::Trim, ImportanceMethod::LastLayer),
        (PolicyKind::Sample, ImportanceMethod::Exact),
        (PolicyKind::Infobatch, ImportanceMethod::Loss),
        (PolicyKind::Surprise, ImportanceMethod::Exact),
    ] {
        let (c, st) = stream(policy, method, 0.6, 1.0);
        let trained = st.trained_fresh + st.trained_replay;
        let what = format!("{policy:?}/{method:?}");
        assert_eq!(
            c.inference.work.rows_forward, st.seen,
            "{what}: every fresh row predicted"
        );
        assert_eq!(c.training.work.rows_forward, st.trained_replay, "{what}");
        assert_eq!(c.training.work.rows_backward, trained, "{what}");
        assert_eq!(c.training.work.rows_weight_grad, trained, "{what}");
        assert_eq!(c.training.work.optimizer_steps, st.steps, "{what}");
        // Random needs no scores at all; only exact scores back-propagate untrained rows.
        let exact = method == ImportanceMethod::Exact && policy != PolicyKind::Random;
        let scoring = if exact { st.seen - st.trained_fresh } else { 0 };
        assert_eq!(c.scoring.work.rows_backward, scoring, "{what}");
        assert_eq!(st.backpropagated, trained + scoring, "{what}");
        assert!(
            c.learn_cpu_s > 0.0 && c.inference.work.cpu_s > 0.0,
            "{what}"
        );
        let kept = st.trained_fresh as f64 / st.seen as f64;
        // Surprise trains less while the model converges (scores below their baseline).
        let range = if policy == PolicyKind::Surprise {
            0.1..0.8
        } else {
            0.55..0.8
        };
        assert!(range.contains(&kept), "{what}: kept {kept}");
    }
}

#[test]
fn the_saving_is_measured_against_every_row_training() {
    // Every row at the reference's replay ratio: nothing saved, nothing lost.
    let (full, st) = stream(PolicyKind::Random, ImportanceMethod::Loss, 1.0, 2.0);
    assert_eq!(full.reference.work.rows_backward, st.backpropagated);
    assert!(
        full.saved_flops_fraction.abs() < 1e-9,
        "{}",
        full.saved_flops_fraction
    );
    // Random 0.5 at replay 1: each step back-propagates about 0.5 + 1 rows per fresh row
    // where the reference does 1 + 2.
    let (half, _) = stream(PolicyKind::Random, ImportanceMethod::Loss, 0.5, 1.0);
    let b = half.saved_backward_fraction;
    assert!((b - 0.5).abs() < 0.04, "saved {b}");
    // Exact top-k pays for scoring: it saves less than random at the same keep and replay.
    let (exact, _) = stream(PolicyKind::TopK, ImportanceMethod::Exact, 0.5, 1.0);
    assert!(
        exact.saved_backward_fraction < b - 0.1,
        "{}",
        exact.saved_backward_fraction
    );
    assert!(exact.scoring.flops > 0.0 && half.scoring.flops == 0.0);
}

#[test]
fn offline_training_stops_on_validation_and_reports_the_test_period() {
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let dir = out
            .path()
            .join(extra.join("_").replace(['"', '=', '.'], ""));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gradsift"));
        cmd.args(["train", "pipelines/milan-replay.toml", "--quiet", "--json"])
            .arg("--output")
            .arg(&dir)
            .current_dir(common::repo());
        for s in [
            "evaluation.periods=[{name=\"validation\",from=\"2013-12-01T00:00:00Z\"},{name=\"test\",from=\"2013-12-12T00:00:00Z\"}]",
            "offline.epochs=6",
            "offline.patience=2",
            "offline.batch_size=128",
        ]
        .iter()
        .chain(extra)
        {
            cmd.args(["--set", s]);
        }
        let o = cmd.output().expect("gradsift runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report = std::fs::read_to_string(dir.join("report.json")).unwrap();
        serde_json::from_str(&report).unwrap()
    };
    let full = run(&["selection.policy=\"random\"", "selection.keep=1.0"]);
    let half = run(&["selection.policy=\"random\"", "selection.keep=0.5"]);
    let topk = run(&[
        "selection.policy=\"top_k\"",
        "importance.method=\"exact\"",
        "selection.keep=0.5",
    ]);
    for r in [&full, &half, &topk] {
        let epochs = r["epochs_run"].as_u64().unwrap();
        assert!((1..=6).contains(&epochs), "{r}");
        let best = r["best_epoch"].as_u64().unwrap();
        assert!(best >= 1 && best <= epochs);
        let names: Vec<&str> = r["periods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["validation", "test"]);
        let test_mae = r["periods"][1]["metrics"]["model"]["mae"].as_f64().unwrap();
        assert!(test_mae.is_finite() && test_mae > 0.0, "{test_mae}");
        let train = r["train_rows"].as_u64().unwrap();
        assert!(train > 4000 && r["held_out_rows"].as_u64().unwrap() > 2000);
    }
    assert!(
        full["compute"]["saved_flops_fraction"]
            .as_f64()
            .unwrap()
            .abs()
            < 1e-9
    );
    // After one full epoch, random 0.5 trains half the rows of each later epoch.
    let kept = half["trained_fraction_after_warmup"].as_f64().unwrap();
    assert!((kept - 0.5).abs() < 0.03, "{kept}");
    assert!(
        half["compute"]["saved_flops_fraction"].as_f64().unwrap() > 0.2,
        "{half}"
    );
    let h = &topk["history"];
    assert!(
        h[0]["full"].as_bool().unwrap() && !h[1]["full"].as_bool().unwrap(),
        "{h}"
    );
    // InfoBatch's anneal (the last tenth of 30 epochs on every row) runs even when early
    // stopping (patience 1) ends training long before epoch 27: then, before it stops.
    let ib = run(&[
        "selection.policy=\"infobatch\"",
        "importance.method=\"loss\"",
        "selection.keep=0.5",
        "offline.epochs=30",
        "offline.patience=1",
        "offline.anneal=0.1",
    ]);
    let h: Vec<bool> = (ib["history"].as_array().unwrap().iter())
        .map(|e| e["full"].as_bool().unwrap())
        .collect();
    let n = h.len();
    assert!(n < 27, "stopped early: {h:?}");
    assert!(h[n - 3..].iter().all(|f| *f) && !h[n - 4], "{h:?}");
    // Loss scores cost no pass, but choosing the rows each epoch costs CPU: booked as
    // scoring, which every-row training (random at keep 1) never books.
    let scoring_cpu = |r: &serde_json::Value| r["compute"]["scoring"]["cpu_s"].as_f64().unwrap();
    assert!(
        scoring_cpu(&ib) > 0.0 && scoring_cpu(&full) == 0.0,
        "{}",
        ib["compute"]
    );
}

/// `gradsift train` stops early on the validation period: one without rows (here five
/// minutes between two 10-minute slots) is refused at start, naming the key. It read NaN every epoch and kept the
/// untrained weights, whose figures it reported.
#[test]
fn offline_training_refuses_an_empty_validation_period() {
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .args(["train", "pipelines/milan-replay.toml", "--quiet", "--output"])
        .arg(out.path())
        .args([
            "--set",
            "evaluation.periods=[{name=\"validation\",from=\"2013-12-01T00:00:01Z\"},{name=\"test\",from=\"2013-12-01T00:05:00Z\"}]",
        ])
        .current_dir(common::repo())
        .output()
        .expect("gradsift runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("evaluation.periods") && err.contains("holds no rows"),
        "{err}"
    );
}
