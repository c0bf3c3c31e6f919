//! The plots, each as PNG and SVG: the compute/metric frontier per family, the metric
//! against `selection.keep`, and the score histograms of kept vs dropped samples. Pictures,
//! because "how much compute for how much error" is a curve, not a number.

//!
//! Style and font: [`crate::plotting`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::array::{Array, BooleanArray, Float32Array};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Experiment;
use super::grid::{self, Config};
use super::summary::Summary;

use crate::plotting::{COLORS, FONT, SIZE, png_and_svg, register_font};

/// One configuration's point: compute fraction, test mean, test sd.
type Point = (f64, f64, f64);

/// One family's series.
struct Series {
    name: String,
    points: Vec<Point>,
}

/// What the frontier and keep plots draw.
struct Lines {
    title: String,
    x_label: String,
    y_label: String,
    higher_is_better: bool,
    reference: Point,
    families: Vec<Series>,
    /// Draw the best-so-far envelope (frontier) or join the points in x order (keep).
    envelope: bool,
}

/// All three plots into `out`.
pub fn all(out: &Path, exp: &Experiment, configs: &[Config], summary: &Summary) -> Result<()> {
    register_font();
    let frontier = frontier_data(configs, summary);
    png_and_svg!(out, "frontier", SIZE, draw_lines, &frontier);
    let keep = keep_data(configs, summary);
    png_and_svg!(out, "keep", SIZE, draw_lines, &keep);
    let scores = score_data(out, exp, configs, summary);
    png_and_svg!(out, "scores", SIZE, draw_scores, &scores);
    Ok(())
}

fn stat_point(summary: &Summary, i: usize, x: f64) -> Point {
    let t = &summary.stats[i].test;
    (x, t.mean, if t.sd.is_finite() { t.sd } else { 0.0 })
}

fn family_names(configs: &[Config]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for c in configs.iter().filter(|c| !c.is_reference()) {
        if !names.contains(&c.family) {
            names.push(c.family.clone());
        }
    }
    names
}

fn frontier_data(configs: &[Config], s: &Summary) -> Lines {
    let unit = if s.has_compute {
        "FLOPs of scoring + training"
    } else {
        "process CPU seconds"
    };
    let families = family_names(configs)
        .into_iter()
        .map(|name| {
            let points = (0..configs.len())
                .filter(|&i| configs[i].family == name)
                .map(|i| stat_point(s, i, s.stats[i].fraction.mean))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            Series { name, points }
        })
        .collect();
    Lines {
        title: format!(
            "{}: test {} vs learning compute (mean ± sd over seeds)",
            s.name,
            s.metric.label()
        ),
        x_label: format!("learning compute / reference ({unit})"),
        y_label: format!("test {}", s.metric.label()),
        higher_is_better: s.metric.higher_is_better(),
        reference: stat_point(s, 0, 1.0),
        families,
        envelope: true,
    }
}

fn most_common(values: &[String]) -> Option<String> {
    let mut best: Option<(&String, usize)> = None;
    for v in values {
        let n = values
            .iter()
            .filter(|w| grid::same_value(Some(w.as_str()), Some(v.as_str())))
            .count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((v, n));
        }
    }
    best.map(|(v, _)| v.clone())
}

/// A family's configurations at one replay ratio: the reference's if the family has it, else its most common.
fn at_replay_ratio(configs: &[Config], family: &str, reference: Option<&str>) -> Vec<usize> {
    let members: Vec<usize> = (0..configs.len())
        .filter(|&i| configs[i].family == family)
        .collect();
    let ratio = |i: usize| configs[i].value("buffer.replay_ratio");
    let values: Vec<String> = members.iter().filter_map(|&i| ratio(i)).collect();
    let has_reference = values
        .iter()
        .any(|v| grid::same_value(Some(v.as_str()), reference));
    let target = if has_reference {
        reference.map(str::to_string)
    } else {
        most_common(&values)
    };
    members
        .into_iter()
        .filter(|&i| grid::same_value(ratio(i).as_deref(), target.as_deref()))
        .collect()
}

