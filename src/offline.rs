//! Offline training, the published setting (`gradsift train`): several epochs over a Parquet
//! archive split in time, with the selection policy applied per epoch.
//!
//! The archive goes through the same source → decode → features path as a live run (so the
//! features are the ones a deployment would compute), and is split by the pipeline's
//! evaluation periods: rows before the `validation` period train, rows from it on are held
//! out. After `warmup_epochs` on every row, each epoch trains the rows the policy picks from
//! the scores of the previous passes: a trained row's score comes free with its training pass
//! (the ghost norm of its backward, or a proxy of its forward); a pruned row keeps its last
//! one. The last `anneal` fraction of epochs trains every row again (InfoBatch); when early
//! stopping ends training sooner, those epochs run at that point, then it stops. Early
//! stopping watches the validation period; the best epoch's model is reported on every period,
//! so settings are chosen on validation and judged on test. Work is counted as online, with
//! every-row training of the same epochs as the reference.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::learner::LearnerRng;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::energy::{EnergyMeter, EnergyReading};
use crate::features::{FeatureEngine, Samples};
use crate::learner::OnlineLearner;
use crate::learner::compute::{ComputeReport, Work};
use crate::learner::decision::{Decision, LossTable, RuleRecord};
use crate::learner::eval::{Boundary, EvalSummary, Observation, PeriodReport, Scoreboard};
use crate::learner::importance::ImportanceMethod;
use crate::learner::model::Head;
use crate::learner::select::Selector;
use crate::pipeline::{RunOptions, count_skip, decode_rows, feature_engine};
use crate::schema::Schema;
use crate::shutdown::Shutdown;
use crate::sink::dead_letter::{DeadLetter, DeadLetterSink};
use crate::source::{SourceConfig, SourceEvent, parquet};

/// `[offline]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    /// Most epochs.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Rows per optimiser step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// First epochs on every row (their passes give the first scores).
    #[serde(default = "one")]
    pub warmup_epochs: usize,
    /// Fraction of the last epochs that train every row again.
    #[serde(default)]
    pub anneal: f64,
    /// Epochs without a better validation metric before stopping.
    #[serde(default = "default_patience")]
    pub patience: usize,
}

fn default_epochs() -> usize {
    30
}
fn default_batch() -> usize {
    64
}
fn one() -> usize {
    1
}
fn default_patience() -> usize {
    5
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig {
            epochs: default_epochs(),
            batch_size: default_batch(),
            warmup_epochs: one(),
            anneal: 0.0,
            patience: default_patience(),
        }
    }
}

impl OfflineConfig {
    /// The first problem with these settings: (key, expected, found).
    pub fn problem(&self) -> Option<(&'static str, &'static str, String)> {
        if self.epochs == 0 {
            return Some(("offline.epochs", "at least 1 epoch", "0".into()));
        }
        if self.batch_size == 0 {
            return Some(("offline.batch_size", "at least 1 row", "0".into()));
        }
        if self.patience == 0 {
            return Some((
                "offline.patience",
                "at least 1 epoch without improvement",
                "0".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.anneal) {
            return Some((
                "offline.anneal",
                "a fraction in [0, 1)",
                self.anneal.to_string(),
            ));
        }
        None
    }
}

/// One epoch in the report.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub rows_trained: usize,
    /// Every row (warm-up, annealing) or the policy's choice.
    pub full: bool,
    /// The early-stopping figure on the validation period (lower is better).
    pub validation: f64,
}

/// What `gradsift train` reports (the fields an experiment reads are named as in a run's).
#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    pub pipeline: String,
    pub mode: &'static str,
    pub importance: String,
    pub selection_policy: String,
    pub keep: f64,
    pub samples: u64,
    pub train_rows: usize,
    pub held_out_rows: usize,
    pub skipped: BTreeMap<String, u64>,
    pub dead_lettered_rows: u64,
    pub epochs_run: usize,
    pub best_epoch: usize,
    /// Rows trained in the policy's epochs / (train rows × those epochs).
    pub trained_fraction_after_warmup: f64,
    pub history: Vec<EpochReport>,
    /// The best epoch's model over every held-out row, and per period.
    pub metrics: EvalSummary,
    pub periods: Vec<PeriodReport>,
    pub compute: ComputeReport,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub energy: EnergyReading,
    pub outputs: BTreeMap<String, String>,
    /// Non-finite steps were skipped (the guard went back to earlier weights) or the best
    /// model predicts non-finite values: the figures are not ones to report (as a run's).
    pub diverged: bool,
    /// A shutdown signal ended training before its epochs or early stopping did.
    pub interrupted: bool,
}

