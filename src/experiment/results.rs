//! One row per run: a run's `report.json` → its metric on the validation and test periods
//! and the whole stream, and what its learning cost; written as `results.csv` and
//! `results.parquet`. Reports are read as loose JSON and every field is optional, because
//! reports from older binaries lack `periods` and `compute`: then both periods fall back to
//! the whole-stream metric and compute to the process's CPU time (and back-propagated rows).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, Float64Array, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::grid::{Config, Run};
use super::runner::Outcome;
use super::{Experiment, Metric};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Ok,
    Failed,
    /// The metric is NaN or ±∞: never enters an average.
    Diverged,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Diverged => "diverged",
        }
    }
}

/// What one run produced. Metrics are NaN when absent; costs `None` when not reported.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    pub config: usize,
    pub seed: u64,
    pub status: Status,
    pub error: String,
    pub validation: f64,
    pub test: f64,
    pub whole: f64,
    /// The report had validation and test periods (else both are the whole stream).
    pub periods: bool,
    /// The report had a `compute` section (else compute is process CPU time).
    pub has_compute: bool,
    pub learn_flops: Option<f64>,
    pub reference_flops: Option<f64>,
    pub rows_backward: Option<f64>,
    pub rows_weight_grad: Option<f64>,
    pub optimizer_steps: Option<f64>,
    pub learn_cpu_s: Option<f64>,
    pub cpu_s: Option<f64>,
    pub wall_s: Option<f64>,
    pub energy_j: Option<f64>,
    pub kept_fraction: Option<f64>,
}

