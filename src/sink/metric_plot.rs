//! The run plot (`gradsift run --plot`): the windowed prequential metric over the stream,
//! persistence's beside it where the scoreboard keeps it, and a vertical line at every drift
//! detection (loss detectors red, the score test blue) and a black one at every known change
//! point (`evaluation.changes`), as `metric.png` and `metric.svg`. `gradsift plot` draws
//! several runs' series in one figure (e.g. without and with drift reactions) from the
//! traces their reports keep
//! beside the report. How fast a change is seen and how fast the model recovers is a shape
//! over time, which no single number in the report shows.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::learner::drift::{Detector, DriftEvent};
use crate::learner::trace::{ChangeMark, TracePoint};
use crate::plotting::{COLORS, FONT, SIZE, png_and_svg, register_font};

/// What the plot draws: one windowed series per run (the first run's baseline beside
/// them), detections and known changes.
pub struct MetricPlot<'a> {
    pub title: String,
    pub metric: String,
    pub series: Vec<(String, &'a [TracePoint])>,
    pub events: &'a [DriftEvent],
    pub changes: Vec<u64>,
}

impl<'a> MetricPlot<'a> {
    /// The run plot of one run.
    pub fn run(
        title: String,
        metric: String,
        points: &'a [TracePoint],
        events: &'a [DriftEvent],
        changes: &[ChangeMark],
    ) -> Self {
        MetricPlot {
            title,
            metric,
            series: vec![("model (window)".into(), points)],
            events,
            changes: changes.iter().filter_map(|c| c.at).collect(),
        }
    }
}

/// Writes `metric.png` and `metric.svg` into `out`; the PNG's path.
pub fn write(out: &Path, plot: &MetricPlot<'_>) -> Result<std::path::PathBuf> {
    write_named(out, "metric", plot)
}

/// Writes `NAME.png` and `NAME.svg` into `out`; the PNG's path.
pub fn write_named(out: &Path, name: &str, plot: &MetricPlot<'_>) -> Result<std::path::PathBuf> {
    register_font();
    png_and_svg!(out, name, SIZE, draw, plot);
    Ok(out.join(format!("{name}.png")))
}

/// `gradsift plot`: the windowed series of several runs in one figure, each from a run
/// folder's `report.json` (runs with `output.plot` or `evaluation.changes` keep a trace);
/// the known changes and metric are the first run's. Returns the PNG's path.
pub fn compare(
    out: &Path,
    name: &str,
    title: &str,
    runs: &[(String, std::path::PathBuf)],
) -> Result<std::path::PathBuf> {
    let mut traces = Vec::new();
    let (mut metric, mut changes) = (String::new(), Vec::new());
    for (i, (label, dir)) in runs.iter().enumerate() {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let report: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a report", path.display()))?;
        let trace = &report["trace"];
        anyhow::ensure!(
            trace.is_object(),
            "{} keeps no trace: run it with --plot or evaluation.changes",
            path.display()
        );
        let points: Vec<TracePoint> = serde_json::from_value(trace["points"].clone())
            .with_context(|| format!("{}: trace.points", path.display()))?;
        if i == 0 {
            metric = trace["metric"].as_str().unwrap_or_default().to_string();
            changes = (report["changes"].as_array().into_iter().flatten())
                .filter_map(|c| c["at"].as_u64())
                .collect();
        }
        traces.push((label.clone(), points));
    }
    let plot = MetricPlot {
        title: title.to_string(),
        metric,
        series: traces.iter().map(|(l, p)| (l.clone(), &p[..])).collect(),
        events: &[],
        changes,
    };
    write_named(out, name, &plot)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &MetricPlot<'_>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let all = || p.series.iter().flat_map(|(_, pts)| pts.iter());
    let x_max = all().map(|q| q.sample).max().unwrap_or(1).max(1) as f64;
    let values = all().flat_map(|q| [Some(q.model), q.baseline]);
    let y_max = values
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(&p.title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("sample")
        .y_desc(&p.metric)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    for e in p.events {
        let color = if e.detector == Detector::ScoreShift {
            COLORS[0].mix(0.35)
        } else {
            COLORS[3].mix(0.5)
        };
        let x = e.sample as f64;
        chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max)], color))?;
    }
    for &x in &p.changes {
        let x = x as f64;
        chart.draw_series(LineSeries::new(
            [(x, 0.0), (x, y_max)],
            BLACK.mix(0.8).stroke_width(2),
        ))?;
    }
    for (i, (label, pts)) in p.series.iter().enumerate() {
        let color = COLORS[if i == 0 { 0 } else { (i + 1) % COLORS.len() }];
        let model = pts.iter().map(|q| (q.sample as f64, q.model));
        chart
            .draw_series(LineSeries::new(model, color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    let first = p.series.first().map_or(&[][..], |(_, pts)| *pts);
    let base: Vec<(f64, f64)> = (first.iter())
        .filter_map(|q| q.baseline.map(|b| (q.sample as f64, b)))
        .collect();
    if !base.is_empty() {
        chart
            .draw_series(LineSeries::new(base, COLORS[1]))?
            .label("persistence (window)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COLORS[1]));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font((FONT, 15))
        .draw()?;
    Ok(())
}
