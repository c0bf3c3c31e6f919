//! The reference run's learning settings, written beside an experiment's results as
//! `settings.toml`. An experiment file sets only what it varies; every other setting comes
//! from its pipeline, which keeps changing as defaults are chosen. So a re-run months later
//! can silently measure another reference (session 22 found the beam reference had moved
//! from two optimiser steps per micro-batch to one). Two runs' figures compare only if these
//! settings agree: a run into a folder whose `settings.toml` differs says which keys moved.
//!
//! Kept: everything that changes what is learnt or measured (model, training but its seed,
//! selection, importance, buffer, features, evaluation, compute, drift, offline, the source's
//! batch size, row limit and injection) and a checksum of the schema file. Left out: where
//! files are and where output goes, telemetry, energy, checkpoints and channel sizes.

use std::path::Path;

use anyhow::{Context, Result, anyhow};

use crate::config::PipelineConfig;

/// The file name beside `results.csv`.
pub const FILE: &str = "settings.toml";

/// Top-level tables that only say where things go or how they are reported.
const LEFT_OUT: [&str; 7] = [
    "name",
    "output",
    "channels",
    "checkpoint",
    "telemetry",
    "energy",
    "schema",
];
/// Source keys that change what is learnt (the rest name files, brokers and topics).
const SOURCE_KEPT: [&str; 4] = ["kind", "batch_size", "max_rows", "inject"];

/// The learning settings of `cfg` (see the module doc).
pub fn of(cfg: &PipelineConfig) -> Result<toml::Table> {
    let value = toml::Value::try_from(cfg).context("cannot write the pipeline's settings")?;
    let toml::Value::Table(mut t) = value else {
        return Err(anyhow!("a pipeline's settings are a table"));
    };
    for k in LEFT_OUT {
        t.remove(k);
    }
    if let Some(toml::Value::Table(source)) = t.get_mut("source") {
        source.retain(|k, _| SOURCE_KEPT.contains(&k));
    }
    if let Some(toml::Value::Table(training)) = t.get_mut("training") {
        training.remove("seed");
    }
    let schema = std::fs::read(&cfg.schema)
        .with_context(|| format!("cannot read the schema {}", cfg.schema.display()))?;
    let crc = i64::from(crc32fast::hash(&schema));
    t.insert("schema_crc32".into(), toml::Value::Integer(crc));
    Ok(t)
}

/// Every setting that differs between `old` and `new`, as `key: old → new` (sorted by key;
/// "unset" where one side lacks it).
pub fn diff(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let (a, b): (
        std::collections::BTreeMap<_, _>,
        std::collections::BTreeMap<_, _>,
    ) = (a.into_iter().collect(), b.into_iter().collect());
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&String>| v.map_or("unset".to_string(), Clone::clone);
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// `(dotted key, value as TOML)` of every leaf (arrays are leaves).
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            v => out.push((key, v.to_string())),
        }
    }
}

/// How `settings` differ from those in `OUT/settings.toml` (none when there are none: a first
/// run, or results made before this file existed).
pub fn changes(out: &Path, settings: &toml::Table) -> Result<Vec<String>> {
    let path = out.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let old: toml::Table = text
                .parse()
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            Ok(diff(&old, settings))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `settings` as `OUT/settings.toml` (once the results beside it are written).
pub fn write(out: &Path, settings: &toml::Table) -> Result<()> {
    let path = out.join(FILE);
    let text = format!(
        "# The reference run's learning settings when these results were made (written by\n\
         # `gradsift experiment`; src/experiment/settings.rs). A re-run compares its own.\n{}",
        toml::to_string(settings).context("cannot write the settings")?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milan(sets: &[&str]) -> toml::Table {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/milan-replay.toml");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        of(&PipelineConfig::load(&p, &sets).unwrap()).unwrap()
    }

    #[test]
    fn learning_settings_keep_what_is_learnt_and_leave_out_where_things_go() {
        let s = milan(&[]);
        assert!(s.contains_key("model") && s.contains_key("buffer"));
        let schema = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/milan_internet.json"),
        )
        .unwrap();
        let crc = i64::from(crc32fast::hash(&schema));
        assert_eq!(s["schema_crc32"].as_integer(), Some(crc));
        for k in ["output", "telemetry", "schema", "name"] {
            assert!(!s.contains_key(k), "{k}");
        }
        assert!(!s["source"].as_table().unwrap().contains_key("path"));
        assert!(!s["training"].as_table().unwrap().contains_key("seed"));
        // Where a run writes, its seed and its telemetry do not count; what it learns does.
        let same = milan(&[
            "output.dir=\"/elsewhere\"",
            "training.seed=99",
            "telemetry.enabled=false",
        ]);
        assert!(diff(&s, &same).is_empty(), "{:?}", diff(&s, &same));
        let moved = milan(&["training.steps_per_batch=2", "buffer.replay_ratio=3.0"]);
        assert_eq!(
            diff(&s, &moved),
            [
                "buffer.replay_ratio: 2.0 → 3.0",
                "training.steps_per_batch: 1 → 2"
            ]
        );
    }

    #[test]
    fn a_rerun_into_the_same_folder_says_which_settings_moved() {
        let d = tempfile::tempdir().unwrap();
        let s = milan(&[]);
        assert!(changes(d.path(), &s).unwrap().is_empty(), "a first run");
        write(d.path(), &s).unwrap();
        assert!(
            changes(d.path(), &s).unwrap().is_empty(),
            "the same settings"
        );
        let moved = milan(&["model.hidden=[32]"]);
        assert_eq!(
            changes(d.path(), &moved).unwrap(),
            ["model.hidden: [64, 64] → [32]"]
        );
        write(d.path(), &moved).unwrap();
        assert!(changes(d.path(), &moved).unwrap().is_empty());
        let mut gone = moved.clone();
        gone.remove("drift");
        let c = changes(d.path(), &gone).unwrap();
        assert!(
            !c.is_empty() && c.iter().all(|c| c.ends_with("→ unset")),
            "{c:?}"
        );
        std::fs::write(d.path().join(FILE), "not toml = = 1").unwrap();
        let e = changes(d.path(), &s).unwrap_err().to_string();
        assert!(e.contains(FILE), "{e}");
    }
}