fn keep_series(configs: &[Config], s: &Summary, family: String) -> Series {
    let reference = configs[0].value("buffer.replay_ratio");
    // (configuration, point); other axes: per keep value, the best validation metric.
    let mut chosen: Vec<(usize, Point)> = Vec::new();
    for i in at_replay_ratio(configs, &family, reference.as_deref()) {
        let keep = configs[i]
            .value("selection.keep")
            .and_then(|v| v.parse::<f64>().ok());
        let p = stat_point(s, i, keep.unwrap_or(f64::NAN));
        if !(p.0.is_finite() && p.1.is_finite()) {
            continue;
        }
        let better = |j: usize| {
            s.metric
                .worse_by(s.stats[i].validation, s.stats[j].validation)
                < 0.0
        };
        match chosen.iter().position(|(_, q)| q.0 == p.0) {
            Some(k) if better(chosen[k].0) => chosen[k] = (i, p),
            Some(_) => {}
            None => chosen.push((i, p)),
        }
    }
    let mut points: Vec<Point> = chosen.into_iter().map(|(_, p)| p).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Series {
        name: family,
        points,
    }
}

fn keep_data(configs: &[Config], s: &Summary) -> Lines {
    let families = family_names(configs)
        .into_iter()
        .map(|f| keep_series(configs, s, f))
        .collect();
    Lines {
        title: format!(
            "{}: test {} vs selection.keep (mean, band ± sd over seeds)",
            s.name,
            s.metric.label()
        ),
        x_label: "selection.keep (fraction of samples trained after warm-up)".into(),
        y_label: format!("test {}", s.metric.label()),
        higher_is_better: s.metric.higher_is_better(),
        reference: stat_point(s, 0, 1.0),
        families,
        envelope: false,
    }
}

fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-9);
    (lo - pad)..(hi + pad)
}

/// The x and y ranges that hold every point, its error bar and the reference.
fn ranges(d: &Lines) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let all: Vec<Point> = d
        .families
        .iter()
        .flat_map(|f| f.points.iter().copied())
        .chain([d.reference])
        .filter(|p| p.1.is_finite())
        .collect();
    let fold = |f: fn(&Point) -> f64, min: bool| {
        all.iter().map(f).fold(
            if min {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            },
            if min { f64::min } else { f64::max },
        )
    };
    let (x0, x1) = (fold(|p| p.0, true).min(0.0), fold(|p| p.0, false).max(1.0));
    let (y0, y1) = (fold(|p| p.1 - p.2, true), fold(|p| p.1 + p.2, false));
    if !(y0.is_finite() && y1.is_finite()) {
        return (0.0..1.05, 0.0..1.0);
    }
    (x0..x1 * 1.05, padded(y0, y1))
}

/// The best-so-far points in x order: nothing cheaper does better.
fn envelope(points: &[Point], higher_is_better: bool) -> Vec<(f64, f64)> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best = f64::NAN;
    let mut out = Vec::new();
    for (x, y, _) in sorted {
        let improves = best.is_nan() || if higher_is_better { y > best } else { y < best };
        if improves {
            best = y;
            out.push((x, y));
        }
    }
    out
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Lines) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (xr, yr) = ranges(d);
    let mut chart = ChartBuilder::on(root)
        .caption(&d.title, (FONT, 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(xr.clone(), yr)?;
    chart
        .configure_mesh()
        .x_desc(&d.x_label)
        .y_desc(&d.y_label)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    for (k, f) in d.families.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        draw_family(&mut chart, f, color, d)?;
    }
    let (rx, ry, rsd) = d.reference;
    if ry.is_finite() {
        let style = ShapeStyle::from(&BLACK).stroke_width(1);
        if d.envelope {
            chart.draw_series([ErrorBar::new_vertical(
                rx,
                ry - rsd,
                ry,
                ry + rsd,
                BLACK.stroke_width(2),
                12,
            )])?;
            chart
                .draw_series([Cross::new((rx, ry), 8, BLACK.stroke_width(3))])?
                .label("reference (full data)")
                .legend(|(x, y)| Cross::new((x, y), 6, BLACK.stroke_width(2)));
        } else {
            chart
                .draw_series(LineSeries::new([(xr.start, ry), (xr.end, ry)], style))?
                .label("reference (full data)")
                .legend(|(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], BLACK));
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn draw_family<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    f: &Series,
    color: RGBColor,
    d: &Lines,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if f.points.is_empty() {
        return Ok(());
    }
    if d.envelope {
        let bars = f.points.iter().map(|&(x, y, sd)| {
            ErrorBar::new_vertical(x, y - sd, y, y + sd, color.stroke_width(1), 8)
        });
        chart.draw_series(bars)?;
        chart.draw_series(
            f.points
                .iter()
                .map(|&(x, y, _)| Circle::new((x, y), 5, color.filled())),
        )?;
        let line = envelope(&f.points, d.higher_is_better);
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(format!("{} (envelope)", f.name))
            .legend(move |(x, y)| {
                PathElement::new([(x - 10, y), (x + 10, y)], color.stroke_width(2))
            });
    } else {
        let mut band: Vec<(f64, f64)> = f.points.iter().map(|&(x, y, sd)| (x, y + sd)).collect();
        band.extend(f.points.iter().rev().map(|&(x, y, sd)| (x, y - sd)));
        chart.draw_series([Polygon::new(band, color.mix(0.18).filled())])?;
        chart.draw_series(
            f.points
                .iter()
                .map(|&(x, y, _)| Circle::new((x, y), 4, color.filled())),
        )?;
        chart
            .draw_series(LineSeries::new(
                f.points.iter().map(|&(x, y, _)| (x, y)),
                color.stroke_width(2),
            ))?
            .label(f.name.clone())
            .legend(move |(x, y)| {
                PathElement::new([(x - 10, y), (x + 10, y)], color.stroke_width(2))
            });
    }
    Ok(())
}

/// One family's score histogram panel: log-spaced bin edges, share of kept and of dropped per bin.
struct Histogram {
    title: String,
    edges: Vec<f64>,
    kept: Vec<f64>,
    dropped: Vec<f64>,
    counts: (usize, usize),
    /// Scores ≤ 0 or not finite (no place on a log axis).
    off_axis: usize,
    missing: Option<String>,
}

/// `scores.parquet`, or the `scores/part-*.parquet` segments, of a run.
fn score_files(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join("scores.parquet");
    if single.is_file() {
        return vec![single];
    }
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir.join("scores"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    parts.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
    });
    parts.sort();
    parts
}

