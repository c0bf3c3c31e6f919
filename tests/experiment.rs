//! `gradsift experiment` end to end: the real binary runs a tiny grid (2 families × 2 keep
//! values × 2 seeds, plus the reference) over the bundled Milan archive as subprocesses, and
//! writes the results table, the summary, the frontier and the plots.

mod common;

use std::path::Path;
use std::process::Command;

/// Splits one CSV line (quoted fields may hold commas and doubled quotes).
fn fields(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Header → column index, and the rows.
fn csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = fields(lines.next().expect("a header"));
    (header, lines.map(fields).collect())
}

fn col(header: &[String], name: &str) -> usize {
    header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
}

const EXPERIMENT: &str = r#"
name = "tiny"
pipeline = "PIPELINE"
metric = "mae"
seeds = [1, 2]
jobs = 2
set = ["source.max_rows=2500", "selection.warmup=300", "selection.window=512",
       "buffer.capacity=256", "buffer.replay_ratio=1.0", "evaluation.window=500",
       "evaluation.periods=[{name=\"validation\",from=1200},{name=\"test\",from=1800}]"]

[reference]
set = ["importance.method=\"random\"", "selection.keep=1.0", "buffer.policy=\"fifo\""]

[[family]]
name = "random"
set = ["importance.method=\"random\"", "buffer.policy=\"fifo\""]
axes = { "selection.keep" = [0.5, 0.8] }

[[family]]
name = "exact"
set = ["importance.method=\"exact\""]
axes = { "selection.keep" = [0.5, 0.8] }
"#;

fn experiment(file: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .arg("experiment")
        .arg(file)
        .arg("--output")
        .arg(out)
        .output()
        .expect("gradsift starts")
}

fn assert_plots(out: &Path) {
    for stem in ["frontier", "keep", "scores"] {
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{stem}.png is not a PNG"
        );
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        let head = svg.trim_start();
        assert!(
            head.starts_with("<svg") || head.starts_with("<?xml"),
            "{stem}.svg is not SVG"
        );
        assert!(
            svg.contains("</svg>") && svg.contains("<text"),
            "{stem}.svg has no text"
        );
    }
}

