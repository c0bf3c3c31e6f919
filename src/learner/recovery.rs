//! Recovery from known changes: for each change point of the stream (`evaluation.changes`),
//! when a stream-wide drift detector first fired after it, and how many samples the windowed
//! prequential metric took to come back within 10% of the level it settles at.
//!
//! Read off the bounded metric trace, so it costs nothing per sample; its resolution is the
//! trace's spacing (16 samples on a stream of up to 16 k, doubling with length). Two
//! readings. The windowed metric as plotted lags the change by up to one evaluation window,
//! and right after it mostly measures the rows before: where the old regime's error was
//! higher (a busier site), its "recovery" is the window emptying of them. So recovery is
//! also read over the segment's own rows only (the window never reaches back before the
//! change), which measures what the learner did after it.

use serde::Serialize;

use super::drift::DriftEvent;
use super::trace::{ChangeMark, TracePoint};

/// "Recovered": the windowed metric at most this fraction above its settled level.
pub const BAND: f64 = 0.10;

/// The first stream-wide detection after a change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub detector: String,
    pub sample: u64,
    /// Samples after the change.
    pub delay: u64,
}

/// How the learner met one known change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeRecovery {
    pub name: String,
    /// The first sample at or after the change; none when the stream never reached it.
    pub at: Option<u64>,
    /// Samples until the next change or the end of the stream.
    pub segment_samples: u64,
    pub first_detection: Option<Detection>,
    /// Mean windowed metric (lower is better) over the second half of the segment.
    pub settled: Option<f64>,
    /// The worst windowed metric in the segment's first half.
    pub peak: Option<f64>,
    /// Samples from the change until the windowed metric, past its worst point in the first
    /// half of the segment, is back within [`BAND`] of `settled` (0: it never left the band).
    /// None when the segment has too few trace points to tell.
    pub recovery_samples: Option<u64>,
    /// Read over the segment's own rows (a window of at most `evaluation.window` rows, none
    /// from before the change): the mean of that metric over the segment's second half.
    pub settled_own_rows: Option<f64>,
    /// Samples from the change until that metric is within [`BAND`] of `settled_own_rows`
    /// and stays there for a window (0: it was from the first trace point). None when the
    /// segment is too short to tell or the trace has no running totals.
    pub recovery_samples_own_rows: Option<u64>,
}

/// One entry per change mark, in stream order of the marks. `end` is the number of samples
/// seen; `points` are the trace's (metric lower is better); `events` the kept detections;
/// `window` the evaluation window, in rows.
pub fn recoveries(
    marks: &[ChangeMark],
    points: &[TracePoint],
    events: &[DriftEvent],
    end: u64,
    window: u64,
) -> Vec<ChangeRecovery> {
    let mut ats: Vec<u64> = marks.iter().filter_map(|m| m.at).collect();
    ats.sort_unstable();
    marks
        .iter()
        .map(|m| {
            let Some(at) = m.at else {
                return ChangeRecovery {
                    name: m.name.clone(),
                    at: None,
                    segment_samples: 0,
                    first_detection: None,
                    settled: None,
                    peak: None,
                    recovery_samples: None,
                    settled_own_rows: None,
                    recovery_samples_own_rows: None,
                };
            };
            let seg_end = ats.iter().copied().find(|&a| a > at).unwrap_or(end);
            let first_detection = events
                .iter()
                .find(|e| e.key.is_none() && e.sample >= at && e.sample < seg_end)
                .map(|e| Detection {
                    detector: e.detector.name().to_string(),
                    sample: e.sample,
                    delay: e.sample - at,
                });
            let seg: Vec<&TracePoint> = points
                .iter()
                .filter(|p| p.sample > at && p.sample <= seg_end)
                .collect();
            let (settled, peak, recovery_samples) = settle(&seg, at, seg_end);
            let own = own_rows(points, at, seg_end, window);
            let (settled_own_rows, recovery_samples_own_rows) =
                own.map_or((None, None), |o| settle_own(&o, at, seg_end, window));
            ChangeRecovery {
                name: m.name.clone(),
                at: Some(at),
                segment_samples: seg_end - at,
                first_detection,
                settled,
                peak,
                recovery_samples,
                settled_own_rows,
                recovery_samples_own_rows,
            }
        })
        .collect()
}

