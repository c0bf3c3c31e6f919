//! End to end: each bundled pipeline replays its real, pyarrow-written archive; the kept
//! fraction is what the configuration asks for; bad rows are counted, dead-lettered, and
//! do not stop the run.

mod common;

use std::process::Command;

use gradsift::learner::drift::Detector;
use gradsift::learner::eval::EvalSummary;

#[test]
fn milan_pipeline_runs_from_the_cli_and_pyarrow_reads_its_scores() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .current_dir(common::repo())
        .args(["run", "pipelines/milan-replay.toml", "--quiet", "--output"])
        .arg(out.path())
        // The endpoint on a free port: the default one may be taken on a developer's machine.
        .arg("--set")
        .arg(format!(
            "telemetry.listen=\"127.0.0.1:{}\"",
            common::free_port()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "gradsift run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        stdout.contains("samples seen") && stdout.contains("persistence"),
        "summary table printed:\n{stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    // 8,928 slots; the first 144 lack the same-slot-yesterday lag.
    assert_eq!(report["rows_read"], 8928);
    assert_eq!(report["skipped"]["lag_warmup"], 144);
    assert_eq!(report["samples"], 8928 - 144);
    let mae = report["metrics"]["model"]["mae"].as_f64().unwrap();
    assert!(mae.is_finite() && mae > 0.0);
    // Energy and carbon, with the model stated: at least the CPU term of the default model.
    let e = &report["energy"];
    let (joules, cpu) = (e["joules"].as_f64().unwrap(), e["cpu_s"].as_f64().unwrap());
    match e["source"].as_str().unwrap() {
        "cpu_time" => assert!(cpu > 0.0 && joules >= cpu * 4.4, "{e}"),
        _ => assert!(joules > 0.0, "{e}"), // RAPL: the whole package's energy
    }
    assert!((e["co2_grams"].as_f64().unwrap() - joules / 3.6e6 * 475.0).abs() < 1e-9);
    assert!(e["model"].as_str().unwrap().contains("gCO2/kWh"), "{e}");
    assert!(stdout.contains("energy model:"), "{stdout}");
    // Every stage's thread reports its CPU time, and none exceeds the process's.
    let (st, total) = (&report["stages"], report["cpu_s"].as_f64().unwrap());
    for stage in ["source", "features", "learner", "sink"] {
        let cpu = st[stage]["cpu_s"].as_f64().unwrap();
        assert!(cpu >= 0.0 && cpu <= total, "{stage}: {st}");
        assert!(
            st[stage]["wait_s"].as_f64().unwrap() >= 0.0,
            "{stage}: {st}"
        );
    }
    assert!(st["source"]["cpu_s"].as_f64().unwrap() > 0.0, "{st}");
    assert!(st["features"]["cpu_s"].as_f64().unwrap() > 0.0, "{st}");
    assert!(st["learner"]["cpu_s"].as_f64().unwrap() > 0.0, "{st}");

    let scores = out.path().join("scores.parquet");
    let py = common::python(&format!(
        "import pyarrow.parquet as pq, pyarrow.compute as pc\n\
         t = pq.ParquetFile('{}').read()\n\
         print(t.num_rows, ','.join(t.column_names), pc.sum(t['selected']).as_py(), pc.sum(t['retained']).as_py(), t.schema.field('time').type)",
        scores.display()
    ));
    let f: Vec<&str> = py.split_whitespace().collect();
    assert_eq!(f[0], (8928 - 144).to_string());
    assert_eq!(
        f[1],
        "source,position,key,time,score,threshold,selected,trained,retained,prediction,target"
    );
    assert_eq!(f[2], report["selected"].to_string());
    assert_eq!(f[3], report["retained"].to_string());
    assert!(f[4].starts_with("timestamp[us"), "{}", f[4]);
}

/// `output.features`: each score row carries the model's input vector (Milan: lags 1-6 and
/// 144, hour and weekday sin/cos, 11 inputs), in the checkpointed segments too, for a peer
/// learner to run on the same inputs.
#[test]
fn the_score_file_carries_the_model_inputs_on_request() {
    let out = tempfile::tempdir().unwrap();
    common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[
            "output.features=true",
            "checkpoint.enabled=true",
            "checkpoint.every_rows=3000",
        ],
    ));
    let py = common::python(&format!(
        "{}import pyarrow.compute as pc, math\n\
         w = pc.list_value_length(t['features'])\n\
         flat = pc.list_flatten(t['features']).to_pylist()\n\
         print(t.num_rows, pc.min(w).as_py(), pc.max(w).as_py(), all(math.isfinite(v) for v in flat), len(set(flat)) > 1000)",
        common::load_scores_py(out.path())
    ));
    assert_eq!(py.trim(), "8784 11 11 True True");
}

