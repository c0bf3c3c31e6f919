//! The end-of-run report: what was seen, skipped, scored, trained and retained, how well the
//! model predicted next to its baselines, and what it cost. Written as JSON beside the score
//! file and printed as a table.

use std::collections::BTreeMap;

use comfy_table::{Cell, Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

use crate::learner::buffer::BufferStats;
use crate::learner::compute::ComputeReport;
use crate::learner::drift::{Detector, DriftConfig, DriftEvent, DriftMonitor, Reaction};
use crate::learner::eval::{BeamMetrics, ErrorMetrics, EvalSummary, KNN_K, PeriodReport};
use crate::learner::recovery::ChangeRecovery;

/// Replay buffer state at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct BufferReport {
    pub policy: String,
    pub len: usize,
    pub bytes: usize,
    pub capacity: usize,
    pub max_bytes: usize,
    #[serde(flatten)]
    pub stats: BufferStats,
}

/// Everything a run reports (see the module doc).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub pipeline_file: String,
    pub schema: String,
    pub attribution: String,
    pub importance: String,
    pub keep: f64,
    pub unbiased_q: f64,
    pub backend: String,
    pub hidden: Vec<usize>,
    pub micro_batch: usize,
    pub interrupted: bool,
    pub rows_read: u64,
    pub samples: u64,
    pub skipped: BTreeMap<String, u64>,
    pub skipped_total: u64,
    pub dead_lettered_rows: u64,
    /// Keys with feature state at the end, and keys forgotten at `features.max_keys`.
    pub keys_tracked: usize,
    pub keys_forgotten: u64,
    /// Models kept (1, or one per key under `model.scope = "per_key"`) and dropped at
    /// `model.max_models`.
    pub models: usize,
    pub models_dropped: u64,
    /// What the drift detectors found (none when `drift.enabled` is false).
    pub drift: DriftReport,
    /// The known change points (`evaluation.changes`): first detection, recovery samples.
    pub changes: Vec<ChangeRecovery>,
    /// The windowed metric over the stream (kept with `output.plot` or known changes), for
    /// `gradsift plot` to draw runs side by side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceReport>,
    /// Values clamped to their column's physical range (this process).
    pub values_clipped: u64,
    /// `model.decision = "switch"`: how often the two rules differed, and which one acted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_switch: Option<SwitchReport>,
    pub scored: u64,
    pub selected: u64,
    pub trained: u64,
    pub trained_fraction: f64,
    pub trained_fraction_after_warmup: f64,
    pub replayed: u64,
    pub retained: u64,
    pub buffer: BufferReport,
    pub backpropagated: u64,
    pub training_steps: u64,
    /// Trained rows whose loss weight `selection.clip` cut (since the run began: a resumed
    /// run's count includes the checkpoint's).
    pub rows_clipped: u64,
    /// Rows predicted by the averaged weights (`training.average_decay`; counted as
    /// `rows_clipped`).
    pub rows_averaged: u64,
    /// Updates skipped for a non-finite gradient, and returns to the last good weights.
    pub nonfinite_steps: u64,
    pub model_restores: u64,
    /// The model diverged: steps were skipped or predictions were not finite. Its metrics
    /// are then not figures to report.
    pub diverged: bool,
    pub last_train_loss: f64,
    pub metrics: EvalSummary,
    /// The same metrics per evaluation period (`[evaluation] periods`).
    pub periods: Vec<PeriodReport>,
    /// Work counted by the learner, and the saving against every-row training.
    pub compute: ComputeReport,
    pub selection_policy: String,
    pub replay_ratio: f64,
    pub replay_sampling: String,
    pub wall_s: f64,
    pub cpu_s: f64,
    /// CPU and channel-wait seconds of the source, learner and sink threads.
    pub stages: crate::stage_time::StageReport,
    pub samples_per_s: f64,
    /// Seconds from the first rows to the end (excludes start-up, e.g. a consumer-group join).
    pub active_s: f64,
    /// Present when checkpoints are on.
    pub checkpoint: Option<CheckpointReport>,
    /// Records written to the per-sample output topic.
    pub topic_records: Option<u64>,
    /// Estimated energy and carbon of this process, with the model used.
    pub energy: crate::energy::EnergyReading,
    pub outputs: BTreeMap<String, String>,
}

/// `model.decision = "switch"` in this process: rows on which the most probable class and
/// the least expected loss differed, and of those the rows acted on the most probable one.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SwitchReport {
    pub rows_differing: u64,
    pub acted_most_probable: u64,
}

