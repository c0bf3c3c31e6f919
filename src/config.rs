//! Pipeline configuration: a TOML file → typed settings, checked before anything runs.
//!
//! Every error names the file, the dotted key and what was expected, because a pipeline that
//! dies an hour into a replay over a typo costs more than one that refuses to start. Paths
//! inside the file (schema, source data) are relative to the file's own folder, so a
//! pipeline runs the same from any working directory; the output folder is relative to the
//! working directory. `--set key=value` overrides are applied before validation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointConfig;
use crate::energy::EnergyConfig;
use crate::learner::buffer::BufferConfig;
use crate::learner::eval::Boundary;
use crate::learner::importance::ImportanceMethod;
use crate::learner::model::Head;
use crate::learner::select::SelectionConfig;
use crate::learner::{LearnerConfig, ModelConfig, TrainingConfig};
use crate::offline::OfflineConfig;
use crate::sink::topic::TopicSinkConfig;
use crate::source::SourceConfig;
use crate::telemetry::TelemetryConfig;

/// `[importance]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportanceConfig {
    pub method: ImportanceMethod,
    /// `reducible`: every this-many-th sample is held out to fit the small model on.
    #[serde(default = "default_holdout")]
    pub holdout_every: u64,
}

fn default_holdout() -> u64 {
    10
}

/// `[evaluation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Samples in the "last window" metrics.
    #[serde(default = "default_eval_window")]
    pub window: usize,
    /// Named periods with their own metrics, e.g. a validation period to choose settings on
    /// and a later test period to report them on.
    #[serde(default)]
    pub periods: Vec<PeriodConfig>,
    /// Known change points of the stream (a new site, a holiday): the report gives, for
    /// each, the first drift detection after it and the samples the model took to recover.
    #[serde(default)]
    pub changes: Vec<PeriodConfig>,
}

/// One `[[evaluation.periods]]` entry: from a sample number or an RFC 3339 event time on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodConfig {
    pub name: String,
    pub from: PeriodStart,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PeriodStart {
    Sample(u64),
    Time(String),
}

impl PeriodStart {
    pub fn boundary(&self) -> Result<Boundary, String> {
        match self {
            PeriodStart::Sample(s) => Ok(Boundary::Sample(*s)),
            PeriodStart::Time(t) => chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| Boundary::Time(d.timestamp_micros()))
                .map_err(|e| format!("\"{t}\" ({e})")),
        }
    }
}

impl EvaluationConfig {
    /// The periods as the scoreboard takes them (validated at load).
    pub fn boundaries(&self) -> Vec<(String, Boundary)> {
        named_boundaries(&self.periods)
    }

    /// The known change points (validated at load).
    pub fn change_points(&self) -> Vec<(String, Boundary)> {
        named_boundaries(&self.changes)
    }
}

fn named_boundaries(v: &[PeriodConfig]) -> Vec<(String, Boundary)> {
    v.iter()
        .filter_map(|p| p.from.boundary().ok().map(|b| (p.name.clone(), b)))
        .collect()
}

/// `[compute]`: what compute saved is measured against.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    /// Replay ratio of the every-row training reference (default: `buffer.replay_ratio`).
    #[serde(default)]
    pub reference_replay_ratio: Option<f64>,
}

fn default_eval_window() -> usize {
    1000
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        EvaluationConfig {
            window: default_eval_window(),
            periods: Vec::new(),
            changes: Vec::new(),
        }
    }
}

/// Widest hidden layer `model.hidden` accepts.
const MAX_WIDTH: usize = 16_384;
/// Most weights between hidden layers (64 M: 256 MB of f32, 1 GB with Adam's moments).
const MAX_WEIGHTS: u128 = 64 << 20;

/// `[features]`: limits of the online feature state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// Keys (cells, squares) tracked at once; the least recently seen is forgotten beyond it.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// A value outside its column's physical range: dead-lettered (`dead_letter`) or
    /// clamped to the range (`clip`).
    #[serde(default)]
    pub out_of_range: crate::features::OutOfRange,
    /// A value further than this many running standard deviations from its column's running
    /// mean (after 1,000 values) is dead-lettered as `out_of_range`, for columns with or
    /// without a declared range: no real reading is that far out, and one that got into the
    /// running scalers would ruin them for good. 0 turns the check off.
    #[serde(default = "default_max_deviations")]
    pub max_deviations: f64,
}

