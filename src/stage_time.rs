//! CPU time and waiting time per pipeline stage (source, features, learner, sink, checkpoint
//! writer): which stage is the
//! bottleneck, and where each one waits. A stage's thread adds its own CPU time when it ends;
//! waits are timed where they happen, at the bounded channels between stages (a source
//! waiting to send is backpressure from the learner; a learner waiting to receive is starved
//! by its source).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One stage's counters, shared between its thread and the report.
#[derive(Debug, Default)]
pub struct StageTime {
    cpu_ns: AtomicU64,
    wait_ns: AtomicU64,
}

impl StageTime {
    /// Runs `f` (a blocking send or receive) and counts its duration as waiting.
    pub fn waiting<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(&self.wait_ns, start.elapsed());
        out
    }

    /// Runs `f` on the current thread and counts the thread's CPU time in it.
    pub fn on_thread<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = cpu_time::ThreadTime::now();
        let out = f();
        self.add(&self.cpu_ns, start.elapsed());
        out
    }

    fn add(&self, counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn seconds(&self) -> StageSeconds {
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        StageSeconds {
            cpu_s: s(&self.cpu_ns),
            wait_s: s(&self.wait_ns),
        }
    }
}

/// A stage's totals in the report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StageSeconds {
    /// CPU time of the stage's thread.
    pub cpu_s: f64,
    /// Time blocked on its channel: sending (source) or receiving (learner, sink); the feature stage does both.
    pub wait_s: f64,
}

/// The stages of a run.
#[derive(Debug, Default)]
pub struct StageTimes {
    pub source: StageTime,
    pub features: StageTime,
    pub learner: StageTime,
    pub sink: StageTime,
    /// The checkpoint writer (its wait is for the next checkpoint).
    pub checkpoint: StageTime,
}

/// [`StageTimes`] as the report shows them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StageReport {
    pub source: StageSeconds,
    #[serde(default)]
    pub features: StageSeconds,
    pub learner: StageSeconds,
    pub sink: StageSeconds,
    #[serde(default)]
    pub checkpoint: StageSeconds,
}

impl StageTimes {
    pub fn report(&self) -> StageReport {
        StageReport {
            source: self.source.seconds(),
            features: self.features.seconds(),
            learner: self.learner.seconds(),
            sink: self.sink.seconds(),
            checkpoint: self.checkpoint.seconds(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_and_cpu_are_counted_apart() {
        let t = StageTime::default();
        t.waiting(|| std::thread::sleep(Duration::from_millis(30)));
        // Spin until this thread has used 30 ms of CPU (not of wall time: the test runs
        // beside others on two cores).
        t.on_thread(|| {
            let start = cpu_time::ThreadTime::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        let s = t.seconds();
        assert!(s.wait_s >= 0.029, "{s:?}");
        // Spinning costs CPU; sleeping does not (the 30 ms of sleep add none).
        assert!(s.cpu_s >= 0.029 && s.cpu_s < 0.055, "{s:?}");
    }
}