/// (score, trained) of every sample of a run.
pub fn read_scores(dir: &Path) -> Result<Vec<(f32, bool)>> {
    let files = score_files(dir);
    anyhow::ensure!(
        !files.is_empty(),
        "no scores.parquet or scores/part-*.parquet in {}",
        dir.display()
    );
    let mut rows = Vec::new();
    for f in files {
        let file =
            std::fs::File::open(&f).with_context(|| format!("cannot open {}", f.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not Parquet", f.display()))?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["score", "trained"]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .with_context(|| format!("{}: no column `{name}`", f.display()))
            };
            let score = col("score")?
                .as_any()
                .downcast_ref::<Float32Array>()
                .context("`score` is not f32")?
                .clone();
            let trained = col("trained")?
                .as_any()
                .downcast_ref::<BooleanArray>()
                .context("`trained` is not bool")?
                .clone();
            rows.extend(
                (0..batch.num_rows())
                    .map(|i| (score.value(i), !trained.is_null(i) && trained.value(i))),
            );
        }
    }
    Ok(rows)
}

const BINS: usize = 30;

fn histogram(title: String, rows: &[(f32, bool)]) -> Histogram {
    let positive: Vec<(f64, bool)> = rows
        .iter()
        .map(|&(s, t)| (s as f64, t))
        .filter(|(s, _)| s.is_finite() && *s > 0.0)
        .collect();
    let off_axis = rows.len() - positive.len();
    let (lo, hi) = positive
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (s, _)| {
            (a.min(*s), b.max(*s))
        });
    let (lo, hi) = match (positive.is_empty(), lo < hi) {
        (true, _) => (1e-3, 1.0),
        (false, true) => (lo, hi * 1.0001),
        (false, false) => (lo * 0.5, lo * 2.0),
    };
    let edges: Vec<f64> = (0..=BINS)
        .map(|k| lo * (hi / lo).powf(k as f64 / BINS as f64))
        .collect();
    let (mut kept, mut dropped) = (vec![0.0; BINS], vec![0.0; BINS]);
    for &(s, t) in &positive {
        let at = ((s / lo).ln() / (hi / lo).ln() * BINS as f64).floor();
        let k = at.clamp(0.0, BINS as f64 - 1.0) as usize;
        if t { kept[k] += 1.0 } else { dropped[k] += 1.0 }
    }
    let counts = (
        positive.iter().filter(|p| p.1).count(),
        positive.iter().filter(|p| !p.1).count(),
    );
    kept.iter_mut().for_each(|v| *v /= counts.0.max(1) as f64);
    dropped
        .iter_mut()
        .for_each(|v| *v /= counts.1.max(1) as f64);
    let missing = positive
        .is_empty()
        .then(|| "no positive finite score to show".to_string());
    Histogram {
        title,
        edges,
        kept,
        dropped,
        counts,
        off_axis,
        missing,
    }
}

