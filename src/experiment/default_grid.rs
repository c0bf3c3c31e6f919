//! The default grid of `gradsift experiment --pipeline PIPELINE.toml`: "are all samples
//! important on this stream, and what can be saved?" asked of any pipeline without writing an
//! experiment file first.
//!
//! It is the grid our three workloads' experiments share (`experiments/{milan,lte,beam}.toml`):
//! random rows or whole micro-batches at several keep fractions and replay ratios, and at
//! the same points the published rule (top-k by exact gradient norm), an outlier trim (the
//! top 3% by EL2N dropped, then random), InfoBatch, and random rows with norm clipping; the
//! reference is every row trained at the replay ratio `gradsift run` counts savings against
//! (`compute.reference_replay_ratio`, else the pipeline's own), and the replay axis is that
//! ratio, two thirds and a third of it. The file is written
//! into the output folder before it runs, so the run can be repeated or edited
//! (`gradsift experiment OUTPUT/experiment.toml`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::PipelineConfig;
use crate::schema::{Headline, Schema};

/// Keep fractions of the random family (the others leave out 1.0: at keep 1 they are random).
const KEEPS: [f64; 4] = [0.5, 0.7, 0.9, 1.0];

/// The experiment file for `pipeline` (with `sets` applied to every run), `seeds` seeds.
pub fn experiment_text(pipeline: &Path, seeds: u64, sets: &[String]) -> Result<String> {
    let cfg = PipelineConfig::load(pipeline, sets)?;
    let names: Vec<&str> = cfg
        .evaluation
        .periods
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    if !(names.contains(&"validation") && names.contains(&"test")) {
        bail!(
            "{}: key `evaluation.periods`: expected periods named \"validation\" and \"test\" \
             (an earlier and a later part of the stream: settings are chosen on the first and \
             reported on the second), found {names:?}",
            pipeline.display()
        );
    }
    if seeds == 0 {
        bail!("--seeds: expected at least 1 seed, found 0");
    }
    let schema = Schema::load(&cfg.schema)?;
    let metric = match schema.headline() {
        Headline::Mae => "mae",
        Headline::PowerLossDb => "power_loss_db",
        Headline::Top1 => "top1",
    };
    let path = std::fs::canonicalize(pipeline)
        .with_context(|| format!("cannot resolve {}", pipeline.display()))?;
    // Savings are counted against every-row training at the replay ratio `gradsift run`
    // counts them against: the pipeline's `compute.reference_replay_ratio`, else its own.
    let r = cfg.reference_replay_ratio();
    let quote = |s: &str| format!("'{}'", s.replace('\'', "\""));
    let common: Vec<String> = [
        "selection.unit = \"row\"".to_string(),
        "buffer.policy = \"fifo\"".into(),
        "buffer.rescore_every = 0".into(),
        "output.scores = true".into(),
        format!("compute.reference_replay_ratio = {r}"),
    ]
    .into_iter()
    .chain(sets.iter().cloned())
    .map(|s| quote(&s))
    .collect();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Written by `gradsift experiment --pipeline {}`: the default grid\n\
         # (src/experiment/default_grid.rs). Run it again with `gradsift experiment` on this file.",
        pipeline.display()
    );
    let _ = writeln!(t, "name = {:?}", format!("{}-default", cfg.name));
    let _ = writeln!(t, "pipeline = {:?}", path.display().to_string());
    let _ = writeln!(t, "metric = \"{metric}\"");
    let _ = writeln!(t, "seeds = {:?}", (1..=seeds).collect::<Vec<_>>());
    let _ = writeln!(t, "tolerance = 0.01");
    let _ = writeln!(t, "set = [{}]", common.join(", "));
    let _ = writeln!(
        t,
        "\n# Every row trained at the pipeline's replay ratio: the denominator.\n[reference]\n\
         set = ['selection.policy = \"random\"', 'selection.keep = 1.0', 'buffer.replay_ratio = {r}']"
    );
    let replay = format!("{:?}", replay_axis(r));
    let write_family = |t: &mut String, name: &str, set: &[&str], keeps: &[f64], more: &str| {
        let set: Vec<String> = set.iter().map(|s| quote(s)).collect();
        let _ = writeln!(
            t,
            "\n[[family]]\nname = \"{name}\"\nset = [{}]\n\
             axes = {{ \"selection.keep\" = {keeps:?}, \"buffer.replay_ratio\" = {replay}{more} }}",
            set.join(", ")
        );
    };
    let random = "selection.policy = \"random\"";
    let el2n = "importance.method = \"el2n\"";
    // Random rows, or random whole micro-batches (a dropped one takes no optimiser step):
    // both are the baseline, and each other family is paired with random rows.
    let units = ", \"selection.unit\" = [\"row\", \"micro_batch\"]";
    let family = |t: &mut String, name: &str, set: &[&str], keeps: &[f64]| {
        write_family(
            t,
            name,
            set,
            keeps,
            if name == "random" { units } else { "" },
        )
    };
    family(&mut t, "random", &[random], &KEEPS);
    let exact = "importance.method = \"exact\"";
    family(
        &mut t,
        "top_k-exact",
        &["selection.policy = \"top_k\"", exact],
        &KEEPS[..3],
    );
    let trim = ["selection.policy = \"trim\"", el2n, "selection.trim = 0.03"];
    family(&mut t, "trim-el2n", &trim, &KEEPS[..3]);
    let infobatch = [
        "selection.policy = \"infobatch\"",
        "importance.method = \"loss\"",
    ];
    family(&mut t, "infobatch-loss", &infobatch, &KEEPS[..3]);
    family(
        &mut t,
        "clip-el2n",
        &[random, el2n, "selection.clip = 0.7"],
        &KEEPS[1..],
    );
    Ok(t)
}