#[test]
fn lte_pipeline_replays_and_dead_letters_the_null_kpis() {
    common::shared_data();
    let out = tempfile::tempdir().unwrap();
    let r = common::run(common::pipeline("lte-replay.toml", out.path(), &[]));
    assert_eq!(r.rows_read, 4192 + 1049 + 6892 + 1723);
    // LesCorts has Arrow nulls in the MCS / RB columns: counted by column, never fatal.
    let nulls: u64 = r
        .skipped
        .iter()
        .filter(|(k, _)| k.starts_with("null:"))
        .map(|(_, v)| v)
        .sum();
    assert!(nulls > 0, "{:?}", r.skipped);
    assert_eq!(r.samples + r.skipped_total, r.rows_read);
    assert_eq!(r.dead_lettered_rows, nulls);
    let letters = std::fs::read_to_string(out.path().join("dead_letters.jsonl")).unwrap();
    assert_eq!(letters.lines().count() as u64, nulls);
    let EvalSummary::Regression(m) = &r.metrics else {
        panic!("regression metrics")
    };
    assert!(m.model.mae.is_finite() && m.persistence.n > 0);
}

#[test]
fn beam_pipeline_replays_all_scenarios() {
    common::shared_data();
    let out = tempfile::tempdir().unwrap();
    let r = common::run(common::pipeline("beam-replay.toml", out.path(), &[]));
    assert_eq!(r.rows_read, 2422 + 2974 + 1487 + 1867);
    assert_eq!(r.samples, r.rows_read, "no lags: every row is a sample");
    let EvalSummary::Classification(m) = &r.metrics else {
        panic!("classification metrics")
    };
    // Chance is 1/64 top-1 and 3/64 top-3; position predicts the beam far better.
    assert!(m.model.top1 > 5.0 / 64.0, "top-1 {}", m.model.top1);
    assert!(m.model.top3 > m.model.top1);
    assert!(m.model.power_loss_db.is_finite() && m.model.power_loss_db >= 0.0);
}

/// Issue 12: the site's last revealed beam as an input (`beam-tracking`), against the
/// position alone, on the same four scenarios; both beside the report's own baselines.
/// A run is a function of its data, configuration and seed: the same figures to the last bit
/// run after run in one process, and with runs on other threads at the same time (the
/// pipeline with the most parts that learn online: a model per site, the learnt blend, the
/// nearest-neighbour vote and the switch).
#[test]
fn runs_in_one_process_agree_to_the_last_bit_in_turn_and_at_once() {
    common::shared_data();
    let run = || {
        let out = tempfile::tempdir().unwrap();
        let r = common::run(common::pipeline(
            "beam-replay.toml",
            out.path(),
            &["output.scores=false"],
        ));
        let EvalSummary::Classification(m) = r.metrics else {
            panic!("classification metrics")
        };
        let m = (m.model, m.mlp_alone);
        let bits = |x: f64| x.to_bits();
        let switch = r.decision_switch.expect("the switch's counts");
        (
            [m.0.top1, m.0.top3, m.0.power_loss_db, m.1.top1, m.1.top3].map(bits),
            (switch.rows_differing, switch.acted_most_probable),
        )
    };
    let first = run();
    assert_eq!(run(), first, "the same run again");
    let at_once: Vec<_> = (0..3).map(|_| std::thread::spawn(run)).collect();
    for t in at_once {
        assert_eq!(t.join().unwrap(), first, "runs on three threads at once");
    }
}

#[test]
fn beam_tracking_uses_the_last_beam_and_the_baselines_score_the_same_rows() {
    common::shared_data();
    let run = |pipe: &str| {
        let out = tempfile::tempdir().unwrap();
        let r = common::run(common::pipeline(pipe, out.path(), &["output.scores=false"]));
        let EvalSummary::Classification(m) = r.metrics.clone() else {
            panic!("classification metrics")
        };
        (r, m)
    };
    let (pos, p) = run("beam-replay.toml");
    let (track, t) = run("beam-tracking.toml");
    assert_eq!(pos.samples, 8750);
    assert_eq!(
        track.samples,
        8750 - 4,
        "a site's first row has no past beam"
    );
    assert_eq!(
        (pos.models, track.models),
        (4, 1),
        "a model per site, and a shared one"
    );
    // Persistence and the 5-NN exist from each site's second row on.
    assert_eq!((p.persistence.n, p.knn.n), (8746, 8746));
    assert_eq!(p.model_on_baseline_rows.n, 8746);
    assert!(p.knn.top3 > p.knn.top1 && p.persistence.top3 == p.persistence.top1);
    // The shipped prediction blends the MLP with the vote; the MLP alone is reported beside.
    assert_eq!(p.mlp_alone.n, 8750);
    assert!(p.model.power_loss_db < p.mlp_alone.power_loss_db);
    assert!(
        t.model.power_loss_db < 0.8 * p.model.power_loss_db,
        "the last beam helps: {} dB vs {} dB",
        t.model.power_loss_db,
        p.model.power_loss_db
    );
    assert!(t.model.power_loss_db_pooled.is_finite() && t.model.power_loss_db_pooled > 0.0);
}

