//! `gradsift experiment EXPERIMENT.toml`: on this stream, which samples matter and how much
//! compute can selection save? Runs a grid of pipeline configurations × seeds, each as a
//! `gradsift run` subprocess, and compares every policy family with the full-data reference
//! and with random selection at equal compute, because random at the same budget is the
//! baseline a selection policy has to beat.
//!
//! This module holds the experiment file's types and the `run` entry; [`grid`] expands the
//! file into runs, [`runner`] runs them in parallel, [`results`] turns each run's
//! `report.json` into one row, [`summary`] picks and compares per family, [`plot`] draws.
//! Like `src/config.rs`, a bad file fails at start with the file, the key and what was
//! expected: an experiment is hours of runs, a typo should cost seconds.

pub mod confirm;
pub mod default_grid;
pub mod grid;
pub mod plot;
pub mod results;
pub mod runner;
pub mod settings;
pub mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

/// The metric decisions and figures are made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Mae,
    Rmse,
    SmapePct,
    Top1,
    Top3,
    PowerLossDb,
}

impl Metric {
    /// Its field in a report's `metrics.model`.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Mae => "mae",
            Metric::Rmse => "rmse",
            Metric::SmapePct => "smape_pct",
            Metric::Top1 => "top1",
            Metric::Top3 => "top3",
            Metric::PowerLossDb => "power_loss_db",
        }
    }

    /// Accuracies are better higher, errors and losses lower.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Top1 | Metric::Top3)
    }

    /// Name with units, for tables and plot axes.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Mae => "MAE (target units)",
            Metric::Rmse => "RMSE (target units)",
            Metric::SmapePct => "sMAPE (%)",
            Metric::Top1 => "top-1 accuracy",
            Metric::Top3 => "top-3 accuracy",
            Metric::PowerLossDb => "power loss (dB)",
        }
    }

    /// How much worse `value` is than `reference`, relative (0.01 = 1% worse; negative: better).
    pub fn worse_by(self, value: f64, reference: f64) -> f64 {
        let rel = (value - reference) / reference.abs();
        if self.higher_is_better() { -rel } else { rel }
    }
}

/// `[reference]`: the full-data configuration, the denominator of compute saved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSpec {
    #[serde(default)]
    pub set: Vec<String>,
}

/// `[[family]]`: a policy family, the cartesian product of its axes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilySpec {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
    /// Setting → the values it takes (sorted by setting, so labels are stable).
    #[serde(default)]
    pub axes: BTreeMap<String, Vec<toml::Value>>,
}

/// Which command each run is: the online learner (`gradsift run`, prequential) or the
/// offline trainer (`gradsift train`, epochs with early stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Online,
    Offline,
}

impl Mode {
    /// The gradsift subcommand of a run.
    pub fn command(self) -> &'static str {
        match self {
            Mode::Online => "run",
            Mode::Offline => "train",
        }
    }
}

/// A whole experiment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// The pipeline file (relative to the experiment file; resolved by [`load`]).
    pub pipeline: PathBuf,
    pub metric: Metric,
    #[serde(default)]
    pub mode: Mode,
    pub seeds: Vec<u64>,
    /// Runs at once (default: available cores).
    #[serde(default)]
    pub jobs: Option<usize>,
    /// Relative validation slack within which a configuration counts as "as good as full data".
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Overrides for every run.
    #[serde(default)]
    pub set: Vec<String>,
    pub reference: ReferenceSpec,
    #[serde(default, rename = "family")]
    pub families: Vec<FamilySpec>,
    /// The file this was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_tolerance() -> f64 {
    0.01
}

/// Reads, validates and resolves an experiment file.
pub fn load(path: &Path) -> Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read experiment file {}", path.display()))?;
    let mut exp = parse(&text, path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    exp.pipeline = base.join(&exp.pipeline);
    if !exp.pipeline.is_file() {
        return Err(exp.bad(
            "pipeline",
            "a pipeline file (relative to the experiment file)",
            exp.pipeline.display(),
        ));
    }
    Ok(exp)
}

/// Parses and validates the text of an experiment file (`file` names it in errors).
pub fn parse(text: &str, file: &Path) -> Result<Experiment> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let mut exp: Experiment = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| anyhow!("{}: key `{}`: {}", file.display(), e.path(), e.inner()))?;
    exp.file = file.to_path_buf();
    exp.validate()?;
    Ok(exp)
}