/// Checkpoints of a run.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    pub path: String,
    /// Checkpoints written by this process.
    pub written: u64,
    pub last_bytes: u64,
    /// Wall time the learner's thread spent on them (segment roll, dead-letter sync, state
    /// copy); encoding, writing and syncing run on the checkpoint writer's thread.
    pub seconds: f64,
    /// Wall time of the whole checkpoints, the writer's encoding, writing and syncing
    /// included.
    #[serde(default)]
    pub write_seconds: f64,
    /// Samples the model had seen when this process resumed (none: started fresh).
    pub resumed_at_samples: Option<u64>,
    /// Restarts from a checkpoint over the pipeline's life.
    pub resumes: u64,
    /// Rows delivered again by the source but already covered by the checkpoint (skipped).
    pub rows_already_covered: u64,
}

fn f(v: f64) -> String {
    if v.abs() >= 1e5 || (v != 0.0 && v.abs() < 1e-3) {
        format!("{v:.4e}")
    } else {
        format!("{v:.4}")
    }
}

/// What a metric cell says when its figures are not numbers to trust.
fn not_a_number(n: u64, nonfinite: u64) -> Option<String> {
    if nonfinite > 0 {
        Some(format!("diverged ({nonfinite} non-finite)"))
    } else if n == 0 {
        Some("n/a".into())
    } else {
        None
    }
}

fn err_row(t: &mut Table, name: &str, m: &ErrorMetrics) {
    let cells = match not_a_number(m.n, m.nonfinite) {
        Some(why) => vec![why.clone(), why.clone(), why],
        None => vec![f(m.mae), f(m.rmse), format!("{:.2}", m.smape_pct)],
    };
    let mut row = vec![Cell::new(name), Cell::new(m.n)];
    row.extend(cells.into_iter().map(Cell::new));
    t.add_row(row);
}

fn beam_row(t: &mut Table, name: &str, m: &BeamMetrics) {
    let cells = match not_a_number(m.n, m.nonfinite) {
        Some(why) => vec![why.clone(), why.clone(), why.clone(), why],
        None => {
            let db = |v: f64| {
                if v.is_finite() {
                    format!("{v:.3}")
                } else {
                    "n/a".into()
                }
            };
            vec![
                format!("{:.4}", m.top1),
                format!("{:.4}", m.top3),
                db(m.power_loss_db),
                db(m.power_loss_db_pooled),
            ]
        }
    };
    let mut row = vec![Cell::new(name), Cell::new(m.n)];
    row.extend(cells.into_iter().map(Cell::new));
    t.add_row(row);
}

/// The `drift` block of a report.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub enabled: bool,
    /// Detections per detector.
    pub counts: BTreeMap<String, u64>,
    /// The first detections, in stream order.
    pub events: Vec<DriftEvent>,
    /// Reactions configured, how often the learner reacted, and the first samples it did at.
    pub reactions: Vec<Reaction>,
    pub reacted: u64,
    pub reacted_at: Vec<u64>,
}

impl DriftReport {
    pub fn new(cfg: &DriftConfig, m: &DriftMonitor) -> Self {
        let enabled = cfg.enabled;
        let detectors = [Detector::Adwin, Detector::PageHinkley, Detector::ScoreShift];
        DriftReport {
            enabled,
            counts: detectors
                .iter()
                .map(|d| (d.name().to_string(), m.counts[*d as usize]))
                .chain([
                    ("adwin_per_key".to_string(), m.key_counts[0]),
                    ("page_hinkley_per_key".to_string(), m.key_counts[1]),
                ])
                .collect(),
            events: m.events.clone(),
            reactions: cfg.reactions.clone(),
            reacted: m.reactions,
            reacted_at: m.reacted_at.clone(),
        }
    }

    fn text(&self) -> String {
        if !self.enabled {
            return "off".into();
        }
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let first: Vec<String> = self
            .events
            .iter()
            .take(6)
            .map(|e| format!("{}@{}", e.detector.name(), e.sample))
            .collect();
        let reacted = if self.reactions.is_empty() {
            String::new()
        } else {
            format!("; reacted {} times ({:?})", self.reacted, self.reactions)
        };
        if first.is_empty() {
            format!("none ({}){reacted}", counts.join(", "))
        } else {
            format!("{}; first: {}{reacted}", counts.join(", "), first.join(" "))
        }
    }
}

/// The run's windowed metric as a bounded series.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub metric: String,
    /// Samples in the window.
    pub window: usize,
    pub points: Vec<crate::learner::trace::TracePoint>,
}

/// One line per known change: where, the first detection, the recovery.
fn changes_text(changes: &[ChangeRecovery]) -> String {
    if changes.is_empty() {
        return "none declared (evaluation.changes)".into();
    }
    let one = |c: &ChangeRecovery| {
        let Some(at) = c.at else {
            return format!("{}: not reached", c.name);
        };
        let found = c
            .first_detection
            .as_ref()
            .map_or("not detected".into(), |d| {
                format!("{} after {} samples", d.detector, d.delay)
            });
        let back = c.recovery_samples.map_or("too short to tell".into(), |r| {
            let band = 100.0 * crate::learner::recovery::BAND;
            let own = c
                .recovery_samples_own_rows
                .map_or(String::new(), |o| format!(" ({o} over its own rows)"));
            format!("back within {band:.0}% in {r} samples{own}")
        });
        format!("{} @{at}: {found}, {back}", c.name)
    };
    changes.iter().map(one).collect::<Vec<_>>().join("; ")
}

