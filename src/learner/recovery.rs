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
use super::trace::{ChangeMark, RunningTotal, TracePoint};

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
    /// from before the change): the metric over the rows of the segment's second half.
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
            // The mark's own record; the event list for traces written before it was kept.
            let first_detection = m
                .detected
                .or_else(|| {
                    events
                        .iter()
                        .find(|e| e.key.is_none() && e.sample >= at && e.sample < seg_end)
                        .map(|e| (e.detector, e.sample))
                })
                .map(|(detector, sample)| Detection {
                    detector: detector.name().to_string(),
                    sample,
                    delay: sample - at,
                });
            let seg: Vec<&TracePoint> = points
                .iter()
                .filter(|p| p.sample > at && p.sample <= seg_end)
                .collect();
            let (settled, peak, recovery_samples) = settle(&seg, at, seg_end);
            let own = own_rows(points, m.total, at, seg_end, window);
            let (settled_own_rows, recovery_samples_own_rows) =
                own.map_or((None, None), |o| settle_own(&o, &seg, at, seg_end, window));
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
/// the segment (at, seg_end]: from the change's own total while the window reaches back to
/// it, else from the first point at or after the window's start (at most `window` rows; one
/// trace spacing where the thinned trace is coarser than a window). None without totals
/// (a trace written before they were kept).
fn own_rows(
    points: &[TracePoint],
    origin: Option<RunningTotal>,
    at: u64,
    seg_end: u64,
    window: u64,
) -> Option<Vec<(u64, f64)>> {
    let origin = origin?;
    let base = points.partition_point(|p| p.sample <= at);
    let mut out = Vec::new();
    for (i, p) in points.iter().enumerate().skip(base) {
        if p.sample > seg_end {
            break;
        }
        if p.total.rows == 0 {
            return None;
        }
        let from = at.max(p.sample.saturating_sub(window));
        let start = if from == at || i == base {
            origin
        } else {
            let k = base + points[base..i].partition_point(|q| q.sample < from);
            points[k.min(i - 1)].total
        };
        if let Some(v) = p.total.mean_since(&start) {
            out.push((p.sample, v));
        }
    }
    Some(out)
}

/// (settled level, recovery samples) of a segment's own-rows series: see
/// [`ChangeRecovery::recovery_samples_own_rows`]. The settled level is the metric over the
/// rows of the segment's second half, from the totals.
fn settle_own(
    own: &[(u64, f64)],
    seg: &[&TracePoint],
    at: u64,
    seg_end: u64,
    window: u64,
) -> (Option<f64>, Option<u64>) {
    let mid = at + (seg_end - at) / 2;
    let halves = own.iter().filter(|p| p.0 >= mid).count();
    if halves < 2 || own.len() - halves < 2 {
        return (None, None);
    }
    let (Some(from), Some(to)) = (seg.iter().find(|p| p.sample >= mid), seg.last()) else {
        return (None, None);
    };
    let Some(settled) = to.total.mean_since(&from.total) else {
        return (None, None);
    };
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

    /// A change at `at` without the running total (as in traces written before it).
    fn mark(at: u64) -> ChangeMark {
        ChangeMark {
            name: format!("at {at}"),
            start: Boundary::Sample(at),
            at: Some(at),
            total: None,
            detected: None,
        }
    }

    /// A change at `at` of the stream [`trace`] draws from `f`, with its running total.
    fn mark_in(f: impl Fn(u64) -> f64, at: u64) -> ChangeMark {
        let sum = (1..=at).map(|r| f(r.div_ceil(10) * 10)).sum();
        ChangeMark {
            total: Some(RunningTotal {
                sum,
                rows: at,
                power: false,
            }),
            ..mark(at)
        }
    }

    /// Points every 10 samples; each row since the last point has the metric `f(sample)`,
    /// and the plotted `model` is `f` itself.
    fn trace(f: impl Fn(u64) -> f64) -> Vec<TracePoint> {
        let mut sum = 0.0;
        (1..=200)
            .map(|i| {
                sum += 10.0 * f(i * 10);
                TracePoint {
                    sample: i * 10,
                    model: f(i * 10),
                    baseline: None,
                    total: RunningTotal {
                        sum,
                        rows: i * 10,
                        power: false,
                    },
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
        let f = |s: u64| if s <= 1000 { 5.0 } else { 1.0 };
        let quiet = trace(f);
        let trailing: Vec<TracePoint> = (quiet.iter().enumerate())
            .map(|(i, p)| {
                let q = &quiet[i.saturating_sub(10)];
                let model = p.total.mean_since(&q.total).unwrap_or(p.model);
                TracePoint { model, ..*p }
            })
            .collect();
        let r = &recoveries(&[mark_in(f, 1000)], &trailing, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples, Some(100), "the window's lag: {r:?}");
        assert_eq!(r.recovery_samples_own_rows, Some(0), "{r:?}");
        assert_eq!(r.settled_own_rows, Some(1.0));
        // The same change between two trace points (1005) and a window that is not a
        // multiple of their spacing: the first reading starts at the change itself, not at
        // the point before it, and no reading holds more than a window of rows.
        let g = |s: u64| if s <= 1000 { 5.0 } else { 1.0 };
        let off = trace(g);
        let own = own_rows(&off, mark_in(g, 1005).total, 1005, 2000, 95).unwrap();
        assert_eq!(own[0], (1010, 1.0), "only rows 1006-1010");
        assert!(own.iter().all(|p| p.1 == 1.0), "{own:?}");
        // A learning curve: 5.0 for 300 samples, then 1.0. Its own-rows window is in the
        // band once it holds no row of the curve (1400), not at the first lucky point.
        // Its first point (1010) is a lucky one, in the band.
        let c = |s: u64| if (1011..=1300).contains(&s) { 5.0 } else { 1.0 };
        let curve = trace(c);
        let own = own_rows(&curve, mark_in(c, 1000).total, 1000, 2000, 100).unwrap();
        assert_eq!(own[0], (1010, 1.0));
        // At most a window: at 1400 the rows 1301-1400, all 1.0.
        assert_eq!(own.iter().find(|p| p.0 == 1400).unwrap().1, 1.0);
        let r = &recoveries(&[mark_in(c, 1000)], &curve, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples_own_rows, Some(400), "{r:?}");
        // The settled level is the metric over the second half's rows (1500-2000).
        assert_eq!(r.settled_own_rows, Some(1.0));
        // Traces written before the totals were kept tell nothing.
        let r = &recoveries(&[mark(1000)], &curve, &[], 2000, 100)[0];
        assert_eq!(r.recovery_samples_own_rows, None);
        assert!(r.recovery_samples.is_some());
    }

    #[test]
    fn totals_of_different_kinds_do_not_subtract() {
        let a = RunningTotal {
            sum: 10.0,
            rows: 10,
            power: false,
        };
        let b = RunningTotal {
            sum: 30.0,
            rows: 20,
            power: true,
        };
        assert_eq!(b.mean_since(&a), None);
        assert_eq!(b.mean_since(&RunningTotal { power: true, ..a }), Some(2.0));
        assert_eq!(a.mean_since(&a), None, "no rows between");
    }
}