/// Issue 12: acting on the beam of least expected power loss instead of the most probable
/// one, and (`switch`, shipped) on whichever of the two lost less on the site's recent rows.
/// Training is the same, so the ranking (top-3) is the same (within a few rows of float
/// noise, below); the power lost is less, and least with the switch.
#[test]
fn the_expected_loss_decision_loses_less_power_with_the_same_ranking() {
    common::shared_data();
    let run = |decision: &str| {
        let out = tempfile::tempdir().unwrap();
        let set = format!("model.decision=\"{decision}\"");
        let r = common::run(common::pipeline(
            "beam-replay.toml",
            out.path(),
            &["output.scores=false", &set],
        ));
        let EvalSummary::Classification(m) = r.metrics else {
            panic!("classification metrics")
        };
        (m, r.decision_switch)
    };
    let ((argmax, none), (decided, _)) = (run("argmax"), run("min_expected_loss"));
    let (switch, counted) = run("switch");
    // The report says how often the rules differed and which acted (the switch only).
    let counted = counted.expect("the switch's counts");
    assert!(none.is_none());
    assert!(
        counted.rows_differing > 100
            && counted.acted_most_probable > 0
            && counted.acted_most_probable < counted.rows_differing,
        "{counted:?}"
    );
    println!("the switch: {counted:?}");
    // The same training, so the same ranking. One CI run of session 23 counted 6,069 top-3
    // hits of 8,750 against 6,070 between two of these runs, never seen again. A possible
    // cause was found in session 26: burn drew initial weights lazily, outside the init
    // lock, so a model built while another test seeded could start elsewhere (mended in
    // `Mlp::new`). Until runs show it gone, a few rows of slack, not a tolerance on quality.
    let rows = argmax.model.n as f64;
    let same = |a: f64, b: f64| ((a - b) * rows).abs() <= 3.0;
    assert!(same(argmax.model.top3, decided.model.top3));
    assert!(same(argmax.model.top3, switch.model.top3));
    assert!(
        same(argmax.mlp_alone.top1, decided.mlp_alone.top1),
        "same training"
    );
    // 3% less before the vote weighed nearer neighbours more (session 21), which made the
    // most probable beam itself better: 0.724 vs 0.734 dB now (seeds 1-5: -1.5 ± 0.7%); the
    // switch 0.706 dB (seeds 1-5, validation: -6.1 ± 1.1% against the expected loss alone).
    for (better, worse) in [(&decided, &argmax), (&switch, &decided)] {
        let (b, w) = (&better.model, &worse.model);
        assert!(
            b.power_loss_db < w.power_loss_db,
            "{} vs {} dB",
            b.power_loss_db,
            w.power_loss_db
        );
        assert!(b.power_loss_db_pooled < w.power_loss_db_pooled);
    }
    // Not a law, what this stream shows (seed 7: 0.357 < 0.376 < 0.388): acting on the most
    // probable beam only where that lost less, the switch's top-1 lies between the rules'.
    assert!(decided.model.top1 < switch.model.top1 && switch.model.top1 < argmax.model.top1);

    // Checkpoints keep the learnt table (a resume acts on it at once).
    let out = tempfile::tempdir().unwrap();
    let sets = [
        "output.scores=false",
        "checkpoint.enabled=true",
        "source.max_rows=3000",
    ];
    common::run(common::pipeline("beam-replay.toml", out.path(), &sets));
    let c = gradsift::checkpoint::load(&out.path().join("checkpoint.bin"))
        .unwrap()
        .expect("a checkpoint");
    let table = c.decision.expect("the loss table in the checkpoint");
    assert_eq!((table.classes(), table.rows()), (64, 1000.0));
    // And each site's record of the two rules (3,000 rows: scenarios 1 and 2).
    let mut features = c.features;
    let learnt = (features.take_learner_parts().iter())
        .filter(|(_, p)| p.rules != Default::default())
        .count();
    assert_eq!(learnt, 2);
    // And the learnt blend, moved from the fixed schedule.
    let gate = c.blend_gate;
    assert_ne!(
        gate.theta,
        gradsift::learner::blend::BlendGate::default().theta
    );
    assert!(gate.theta.iter().all(|t| t.is_finite()));
    println!("learnt blend after 3,000 rows: θ = {:?}", gate.theta);
}