impl RunRecord {
    pub fn ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The learning compute the choice rule compares: FLOPs, else process CPU seconds.
    pub fn compute(&self) -> f64 {
        self.learn_flops.or(self.cpu_s).unwrap_or(f64::NAN)
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// `metrics.model.<key>`: NaN when null (non-finite floats serialise as null), None when absent.
fn metric_in(metrics: &Value, metric: Metric) -> Option<f64> {
    let v = metrics.get("model")?.get(metric.key())?;
    Some(v.as_f64().unwrap_or(f64::NAN))
}

fn period<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    let periods = report.get("periods")?.as_array()?;
    periods
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("metrics")
}

/// Whether a named period exists and scored no rows (its metrics would read 0).
fn empty(report: &Value, name: &str) -> bool {
    let Some(periods) = report.get("periods").and_then(Value::as_array) else {
        return false;
    };
    periods.iter().any(|p| {
        p.get("name").and_then(Value::as_str) == Some(name)
            && p.get("samples").and_then(Value::as_u64) == Some(0)
    })
}

/// scoring + training of one `compute` field.
fn learn(report: &Value, field: &str) -> Option<f64> {
    let c = report.get("compute")?;
    Some(num(c, &["scoring", field])? + num(c, &["training", field])?)
}

fn costs(r: &mut RunRecord, report: &Value) {
    r.has_compute = report.get("compute").is_some();
    r.learn_flops = num(report, &["compute", "learn_flops"]).or_else(|| learn(report, "flops"));
    r.reference_flops = num(report, &["compute", "reference", "flops"]);
    r.rows_backward = learn(report, "rows_backward").or_else(|| num(report, &["backpropagated"]));
    r.rows_weight_grad = learn(report, "rows_weight_grad");
    r.optimizer_steps =
        learn(report, "optimizer_steps").or_else(|| num(report, &["training_steps"]));
    r.cpu_s = num(report, &["cpu_s"]);
    r.learn_cpu_s = learn(report, "cpu_s").or(r.cpu_s);
    r.wall_s = num(report, &["wall_s"]);
    r.energy_j = num(report, &["energy", "joules"]);
    r.kept_fraction = num(report, &["trained_fraction_after_warmup"]);
}

/// A run's row from its report.
pub fn from_report(config: usize, seed: u64, metric: Metric, report: &Value) -> RunRecord {
    let mut r = RunRecord {
        config,
        seed,
        ..Default::default()
    };
    costs(&mut r, report);
    let whole = report.get("metrics").and_then(|m| metric_in(m, metric));
    let Some(whole) = whole else {
        r.status = Status::Failed;
        r.error = format!(
            "report.json has no metrics.model.{}: does this pipeline report {}?",
            metric.key(),
            metric.label()
        );
        return r;
    };
    let (val, test) = (period(report, "validation"), period(report, "test"));
    r.periods = val.is_some() && test.is_some();
    if let Some(name) = ["validation", "test"]
        .into_iter()
        .find(|n| empty(report, n))
    {
        r.status = Status::Failed;
        r.error =
            format!("the `{name}` period has no rows: set evaluation.periods inside the stream");
        return r;
    }
    r.whole = whole;
    // Both periods, or neither (then both read the whole stream, and the summary says so):
    // one alone, or a period without the metric, would let test rows into a decision.
    let read = |m: Option<&Value>| m.map(|m| metric_in(m, metric));
    match (read(val), read(test)) {
        (None, None) => (r.validation, r.test) = (whole, whole),
        (Some(Some(v)), Some(Some(t))) => (r.validation, r.test) = (v, t),
        _ => {
            r.status = Status::Failed;
            r.error = format!(
                "evaluation.periods needs both `validation` and `test` with {} in each (or \
                 neither): a decision must not read the test rows",
                metric.label()
            );
            return r;
        }
    }
    // A run a shutdown signal cut short reports part of its stream or epochs.
    if report.get("interrupted").and_then(Value::as_bool) == Some(true) {
        r.status = Status::Failed;
        r.error = "interrupted by a shutdown signal: a partial run".into();
        return r;
    }
    // The report's own verdict too: a run whose guard skipped non-finite steps and went
    // back to earlier weights has finite metrics that are still not figures to report.
    let flagged = report.get("diverged").and_then(Value::as_bool) == Some(true);
    if flagged
        || ![r.validation, r.test, r.whole]
            .iter()
            .all(|v| v.is_finite())
    {
        r.status = Status::Diverged;
    }
    r
}

/// Every run's row, in the order of `runs`.
pub fn records(metric: Metric, runs: &[Run], outcomes: Vec<Outcome>) -> Vec<RunRecord> {
    runs.iter()
        .zip(outcomes)
        .map(|(run, o)| match o {
            Outcome::Done { report, .. } => from_report(run.config, run.seed, metric, &report),
            Outcome::Failed(error) => RunRecord {
                config: run.config,
                seed: run.seed,
                status: Status::Failed,
                error,
                validation: f64::NAN,
                test: f64::NAN,
                whole: f64::NAN,
                ..Default::default()
            },
        })
        .collect()
}

/// A column of the results table.
enum Col {
    Str(Vec<String>),
    U64(Vec<u64>),
    F64(Vec<Option<f64>>),
}

fn columns(exp: &Experiment, configs: &[Config], rows: &[RunRecord]) -> Vec<(String, Col)> {
    let s = |f: &dyn Fn(&RunRecord) -> String| Col::Str(rows.iter().map(f).collect());
    let x = |f: &dyn Fn(&RunRecord) -> Option<f64>| Col::F64(rows.iter().map(f).collect());
    let c = |r: &RunRecord| &configs[r.config];
    let axes = |r: &RunRecord| {
        c(r).axes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        ("experiment".into(), s(&|_| exp.name.clone())),
        ("family".into(), s(&|r| c(r).family.clone())),
        ("label".into(), s(&|r| c(r).label.clone())),
        ("axes".into(), s(&axes)),
        (
            "seed".into(),
            Col::U64(rows.iter().map(|r| r.seed).collect()),
        ),
        ("status".into(), s(&|r| r.status.as_str().into())),
        (
            format!("validation_{}", exp.metric.key()),
            x(&|r| Some(r.validation)),
        ),
        (format!("test_{}", exp.metric.key()), x(&|r| Some(r.test))),
        (
            format!("whole_stream_{}", exp.metric.key()),
            x(&|r| Some(r.whole)),
        ),
        ("learn_flops".into(), x(&|r| r.learn_flops)),
        ("reference_flops".into(), x(&|r| r.reference_flops)),
        ("rows_backward".into(), x(&|r| r.rows_backward)),
        ("rows_weight_grad".into(), x(&|r| r.rows_weight_grad)),
        ("optimizer_steps".into(), x(&|r| r.optimizer_steps)),
        ("learn_cpu_s".into(), x(&|r| r.learn_cpu_s)),
        ("cpu_s".into(), x(&|r| r.cpu_s)),
        ("wall_s".into(), x(&|r| r.wall_s)),
        ("energy_j".into(), x(&|r| r.energy_j)),
        ("kept_fraction".into(), x(&|r| r.kept_fraction)),
        ("error".into(), s(&|r| r.error.clone())),
    ]
}

/// A CSV field, quoted when it holds a comma, quote or line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn cell(col: &Col, i: usize) -> String {
    match col {
        Col::Str(v) => csv_field(&v[i]),
        Col::U64(v) => v[i].to_string(),
        Col::F64(v) => v[i].map(|x| x.to_string()).unwrap_or_default(),
    }
}