impl Experiment {
    fn bad(&self, key: &str, expected: &str, found: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: key `{key}`: expected {expected}, found {found}",
            self.file.display()
        )
    }

    fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(self.bad("name", "a non-empty name", "\"\""));
        }
        let unique: BTreeSet<_> = self.seeds.iter().collect();
        if self.seeds.is_empty() || unique.len() != self.seeds.len() {
            return Err(self.bad(
                "seeds",
                "a non-empty list of distinct seeds",
                format!("{:?}", self.seeds),
            ));
        }
        if self.jobs == Some(0) {
            return Err(self.bad("jobs", "at least 1 run at once", 0));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(self.bad(
                "tolerance",
                "a relative slack ≥ 0, e.g. 0.01",
                self.tolerance,
            ));
        }
        self.check_sets("set", &self.set)?;
        self.check_sets("reference.set", &self.reference.set)?;
        self.check_families()
    }

    fn check_sets(&self, key: &str, sets: &[String]) -> Result<()> {
        for (i, s) in sets.iter().enumerate() {
            if s.split_once('=').is_none_or(|(k, _)| k.trim().is_empty()) {
                return Err(self.bad(
                    &format!("{key}[{i}]"),
                    "an override KEY=VALUE",
                    format!("{s:?}"),
                ));
            }
        }
        Ok(())
    }

    fn check_families(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (i, f) in self.families.iter().enumerate() {
            let key = format!("family[{i}]");
            if f.name.trim().is_empty() || f.name == grid::REFERENCE || !seen.insert(&f.name) {
                let expected = "a non-empty family name, not \"reference\", used once";
                return Err(self.bad(&format!("{key}.name"), expected, format!("{:?}", f.name)));
            }
            self.check_sets(&format!("{key}.set"), &f.set)?;
            for (axis, values) in &f.axes {
                if values.is_empty() {
                    return Err(self.bad(
                        &format!("{key}.axes.\"{axis}\""),
                        "a non-empty array of values",
                        "[]",
                    ));
                }
            }
        }
        if self.families.is_empty() {
            bail!(
                "{}: key `family`: expected at least one [[family]], found none",
                self.file.display()
            );
        }
        Ok(())
    }
}

/// What `gradsift experiment` was asked.
#[derive(Debug, Clone)]
pub struct Args {
    /// The experiment file, or `None` with `pipeline`.
    pub file: Option<PathBuf>,
    /// Run the default grid ([`default_grid`]) of this pipeline instead of a file.
    pub pipeline: Option<PathBuf>,
    /// Seeds of the default grid (1, 2, …).
    pub seeds: u64,
    /// Overrides for every run, after the file's own `set`.
    pub sets: Vec<String>,
    /// Default `experiments/results/NAME` (relative to the working directory).
    pub output: Option<PathBuf>,
    /// Re-run runs whose report already exists.
    pub fresh: bool,
    /// Overrides the file's `jobs`.
    pub jobs: Option<usize>,
    /// Fresh seeds to run each family's pick and its random partner on again ([`confirm`]).
    pub confirm: u64,
}

/// The experiment file to run: the one given, or the default grid of the pipeline given,
/// written as `experiment.toml` into its output folder (with the overrides in it).
fn experiment_file(args: &Args) -> Result<(PathBuf, Vec<String>)> {
    match (&args.file, &args.pipeline) {
        (Some(f), None) => Ok((f.clone(), args.sets.clone())),
        (None, Some(p)) => {
            let text = default_grid::experiment_text(p, args.seeds, &args.sets)?;
            let name = parse(&text, Path::new("experiment.toml"))?.name;
            let out = args
                .output
                .clone()
                .unwrap_or_else(|| Path::new("experiments/results").join(name));
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let file = out.join("experiment.toml");
            std::fs::write(&file, text)
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!("the default grid of {}: {}", p.display(), file.display());
            Ok((file, Vec::new()))
        }
        _ => bail!("give an experiment file or --pipeline PIPELINE.toml, not both"),
    }
}

/// The learning settings of the experiment's reference run ([`settings`]).
fn reference_settings(exp: &Experiment, configs: &[grid::Config]) -> Result<toml::Table> {
    let reference = (configs.iter().find(|c| c.is_reference()))
        .ok_or_else(|| anyhow!("{}: no reference configuration", exp.file.display()))?;
    let cfg = crate::config::PipelineConfig::load(&exp.pipeline, &reference.overrides)?;
    settings::of(&cfg)
}