fn score_data(out: &Path, exp: &Experiment, configs: &[Config], s: &Summary) -> Vec<Histogram> {
    let seed = if exp.seeds.contains(&1) {
        1
    } else {
        exp.seeds[0]
    };
    let chosen = s
        .rows
        .iter()
        .filter(|r| r.family != grid::RANDOM && r.family != grid::REFERENCE)
        .take(4);
    chosen
        .map(|r| {
            let c = &configs[r.chosen];
            let title = format!("{} (seed {seed})", c.label);
            match read_scores(&grid::run_dir(out, c, seed)) {
                Ok(rows) => histogram(title, &rows),
                Err(e) => Histogram {
                    missing: Some(format!("{e:#}")),
                    ..histogram(title, &[])
                },
            }
        })
        .collect()
}

fn draw_scores<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Histogram],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(
        "importance scores of kept (trained) vs dropped samples, chosen configuration per family",
        (FONT, 22),
    )?;
    if panels.is_empty() {
        root.draw(&Text::new(
            "no non-random family to show",
            (40, 40),
            (FONT, 20),
        ))?;
        return Ok(());
    }
    let shape = match panels.len() {
        1 => (1, 1),
        2 => (1, 2),
        _ => (2, 2),
    };
    for (area, h) in root.split_evenly(shape).iter().zip(panels) {
        draw_histogram(area, h)?;
    }
    Ok(())
}

fn draw_histogram<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, h: &Histogram) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if let Some(why) = &h.missing {
        area.draw(&Text::new(
            format!("{}: {why}", h.title),
            (20, 30),
            (FONT, 14),
        ))?;
        return Ok(());
    }
    let top = h
        .kept
        .iter()
        .chain(&h.dropped)
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1e-3)
        * 1.1;
    let (lo, hi) = (h.edges[0], h.edges[BINS]);
    let mut chart = ChartBuilder::on(area)
        .caption(&h.title, (FONT, 16))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..top)?;
    let x_desc = if h.off_axis > 0 {
        format!(
            "per-sample score (log scale; {} scores ≤ 0 not shown)",
            h.off_axis
        )
    } else {
        "per-sample score (log scale)".into()
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("share of the group")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 14))
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.1e}"))
        .draw()?;
    let groups = [
        (
            &h.kept,
            COLORS[0],
            format!("kept (trained), n = {}", h.counts.0),
        ),
        (
            &h.dropped,
            COLORS[3],
            format!("dropped, n = {}", h.counts.1),
        ),
    ];
    for (shares, color, label) in groups {
        let bars = (0..BINS).map(|k| {
            Rectangle::new(
                [(h.edges[k], 0.0), (h.edges[k + 1], shares[k])],
                color.mix(0.45).filled(),
            )
        });
        chart.draw_series(bars)?.label(label).legend(move |(x, y)| {
            Rectangle::new([(x - 8, y - 5), (x + 8, y + 5)], color.mix(0.45).filled())
        });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_keeps_points_nothing_cheaper_beats() {
        let pts = [
            (0.5, 10.0, 0.0),
            (0.7, 12.0, 0.0),
            (0.9, 9.0, 0.0),
            (0.3, 11.0, 0.0),
        ];
        assert_eq!(
            envelope(&pts, false),
            [(0.3, 11.0), (0.5, 10.0), (0.9, 9.0)]
        );
        assert_eq!(envelope(&pts, true), [(0.3, 11.0), (0.7, 12.0)]);
    }

    #[test]
    fn histogram_shares_sum_to_one_per_group_and_skip_non_positive_scores() {
        let rows = [
            (1e-3, true),
            (1e-1, true),
            (1.0, false),
            (0.0, false),
            (f32::NAN, true),
        ];
        let h = histogram("t".into(), &rows);
        assert_eq!(h.counts, (2, 1));
        assert_eq!(h.off_axis, 2);
        assert!((h.kept.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((h.dropped.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(h.edges.windows(2).all(|w| w[1] / w[0] > 1.0));
    }
}