/// (sample, metric over the rows since max(change, sample − window)) at each trace point of
/// the segment (at, seg_end]. The stretch starts at the last point at or before its start,
/// so up to one trace spacing of rows before the change may count. None without totals.
fn own_rows(points: &[TracePoint], at: u64, seg_end: u64, window: u64) -> Option<Vec<(u64, f64)>> {
    let base = points.partition_point(|p| p.sample <= at);
    let mut out = Vec::new();
    for (i, p) in points.iter().enumerate().skip(base) {
        if p.sample > seg_end {
            break;
        }
        if p.rows == 0 {
            return None;
        }
        let from = at.max(p.sample.saturating_sub(window));
        // The last point at or before `from` (at or before the change at the earliest).
        let k = points[..i].partition_point(|q| q.sample <= from);
        let (total, rows) = k
            .checked_sub(1)
            .map_or((0.0, 0), |k| (points[k].total, points[k].rows));
        let n = p.rows.saturating_sub(rows);
        if n > 0 {
            out.push((p.sample, (p.total - total) / n as f64));
        }
    }
    Some(out)
}

/// (settled level, recovery samples) of a segment's own-rows series: see
/// [`ChangeRecovery::recovery_samples_own_rows`].
fn settle_own(
    own: &[(u64, f64)],
    at: u64,
    seg_end: u64,
    window: u64,
) -> (Option<f64>, Option<u64>) {
    let mid = at + (seg_end - at) / 2;
    let second: Vec<f64> = own.iter().filter(|p| p.0 >= mid).map(|p| p.1).collect();
    if second.len() < 2 || own.len() - second.len() < 2 {
        return (None, None);
    }
    let settled = second.iter().sum::<f64>() / second.len() as f64;
    let limit = settled * (1.0 + BAND);
    // The first point from which the metric stays in the band for a window.
    let stays = |i: usize| {
        let until = own[i].0 + window;
        own[i..]
            .iter()
            .take_while(|p| p.0 <= until)
            .all(|p| p.1 <= limit)
    };
    let back = (0..own.len()).find(|&i| stays(i));
    let samples = match back {
        Some(0) => 0,
        Some(i) => own[i].0 - at,
        None => seg_end - at,
    };
    (Some(settled), Some(samples))
}