/// Runs an experiment end to end: runs, results tables, summary, plots.
pub fn run(args: Args) -> Result<()> {
    let (file, sets) = experiment_file(&args)?;
    let mut exp = load(&file)?;
    exp.check_sets("--set", &sets)?;
    exp.set.extend(sets);
    let out = args
        .output
        .unwrap_or_else(|| Path::new("experiments/results").join(&exp.name));
    let configs = grid::expand(&exp)?;
    grid::check(&exp, &configs)?;
    let learning = reference_settings(&exp, &configs)?;
    let moved = settings::changes(&out, &learning)?;
    if !moved.is_empty() {
        eprintln!(
            "warning: the reference's settings differ from those of the results already in {} \
             (made earlier); the new figures do not compare with the old ones:\n  {}",
            out.display(),
            moved.join("\n  ")
        );
    }
    let runs = grid::runs(&configs, &exp.seeds, &out);
    let jobs = args
        .jobs
        .or(exp.jobs)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bin = std::env::current_exe().context("cannot find the gradsift binary")?;
    let inputs = runner::inputs_crc(&bin, &exp.pipeline)?;
    let inv = runner::Invocation {
        bin: &bin,
        mode: exp.mode,
        pipeline: &exp.pipeline,
        inputs,
    };
    let outcomes = runner::run_all(inv, &configs, &runs, jobs, args.fresh);
    let mut records = results::records(exp.metric, &runs, outcomes);
    results::write(&out, &exp, &configs, &records)?;
    settings::write(&out, &learning)?;
    let summary = summary::summarize(&exp, &configs, &records);
    print!("{}", summary.render(&configs));
    summary.write(&out, &configs)?;
    plot::all(&out, &exp, &configs, &summary)?;
    println!("results, summary, frontier and plots in {}", out.display());
    if args.confirm > 0 {
        let seeds = confirm::fresh_seeds(&exp.seeds, args.confirm);
        let set = confirm::configs(&summary);
        let more = confirm::runs_of(&set, grid::runs(&configs, &seeds, &out));
        let outcomes = runner::run_all(inv, &configs, &more, jobs, args.fresh);
        records.extend(results::records(exp.metric, &more, outcomes));
        let mut all = exp.clone();
        all.seeds.extend(&seeds);
        let by_config = summary::summarize(&all, &configs, &records).by_config;
        let rows = confirm::rows(&summary, &by_config, &seeds);
        print!(
            "{}",
            confirm::render(exp.metric, &rows, &configs, &all.seeds)
        );
        confirm::write(&out, exp.metric, &rows, &configs)?;
        println!("confirmation in {}", out.join("confirm.csv").display());
    }
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.status == results::Status::Failed)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed (see the error column of {})",
            failed.len(),
            records.len(),
            out.join("results.csv").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
pipeline = "p.toml"
metric = "mae"
seeds = [1, 2]
[reference]
set = ["selection.keep=1.0"]
[[family]]
name = "random"
axes = { "selection.keep" = [0.5, 0.7] }
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("exp/e.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        let e = parse(GOOD, Path::new("e.toml")).unwrap();
        assert_eq!(e.metric, Metric::Mae);
        assert_eq!(e.tolerance, 0.01);
        assert_eq!(e.families[0].axes["selection.keep"].len(), 2);
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_expectation() {
        let m = err(&GOOD.replace("\"mae\"", "\"accuracy\""));
        assert!(
            m.contains("exp/e.toml") && m.contains("key `metric`") && m.contains("mae"),
            "{m}"
        );
        let m = err(&GOOD.replace("seeds = [1, 2]", "seeds = [1, 2]\nseed = 3"));
        assert!(
            m.contains("exp/e.toml")
                && m.contains("unknown field `seed`")
                && m.contains("expected one of"),
            "{m}"
        );
        let m = err(&GOOD.replace("seeds = [1, 2]", "seeds = []"));
        assert!(m.contains("key `seeds`: expected a non-empty list"), "{m}");
        let m = err(&GOOD.replace("[0.5, 0.7]", "[]"));
        assert!(
            m.contains("key `family[0].axes.\"selection.keep\"`: expected a non-empty array"),
            "{m}"
        );
        let m = err(&GOOD.replace("\"selection.keep=1.0\"", "\"selection.keep\""));
        assert!(
            m.contains("key `reference.set[0]`: expected an override KEY=VALUE"),
            "{m}"
        );
        let m = err(&GOOD.replace("seeds = [1, 2]", "seeds = [1, 2]\ntolerance = -1"));
        assert!(
            m.contains("key `tolerance`: expected a relative slack"),
            "{m}"
        );
        let m = err(&GOOD.replace("name = \"random\"", "name = \"reference\""));
        assert!(m.contains("key `family[0].name`"), "{m}");
        let m = err(&GOOD.replace("seeds = [1, 2]", "seeds = [1, \"two\"]"));
        assert!(m.contains("key `seeds[1]`"), "{m}");
    }

    #[test]
    fn worse_by_follows_the_metric_direction() {
        assert!((Metric::Mae.worse_by(101.0, 100.0) - 0.01).abs() < 1e-12);
        assert!((Metric::Top1.worse_by(0.99, 1.0) - 0.01).abs() < 1e-12);
        assert!(Metric::Top1.worse_by(0.5, 0.4) < 0.0);
    }
}
