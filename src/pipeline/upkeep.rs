//! The upkeep ticker: process-wide gauges (energy, power, CPU, memory, checkpoint age)
//! refreshed on a timer of their own, so that a quiet or stalled stream still shows its
//! process's state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::energy::{EnergyMeter, EnergyReading};
use crate::telemetry;

/// Refreshes the process gauges every `every` until aborted.
pub(super) async fn tick_process_metrics(
    meter: Arc<Mutex<EnergyMeter>>,
    last_checkpoint_ms: Option<Arc<AtomicU64>>,
    started: Instant,
    every: Duration,
) {
    let mut interval = tokio::time::interval(every);
    let mut prev: Option<(Instant, f64)> = None;
    loop {
        interval.tick().await;
        let now = Instant::now();
        let r = meter.lock().expect("meter").read();
        let power = prev.map_or(0.0, |(t, j)| {
            (r.joules - j) / now.duration_since(t).as_secs_f64().max(1e-3)
        });
        prev = Some((now, r.joules));
        let age = last_checkpoint_ms
            .as_ref()
            .map(|ms| match ms.load(Ordering::Relaxed) {
                0 => started.elapsed().as_secs_f64(),
                last => unix_ms().saturating_sub(last) as f64 / 1000.0,
            });
        telemetry::process(&process_view(&r, power, age));
    }
}

pub(super) fn process_view(
    e: &EnergyReading,
    power_w: f64,
    checkpoint_age_s: Option<f64>,
) -> telemetry::ProcessView {
    telemetry::ProcessView {
        joules: e.joules,
        co2_grams: e.co2_grams,
        cpu_s: e.cpu_s,
        rss_bytes: e.rss_bytes,
        power_w,
        checkpoint_age_s,
    }
}

pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