/// (settled level, peak of the first half, recovery samples) of one segment's points.
fn settle(seg: &[&TracePoint], at: u64, seg_end: u64) -> (Option<f64>, Option<f64>, Option<u64>) {
    let mid = at + (seg_end - at) / 2;
    let (first, second): (Vec<&TracePoint>, Vec<&TracePoint>) =
        seg.iter().partition(|p| p.sample < mid);
    if first.len() < 2 || second.len() < 2 {
        return (None, None, None);
    }
    let settled = second.iter().map(|p| p.model).sum::<f64>() / second.len() as f64;
    let peak = first
        .iter()
        .map(|p| p.model)
        .fold(f64::NEG_INFINITY, f64::max);
    let limit = settled * (1.0 + BAND);
    // From the change to the first point after the first half's worst one that is back in
    // the band (the segment's length if none is).
    let worst = (first.iter().enumerate())
        .max_by(|a, b| a.1.model.total_cmp(&b.1.model))
        .map_or(0, |(i, _)| i);
    let recovery = if peak <= limit {
        0
    } else {
        seg[worst..]
            .iter()
            .find(|p| p.model <= limit)
            .map_or(seg_end, |p| p.sample)
            - at
    };
    (Some(settled), Some(peak), Some(recovery))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::drift::Detector;
    use crate::learner::eval::Boundary;

    fn mark(at: u64) -> ChangeMark {
        ChangeMark {
            name: format!("at {at}"),
            start: Boundary::Sample(at),
            at: Some(at),
        }
    }

    /// Points every 10 samples; each row since the last point has the metric `f(sample)`,
    /// and the plotted `model` is `f` itself.
    fn trace(f: impl Fn(u64) -> f64) -> Vec<TracePoint> {
        let mut total = 0.0;
        (1..=200)
            .map(|i| {
                total += 10.0 * f(i * 10);
                TracePoint {
                    sample: i * 10,
                    model: f(i * 10),
                    baseline: None,
                    total,
                    rows: i * 10,
                }
            })
            .collect()
    }

    fn event(sample: u64, key: Option<&str>) -> DriftEvent {
        DriftEvent {
            sample,
            time: 0,
            detector: Detector::PageHinkley,
            key: key.map(std::sync::Arc::from),
            statistic: 1.0,
            threshold: 0.5,
        }
    }

    #[test]
    fn recovery_is_counted_from_the_change_to_the_return_into_the_band() {
        // Error 1.0 before the change at 1000, 5.0 right after, back to 1.0 from 1300 on.
        let points = trace(|s| if (1000..1300).contains(&s) { 5.0 } else { 1.0 });
        let events = [event(990, None), event(1040, Some("k")), event(1060, None)];
        let r = recoveries(&[mark(1000)], &points, &events, 2000, 100);
        let r = &r[0];
        assert_eq!(r.segment_samples, 1000);
        assert_eq!(r.settled, Some(1.0));
        assert_eq!(r.peak, Some(5.0));
        assert_eq!(r.recovery_samples, Some(300));
        let d = r.first_detection.as_ref().expect("detected");
        assert_eq!(
            (d.sample, d.delay),
            (1060, 60),
            "stream-wide, after the change"
        );
        // A later wobble out of the band does not undo the recovery.
        let wobbly = trace(|s| match s {
            1000..1300 => 5.0,
            1400..1420 => 1.5,
            _ => 1.0,
        });
        let r = recoveries(&[mark(1000)], &wobbly, &[], 2000, 100);
        assert_eq!(r[0].recovery_samples, Some(300));
    }

    #[test]
    fn a_change_the_metric_never_feels_recovers_in_zero_and_segments_end_at_the_next_change() {
        let points = trace(|s| if s < 1000 { 2.0 } else { 1.0 });
        let r = recoveries(&[mark(1000), mark(500)], &points, &[], 2000, 100);
        // The change at 500 ends where the one at 1000 begins: its first half stays at 2.0,
        // about where its second half (750-1000) settles.
        assert_eq!(r[1].segment_samples, 500);
        assert_eq!(r[1].recovery_samples, Some(0));
        assert_eq!(r[0].recovery_samples, Some(0));
        assert!(r[0].first_detection.is_none());
    }

    #[test]
    fn a_change_never_reached_or_too_short_to_tell_has_no_figures() {
        let mut unreached = mark(0);
        unreached.at = None;
        let points = trace(|_| 1.0);
        let r = recoveries(&[unreached, mark(1995)], &points, &[], 2000, 100);
        assert_eq!(r[0].at, None);
        assert_eq!(r[1].recovery_samples, None);
        assert_eq!(r[1].recovery_samples_own_rows, None);
    }

    #[test]
    fn own_rows_recovery_ignores_the_rows_before_the_change_and_waits_a_window_in_the_band() {
        // A quieter regime from 1000 on, learnt at once: the plotted window (here a trailing
        // window of 100 rows, read from the totals) needs a window to empty of the old rows,
        // the segment's own rows never left the band.
        let quiet = trace(|s| if s <= 1000 { 5.0 } else { 1.0 });
        let trailing: Vec<TracePoint> = (quiet.iter().enumerate())
            .map(|(i, p)| {
                let q = &quiet[i.saturating_sub(10)];
                let n = (p.rows - q.rows).max(1) as f64;
                TracePoint {
                    model: if i < 10 {
                        p.model
                    } else {
                        (p.total - q.total) / n
                    },
                    ..*p
                }
            })
            .collect();
        let r = &recoveries(&[mark(1000)], &trailing, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples, Some(100), "the window's lag: {r:?}");
        assert_eq!(r.recovery_samples_own_rows, Some(0), "{r:?}");
        assert_eq!(r.settled_own_rows, Some(1.0));
        // A learning curve: 5.0 for 300 samples, then 1.0. Its own-rows window is in the
        // band once it holds no row of the curve (1400), not at the first lucky point.
        // Its first point (1010) is a lucky one, in the band.
        let curve = trace(|s| if (1011..=1300).contains(&s) { 5.0 } else { 1.0 });
        assert!(own_rows(&curve, 1000, 2000, 100).unwrap()[0] == (1010, 1.0));
        let r = &recoveries(&[mark(1000)], &curve, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples_own_rows, Some(400), "{r:?}");
        // Traces written before the totals were kept tell nothing.
        let old: Vec<TracePoint> = curve.iter().map(|p| TracePoint { rows: 0, ..*p }).collect();
        let r = &recoveries(&[mark(1000)], &old, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples_own_rows, None);
        assert!(r.recovery_samples.is_some());
    }
}