/// The archive as samples, with what did not become one.
#[derive(Default)]
struct Archive {
    samples: Samples,
    skipped: BTreeMap<String, u64>,
    dead_rows: u64,
}

/// Reads the archive through decode and features; bad input is dead-lettered to `dead`.
async fn load(
    cfg: &PipelineConfig,
    schema: &Arc<Schema>,
    features: &mut FeatureEngine,
    dead: &mut DeadLetterSink,
    shutdown: &Shutdown,
) -> Result<Archive> {
    let SourceConfig::Parquet(src) = cfg.source.clone() else {
        bail!(
            "{}: key `source.kind`: expected \"parquet\" (`gradsift train` reads an archive), found \"kafka\"",
            cfg.file.display()
        );
    };
    let files = src.files(schema)?;
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(cfg.channels.batches);
    let (sc, sd) = (schema.clone(), shutdown.clone());
    let reader = tokio::task::spawn_blocking(move || {
        let tx = crate::source::EventSender::new(tx, Default::default());
        parquet::replay(&src, &sc, &files, Default::default(), tx, &sd)
    });
    let decoder = Decoder::new(schema.clone());
    let mut a = Archive::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            SourceEvent::Unreadable(u) => {
                count_skip(&mut a.skipped, &u.reason, u.rows);
                a.dead_rows += u.rows;
                dead.send(&DeadLetter::unreadable(&u))?;
            }
            SourceEvent::Batch { batch, origins, .. } => {
                let (skipped, dead_rows) = (&mut a.skipped, &mut a.dead_rows);
                decode_rows(&decoder, features, &batch, &origins, &mut a.samples, |s| {
                    count_skip(skipped, &s.reason, 1);
                    if !s.bad_input {
                        return Ok(());
                    }
                    *dead_rows += 1;
                    dead.send(&s.letter())
                })?;
            }
        }
    }
    reader.await.context("the archive reader stopped")??;
    dead.finish()?;
    Ok(a)
}

/// Row indices before the `validation` period (training) and from it on (held out).
fn split(
    cfg: &PipelineConfig,
    samples: &Samples,
    periods: &[(String, Boundary)],
) -> Result<(Vec<usize>, Vec<usize>)> {
    let find = |name: &str| periods.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
    let (Some(start), Some(test)) = (find("validation"), find("test")) else {
        bail!(
            "{}: key `evaluation.periods`: expected periods named \"validation\" and \"test\" \
             (gradsift train trains before validation, stops early on it and reports test)",
            cfg.file.display()
        );
    };
    let (train, held): (Vec<usize>, Vec<usize>) =
        (0..samples.len()).partition(|&i| !start.reached(i as u64, samples.times[i]));
    if train.is_empty() || held.is_empty() {
        bail!(
            "{}: key `evaluation.periods`: the validation period leaves {} training and {} \
             held-out rows; expected some of each",
            cfg.file.display(),
            train.len(),
            held.len()
        );
    }
    // Early stopping reads the validation period: without rows it reads NaN every epoch
    // and would keep the untrained weights.
    if held
        .iter()
        .all(|&i| test.reached(i as u64, samples.times[i]))
    {
        bail!(
            "{}: key `evaluation.periods`: the validation period holds no rows before `test` \
             starts; expected some",
            cfg.file.display()
        );
    }
    Ok((train, held))
}