impl RunReport {
    /// The counted saving, in FLOPs and back-propagated rows, against every-row training.
    fn compute_saved(&self) -> String {
        let c = &self.compute;
        if c.reference.flops.is_nan() || c.reference.flops <= 0.0 {
            return "n/a (nothing trained)".into();
        }
        format!(
            "{:.1}% of FLOPs, {:.1}% of back-propagated rows ({:.3e} vs {:.3e} FLOPs; \
             reference: every row, replay {})",
            100.0 * c.saved_flops_fraction,
            100.0 * c.saved_backward_fraction,
            c.learn_flops,
            c.reference.flops,
            c.reference_replay_ratio
        )
    }

    /// The summary tables as printed at the end of `gradsift run`.
    pub fn render(&self) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["stream", "value"]);
        let rows = self
            .input_rows()
            .into_iter()
            .chain(self.learning_rows())
            .chain(self.cost_rows());
        for (k, v) in rows {
            t.add_row(vec![k, v]);
        }
        if self.interrupted {
            t.add_row(vec![
                "interrupted".to_string(),
                "yes (shutdown signal)".to_string(),
            ]);
        }
        let m = self.metrics_table();
        let mut out = format!("{t}\n{m}\n");
        out.push_str(&format!("energy model: {}\n", self.energy.model));
        if !self.attribution.is_empty() {
            out.push_str(&format!("data: {}\n", self.attribution));
        }
        for (k, v) in &self.outputs {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out
    }

    /// What the run read and skipped, its keys, models and drift.
    fn input_rows(&self) -> Vec<(String, String)> {
        vec![
            (
                "pipeline".into(),
                format!(
                    "{} [{} scores, {} policy; keep {}; replay {} {}{}; {} backend]",
                    self.pipeline,
                    self.importance,
                    self.selection_policy,
                    self.keep,
                    self.replay_ratio,
                    self.replay_sampling,
                    if self.unbiased_q > 0.0 {
                        format!(", unbiased q {}", self.unbiased_q)
                    } else {
                        String::new()
                    },
                    self.backend
                ),
            ),
            ("rows read".into(), self.rows_read.to_string()),
            ("samples seen (valid)".into(), self.samples.to_string()),
            ("skipped".into(), self.skipped_total.to_string()),
        ]
        .into_iter()
        .chain(
            self.skipped
                .iter()
                .map(|(r, n)| (format!("  skipped: {r}"), n.to_string())),
        )
        .chain([
            (
                "dead-lettered rows".into(),
                self.dead_lettered_rows.to_string(),
            ),
            (
                "keys tracked / forgotten".into(),
                format!("{} / {}", self.keys_tracked, self.keys_forgotten),
            ),
            (
                "models kept / dropped".into(),
                format!("{} / {}", self.models, self.models_dropped),
            ),
            ("drift detections".into(), self.drift.text()),
            ("known changes".into(), changes_text(&self.changes)),
        ])
        .collect()
    }

    /// Selection, training and the buffer.
    fn learning_rows(&self) -> Vec<(String, String)> {
        let pct = |a: u64, b: u64| format!("{a} ({:.1}%)", 100.0 * a as f64 / b.max(1) as f64);
        let mut rows = vec![(
            "values clipped to their range".into(),
            self.values_clipped.to_string(),
        )];
        if let Some(d) = self.decision_switch {
            rows.push((
                "decision: rules differed / acted on most probable".into(),
                format!(
                    "{} / {}",
                    pct(d.rows_differing, self.samples),
                    pct(d.acted_most_probable, d.rows_differing)
                ),
            ));
        }
        rows.extend([
            ("scored".into(), self.scored.to_string()),
            ("selected".into(), pct(self.selected, self.samples)),
            ("trained (fresh)".into(), pct(self.trained, self.samples)),
            (
                "trained fraction after warm-up".into(),
                format!("{:.4}", self.trained_fraction_after_warmup),
            ),
            ("replayed rows trained".into(), self.replayed.to_string()),
            (
                "retained (admitted to buffer)".into(),
                self.retained.to_string(),
            ),
            (
                "buffer at end".into(),
                format!(
                    "{} / {} samples, {} / {} bytes ({} policy)",
                    self.buffer.len,
                    self.buffer.capacity,
                    self.buffer.bytes,
                    self.buffer.max_bytes,
                    self.buffer.policy
                ),
            ),
            (
                "buffer evicted / rescored".into(),
                format!(
                    "{} / {}",
                    self.buffer.stats.evicted, self.buffer.stats.rescored
                ),
            ),
            (
                "samples back-propagated".into(),
                self.backpropagated.to_string(),
            ),
            ("training steps".into(), self.training_steps.to_string()),
            (
                "rows clipped (selection.clip)".into(),
                self.rows_clipped.to_string(),
            ),
            (
                "rows predicted by averaged weights".into(),
                self.rows_averaged.to_string(),
            ),
            (
                "non-finite steps skipped / restores".into(),
                if self.diverged {
                    format!(
                        "{} / {}: THE MODEL DIVERGED (lower training.learning_rate?)",
                        self.nonfinite_steps, self.model_restores
                    )
                } else {
                    format!("{} / {}", self.nonfinite_steps, self.model_restores)
                },
            ),
        ]);
        rows
    }

    /// Compute, time, energy and what was written.
    fn cost_rows(&self) -> Vec<(String, String)> {
        [
            (
                "compute saved vs every-row training".into(),
                self.compute_saved(),
            ),
            (
                "learning CPU, energy (scoring / training)".into(),
                format!(
                    "{:.3} s ({:.3} / {:.3}), {:.2} J ({:.2} / {:.2}); inference {:.3} s",
                    self.compute.learn_cpu_s,
                    self.compute.scoring.work.cpu_s,
                    self.compute.training.work.cpu_s,
                    self.compute.scoring.energy_j + self.compute.training.energy_j,
                    self.compute.scoring.energy_j,
                    self.compute.training.energy_j,
                    self.compute.inference.work.cpu_s
                ),
            ),
            (
                "wall time".into(),
                format!("{:.2} s ({:.0} samples/s)", self.wall_s, self.samples_per_s),
            ),
            ("CPU time".into(), format!("{:.2} s", self.cpu_s)),
            (
                "energy (estimate)".into(),
                format!(
                    "{:.1} J, {:.3} mg CO2 ({}; model below)",
                    self.energy.joules,
                    self.energy.co2_grams * 1e3,
                    self.energy.source
                ),
            ),
        ]
        .into_iter()
        .chain(self.checkpoint.iter().map(|c| {
            (
                "checkpoints written".into(),
                format!(
                    "{} (last {} bytes, {:.3} s in all){}",
                    c.written,
                    c.last_bytes,
                    c.seconds,
                    match c.resumed_at_samples {
                        Some(n) => format!(
                            "; resumed at sample {n}, {} rows already covered",
                            c.rows_already_covered
                        ),
                        None => String::new(),
                    }
                ),
            )
        }))
        .chain(
            self.topic_records
                .map(|n| ("output topic records".into(), n.to_string())),
        )
        .collect()
    }

    /// The prequential metrics: whole stream, last window, baselines and periods.
    fn metrics_table(&self) -> Table {
        let mut m = Table::new();
        m.load_preset(UTF8_FULL_CONDENSED);
        match &self.metrics {
            EvalSummary::Regression(r) => {
                m.set_header(vec![
                    "prequential (regression)",
                    "n",
                    "MAE",
                    "RMSE",
                    "sMAPE %",
                ]);
                err_row(&mut m, "model, whole stream", &r.model);
                err_row(&mut m, "persistence, whole stream", &r.persistence);
                err_row(&mut m, "model, last window", &r.model_last_window);
                err_row(
                    &mut m,
                    "persistence, last window",
                    &r.persistence_last_window,
                );
                if r.seasonal.n > 0 {
                    err_row(
                        &mut m,
                        "model, rows with a seasonal value",
                        &r.model_on_seasonal_rows,
                    );
                    err_row(&mut m, "seasonal (same slot, one season back)", &r.seasonal);
                }
            }
            EvalSummary::Classification(c) => {
                m.set_header(vec![
                    "prequential (beam)",
                    "n",
                    "top-1",
                    "top-3",
                    "power loss dB",
                    "pooled dB",
                ]);
                beam_row(&mut m, "model, whole stream", &c.model);
                beam_row(&mut m, "model, last window", &c.model_last_window);
                let knn = format!("online {}-NN (raw position, same key)", KNN_K);
                beam_row(&mut m, "persistence (key's last label)", &c.persistence);
                beam_row(&mut m, &knn, &c.knn);
                if c.mlp_alone.n > 0 {
                    beam_row(&mut m, "MLP alone (the model is a blend)", &c.mlp_alone);
                }
            }
        }
        for p in &self.periods {
            let name = format!("model, period `{}`", p.name);
            match &p.metrics {
                EvalSummary::Regression(r) => err_row(&mut m, &name, &r.model),
                EvalSummary::Classification(c) => beam_row(&mut m, &name, &c.model),
            }
        }
        m
    }
}