/// `gradsift train` acts by the switch too: on its evaluation rows each site's record of the
/// two rules follows the rows already scored, in time order, as online.
#[test]
fn offline_training_acts_by_the_switch() {
    common::shared_data();
    let out = tempfile::tempdir().unwrap();
    let train = |decision: &str| -> serde_json::Value {
        let dir = out.path().join(decision);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gradsift"));
        cmd.args(["train", "pipelines/beam-replay.toml", "--quiet", "--json"])
            .arg("--output")
            .arg(&dir)
            .current_dir(common::repo());
        let decision = format!("model.decision=\"{decision}\"");
        // One epoch: the same model for every decision.
        for s in [
            "model.scope=\"shared\"",
            "offline.epochs=1",
            "telemetry.enabled=false",
            &decision,
        ] {
            cmd.args(["--set", s]);
        }
        let o = cmd.output().expect("gradsift runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
    };
    let model = |r: &serde_json::Value, k: &str| r["periods"][0]["metrics"]["model"][k].as_f64();
    let (least, switch) = (train("min_expected_loss"), train("switch"));
    assert_eq!(
        model(&least, "top3"),
        model(&switch, "top3"),
        "the same model"
    );
    let (l, s) = (
        model(&least, "power_loss_db"),
        model(&switch, "power_loss_db"),
    );
    let (l, s) = (l.unwrap(), s.unwrap());
    assert!(s.is_finite() && s != l, "the switch acted: {s} vs {l} dB");
    println!("validation power loss: least expected loss {l:.4} dB, switch {s:.4} dB");
}

#[test]
fn keep_one_trains_on_every_valid_sample() {
    // Every policy but `trim` (an outlier filter: it drops its top fraction whatever `keep`).
    for policy in ["top_k", "random", "sample", "infobatch"] {
        let out = tempfile::tempdir().unwrap();
        let p = format!("selection.policy=\"{policy}\"");
        let r = common::run(common::pipeline(
            "milan-replay.toml",
            out.path(),
            &["selection.keep=1.0", "output.scores=false", &p],
        ));
        assert_eq!(r.trained, r.samples, "{policy}");
        assert_eq!(r.selected, r.samples, "{policy}");
    }
}

#[test]
fn keep_point_seven_trains_seventy_percent_after_warmup() {
    common::shared_data();
    for (pipe, extra) in [
        ("milan-replay.toml", None),
        ("lte-replay.toml", None),
        // One model: per-site models each warm up on their own first rows.
        ("beam-replay.toml", Some("model.scope=\"shared\"")),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut o = vec!["selection.keep=0.7", "output.scores=false"];
        o.extend(extra);
        let r = common::run(common::pipeline(pipe, out.path(), &o));
        let f = r.trained_fraction_after_warmup;
        println!("{pipe}: trained fraction after warm-up {f:.4}");
        assert!((f - 0.7).abs() <= 0.03, "{pipe}: trained {f}");
    }
}

#[test]
fn bad_rows_are_counted_by_reason_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    // pyarrow writes the bad input: NaN, ±inf and nulls in the target, a file without the
    // target column, and a file where it is a string.
    common::python(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         t = pq.read_table('{m}')\n\
         v = t['internet'].to_pylist()\n\
         for i in range(300, 310): v[i] = float('nan')\n\
         for i in range(400, 403): v[i] = float('inf')\n\
         v[500] = float('-inf')\n\
         for i in range(600, 605): v[i] = None\n\
         good = t.set_column(2, 'internet', pa.array(v, pa.float64()))\n\
         pq.write_table(good, '{d}/a_good.parquet')\n\
         pq.write_table(t.slice(0, 50).drop_columns(['internet']), '{d}/b_missing.parquet')\n\
         s = t.slice(0, 40).set_column(2, 'internet', pa.array([str(x) for x in t['internet'].to_pylist()[:40]]))\n\
         pq.write_table(s, '{d}/c_string.parquet')\n",
        m = milan.display(),
        d = dir.path().display()
    ));
    let out = tempfile::tempdir().unwrap();
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[&format!("source.path=\"{}\"", dir.path().display())],
    ));
    println!("{:?}", r.skipped);
    assert_eq!(r.skipped.get("non_finite:internet"), Some(&14));
    assert_eq!(r.skipped.get("null:internet"), Some(&5));
    assert_eq!(r.skipped.get("missing_column:internet"), Some(&50));
    assert_eq!(r.skipped.get("wrong_type:internet"), Some(&40));
    assert_eq!(r.rows_read, 8928 + 50 + 40);
    assert_eq!(r.samples + r.skipped_total, r.rows_read);
    assert_eq!(r.dead_lettered_rows, 14 + 5 + 50 + 40);
    let letters = std::fs::read_to_string(out.path().join("dead_letters.jsonl")).unwrap();
    let reasons: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(reasons.iter().any(|l| l["reason"] == "wrong_type:internet"
        && l["detail"].as_str().unwrap().contains("expected float")));
    assert!(
        reasons
            .iter()
            .any(|l| l["reason"] == "non_finite:internet" && l["row"] == 300)
    );
    assert!(r.samples > 8000);
}