/// The lower-is-better figure early stopping watches: MAE, or the beam power loss where the
/// data has beam powers (top-1 is capped by label noise), else 1 − top-1.
pub fn headline(m: &EvalSummary) -> f64 {
    match m {
        EvalSummary::Regression(r) => r.model.mae,
        EvalSummary::Classification(c) if c.model.power_loss_db.is_finite() => {
            c.model.power_loss_db
        }
        EvalSummary::Classification(c) => 1.0 - c.model.top1,
    }
}

/// Scores every `rows` with the current model into a fresh scoreboard. With
/// `model.decision = "switch"`, each key's record of the two rules follows the rows already
/// scored, in order, as it does online (the labels of earlier rows are known).
fn evaluate(
    learner: &mut OnlineLearner,
    s: &Samples,
    rows: &[usize],
    head: Head,
    cfg: &PipelineConfig,
    periods: &[(String, Boundary)],
    mut table: Option<&mut LossTable>,
) -> Scoreboard {
    let width = s.x.len() / s.len().max(1);
    let k = head.outputs();
    let mut board = Scoreboard::new(head, cfg.evaluation.window, periods);
    let mut decided = Vec::new();
    let switch = cfg.model.decision == Decision::Switch;
    let mut records: HashMap<&str, RuleRecord> = HashMap::new();
    for chunk in rows.chunks(4096) {
        let x: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| s.x[i * width..(i + 1) * width].iter().copied())
            .collect();
        let out = learner.predict(x, chunk.len());
        for (j, &i) in chunk.iter().enumerate() {
            let row = &out[j * k..(j + 1) * k];
            let (_, mut obs) = s.eval[i].observe(head, row);
            let mut rules = None;
            if let (Some(t), Observation::Classification { choice, .. }) = (&mut table, &mut obs) {
                let record = records.get(s.keys[i].as_ref()).filter(|_| switch);
                let a = t.choose(row, true, record, &mut decided);
                if !a.on_most {
                    *choice = Some(&decided);
                }
                rules = switch.then_some(a);
            }
            board.record(i as u64, s.times[i], obs);
            if let (Some(a), Some(p)) = (rules, &s.eval[i].power) {
                let record = records.entry(s.keys[i].as_ref()).or_default();
                record.learn(cfg.model.decision_decay, p, a.most, a.least);
            }
        }
    }
    board
}

/// `model.decision = "min_expected_loss"` or `"switch"`: the loss table learnt from the
/// training rows.
fn loss_table(cfg: &PipelineConfig, head: Head, s: &Samples, train: &[usize]) -> Option<LossTable> {
    let mut t = LossTable::for_model(cfg.model.decision, cfg.model.decision_memory, head)?;
    for p in train.iter().filter_map(|&i| s.eval[i].power.as_deref()) {
        t.learn(p);
    }
    Some(t)
}

/// The validation figure of a scoreboard.
fn validation(board: &Scoreboard) -> f64 {
    board
        .periods()
        .iter()
        .find(|p| p.name == "validation")
        .map_or(f64::NAN, |p| headline(&p.metrics))
}

/// Trainer state across epochs.
struct Epochs<'a> {
    cfg: &'a PipelineConfig,
    learner: OnlineLearner,
    samples: &'a Samples,
    train: Vec<usize>,
    /// Last score of each training row (NaN: never scored).
    scores: Vec<f32>,
    rng: LearnerRng,
    width: usize,
    /// `model.decision`'s loss table, learnt once from the training rows.
    losses: Option<LossTable>,
}

