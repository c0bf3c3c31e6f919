//! The grid: an experiment file → configurations (the reference, then each family's
//! cartesian product of axis values) → runs (configuration × seed), each with its `--set`
//! overrides and its output folder. Kept apart from running so the expansion (labels, TOML
//! quoting, folder names) is tested without a subprocess.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use super::Experiment;
use crate::config::PipelineConfig;

/// The family name of the full-data configuration.
pub const REFERENCE: &str = "reference";
/// The family that is the equal-compute baseline.
pub const RANDOM: &str = "random";

/// One pipeline configuration of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub family: String,
    /// `family/key=value,key=value` (just `family` without axes).
    pub label: String,
    /// The label as a folder name.
    pub slug: String,
    /// Axis setting → value as shown (strings unquoted).
    pub axes: Vec<(String, String)>,
    /// `--set` overrides: the experiment's, the family's, then the axis values.
    pub overrides: Vec<String>,
}

impl Config {
    pub fn is_reference(&self) -> bool {
        self.family == REFERENCE
    }

    /// The value this configuration sets for `key` (the last override naming it), as written.
    pub fn value(&self, key: &str) -> Option<String> {
        self.overrides.iter().rev().find_map(|o| {
            let (k, v) = o.split_once('=')?;
            (k.trim() == key).then(|| unquote(v.trim()))
        })
    }
}

/// One run: a configuration with a seed, and where it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub config: usize,
    pub seed: u64,
    pub dir: PathBuf,
}

/// A TOML value as the right-hand side of a `--set` override (strings quoted as TOML strings).
pub fn override_text(v: &toml::Value) -> String {
    v.to_string()
}

/// A TOML value as shown in a label: strings without their quotes.
pub fn display_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn unquote(v: &str) -> String {
    match format!("v = {v}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(toml::Value::String(s)) => s,
            _ => v.to_string(),
        },
        Err(_) => v.to_string(),
    }
}

/// Whether two override values are the same setting (numbers compared as numbers).
pub fn same_value(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a == b,
        },
        (None, None) => true,
        _ => false,
    }
}

/// Every combination of the axes' values, in order (the last axis varies fastest).
pub fn product(axes: &BTreeMap<String, Vec<toml::Value>>) -> Vec<Vec<(String, toml::Value)>> {
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (key, values) in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    combos
}

/// A label as a folder name: `/` → `__`; letters, digits, `.`, `-`, `_`, `=` kept; the rest `_`.
pub fn slug(label: &str) -> String {
    label
        .replace('/', "__")
        .chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=') => c,
            _ => '_',
        })
        .collect()
}

fn config(family: &str, base: Vec<String>, combo: Vec<(String, toml::Value)>) -> Config {
    let axes: Vec<(String, String)> = combo
        .iter()
        .map(|(k, v)| (k.clone(), display_value(v)))
        .collect();
    let shown: Vec<String> = axes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let label = if shown.is_empty() {
        family.to_string()
    } else {
        format!("{family}/{}", shown.join(","))
    };
    let mut overrides = base;
    overrides.extend(
        combo
            .iter()
            .map(|(k, v)| format!("{k}={}", override_text(v))),
    );
    Config {
        family: family.to_string(),
        slug: slug(&label),
        label,
        axes,
        overrides,
    }
}

/// The reference, then every family's configurations.
pub fn expand(exp: &Experiment) -> Result<Vec<Config>> {
    let with = |sets: &[String]| exp.set.iter().chain(sets).cloned().collect::<Vec<_>>();
    let mut configs = vec![config(REFERENCE, with(&exp.reference.set), vec![])];
    for f in &exp.families {
        for combo in product(&f.axes) {
            configs.push(config(&f.name, with(&f.set), combo));
        }
    }
    let mut slugs = BTreeMap::new();
    for c in &configs {
        if let Some(other) = slugs.insert(c.slug.clone(), c.label.clone()) {
            bail!(
                "{}: configurations `{other}` and `{}` would share the folder {}",
                exp.file.display(),
                c.label,
                c.slug
            );
        }
    }
    Ok(configs)
}