#[test]
fn schema_check_reports_every_mismatch_by_column() {
    common::shared_data();
    let bin = env!("CARGO_BIN_EXE_gradsift");
    let ok = Command::new(bin)
        .current_dir(common::repo())
        .args([
            "schema",
            "check",
            "schemas/lte_cell_kpi.json",
            "../shared/data/lte/elborn_train.parquet",
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let bad = Command::new(bin)
        .current_dir(common::repo())
        .args([
            "schema",
            "check",
            "schemas/lte_cell_kpi.json",
            "data/milan/internet_square5161.parquet",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    for col in ["site", "time", "down", "rb_up_var"] {
        assert!(
            text.contains(&format!("column `{col}`: missing")),
            "{col} in:\n{text}"
        );
    }
}

#[test]
fn a_bad_pipeline_file_fails_at_start_naming_file_key_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::repo().join("pipelines/milan-replay.toml")).unwrap();
    let p = dir.path().join("broken.toml");
    std::fs::write(&p, text.replace("capacity = 2048", "capacity = \"lots\"")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .args(["run"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("broken.toml")
            && err.contains("buffer.capacity")
            && err.contains("expected usize"),
        "{err}"
    );
}

#[test]
fn feature_state_is_bounded_by_max_keys() {
    common::shared_data();
    let out = tempfile::tempdir().unwrap();
    // Two sites, room for one: every switch of site forgets the other one's history.
    let r = common::run(common::pipeline(
        "lte-replay.toml",
        out.path(),
        &["features.max_keys=1", "output.scores=false"],
    ));
    assert_eq!(r.keys_tracked, 1);
    assert!(r.keys_forgotten >= 1);
    let r2 = common::run(common::pipeline(
        "lte-replay.toml",
        out.path(),
        &["output.scores=false"],
    ));
    assert_eq!((r2.keys_tracked, r2.keys_forgotten), (2, 0));
}

#[test]
fn paced_replay_holds_the_row_rate() {
    // 1,500 rows at 3,000 rows/s cannot finish in under half a second (a lower bound only:
    // a slow machine makes it longer, never shorter).
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[
            "source.batch_size=100",
            "source.max_rows=1500",
            "source.pace={ rows_per_second = 3000.0 }",
            "output.scores=false",
        ],
    ));
    assert_eq!(r.rows_read, 1500);
    assert!(
        started.elapsed().as_secs_f64() >= 0.45,
        "{:?}",
        started.elapsed()
    );

    // Speed-up over event time: 1,000 ten-minute slots ≈ 6.9 days of event time; at 1.2e6×
    // that is ~0.5 s of wall time.
    let started = std::time::Instant::now();
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[
            "source.batch_size=50",
            "source.max_rows=1000",
            "source.pace={ speedup = 1.2e6 }",
            "output.scores=false",
        ],
    ));
    assert_eq!(r.rows_read, 1000);
    assert!(
        started.elapsed().as_secs_f64() >= 0.4,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn files_are_merged_in_event_time_order() {
    // pyarrow splits the Milan archive into two files of alternating slots (and shuffles the
    // file names against time): the merged replay must be the original stream, row for row.
    let dir = tempfile::tempdir().unwrap();
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    common::python(&format!(
        "import pyarrow.parquet as pq, pyarrow.compute as pc, pyarrow as pa\n\
         t = pq.read_table('{m}')\n\
         idx = pa.array(range(t.num_rows))\n\
         pq.write_table(t.filter(pc.equal(pc.bit_wise_and(idx, 1), 1)), '{d}/a_odd.parquet', row_group_size=500)\n\
         pq.write_table(t.filter(pc.equal(pc.bit_wise_and(idx, 1), 0)), '{d}/b_even.parquet', row_group_size=700)\n",
        m = milan.display(),
        d = dir.path().display()
    ));
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    let a = common::run(common::pipeline(
        "milan-replay.toml",
        one.path(),
        &["source.batch_size=333"],
    ));
    let b = common::run(common::pipeline(
        "milan-replay.toml",
        two.path(),
        &[
            "source.batch_size=333",
            &format!("source.path=\"{}\"", dir.path().display()),
        ],
    ));
    assert_eq!((a.rows_read, a.samples), (b.rows_read, b.samples));
    assert_eq!(
        b.skipped.get("lag_warmup"),
        Some(&144),
        "lags see the merged order"
    );
    let (EvalSummary::Regression(ma), EvalSummary::Regression(mb)) = (&a.metrics, &b.metrics)
    else {
        panic!()
    };
    assert_eq!(
        ma.model.mae, mb.model.mae,
        "same stream, same seed, same predictions"
    );
    let py = common::python(&format!(
        "import pyarrow.parquet as pq, pyarrow.compute as pc\n\
         t = pq.ParquetFile('{}/scores.parquet').read()['time'].cast('int64')\n\
         print(pc.all(pc.greater(t[1:], t[:-1])).as_py())",
        two.path().display()
    ));
    assert_eq!(py.trim(), "True", "strictly increasing event times");
}

#[test]
fn a_diverged_model_is_reported_not_printed_as_a_good_number() {
    // Issue 10, defect 7: at this learning rate the MAE was NaN and the RMSE printed 0.0000.
    let out = tempfile::tempdir().unwrap();
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[
            "training.learning_rate=1e30",
            "training.max_nonfinite_steps=4",
        ],
    ));
    assert!(r.diverged, "the report says the model diverged");
    assert!(r.nonfinite_steps > 0 && r.model_restores > 0);
    let EvalSummary::Regression(m) = &r.metrics else {
        panic!()
    };
    assert!(m.model.nonfinite > 0 && !m.model.valid());
    assert!(m.persistence.valid(), "the baselines are still scored");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert!(
        json["metrics"]["model"]["rmse"].is_null(),
        "no number for a diverged model"
    );
    assert_eq!(json["diverged"], true);
    let table = r.render();
    assert!(table.contains("diverged (") && table.contains("THE MODEL DIVERGED"));
    assert!(
        !table.contains("NaN"),
        "NaN never prints as a number:\n{table}"
    );
}