impl Epochs<'_> {
    /// Rows and loss weights of epoch `e`.
    fn choose(&mut self, full: bool) -> Vec<(usize, f32)> {
        if full {
            return (0..self.train.len()).map(|j| (j, 1.0)).collect();
        }
        let mut sel_cfg = self.cfg.selection.clone();
        sel_cfg.window = self.train.len();
        sel_cfg.warmup = 0;
        // An epoch's selection is of rows: micro-batch selection is about online steps.
        sel_cfg.unit = crate::learner::select::SelectionUnit::Row;
        let clock = cpu_time::ThreadTime::now();
        let mut sel = Selector::new(sel_cfg);
        let d = sel.decide(&self.scores, &mut self.rng);
        // The policy's own work, booked with its scoring (the learner's clock does not see it).
        self.learner
            .book_selection_cpu(clock.elapsed().as_secs_f64());
        d.weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0.0)
            .map(|(j, w)| (j, *w))
            .collect()
    }

    /// One pass over `rows` (shuffled), in mini-batches.
    fn pass(&mut self, mut rows: Vec<(usize, f32)>) {
        rows.shuffle(&mut self.rng);
        let (w, s) = (self.width, self.samples);
        for chunk in rows.chunks(self.cfg.offline.batch_size) {
            let mut x = Vec::with_capacity(chunk.len() * w);
            let mut y = Vec::with_capacity(chunk.len());
            for &(j, _) in chunk {
                let i = self.train[j];
                x.extend_from_slice(&s.x[i * w..(i + 1) * w]);
                y.push(s.y[i]);
            }
            let weights: Vec<f32> = chunk.iter().map(|(_, wt)| *wt).collect();
            let fresh = self.learner.fit_rows(x, &y, &weights);
            for (&(j, _), sc) in chunk.iter().zip(fresh) {
                self.scores[j] = sc;
            }
        }
        let n = self.train.len() as u64;
        let bs = self.cfg.offline.batch_size as u64;
        self.learner.book_reference(Work {
            rows_forward: n,
            rows_backward: n,
            rows_weight_grad: n,
            optimizer_steps: n.div_ceil(bs),
            cpu_s: 0.0,
        });
    }
}

/// What the epochs came to.
struct Fit {
    history: Vec<EpochReport>,
    best_epoch: usize,
    /// Rows trained and epochs in the policy's (not full) epochs.
    policy_rows: usize,
    policy_epochs: usize,
}

impl Fit {
    fn policy_fraction(&self, train_rows: usize) -> f64 {
        if self.policy_epochs == 0 {
            return 1.0;
        }
        self.policy_rows as f64 / (self.policy_epochs * train_rows) as f64
    }
}

impl Epochs<'_> {
    /// Epochs until `offline.epochs`, early stopping or a shutdown; leaves the best epoch's
    /// weights in the learner.
    fn run(
        &mut self,
        held: &[usize],
        head: Head,
        periods: &[(String, Boundary)],
        progress: &ProgressBar,
        shutdown: &Shutdown,
    ) -> Fit {
        let (cfg, o) = (self.cfg, &self.cfg.offline);
        // InfoBatch prunes while epoch < (1 − anneal)·epochs: 27 of 30 at anneal 0.125, so
        // ⌊anneal·epochs⌋ anneal (the epsilon: 0.7 × 10 is 6.999… in floats).
        let n_anneal = ((o.anneal * o.epochs as f64) + 1e-9).floor() as usize;
        let anneal_from = o.epochs - n_anneal;
        // Set when patience ran out before the anneal: its epochs run then, on every row.
        let mut anneal_end: Option<usize> = None;
        // Scores come from the passes: a policy that needs them needs one full epoch first.
        let warm = o
            .warmup_epochs
            .max(cfg.selection.policy.needs_scores() as usize);
        let mut fit = Fit {
            history: Vec::new(),
            best_epoch: 0,
            policy_rows: 0,
            policy_epochs: 0,
        };
        let (mut best, mut best_weights) = (f64::INFINITY, self.learner.weights());
        for e in 0..o.epochs {
            if shutdown.is_triggered() || anneal_end.is_some_and(|end| e >= end) {
                break;
            }
            let annealing = e >= anneal_from || anneal_end.is_some();
            let full = e < warm || annealing || cfg.selection.keep >= 1.0;
            let rows = self.choose(full);
            let rows_trained = rows.len();
            if !full {
                fit.policy_rows += rows_trained;
                fit.policy_epochs += 1;
            }
            self.pass(rows);
            let table = self.losses.as_mut();
            let board = evaluate(
                &mut self.learner,
                self.samples,
                held,
                head,
                cfg,
                periods,
                table,
            );
            let v = validation(&board);
            fit.history.push(EpochReport {
                epoch: e + 1,
                rows_trained,
                full,
                validation: v,
            });
            progress.inc(1);
            progress.set_message(format!("validation {v:.4}"));
            if v < best {
                (best, best_weights, fit.best_epoch) = (v, self.learner.weights(), e + 1);
            } else if !annealing && e + 1 - fit.best_epoch >= o.patience {
                // Early stopping would cut InfoBatch's anneal off (it comes last): it runs
                // now, whole (patience does not end an anneal).
                if n_anneal > 0 && cfg.selection.keep < 1.0 {
                    anneal_end = Some(e + 1 + n_anneal);
                } else {
                    break;
                }
            }
        }
        progress.finish_and_clear();
        self.learner.set_weights(&best_weights);
        fit
    }
}