fn default_max_keys() -> usize {
    100_000
}
fn default_max_deviations() -> f64 {
    1000.0
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            max_keys: default_max_keys(),
            out_of_range: Default::default(),
            max_deviations: default_max_deviations(),
        }
    }
}

/// `[output]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Folder for the report, the score file and dead letters (default `runs/NAME`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Write the per-sample score file.
    #[serde(default = "yes")]
    pub scores: bool,
    /// One record per sample to a Kafka topic.
    #[serde(default)]
    pub topic: Option<TopicSinkConfig>,
    /// Draw the windowed metric over the stream with the drift detections
    /// (`metric.png`/`.svg` beside the report; `gradsift run --plot`).
    #[serde(default)]
    pub plot: bool,
    /// Add each sample's model inputs to the score file (a `features` list column), to run a
    /// peer learner on exactly the same inputs.
    #[serde(default)]
    pub features: bool,
}

fn yes() -> bool {
    true
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: None,
            scores: true,
            topic: None,
            plot: false,
            features: false,
        }
    }
}

/// `[channels]`: capacities of the bounded queues between stages (backpressure).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Record batches in flight between the source and the learner.
    #[serde(default = "default_capacity")]
    pub batches: usize,
}

fn default_capacity() -> usize {
    4
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            batches: default_capacity(),
        }
    }
}

/// A whole pipeline file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    /// Schema file (relative to the pipeline file).
    pub schema: PathBuf,
    pub source: SourceConfig,
    #[serde(default)]
    pub model: ModelConfig,
    pub importance: ImportanceConfig,
    pub selection: SelectionConfig,
    pub buffer: BufferConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub evaluation: EvaluationConfig,
    #[serde(default)]
    pub features: FeatureConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub channels: ChannelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub energy: EnergyConfig,
    #[serde(default)]
    pub compute: ComputeConfig,
    /// `gradsift train` settings.
    #[serde(default)]
    pub offline: OfflineConfig,
    #[serde(default)]
    pub drift: crate::learner::drift::DriftConfig,
    /// The file this was read from (set by [`PipelineConfig::load`]).
    #[serde(skip)]
    pub file: PathBuf,
}

/// Parses `a.b.c=value`; the value is read as TOML (number, bool, array…) or else a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {spec}: expected KEY=VALUE"))?;
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts = key_path(key).ok_or_else(|| {
        anyhow!(
            "--set {spec}: `{}` is not a TOML key (a.b.c, or a.\"b.c\" for a dotted name)",
            key.trim()
        )
    })?;
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {spec}: `{p}` is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].clone(), value);
    Ok(())
}

/// The segments of a dotted TOML key, read by the TOML parser itself, so that a quoted
/// segment keeps its dots (`source.options."fetch.min.bytes"`, a librdkafka option).
fn key_path(key: &str) -> Option<Vec<String>> {
    let mut table: toml::Table = format!("{} = 0", key.trim()).parse().ok()?;
    let mut path = Vec::new();
    loop {
        let (k, v) = table.into_iter().next()?;
        path.push(k);
        match v {
            toml::Value::Table(inner) => table = inner,
            _ => return Some(path),
        }
    }
}