#[test]
fn a_run_without_samples_prints_no_metric() {
    // Every row is in lag warm-up: nothing was predicted, so there is no error to report.
    let out = tempfile::tempdir().unwrap();
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["source.max_rows=100"],
    ));
    assert_eq!(r.samples, 0);
    let EvalSummary::Regression(m) = &r.metrics else {
        panic!()
    };
    assert!(!m.model.valid() && m.model.mae.is_nan());
    assert!(!r.diverged);
    let table = r.render();
    assert!(table.contains("n/a") && !table.contains("NaN"), "{table}");
}

#[test]
fn a_shutdown_ends_a_slowly_paced_replay_within_seconds() {
    // Issue 10, defect 3: at 600× event time (one 10-minute slot a second) a batch of 1,024
    // rows used to wait 1,024 s in an uninterruptible sleep, and was then released at once.
    // Rows are now released one by one as they fall due, and the sleep wakes on shutdown.
    let out = tempfile::tempdir().unwrap();
    let cfg = common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["source.pace={ speedup = 600.0 }"],
    );
    let r = run_then_shut_down(cfg, 3500);
    assert!(r.interrupted);
    // Three and a half seconds at one row a second: a handful of rows (fewer on a slow
    // start), never a whole batch.
    assert!(
        r.rows_read <= 5,
        "{} rows released in 3.5 s at one row a second",
        r.rows_read
    );
}

/// A paced replay resumed from a checkpoint releases the rows the checkpoint covers at once
/// and paces from the first row after them: at one 10-minute slot a second, the 2,000 covered
/// slots took 2,000 s before the first new row was learnt.
#[test]
fn a_paced_resume_does_not_wait_out_the_covered_rows() {
    let out = tempfile::tempdir().unwrap();
    let sets = ["checkpoint.enabled=true", "output.scores=false"];
    let mut first = sets.to_vec();
    first.push("source.max_rows=2000");
    common::run(common::pipeline("milan-replay.toml", out.path(), &first));
    let mut paced = sets.to_vec();
    paced.push("source.pace={ speedup = 600.0 }");
    let cfg = common::pipeline("milan-replay.toml", out.path(), &paced);
    let r = run_then_shut_down(cfg, 3000);
    let ck = r.checkpoint.as_ref().unwrap();
    assert_eq!(ck.rows_already_covered, 2000, "{:?}", r.rows_read);
}

