//! The prequential metric over the stream, as a bounded series for the run plot.
//!
//! A drifting stream is read in a picture: the windowed error against time, the baseline
//! beside it, and where the detectors fired. The series keeps at most `CAP` points: when
//! full, every other point goes and the spacing doubles, so a run of any length draws with
//! the same memory, its early part as coarse as its late one. Known change points of the
//! stream (`evaluation.changes`) are marked on it as the rows reach them.

use serde::{Deserialize, Serialize};

use super::drift::Detector;
use super::eval::Boundary;

/// Points kept at most.
const CAP: usize = 1024;

/// One point: the sample number, the model's windowed metric, and the baseline's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TracePoint {
    pub sample: u64,
    pub model: f64,
    pub baseline: Option<f64>,
    /// The stream's running total behind `model`: the metric over the rows between two
    /// points is the difference of theirs. 0 rows in traces written before it was kept.
    #[serde(default)]
    pub total: RunningTotal,
}

/// The running sum of the per-row quantity behind the plotted metric (absolute error, power
/// loss dB, or top-1 misses: `Metrics::running_total`) and the rows it sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningTotal {
    pub sum: f64,
    pub rows: u64,
    /// Whether it sums power loss (rows with beam powers); two totals of different kinds do
    /// not subtract.
    pub power: bool,
}

impl RunningTotal {
    /// The mean over the rows between `earlier` and this one, when there are rows and both
    /// sum the same thing.
    pub fn mean_since(&self, earlier: &RunningTotal) -> Option<f64> {
        let n = self.rows.checked_sub(earlier.rows).filter(|&n| n > 0)?;
        (self.power == earlier.power).then(|| (self.sum - earlier.sum) / n as f64)
    }
}

/// A known change point and the sample at which the stream reached it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeMark {
    pub name: String,
    pub start: Boundary,
    pub at: Option<u64>,
    /// The running total just before the change's first row.
    #[serde(default)]
    pub total: Option<RunningTotal>,
    /// The first stream-wide detection at or after the change, before the next one (kept
    /// here: the report's event list is bounded and per-key events may fill it first).
    #[serde(default)]
    pub detected: Option<(Detector, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricTrace {
    stride: u64,
    pub points: Vec<TracePoint>,
    #[serde(default)]
    pub changes: Vec<ChangeMark>,
}

impl Default for MetricTrace {
    fn default() -> Self {
        MetricTrace {
            stride: 16,
            points: Vec::new(),
            changes: Vec::new(),
        }
    }
}

impl MetricTrace {
    /// A trace that marks these change points.
    pub fn with_changes(changes: &[(String, Boundary)]) -> Self {
        MetricTrace {
            changes: changes
                .iter()
                .map(|(name, start)| ChangeMark {
                    name: name.clone(),
                    start: *start,
                    at: None,
                    total: None,
                    detected: None,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Marks the change points that the `sample`-th row (event time `time`) reaches first;
    /// `total` is the running total before that row is scored.
    pub fn mark(&mut self, sample: u64, time: i64, total: RunningTotal) {
        for c in &mut self.changes {
            if c.at.is_none() && c.start.reached(sample, time) {
                c.at = Some(sample);
                c.total = Some(total);
            }
        }
    }

    /// A stream-wide `detector` fired at `sample`: the first detection of the latest change
    /// reached by then, if it has none.
    pub fn detected(&mut self, sample: u64, detector: Detector) {
        // The latest change reached (every one the same row reached, if several).
        let latest = (self.changes.iter())
            .filter_map(|c| c.at.filter(|&a| a <= sample))
            .max();
        for c in &mut self.changes {
            if latest.is_some() && c.at == latest && c.detected.is_none() {
                c.detected = Some((detector, sample));
            }
        }
    }

    /// Whether `sample` is one the trace records (so the caller computes its metric).
    pub fn due(&self, sample: u64) -> bool {
        sample > 0 && sample.is_multiple_of(self.stride)
    }

    pub fn record(&mut self, p: TracePoint) {
        if !(p.model.is_finite()) {
            return;
        }
        self.points.push(p);
        if self.points.len() >= CAP {
            self.stride *= 2;
            let stride = self.stride;
            self.points.retain(|q| q.sample.is_multiple_of(stride));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_marked_at_the_first_row_that_reaches_it() {
        let mut t = MetricTrace::with_changes(&[
            ("by time".into(), Boundary::Time(100)),
            ("by sample".into(), Boundary::Sample(5)),
        ]);
        for (sample, time) in [(0, 10), (4, 120), (5, 90), (6, 130)] {
            t.mark(sample, time, RunningTotal::default());
        }
        let at: Vec<_> = t.changes.iter().map(|c| c.at).collect();
        assert_eq!(at, [Some(4), Some(5)]);
    }

    /// Each change keeps its own first stream-wide detection, whatever fills the report's
    /// bounded event list: detections before any change, or after a later one, are not its.
    #[test]
    fn each_change_keeps_its_first_detection() {
        let mut t = MetricTrace::with_changes(&[
            ("a".into(), Boundary::Sample(100)),
            ("b".into(), Boundary::Sample(200)),
            ("c".into(), Boundary::Sample(200)),
        ]);
        t.detected(50, Detector::Adwin);
        for sample in [100, 200] {
            t.mark(sample, 0, RunningTotal::default());
        }
        t.detected(150, Detector::PageHinkley);
        t.detected(160, Detector::Adwin);
        t.detected(230, Detector::ScoreShift);
        let got: Vec<_> = t.changes.iter().map(|c| c.detected).collect();
        assert_eq!(
            got,
            [
                Some((Detector::PageHinkley, 150)),
                Some((Detector::ScoreShift, 230)),
                Some((Detector::ScoreShift, 230))
            ]
        );
    }

    #[test]
    fn a_long_stream_keeps_a_bounded_evenly_spaced_series() {
        let mut t = MetricTrace::default();
        for s in 0..1_000_000u64 {
            if t.due(s) {
                let baseline = Some(1.0);
                t.record(TracePoint {
                    sample: s,
                    model: s as f64,
                    baseline,
                    total: RunningTotal::default(),
                });
            }
        }
        assert!(
            t.points.len() < CAP && t.points.len() > CAP / 4,
            "{}",
            t.points.len()
        );
        let gaps: Vec<u64> = t
            .points
            .windows(2)
            .map(|w| w[1].sample - w[0].sample)
            .collect();
        assert!(gaps.iter().all(|g| *g == gaps[0]), "even spacing");
        assert!(t.points.last().unwrap().sample > 990_000, "reaches the end");
    }
}