/// Trains a pipeline offline (see the module doc) and writes `report.json`.
pub async fn train(
    cfg: PipelineConfig,
    opts: RunOptions,
    shutdown: Shutdown,
) -> Result<OfflineReport> {
    refuse_online_only(&cfg)?;
    let started = Instant::now();
    let cpu_start = cpu_time::ProcessTime::now();
    let mut meter = EnergyMeter::start(cfg.energy.clone());
    let schema = Arc::new(Schema::load(&cfg.schema)?);
    cfg.validate_with(schema.input_width(), schema.evaluation.beam_power.is_some())?;
    let out_dir = cfg.output_dir();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let decoder = Decoder::new(schema.clone());
    let mut features = feature_engine(&cfg, &schema, &decoder);
    let dead_path = out_dir.join("dead_letters.jsonl");
    let mut dead = DeadLetterSink::new(&dead_path, None);
    let archive = load(&cfg, &schema, &mut features, &mut dead, &shutdown).await?;
    let periods = cfg.evaluation.boundaries();
    let (train_rows, held) = split(&cfg, &archive.samples, &periods)?;
    let head = schema.task.head();
    // No every-row reference booked per step: offline, it is booked per epoch.
    let mut learner_cfg = cfg.learner_config(features.width(), head, 0.0);
    // The averaged weights serve online prediction; offline, each epoch is evaluated (and
    // early stopping keeps the best) with the weights as trained.
    learner_cfg.training.average_decay = 0.0;
    let learner = OnlineLearner::new(learner_cfg);
    let o = &cfg.offline;
    let losses = loss_table(&cfg, head, &archive.samples, &train_rows);
    let mut ep = Epochs {
        cfg: &cfg,
        learner,
        samples: &archive.samples,
        scores: vec![f32::NAN; train_rows.len()],
        train: train_rows,
        rng: LearnerRng::seed_from_u64(cfg.training.seed ^ 0x0ff1),
        width: features.width(),
        losses,
    };
    let fit = ep.run(
        &held,
        head,
        &periods,
        &epoch_bar(&opts, o.epochs),
        &shutdown,
    );
    let board = evaluate(
        &mut ep.learner,
        &archive.samples,
        &held,
        head,
        &cfg,
        &periods,
        ep.losses.as_mut(),
    );
    let energy = meter.read();
    let epochs_run = fit.history.len();
    let report = OfflineReport {
        pipeline: cfg.name.clone(),
        mode: "offline",
        importance: format!("{:?}", cfg.importance.method).to_lowercase(),
        selection_policy: cfg.selection.policy.name().to_string(),
        keep: cfg.selection.keep,
        samples: archive.samples.len() as u64,
        train_rows: ep.train.len(),
        held_out_rows: held.len(),
        skipped: archive.skipped.clone(),
        dead_lettered_rows: archive.dead_rows,
        epochs_run,
        best_epoch: fit.best_epoch,
        trained_fraction_after_warmup: fit.policy_fraction(ep.train.len()),
        history: fit.history,
        metrics: board.whole.summary(),
        periods: board.periods(),
        compute: ep
            .learner
            .compute()
            .with_energy(cfg.energy.joules_per_cpu_second()),
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: cpu_start.elapsed().as_secs_f64(),
        energy,
        outputs: BTreeMap::from([(
            "report".to_string(),
            out_dir.join("report.json").display().to_string(),
        )]),
        // No epoch gave a finite validation figure: the weights are the untrained ones.
        diverged: ep.learner.stats().nonfinite_steps > 0
            || board.whole.nonfinite() > 0
            || (fit.best_epoch == 0 && epochs_run > 0),
        interrupted: shutdown.is_triggered(),
    };
    let path = out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(report)
}