#[test]
fn an_absurd_value_is_dead_lettered_and_does_not_ruin_the_model() {
    // Issue 10, defect 6: one `internet = 1.7e308` row took the last-window MAE from 66 to
    // 61 M for the rest of the stream. The schema declares internet in [0, 1e7].
    let dir = tempfile::tempdir().unwrap();
    let src = common::milan_edited(dir.path(), "bad", "v[3000] = 1.7e308\nv[3001] = -12.0");
    let (clean_out, bad_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clean = common::run(common::pipeline("milan-replay.toml", clean_out.path(), &[]));
    let bad = common::run(common::pipeline(
        "milan-replay.toml",
        bad_out.path(),
        &[&src],
    ));
    assert_eq!(bad.skipped.get("out_of_range:internet"), Some(&2));
    assert!(!bad.diverged);
    let (EvalSummary::Regression(c), EvalSummary::Regression(b)) = (&clean.metrics, &bad.metrics)
    else {
        panic!()
    };
    let rel = (b.model_last_window.mae - c.model_last_window.mae).abs() / c.model_last_window.mae;
    println!(
        "last-window MAE {:.2} with the absurd rows, {:.2} clean",
        b.model_last_window.mae, c.model_last_window.mae
    );
    assert!(rel < 0.1, "{rel}");
    // Each letter says what the row held.
    let letters = std::fs::read_to_string(bad_out.path().join("dead_letters.jsonl")).unwrap();
    let details: Vec<String> = letters
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["reason"] == "out_of_range:internet")
        .map(|l| l["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(details, ["internet = 1.7e308", "internet = -12.0"]);
}

/// Issue 13, first part: the detectors on real streams. The four-site beam stream changes
/// site at sample 2,422 (scenario 2) and 5,396 (scenario 3): the loss detectors fire within
/// 500 samples of each; on the bundled Milan square (no site change, no injected drift) the
/// loss detectors stay quiet.
#[test]
fn the_drift_detectors_find_the_site_changes_and_keep_quiet_on_milan_until_christmas() {
    common::shared_data();
    let run = |pipe: &str| {
        let out = tempfile::tempdir().unwrap();
        common::run(common::pipeline(pipe, out.path(), &["output.scores=false"]))
    };
    let beam = run("beam-replay.toml");
    for change in [2422u64, 5396] {
        let found = beam.drift.events.iter().any(|e| {
            e.detector != Detector::ScoreShift && (change..change + 500).contains(&e.sample)
        });
        assert!(
            found,
            "no loss detector fired within 500 samples of {change}: {:?}",
            beam.drift.events
        );
    }
    // The pipeline declares its site changes; the report finds each, with its first
    // detection and a recovery read off the metric trace.
    let at: Vec<Option<u64>> = beam.changes.iter().map(|c| c.at).collect();
    assert_eq!(
        at,
        [Some(2422), Some(5396), Some(6883)],
        "{:?}",
        beam.changes
    );
    for c in &beam.changes[..2] {
        let d = c.first_detection.as_ref().expect("detected");
        assert!(d.delay < 500, "{c:?}");
        let (settled, peak) = (c.settled.unwrap(), c.peak.unwrap());
        assert!(peak > 1.1 * settled, "the new site is felt: {c:?}");
        assert!(
            c.recovery_samples
                .is_some_and(|r| r > 0 && r < c.segment_samples),
            "{c:?}"
        );
        // A new site is a learning curve on its own rows too, not only the window emptying.
        assert!(
            c.recovery_samples_own_rows
                .is_some_and(|r| r > 300 && r < c.segment_samples),
            "{c:?}"
        );
    }
    let milan = run("milan-replay.toml");
    assert_eq!(milan.drift.counts["adwin"], 0, "{:?}", milan.drift.events);
    assert_eq!(
        milan.drift.counts["page_hinkley"], 0,
        "{:?}",
        milan.drift.events
    );
    // The score test against the same week one season earlier: no alarm from the weekly
    // cycle before Christmas, and Christmas found.
    let christmas = &milan.changes[0];
    let at = christmas.at.expect("Christmas is in the archive");
    let early: Vec<_> = milan
        .drift
        .events
        .iter()
        .filter(|e| e.sample < at)
        .collect();
    assert!(early.is_empty(), "alarms before Christmas: {early:?}");
    let d = christmas.first_detection.as_ref().expect("Christmas found");
    assert!(d.delay < 1008, "within a week: {christmas:?}");
}

/// An injected change (`[source.inject]`: DeepSense scenario 1 with the UE longitude
/// shifted by 0.0002°, about 19 m east, from row 1,500 on, a GPS offset) is found within 500
/// samples by Page-Hinkley, which never fires before it; a reaction runs at the detection. A
/// column the schema does not read is refused at start.
#[test]
fn an_injected_change_is_detected_within_500_samples() {
    common::shared_data();
    let out = tempfile::tempdir().unwrap();
    let s1 = "source.path=\"../../shared/data/beam/deepsense_scenario1.parquet\"";
    let inject = "source.inject={column=\"ue_lon\", from_row=1500, shift=0.0002}";
    let react = "drift.reactions=[\"forget_buffer\"]";
    let r = common::run(common::pipeline(
        "beam-replay.toml",
        out.path(),
        &["output.scores=false", s1, inject, react],
    ));
    let ph: Vec<u64> = (r.drift.events.iter())
        .filter(|e| e.detector == Detector::PageHinkley)
        .map(|e| e.sample)
        .collect();
    assert!(
        ph.first().is_some_and(|s| (1500..2000).contains(s)),
        "{ph:?}"
    );
    assert!(
        r.drift.reacted_at.iter().any(|s| (1500..2000).contains(s)),
        "{:?}",
        r.drift.reacted_at
    );
    let bad = common::try_run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["source.inject={column=\"nope\", from_row=5}"],
    ));
    let e = format!("{:#}", bad.unwrap_err());
    assert!(e.contains("key `source.inject`: column: `nope`"), "{e}");
}

