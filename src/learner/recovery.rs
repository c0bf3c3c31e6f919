//! Recovery from known changes: for each change point of the stream (`evaluation.changes`),
//! when a stream-wide drift detector first fired after it, and how many samples the windowed
//! prequential metric took to come back within 10% of the level it settles at.
//!
//! Read off the bounded metric trace, so it costs nothing per sample; its resolution is the
//! trace's spacing (16 samples on a stream of up to 16 k, doubling with length), and the
//! windowed metric lags the change by up to one evaluation window: both are the same with
//! and without drift reactions, which is the comparison it serves.

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
}

/// One entry per change mark, in stream order of the marks. `end` is the number of samples
/// seen; `points` are the trace's (metric lower is better); `events` the kept detections.
pub fn recoveries(
    marks: &[ChangeMark],
    points: &[TracePoint],
    events: &[DriftEvent],
    end: u64,
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
            ChangeRecovery {
                name: m.name.clone(),
                at: Some(at),
                segment_samples: seg_end - at,
                first_detection,
                settled,
                peak,
                recovery_samples,
            }
        })
        .collect()
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

    fn trace(f: impl Fn(u64) -> f64) -> Vec<TracePoint> {
        (1..=200)
            .map(|i| TracePoint {
                sample: i * 10,
                model: f(i * 10),
                baseline: None,
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
        let r = recoveries(&[mark(1000)], &points, &events, 2000);
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
        let r = recoveries(&[mark(1000)], &wobbly, &[], 2000);
        assert_eq!(r[0].recovery_samples, Some(300));
    }

    #[test]
    fn a_change_the_metric_never_feels_recovers_in_zero_and_segments_end_at_the_next_change() {
        let points = trace(|s| if s < 1000 { 2.0 } else { 1.0 });
        let r = recoveries(&[mark(1000), mark(500)], &points, &[], 2000);
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
        let r = recoveries(&[unreached, mark(1995)], &points, &[], 2000);
        assert_eq!(r[0].at, None);
        assert_eq!(r[1].recovery_samples, None);
    }
}