/// The pipeline's replay ratio, two thirds and a third of it (two decimals), distinct.
fn replay_axis(r: f64) -> Vec<f64> {
    let mut axis: Vec<f64> = [r, r * 2.0 / 3.0, r / 3.0]
        .iter()
        .map(|v| (v * 100.0).round() / 100.0)
        .collect();
    axis.dedup();
    axis
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{Metric, parse};

    fn repo(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    #[test]
    fn the_default_grid_follows_the_pipeline() {
        let text = experiment_text(&repo("pipelines/milan-replay.toml"), 3, &[]).unwrap();
        let e = parse(&text, Path::new("experiment.toml")).unwrap();
        assert_eq!(e.metric, Metric::Mae);
        assert_eq!(e.seeds, [1, 2, 3]);
        let names: Vec<&str> = e.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "random",
                "top_k-exact",
                "trim-el2n",
                "infobatch-loss",
                "clip-el2n"
            ]
        );
        // Milan counts savings against every row at replay 3 (`compute.reference_replay_ratio`;
        // it replays 2): the reference and the replay axis follow.
        let replay = &e.families[0].axes["buffer.replay_ratio"];
        assert_eq!(replay, &[3.0, 2.0, 1.0].map(toml::Value::from).to_vec());
        assert!(
            e.reference
                .set
                .iter()
                .any(|s| s.contains("replay_ratio = 3"))
        );
        let text = experiment_text(&repo("pipelines/beam-replay.toml"), 1, &[]).unwrap();
        let e = parse(&text, Path::new("experiment.toml")).unwrap();
        assert_eq!(e.metric, Metric::PowerLossDb, "beam has per-class power");
        // Overrides reach every run.
        let sets = ["source.max_rows=2500".to_string()];
        let text = experiment_text(&repo("pipelines/milan-replay.toml"), 1, &sets).unwrap();
        let e = parse(&text, Path::new("experiment.toml")).unwrap();
        assert!(
            e.set.iter().any(|s| s == "source.max_rows=2500"),
            "{:?}",
            e.set
        );
    }

    #[test]
    fn a_pipeline_without_validation_and_test_periods_is_refused() {
        let sets = ["evaluation.periods=[{name=\"later\",from=100}]".to_string()];
        let err = experiment_text(&repo("pipelines/milan-replay.toml"), 3, &sets)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("milan-replay.toml")
                && err.contains("key `evaluation.periods`")
                && err.contains("\"validation\" and \"test\"")
                && err.contains("[\"later\"]"),
            "{err}"
        );
    }

    #[test]
    fn the_replay_axis_is_the_ratio_and_two_smaller_ones() {
        assert_eq!(replay_axis(3.0), [3.0, 2.0, 1.0]);
        assert_eq!(replay_axis(0.0), [0.0]);
        assert_eq!(replay_axis(1.0), [1.0, 0.67, 0.33]);
    }
}