/// Loads the pipeline with every configuration's overrides, so a typo fails before any run.
pub fn check(exp: &Experiment, configs: &[Config]) -> Result<()> {
    for c in configs {
        PipelineConfig::load(&exp.pipeline, &c.overrides)
            .map_err(|e| anyhow!("{}: configuration `{}`: {e:#}", exp.file.display(), c.label))?;
    }
    Ok(())
}

/// `OUT/runs/<slug>/seed-<s>`.
pub fn run_dir(out: &Path, config: &Config, seed: u64) -> PathBuf {
    out.join("runs")
        .join(&config.slug)
        .join(format!("seed-{seed}"))
}

/// Every configuration × seed, configuration-major.
pub fn runs(configs: &[Config], seeds: &[u64], out: &Path) -> Vec<Run> {
    let mut runs = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        for &seed in seeds {
            runs.push(Run {
                config: i,
                seed,
                dir: run_dir(out, c, seed),
            });
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp() -> Experiment {
        super::super::parse(
            r#"
name = "t"
pipeline = "p.toml"
metric = "mae"
seeds = [1, 2]
set = ["source.max_rows=100"]
[reference]
set = ["selection.keep=1.0"]
[[family]]
name = "random"
set = ["importance.method=\"random\""]
axes = { "selection.keep" = [0.5, 0.7], "buffer.replay_ratio" = [1.0, 2, 3.5] }
[[family]]
name = "trim el2n"
set = ["importance.method=\"el2n\""]
axes = { "buffer.policy" = ["fifo", "importance"] }
"#,
            Path::new("e.toml"),
        )
        .unwrap()
    }

    #[test]
    fn expansion_is_the_cartesian_product_after_the_reference() {
        let c = expand(&exp()).unwrap();
        assert_eq!(c.len(), 1 + 2 * 3 + 2);
        assert_eq!(c[0].label, "reference");
        assert!(c[0].is_reference());
        assert_eq!(
            c[0].overrides,
            ["source.max_rows=100", "selection.keep=1.0"]
        );
        // Axes sorted by key; the last varies fastest.
        let labels: Vec<_> = c[1..7].iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "random/buffer.replay_ratio=1.0,selection.keep=0.5",
                "random/buffer.replay_ratio=1.0,selection.keep=0.7",
                "random/buffer.replay_ratio=2,selection.keep=0.5",
                "random/buffer.replay_ratio=2,selection.keep=0.7",
                "random/buffer.replay_ratio=3.5,selection.keep=0.5",
                "random/buffer.replay_ratio=3.5,selection.keep=0.7",
            ]
        );
        assert_eq!(
            c[1].overrides,
            [
                "source.max_rows=100",
                "importance.method=\"random\"",
                "buffer.replay_ratio=1.0",
                "selection.keep=0.5"
            ]
        );
    }

    #[test]
    fn strings_are_quoted_in_overrides_and_bare_in_labels() {
        let c = expand(&exp()).unwrap();
        let last = c.last().unwrap();
        assert_eq!(last.label, "trim el2n/buffer.policy=importance");
        assert_eq!(
            last.overrides.last().unwrap(),
            "buffer.policy=\"importance\""
        );
        assert_eq!(last.slug, "trim_el2n__buffer.policy=importance");
        assert_eq!(last.value("importance.method").as_deref(), Some("el2n"));
        assert_eq!(
            last.axes,
            [("buffer.policy".to_string(), "importance".to_string())]
        );
        let v: toml::Value = "a\"b".into();
        // Any valid TOML string form will do (toml may pick a literal string): it round-trips.
        assert_eq!(unquote(&override_text(&v)), "a\"b");
        assert!(override_text(&v).starts_with(['"', '\'']));
    }

    #[test]
    fn values_compare_as_numbers() {
        assert!(same_value(Some("1"), Some("1.0")));
        assert!(!same_value(Some("0.5"), Some("0.7")));
        assert!(same_value(None, None));
        assert!(!same_value(Some("fifo"), None));
    }

    #[test]
    fn runs_are_configurations_times_seeds_in_their_own_folders() {
        let c = expand(&exp()).unwrap();
        let r = runs(&c, &[1, 2], Path::new("out"));
        assert_eq!(r.len(), c.len() * 2);
        assert_eq!(r[1].seed, 2);
        assert_eq!(r[1].dir, Path::new("out/runs/reference/seed-2"));
    }
}
