//! The run plot (`gradsift run --plot`): the windowed prequential metric over the stream,
//! persistence's beside it where the scoreboard keeps it, and a vertical line at every drift
//! detection (loss detectors red, the score test blue) and a black one at every known change
//! point (`evaluation.changes`), as `metric.png` and `metric.svg`
//! beside the report. How fast a change is seen and how fast the model recovers is a shape
//! over time, which no single number in the report shows.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::learner::drift::{Detector, DriftEvent};
use crate::learner::trace::{ChangeMark, TracePoint};
use crate::plotting::{COLORS, FONT, SIZE, png_and_svg, register_font};

/// What the plot draws.
pub struct MetricPlot<'a> {
    pub title: String,
    pub metric: String,
    pub points: &'a [TracePoint],
    pub events: &'a [DriftEvent],
    pub changes: &'a [ChangeMark],
}

/// Writes `metric.png` and `metric.svg` into `out`; the PNG's path.
pub fn write(out: &Path, plot: &MetricPlot<'_>) -> Result<std::path::PathBuf> {
    register_font();
    png_and_svg!(out, "metric", SIZE, draw, plot);
    Ok(out.join("metric.png"))
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &MetricPlot<'_>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let x_max = p.points.last().map_or(1, |q| q.sample).max(1) as f64;
    let values = (p.points.iter()).flat_map(|q| [Some(q.model), q.baseline]);
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
    for x in p.changes.iter().filter_map(|c| c.at) {
        let x = x as f64;
        chart.draw_series(LineSeries::new(
            [(x, 0.0), (x, y_max)],
            BLACK.mix(0.8).stroke_width(2),
        ))?;
    }
    let model = p.points.iter().map(|q| (q.sample as f64, q.model));
    chart
        .draw_series(LineSeries::new(model, COLORS[0].stroke_width(2)))?
        .label("model (window)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COLORS[0].stroke_width(2)));
    let base: Vec<(f64, f64)> = (p.points.iter())
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