/// Issue 13's pictures: `--plot` draws the run's windowed metric (PNG and SVG); a run with
/// declared changes keeps its trace in the report, and `gradsift plot` draws several runs
/// in one figure; a run folder without a report, or a report without a trace, is refused by
/// name.
#[test]
fn the_run_plot_and_runs_side_by_side_are_drawn() {
    let (a, b, figs) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    common::run(common::pipeline(
        "milan-replay.toml",
        a.path(),
        &["output.scores=false", "output.plot=true"],
    ));
    let png = std::fs::read(a.path().join("metric.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(a.path().join("metric.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("MAE"),
        "{}",
        &svg[..200]
    );
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        b.path(),
        &["output.scores=false", "drift.reactions=[\"forget_buffer\"]"],
    ));
    assert!(
        r.trace.as_ref().is_some_and(|t| t.points.len() > 100),
        "the changes keep a trace"
    );
    let plot = |runs: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_gradsift"))
            .args(["plot", "--name", "side", "--output"])
            .arg(figs.path())
            .args(runs)
            .output()
            .unwrap()
    };
    let ok = plot(&[
        format!("without={}", a.path().display()),
        format!("forget_buffer={}", b.path().display()),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let svg = std::fs::read_to_string(figs.path().join("side.svg")).unwrap();
    assert!(svg.contains("without") && svg.contains("forget_buffer"));
    assert!(figs.path().join("side.png").exists());
    let missing = plot(&[format!("x={}", figs.path().join("nothing").display())]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));
    let untraced = tempfile::tempdir().unwrap();
    common::run(common::pipeline(
        "milan-replay.toml",
        untraced.path(),
        &["output.scores=false", "evaluation.changes=[]"],
    ));
    let refused = plot(&[format!("x={}", untraced.path().display())]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("keeps no trace"));
}

/// With a model per site, each site learns from micro-batches of its own rows, however the
/// sites' rows interleave: the four beam sites woven into one another (each row placed at its
/// share of its own site's length, as four live sites would arrive; written by pyarrow) take
/// exactly the optimiser steps of the four sites one after another, and each site's model
/// trains on the same rows. Before, a micro-batch of 16 across four sites was four steps of
/// about four rows (four times the steps).
#[test]
fn per_site_models_step_on_their_own_rows_however_the_sites_interleave() {
    let data = common::shared_data();
    let dir = tempfile::tempdir().unwrap();
    let woven = dir.path().join("woven.parquet");
    common::python(&format!(
        "import glob, pyarrow as pa, pyarrow.parquet as pq\n\
         ts = [pq.read_table(f) for f in sorted(glob.glob('{d}/beam/*.parquet'))]\n\
         order = sorted(((i + 0.5) / t.num_rows, s, i) for s, t in enumerate(ts) for i in range(t.num_rows))\n\
         t = pa.concat_tables([ts[s].slice(i, 1) for _, s, i in order])\n\
         j = t.schema.get_field_index('sample_index')\n\
         t = t.set_column(j, 'sample_index', pa.array(range(t.num_rows), t.schema.field(j).type))\n\
         pq.write_table(t, '{w}')\n",
        d = data.display(),
        w = woven.display()
    ));
    let run = |path: Option<&std::path::Path>| {
        let out = tempfile::tempdir().unwrap();
        let src = path.map(|p| format!("source.path=\"{}\"", p.display()));
        let mut sets = vec![
            "output.scores=false",
            "evaluation.periods=[]",
            "evaluation.changes=[]",
        ];
        sets.extend(src.as_deref());
        common::run(common::pipeline("beam-replay.toml", out.path(), &sets))
    };
    let (apart, woven) = (run(None), run(Some(&woven)));
    assert_eq!(woven.samples, apart.samples);
    let steps = |r: &gradsift::report::RunReport| r.compute.training.work.optimizer_steps;
    let rows = |r: &gradsift::report::RunReport| r.compute.training.work.rows_weight_grad;
    println!(
        "steps: sites apart {}, woven {}",
        steps(&apart),
        steps(&woven)
    );
    assert_eq!(steps(&woven), steps(&apart));
    assert_eq!(rows(&woven), rows(&apart));
}

/// Runs `cfg` on its own thread, asks it to shut down after `ms` milliseconds, and returns
/// its report (the run must end within a minute of the request, not after a paced batch).
fn run_then_shut_down(
    cfg: gradsift::config::PipelineConfig,
    ms: u64,
) -> gradsift::report::RunReport {
    let shutdown = gradsift::shutdown::Shutdown::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let sd = shutdown.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _ = tx.send(rt.block_on(gradsift::pipeline::run(cfg, Default::default(), sd)));
    });
    std::thread::sleep(std::time::Duration::from_millis(ms));
    shutdown.trigger();
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the run ends soon after the shutdown")
        .expect("run completes")
}