#[test]
fn a_tiny_experiment_writes_results_summary_frontier_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.toml");
    let pipeline = common::repo().join("pipelines/milan-replay.toml");
    std::fs::write(
        &file,
        EXPERIMENT.replace("PIPELINE", &pipeline.display().to_string()),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = experiment(&file, &out);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "experiment failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("random at equal compute") && stdout.contains("frontier"),
        "{stdout}"
    );

    let (h, rows) = csv(&out.join("results.csv"));
    assert_eq!(
        rows.len(),
        8 + 2,
        "2 families × 2 keep × 2 seeds + the reference's 2 seeds"
    );
    for r in &rows {
        assert_eq!(r[col(&h, "status")], "ok", "{r:?}");
        for m in ["validation_mae", "test_mae", "whole_stream_mae", "cpu_s"] {
            let v: f64 = r[col(&h, m)]
                .parse()
                .unwrap_or_else(|_| panic!("{m} in {r:?}"));
            assert!(v.is_finite() && v > 0.0, "{m} = {v}");
        }
    }
    let labels: Vec<&str> = rows.iter().map(|r| r[col(&h, "label")].as_str()).collect();
    assert_eq!(labels.iter().filter(|l| **l == "reference").count(), 2);
    assert_eq!(
        labels
            .iter()
            .filter(|l| **l == "exact/selection.keep=0.5")
            .count(),
        2
    );
    assert!(out.join("results.parquet").metadata().unwrap().len() > 0);

    let (h, rows) = csv(&out.join("summary.csv"));
    let families: Vec<&str> = rows.iter().map(|r| r[col(&h, "family")].as_str()).collect();
    assert_eq!(families, ["reference", "random", "exact"]);
    let exact = &rows[2];
    assert!(
        exact[col(&h, "random_at_equal_compute")].starts_with("random/selection.keep="),
        "{exact:?}"
    );
    assert!(
        ["beats random", "tie", "loses"].contains(&exact[col(&h, "verdict")].as_str()),
        "{exact:?}"
    );
    let (_, frontier) = csv(&out.join("frontier.csv"));
    assert_eq!(frontier.len(), 5);
    assert_plots(&out);

    // A second invocation reuses every finished run.
    let o = experiment(&file, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.contains("0 run now, 10 reused"),
        "{stderr}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");

    // The reference's learning settings are kept beside the results; a run into the same
    // folder after its pipeline moved says which settings moved.
    let settings: toml::Table = std::fs::read_to_string(out.join("settings.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(settings["buffer"]["replay_ratio"].as_float(), Some(1.0));
    assert_eq!(settings["source"]["max_rows"].as_integer(), Some(2500));
    let moved = std::fs::read_to_string(&file)
        .unwrap()
        .replace("buffer.replay_ratio=1.0", "buffer.replay_ratio=0.5")
        .replace("seeds = [1, 2]", "seeds = [1]");
    std::fs::write(&file, moved).unwrap();
    let o = experiment(&file, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && stderr.contains("warning: the reference's settings differ")
            && stderr.contains("buffer.replay_ratio: 1.0 → 0.5"),
        "{stderr}"
    );
}

/// `gradsift experiment --pipeline`: the default grid of any pipeline, written into the output
/// folder and run, every family compared with random at equal compute; the written file runs
/// again as it is.
#[test]
fn the_default_grid_runs_on_a_pipeline_without_an_experiment_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gradsift"));
        c.arg("experiment").args(extra).arg("--output").arg(&out);
        c.output().expect("gradsift starts")
    };
    let pipeline = common::repo().join("pipelines/milan-replay.toml");
    let o = args(&[
        "--pipeline",
        pipeline.to_str().unwrap(),
        "--seeds",
        "2",
        "--confirm",
        "1",
        "--set",
        "source.max_rows=2500",
        "--set",
        "selection.warmup=300",
        "--set",
        "evaluation.periods=[{name=\"validation\",from=1200},{name=\"test\",from=1800}]",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "experiment failed:\n{stdout}\n{stderr}");
    let (h, rows) = csv(&out.join("results.csv"));
    assert_eq!(
        rows.len(),
        61 * 2,
        "60 configurations and the reference, 2 seeds"
    );
    assert!(rows.iter().all(|r| r[col(&h, "status")] == "ok"));
    // The summary has the reference and every family of the written file, in its order.
    let file = out.join("experiment.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let written = gradsift::experiment::parse(&text, &file).unwrap();
    assert_eq!(written.families.len(), 5);
    let (h, rows) = csv(&out.join("summary.csv"));
    let families: Vec<&str> = rows.iter().map(|r| r[col(&h, "family")].as_str()).collect();
    let expected: Vec<&str> = std::iter::once("reference")
        .chain(written.families.iter().map(|f| f.name.as_str()))
        .collect();
    assert_eq!(families, expected);
    // Random rows or micro-batches are the baseline; the other families select rows and
    // are paired with random rows.
    for r in &rows[2..] {
        assert!(
            r[col(&h, "random_at_equal_compute")].starts_with("random/")
                && r[col(&h, "random_at_equal_compute")].contains("selection.unit=row"),
            "{r:?}"
        );
    }
    assert_plots(&out);
    // The confirmation ran each pick, its random partner and the reference on seed 3 too,
    // and compares them over seeds 1-3; the verdicts read the fresh seed alone, which is
    // one: no verdict.
    let (h, confirmed) = csv(&out.join("confirm.csv"));
    assert_eq!(confirmed.len(), 5, "one row per family");
    for r in &confirmed {
        assert_eq!(r[col(&h, "seeds")], "3", "{r:?}");
        if r[col(&h, "family")] != "random" {
            for c in [
                "delta_random_test_pct_mean",
                "delta_random_test_fresh_pct_mean",
                "random_compute_ratio",
            ] {
                let v: f64 = r[col(&h, c)].parse().unwrap();
                assert!(v.is_finite(), "{c}: {r:?}");
            }
            assert_eq!(r[col(&h, "verdict_test")], "n/a (one seed)", "{r:?}");
        }
    }
    assert!(stdout.contains("confirmation: the picks"), "{stdout}");
    // The written file is an experiment file like any other, with the overrides in it.
    assert!(text.contains("source.max_rows=2500"), "{text}");
    let o = experiment(&file, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.contains("0 run now, 122 reused"),
        "{stderr}"
    );
    // Without validation and test periods there is nothing to choose on: refused at start.
    let o = args(&[
        "--pipeline",
        pipeline.to_str().unwrap(),
        "--set",
        "evaluation.periods=[]",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("key `evaluation.periods`")
            && stderr.contains("\"validation\" and \"test\""),
        "{stderr}"
    );
}