fn write_csv(path: &Path, cols: &[(String, Col)], n: usize) -> Result<()> {
    let mut text = cols
        .iter()
        .map(|(name, _)| csv_field(name))
        .collect::<Vec<_>>()
        .join(",");
    text.push('\n');
    for i in 0..n {
        text.push_str(
            &cols
                .iter()
                .map(|(_, c)| cell(c, i))
                .collect::<Vec<_>>()
                .join(","),
        );
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn write_parquet(path: &Path, cols: Vec<(String, Col)>) -> Result<()> {
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = cols
        .into_iter()
        .map(|(name, col)| match col {
            Col::Str(v) => (
                Field::new(name, DataType::Utf8, false),
                Arc::new(StringArray::from(v)) as ArrayRef,
            ),
            Col::U64(v) => (
                Field::new(name, DataType::UInt64, false),
                Arc::new(UInt64Array::from(v)) as ArrayRef,
            ),
            Col::F64(v) => (
                Field::new(name, DataType::Float64, true),
                Arc::new(Float64Array::from(v)) as ArrayRef,
            ),
        })
        .unzip();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

/// `results.csv` and `results.parquet` in `out`.
pub fn write(out: &Path, exp: &Experiment, configs: &[Config], rows: &[RunRecord]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_csv(
        &out.join("results.csv"),
        &columns(exp, configs, rows),
        rows.len(),
    )?;
    write_parquet(&out.join("results.parquet"), columns(exp, configs, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_old_report_falls_back_to_the_whole_stream_and_cpu_time() {
        let report = json!({"cpu_s": 2.5, "wall_s": 3.0, "backpropagated": 900, "training_steps": 50,
            "energy": {"joules": 11.0}, "trained_fraction_after_warmup": 0.7,
            "metrics": {"task": "regression", "model": {"n": 10, "mae": 120.0, "rmse": 150.0}}});
        let r = from_report(1, 7, Metric::Mae, &report);
        assert!(r.ok() && !r.periods && !r.has_compute);
        assert_eq!((r.validation, r.test, r.whole), (120.0, 120.0, 120.0));
        assert_eq!(r.compute(), 2.5);
        assert_eq!(r.rows_backward, Some(900.0));
        assert_eq!(r.learn_cpu_s, Some(2.5));
        assert_eq!(r.kept_fraction, Some(0.7));
    }

    #[test]
    fn one_period_alone_or_a_period_without_the_metric_fails_the_run() {
        let test_only = json!({"metrics": {"model": {"mae": 100.0}},
            "periods": [{"name": "test", "samples": 5, "metrics": {"model": {"mae": 110.0}}}]});
        let r = from_report(0, 1, Metric::Mae, &test_only);
        assert!(
            !r.ok() && r.error.contains("both `validation` and `test`"),
            "{}",
            r.error
        );
        let no_metric = json!({"metrics": {"model": {"mae": 100.0}},
            "periods": [{"name": "validation", "samples": 5, "metrics": {"model": {"rmse": 1.0}}},
                        {"name": "test", "samples": 5, "metrics": {"model": {"mae": 110.0}}}]});
        assert!(!from_report(0, 1, Metric::Mae, &no_metric).ok());
    }

    #[test]
    fn periods_and_compute_are_read_when_present() {
        let w = |f: f64| json!({"rows_forward": 1, "rows_backward": f, "rows_weight_grad": f, "optimizer_steps": 1, "flops": f * 10.0, "cpu_s": f / 100.0});
        let report = json!({"cpu_s": 9.0,
            "metrics": {"model": {"mae": 100.0}},
            "periods": [{"name": "validation", "samples": 5, "metrics": {"model": {"mae": 90.0}}},
                        {"name": "test", "samples": 5, "metrics": {"model": {"mae": 110.0}}}],
            "compute": {"inference": w(1.0), "scoring": w(2.0), "training": w(3.0), "reference": w(8.0)}});
        let r = from_report(0, 1, Metric::Mae, &report);
        assert!(r.periods && r.has_compute);
        assert_eq!((r.validation, r.test, r.whole), (90.0, 110.0, 100.0));
        assert_eq!(r.learn_flops, Some(50.0));
        assert_eq!(r.reference_flops, Some(80.0));
        assert_eq!(r.rows_backward, Some(5.0));
        assert_eq!(r.compute(), 50.0);
    }

    #[test]
    fn an_empty_period_fails_the_run_instead_of_reading_zero() {
        let report = json!({"metrics": {"model": {"mae": 100.0}},
            "periods": [{"name": "validation", "samples": 0, "metrics": {"model": {"mae": 0.0}}},
                        {"name": "test", "samples": 5, "metrics": {"model": {"mae": 110.0}}}]});
        let r = from_report(0, 1, Metric::Mae, &report);
        assert!(
            !r.ok() && r.error.contains("`validation` period has no rows"),
            "{}",
            r.error
        );
    }

    #[test]
    fn a_null_metric_is_diverged_and_a_missing_one_failed() {
        let r = from_report(
            0,
            1,
            Metric::Mae,
            &json!({"metrics": {"model": {"mae": null}}}),
        );
        assert_eq!(r.status, Status::Diverged);
        let r = from_report(
            0,
            1,
            Metric::Top1,
            &json!({"metrics": {"model": {"mae": 1.0}}}),
        );
        assert_eq!(r.status, Status::Failed);
        assert!(r.error.contains("metrics.model.top1"), "{}", r.error);
        // Finite metrics of a run the report calls diverged (its guard skipped non-finite
        // steps) are not figures either.
        let flagged = json!({"diverged": true, "nonfinite_steps": 12,
            "metrics": {"model": {"mae": 100.0}}});
        assert_eq!(
            from_report(0, 1, Metric::Mae, &flagged).status,
            Status::Diverged
        );
        // A run a shutdown signal cut short (online or offline) is not a figure, and is
        // never reused.
        let cut = json!({"interrupted": true, "metrics": {"model": {"mae": 100.0}}});
        let r = from_report(0, 1, Metric::Mae, &cut);
        assert!(
            r.status == Status::Failed && r.error.contains("interrupted"),
            "{r:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("report.json"), cut.to_string()).unwrap();
        assert!(super::super::runner::previous(dir.path()).is_none());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