/// Settings only `gradsift run` has, refused at start with the file and the key.
fn refuse_online_only(cfg: &PipelineConfig) -> Result<()> {
    if cfg.importance.method == ImportanceMethod::Reducible {
        bail!(
            "{}: key `importance.method`: expected a score gradsift train supports (exact, \
             exact_autodiff, last_layer, el2n, loss, random), found \"reducible\" (online only: \
             its held-out rows come from the stream)",
            cfg.file.display()
        );
    }
    if cfg.model.scope != crate::learner::per_key::ModelScope::Shared {
        bail!(
            "{}: key `model.scope`: `gradsift train` fits one model; expected \"shared\" (per_key is for `gradsift run`)",
            cfg.file.display()
        );
    }
    Ok(())
}

fn epoch_bar(opts: &RunOptions, epochs: usize) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(epochs as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} epoch {pos}/{len} {wide_bar} {msg} [{elapsed}]")
            .expect("static template"),
    );
    pb
}

impl OfflineReport {
    /// The summary as printed at the end of `gradsift train`.
    pub fn render(&self) -> String {
        let c = &self.compute;
        let mut out = format!(
            "{} offline [{} scores, {} policy, keep {}]: {} training rows, {} held out; \
             {} epochs, best {}\n",
            self.pipeline,
            self.importance,
            self.selection_policy,
            self.keep,
            self.train_rows,
            self.held_out_rows,
            self.epochs_run,
            self.best_epoch
        );
        for p in &self.periods {
            out.push_str(&format!(
                "  {:<12} {} rows, {}\n",
                p.name,
                p.samples,
                summary_text(&p.metrics)
            ));
        }
        out.push_str(&format!(
            "  compute saved vs every-row training of the same epochs: {:.1}% of FLOPs, \
             {:.1}% of back-propagated rows; learning CPU {:.2} s; process CPU {:.2} s, \
             wall {:.2} s, {:.1} J\n",
            100.0 * c.saved_flops_fraction,
            100.0 * c.saved_backward_fraction,
            c.learn_cpu_s,
            self.cpu_s,
            self.wall_s,
            self.energy.joules
        ));
        out
    }
}

fn summary_text(m: &EvalSummary) -> String {
    let (n, nonfinite) = match m {
        EvalSummary::Regression(r) => (r.model.n, r.model.nonfinite),
        EvalSummary::Classification(c) => (c.model.n, c.model.nonfinite),
    };
    if nonfinite > 0 {
        return format!("diverged: {nonfinite} of {n} predictions not finite");
    }
    if n == 0 {
        return "n/a (no rows)".into();
    }
    match m {
        EvalSummary::Regression(r) => format!(
            "MAE {:.4}, RMSE {:.4}, sMAPE {:.2}%",
            r.model.mae, r.model.rmse, r.model.smape_pct
        ),
        EvalSummary::Classification(c) => format!(
            "top-1 {:.4}, top-3 {:.4}, power loss {:.3} dB",
            c.model.top1, c.model.top3, c.model.power_loss_db
        ),
    }
}