impl PipelineConfig {
    /// Reads, overrides, validates and resolves a pipeline file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut cfg: PipelineConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table))
                .map_err(|e| anyhow!("{}: key `{}`: {}", path.display(), e.path(), e.inner()))?;
        cfg.file = path.to_path_buf();
        cfg.validate()?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.schema = base.join(&cfg.schema);
        cfg.source.resolve_paths(base);
        Ok(cfg)
    }

    fn bad(&self, key: &str, expected: &str, found: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: key `{key}`: expected {expected}, found {found}",
            self.file.display()
        )
    }

    /// Checks that need the schema: a replay-buffer byte cap must hold one sample; a decision
    /// by expected loss needs per-class losses (`class_losses`: the schema's
    /// `evaluation.beam_power`).
    pub fn validate_with(&self, input_width: usize, class_losses: bool) -> Result<()> {
        use crate::learner::decision::Decision;
        let by_loss = match self.model.decision {
            Decision::Argmax => None,
            Decision::MinExpectedLoss => Some("\"min_expected_loss\""),
            Decision::Switch => Some("\"switch\""),
        };
        if let (Some(v), false) = (by_loss, class_losses) {
            return Err(self.bad(
                "model.decision",
                "\"argmax\" for a schema without per-class losses (`evaluation.beam_power`)",
                v,
            ));
        }
        let one = input_width * 4 + 1 + crate::learner::buffer::ENTRY_OVERHEAD;
        if self.buffer.max_bytes < one {
            return Err(self.bad(
                "buffer.max_bytes",
                &format!("at least {one} bytes (one sample of {input_width} features)"),
                self.buffer.max_bytes,
            ));
        }
        Ok(())
    }

    /// Every key's range and the keys' consistency; the first problem found is the error.
    fn validate(&self) -> Result<()> {
        self.validate_selection()?;
        self.validate_learning()?;
        self.validate_evaluation()?;
        self.validate_runtime()
    }

    /// `features.max_deviations`, `[selection]` and `[importance]`.
    fn validate_selection(&self) -> Result<()> {
        let d = self.features.max_deviations;
        if !(d == 0.0 || (d.is_finite() && d >= 10.0)) {
            return Err(self.bad(
                "features.max_deviations",
                "0 (off) or at least 10 standard deviations",
                d.to_string(),
            ));
        }
        let s = &self.selection;
        if !(s.keep > 0.0 && s.keep <= 1.0) {
            return Err(self.bad("selection.keep", "a fraction in (0, 1]", s.keep));
        }
        if !(0.0..1.0).contains(&s.unbiased_q) {
            return Err(self.bad(
                "selection.unbiased_q",
                "a probability in [0, 1)",
                s.unbiased_q,
            ));
        }
        if s.window == 0 {
            return Err(self.bad("selection.window", "at least 1 score", 0));
        }
        if !(0.0..1.0).contains(&s.trim) {
            return Err(self.bad("selection.trim", "a fraction in [0, 1)", s.trim));
        }
        let sp = &s.surprise;
        if !(sp.gamma >= 0.0 && sp.gamma.is_finite()) {
            return Err(self.bad("selection.surprise.gamma", "a number ≥ 0", sp.gamma));
        }
        if !(sp.min_keep > 0.0 && sp.min_keep <= 1.0) {
            return Err(self.bad(
                "selection.surprise.min_keep",
                "a fraction in (0, 1]",
                sp.min_keep,
            ));
        }
        if !(sp.short >= 1.0 && sp.long >= sp.short) {
            return Err(self.bad(
                "selection.surprise.long",
                "spans with 1 ≤ short ≤ long",
                format!("short {} long {}", sp.short, sp.long),
            ));
        }
        if let Err(why) =
            crate::learner::net::check_method(self.model.backend, self.importance.method)
        {
            return Err(self.bad("importance.method", &why, "exact_autodiff"));
        }
        if s.unit == crate::learner::select::SelectionUnit::MicroBatch
            && self.importance.method == ImportanceMethod::Reducible
        {
            return Err(self.bad(
                "selection.unit",
                "\"row\" with importance.method = \"reducible\" (its held-out rows are chosen row by row)",
                "micro_batch",
            ));
        }
        if !(0.0..1.0).contains(&s.clip) {
            return Err(self.bad("selection.clip", "a quantile in (0, 1), or 0 (off)", s.clip));
        }
        if s.clip > 0.0 && !self.importance.method.free_norms() {
            return Err(self.bad(
                "importance.method",
                "\"el2n\" or \"last_layer\" with selection.clip (it reads the free gradient norms of every row a step trains)",
                serde_json::to_value(self.importance.method)
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            ));
        }
        if self.importance.holdout_every < 2 {
            return Err(self.bad(
                "importance.holdout_every",
                "at least 2 (one sample in that many is held out)",
                self.importance.holdout_every,
            ));
        }
        Ok(())
    }

    /// `[buffer]`, `[training]`, `[drift]` and `[model]`.
    fn validate_learning(&self) -> Result<()> {
        let b = &self.buffer;
        if b.capacity == 0 {
            return Err(self.bad("buffer.capacity", "at least 1 sample", 0));
        }
        if b.max_bytes == 0 {
            return Err(self.bad("buffer.max_bytes", "at least 1 byte", 0));
        }
        if !(b.decay > 0.0 && b.decay <= 1.0) {
            return Err(self.bad("buffer.decay", "λ in (0, 1]", b.decay));
        }
        if !(b.replay_ratio >= 0.0 && b.replay_ratio <= 16.0) {
            return Err(self.bad("buffer.replay_ratio", "a ratio in [0, 16]", b.replay_ratio));
        }
        let t = &self.training;
        if t.micro_batch == 0 {
            return Err(self.bad("training.micro_batch", "at least 1 sample", 0));
        }
        if let Err((key, expected)) = self.drift.check() {
            return Err(anyhow!(
                "{}: key `{key}`: expected {expected}",
                self.file.display()
            ));
        }
        if let Some(b) = &self.model.blend
            && let Err(e) = b.check()
        {
            return Err(anyhow!(
                "{}: key `model.blend`: expected {e}",
                self.file.display()
            ));
        }
        let memory = self.model.decision_memory;
        if !(memory.is_finite() && memory >= 1.0) {
            return Err(self.bad("model.decision_memory", "a number ≥ 1 (rows)", memory));
        }
        let decay = self.model.decision_decay;
        if !(0.0..1.0).contains(&decay) {
            return Err(self.bad("model.decision_decay", "a number in [0, 1)", decay));
        }
        if !(0.0..1.0).contains(&t.average_decay) {
            let v = t.average_decay;
            return Err(self.bad("training.average_decay", "a number in [0, 1)", v));
        }
        if !(1..=64).contains(&t.steps_per_batch) {
            let v = t.steps_per_batch;
            return Err(self.bad("training.steps_per_batch", "1 to 64 steps", v));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(self.bad(
                "training.learning_rate",
                "a positive number",
                t.learning_rate,
            ));
        }
        if self.model.hidden.iter().any(|&w| w == 0 || w > MAX_WIDTH) {
            return Err(self.bad(
                "model.hidden",
                &format!("widths from 1 to {MAX_WIDTH}"),
                format!("{:?}", self.model.hidden),
            ));
        }
        let weights: u128 = self
            .model
            .hidden
            .windows(2)
            .map(|w| w[0] as u128 * w[1] as u128)
            .sum();
        if weights > MAX_WEIGHTS {
            return Err(self.bad(
                "model.hidden",
                &format!("at most {MAX_WEIGHTS} weights between hidden layers"),
                format!("{:?} ({weights} weights)", self.model.hidden),
            ));
        }
        Ok(())
    }

    /// The pipeline's name, `[evaluation]` and `[compute]`.
    fn validate_evaluation(&self) -> Result<()> {
        let plain = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if self.name.is_empty() || !self.name.chars().all(plain) || self.name.starts_with('.') {
            return Err(self.bad(
                "name",
                "a plain name of letters, digits, '.', '_' and '-', not starting with '.' (it names the folder under runs/)",
                format!("{:?}", self.name),
            ));
        }
        if self.evaluation.window == 0 {
            return Err(self.bad("evaluation.window", "at least 1 sample", 0));
        }
        for (list, entries) in [
            ("periods", &self.evaluation.periods),
            ("changes", &self.evaluation.changes),
        ] {
            let mut names = std::collections::BTreeSet::new();
            for (i, p) in entries.iter().enumerate() {
                let key = format!("evaluation.{list}[{i}]");
                if p.name.is_empty() || !names.insert(p.name.as_str()) {
                    return Err(self.bad(
                        &format!("{key}.name"),
                        "a unique, non-empty name",
                        &p.name,
                    ));
                }
                if let Err(found) = p.from.boundary() {
                    return Err(self.bad(
                        &format!("{key}.from"),
                        "a sample number or an RFC 3339 time such as \"2013-12-01T00:00:00Z\"",
                        found,
                    ));
                }
            }
        }
        // A row counts in the last listed period it has reached, so the list is in stream
        // order (a test period listed before validation took every held-out row).
        let starts: Vec<Boundary> = self
            .evaluation
            .boundaries()
            .into_iter()
            .map(|b| b.1)
            .collect();
        for (i, w) in starts.windows(2).enumerate() {
            let ordered = match (&w[0], &w[1]) {
                (Boundary::Sample(a), Boundary::Sample(b)) => a < b,
                (Boundary::Time(a), Boundary::Time(b)) => a < b,
                _ => false,
            };
            if !ordered {
                return Err(self.bad(
                    &format!("evaluation.periods[{}].from", i + 1),
                    "a start after the previous period's, of the same kind (sample numbers or times)",
                    format!("{:?}", self.evaluation.periods[i + 1].from),
                ));
            }
        }
        if let Some(r) = self.compute.reference_replay_ratio
            && !(0.0..=16.0).contains(&r)
        {
            return Err(self.bad("compute.reference_replay_ratio", "a ratio in [0, 16]", r));
        }
        Ok(())
    }

    /// Channels, checkpoints, telemetry, the offline mode, energy, outputs and the source.
    fn validate_runtime(&self) -> Result<()> {
        if self.channels.batches == 0 {
            return Err(self.bad("channels.batches", "at least 1 batch", 0));
        }
        let c = &self.checkpoint;
        if c.every_rows == 0 {
            return Err(self.bad("checkpoint.every_rows", "at least 1 row", 0));
        }
        if !(c.every_seconds > 0.0 && c.every_seconds.is_finite()) {
            return Err(self.bad(
                "checkpoint.every_seconds",
                "a positive number of seconds",
                c.every_seconds,
            ));
        }
        if self.telemetry.publish_ms == 0 {
            return Err(self.bad("telemetry.publish_ms", "at least 1 ms", 0));
        }
        if let Some((key, expected, found)) = self.offline.problem() {
            return Err(self.bad(key, expected, found));
        }
        if let Some((key, expected, found)) = self.energy.problem() {
            return Err(self.bad(key, expected, found));
        }
        if let Some(t) = &self.output.topic
            && t.brokers.is_none()
            && !matches!(self.source, SourceConfig::Kafka(_))
        {
            return Err(self.bad(
                "output.topic.brokers",
                "the brokers of the output topic (the source is not Kafka)",
                "nothing",
            ));
        }
        self.source
            .validate()
            .map_err(|(key, expected, found)| self.bad(&key, &expected, found))
    }

    /// The model backend's name, as reports and metrics label it.
    pub fn backend_name(&self) -> String {
        format!("{:?}", self.model.backend).to_lowercase()
    }

    /// The importance method's name, as reports and metrics label it.
    pub fn importance_name(&self) -> String {
        format!("{:?}", self.importance.method).to_lowercase()
    }

    /// Replay ratio of the every-row training reference.
    pub fn reference_replay_ratio(&self) -> f64 {
        self.compute
            .reference_replay_ratio
            .unwrap_or(self.buffer.replay_ratio)
    }

    /// The learner's settings for rows `inputs` features wide; `reference_replay_ratio` is
    /// the every-row training its steps book their saving against (0: none booked per step).
    pub fn learner_config(
        &self,
        inputs: usize,
        head: Head,
        reference_replay_ratio: f64,
    ) -> LearnerConfig {
        LearnerConfig {
            inputs,
            head,
            model: self.model.clone(),
            importance: self.importance.method,
            selection: self.selection.clone(),
            buffer: self.buffer.clone(),
            training: self.training.clone(),
            reference_replay_ratio,
            holdout_every: self.importance.holdout_every,
        }
    }

    /// The output folder.
    pub fn output_dir(&self) -> PathBuf {
        self.output
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// Where checkpoints go.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint
            .path
            .clone()
            .unwrap_or_else(|| self.output_dir().join("checkpoint.bin"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("p.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    const GOOD: &str = r#"
name = "t"
schema = "s.json"
[source]
kind = "parquet"
path = "x.parquet"
[importance]
method = "exact"
[selection]
keep = 0.8
[buffer]
capacity = 10
max_bytes = 100000
"#;

    #[test]
    fn absurd_sizes_and_names_fail_at_start() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), GOOD);
        let refused = |set: &str, key: &str, says: &str| {
            let e = PipelineConfig::load(&p, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("p.toml") && e.contains(key) && e.contains(says),
                "{set}: {e}"
            );
        };
        // Issue 10, defect 15: OOM-killed and aborted before.
        refused(
            "model.hidden=[100000000]",
            "model.hidden",
            "widths from 1 to 16384",
        );
        refused(
            "model.hidden=[10000, 10000]",
            "model.hidden",
            "weights between hidden layers",
        );
        // Wrote outside runs/ before.
        refused("name=\"../x\"", "`name`", "plain name");
        refused("name=\"/tmp/x\"", "`name`", "plain name");
        // A deviation bound that would refuse ordinary readings.
        refused(
            "features.max_deviations=3",
            "features.max_deviations",
            "at least 10",
        );
        let cfg = PipelineConfig::load(&p, &["buffer.max_bytes=100".into()]).unwrap();
        let e = cfg.validate_with(16, false).unwrap_err().to_string();
        assert!(
            e.contains("buffer.max_bytes") && e.contains("one sample"),
            "{e}"
        );
        let cfg = PipelineConfig::load(&p, &[]).unwrap();
        assert!(cfg.validate_with(16, false).is_ok());
        let cfg = PipelineConfig::load(&p, &["model.decision=\"min_expected_loss\"".into()]);
        let e = cfg
            .unwrap()
            .validate_with(16, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.decision") && e.contains("beam_power"),
            "{e}"
        );
        let cfg = PipelineConfig::load(&p, &["model.decision=\"min_expected_loss\"".into()]);
        assert!(cfg.unwrap().validate_with(16, true).is_ok());
        let cfg = PipelineConfig::load(&p, &["model.decision=\"switch\"".into()]).unwrap();
        let e = cfg.validate_with(16, false).unwrap_err().to_string();
        assert!(e.contains("model.decision") && e.contains("switch"), "{e}");
        assert!(cfg.validate_with(16, true).is_ok());
    }

    /// `--set` keys are TOML keys: a quoted segment keeps its dots (librdkafka's options
    /// are named so), and a key that is not TOML is refused by name.
    #[test]
    fn set_keys_are_read_as_toml_keys() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "source.options.\"fetch.min.bytes\"=\"1\"").unwrap();
        apply_override(&mut t, "training.seed=3").unwrap();
        let options = t["source"]["options"].as_table().unwrap();
        assert_eq!(options["fetch.min.bytes"].as_str(), Some("1"));
        assert_eq!(t["training"]["seed"].as_integer(), Some(3));
        let err = apply_override(&mut t, "a..b=1").unwrap_err().to_string();
        assert!(err.contains("`a..b` is not a TOML key"), "{err}");
    }

    #[test]
    fn good_file_loads_and_resolves_paths() {
        let d = tempfile::tempdir().unwrap();
        let cfg = PipelineConfig::load(&write(d.path(), GOOD), &[]).unwrap();
        assert_eq!(cfg.schema, d.path().join("s.json"));
        assert_eq!(cfg.selection.keep, 0.8);
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &GOOD.replace("keep = 0.8", "keep = \"most\""));
        let e = PipelineConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("p.toml") && e.contains("selection.keep") && e.contains("expected f64"),
            "{e}"
        );

        let e = PipelineConfig::load(&write(d.path(), GOOD), &["selection.keep=1.5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("selection.keep") && e.contains("(0, 1]") && e.contains("1.5"),
            "{e}"
        );

        for (set, key) in [
            ("drift.adwin_delta=2.0", "drift.adwin_delta"),
            ("drift.recent_half_life=0.5", "drift.recent_half_life"),
            ("drift.score_season=100", "drift.score_season"),
            ("drift.page_hinkley_delta=inf", "drift.page_hinkley_delta"),
            ("drift.score_c_alpha=inf", "drift.score_c_alpha"),
            ("drift.recovery_samples=0", "drift.recovery_samples"),
            ("offline.patience=0", "offline.patience"),
            ("training.steps_per_batch=0", "training.steps_per_batch"),
            ("training.average_decay=1.0", "training.average_decay"),
            ("model.blend={mode=\"schedule\", n0=0.0}", "model.blend"),
            (
                "model.blend={mode=\"bayes\", learn_rate=-0.1}",
                "model.blend",
            ),
            ("model.decision_memory=0.5", "model.decision_memory"),
            ("model.decision_decay=1.0", "model.decision_decay"),
            ("model.decision_scope=\"site\"", "decision_scope"),
            (
                "evaluation.periods=[{name=\"validation\", from=600}, {name=\"test\", from=500}]",
                "evaluation.periods[1].from",
            ),
            (
                "evaluation.periods=[{name=\"validation\", from=5}, {name=\"test\", from=\"2013-12-01T00:00:00Z\"}]",
                "evaluation.periods[1].from",
            ),
        ] {
            let e = PipelineConfig::load(&write(d.path(), GOOD), &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("p.toml") && e.contains(key) && e.contains("expected"),
                "{e}"
            );
        }

        let p = write(
            d.path(),
            &GOOD.replace("capacity = 10", "capacity = 10\ncapacty = 3"),
        );
        let e = PipelineConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("buffer") && e.contains("capacty"), "{e}");

        // burn's autodiff route needs a burn backend; the default is the fused kernel.
        let p = write(
            d.path(),
            &GOOD.replace("method = \"exact\"", "method = \"exact_autodiff\""),
        );
        let e = PipelineConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("importance.method") && e.contains("model.backend = \"flex\""),
            "{e}"
        );
        let with_flex = ["model.backend=\"flex\"".to_string()];
        assert!(PipelineConfig::load(&p, &with_flex).is_ok());

        let p = write(
            d.path(),
            &GOOD.replace("method = \"exact\"", "method = \"grand\""),
        );
        let e = PipelineConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("importance.method") && e.contains("exact_autodiff"),
            "{e}"
        );

        let e = PipelineConfig::load(
            &write(d.path(), GOOD),
            &["telemetry.listen=\"localhost:nine\"".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("telemetry.listen") && e.contains("socket address"),
            "{e}"
        );
        for list in ["periods", "changes"] {
            let set = format!("evaluation.{list}=[{{name=\"test\", from=\"2013-13-01\"}}]");
            let e = PipelineConfig::load(&write(d.path(), GOOD), &[set])
                .unwrap_err()
                .to_string();
            let key = format!("evaluation.{list}[0].from");
            assert!(e.contains(&key) && e.contains("RFC 3339"), "{e}");
        }
        let e = PipelineConfig::load(&write(d.path(), GOOD), &["selection.trim=1.0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("selection.trim") && e.contains("[0, 1)"), "{e}");
        let e = PipelineConfig::load(&write(d.path(), GOOD), &["energy.pue=0.5".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("energy.pue") && e.contains("≥ 1"), "{e}");
        let sets = [
            r#"selection.unit="micro_batch""#.into(),
            r#"importance.method="reducible""#.into(),
        ];
        let e = PipelineConfig::load(&write(d.path(), GOOD), &sets)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("selection.unit") && e.contains("reducible"),
            "{e}"
        );
        let sets = [
            "selection.clip=0.9".into(),
            r#"importance.method="exact""#.into(),
        ];
        let e = PipelineConfig::load(&write(d.path(), GOOD), &sets)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("importance.method") && e.contains("selection.clip") && e.contains("exact"),
            "{e}"
        );
        let e = PipelineConfig::load(&write(d.path(), GOOD), &["selection.clip=1.0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("selection.clip") && e.contains("(0, 1)"), "{e}");
        let e = PipelineConfig::load(&write(d.path(), GOOD), &[r#"selection.unit="rows""#.into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("selection") && e.contains("micro_batch"), "{e}");
    }
}
