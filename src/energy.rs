//! Energy and carbon estimates: CPU time → joules → grams of CO2, with the model stated.
//!
//! The Ericsson study's claim is about compute and carbon, so every run reports what it
//! cost. Where the kernel exposes RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`, also
//! used by AMD's driver) and it is readable, the package counters are used: they measure the
//! whole CPU package, every process on it, so they overstate a shared machine. Otherwise
//! (containers, most VMs, these CI machines) the estimate is the Green Algorithms model
//! (Lannelongue et al., 2021): CPU seconds × watts per core + resident GiB × seconds × watts
//! per GiB, times the data centre's PUE. Carbon is energy × grid intensity. Such estimators
//! err by tens of percent; what they are good for is ratios between runs on one machine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// `[energy]`: the power model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {
    /// Power of one busy core. Default: an AMD EPYC 7763 (280 W TDP / 64 cores ≈ 4.4 W).
    #[serde(default = "default_watts_per_core")]
    pub watts_per_core: f64,
    /// Power of resident memory (Green Algorithms: 0.3725 W per GiB).
    #[serde(default = "default_memory_watts")]
    pub memory_watts_per_gib: f64,
    /// Data-centre power usage effectiveness (1.0: count the IT load only).
    #[serde(default = "default_pue")]
    pub pue: f64,
    /// Grid carbon intensity in gCO2 per kWh (default 475: world average, IEA 2019).
    #[serde(default = "default_grid")]
    pub grid_g_per_kwh: f64,
    /// Use RAPL package counters where readable.
    #[serde(default = "yes")]
    pub rapl: bool,
}

fn default_watts_per_core() -> f64 {
    4.4
}
fn default_memory_watts() -> f64 {
    0.3725
}
fn default_pue() -> f64 {
    1.0
}
fn default_grid() -> f64 {
    475.0
}
fn yes() -> bool {
    true
}

impl Default for EnergyConfig {
    fn default() -> Self {
        EnergyConfig {
            watts_per_core: default_watts_per_core(),
            memory_watts_per_gib: default_memory_watts(),
            pue: default_pue(),
            grid_g_per_kwh: default_grid(),
            rapl: true,
        }
    }
}

impl EnergyConfig {
    /// Joules per CPU-second under the CPU-time model (a busy core × PUE), for splitting a
    /// run's energy between inference, scoring and training.
    pub fn joules_per_cpu_second(&self) -> f64 {
        self.watts_per_core * self.pue
    }

    /// Out-of-range values, as (key, expected, found).
    pub fn problem(&self) -> Option<(&'static str, &'static str, f64)> {
        let finite_pos = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_pos(self.watts_per_core) {
            return Some(("energy.watts_per_core", "watts ≥ 0", self.watts_per_core));
        }
        if !finite_pos(self.memory_watts_per_gib) {
            return Some((
                "energy.memory_watts_per_gib",
                "watts ≥ 0",
                self.memory_watts_per_gib,
            ));
        }
        if !(self.pue.is_finite() && self.pue >= 1.0) {
            return Some(("energy.pue", "a ratio ≥ 1", self.pue));
        }
        if !finite_pos(self.grid_g_per_kwh) {
            return Some(("energy.grid_g_per_kwh", "gCO2/kWh ≥ 0", self.grid_g_per_kwh));
        }
        None
    }
}

/// What a run has cost so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnergyReading {
    pub joules: f64,
    pub co2_grams: f64,
    pub cpu_s: f64,
    pub wall_s: f64,
    /// `rapl` or `cpu_time`.
    pub source: String,
    /// The model in words, for reports.
    pub model: String,
    #[serde(skip)]
    pub rss_bytes: Option<u64>,
}

/// RAPL package domains: (energy_uj file, wrap range, last reading).
struct Rapl {
    zones: Vec<(PathBuf, u64, u64)>,
    joules: f64,
}

impl Rapl {
    fn open(root: &Path) -> Option<Rapl> {
        let mut zones = Vec::new();
        for e in std::fs::read_dir(root).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // Top-level packages only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0") are parts.
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let file = e.path().join("energy_uj");
            let now = read_u64(&file)?;
            let range = read_u64(&e.path().join("max_energy_range_uj")).unwrap_or(u64::MAX);
            zones.push((file, range, now));
        }
        (!zones.is_empty()).then_some(Rapl { zones, joules: 0.0 })
    }

    fn update(&mut self) {
        for (file, range, last) in &mut self.zones {
            if let Some(now) = read_u64(file) {
                // The counter wraps at max_energy_range_uj.
                let delta = if now >= *last {
                    now - *last
                } else {
                    range.saturating_sub(*last) + now
                };
                self.joules += delta as f64 / 1e6;
                *last = now;
            }
        }
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Resident set size of this process (Linux; None elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Meters one run from its start.
pub struct EnergyMeter {
    cfg: EnergyConfig,
    cpu0: cpu_time::ProcessTime,
    wall0: Instant,
    last: Instant,
    gib_seconds: f64,
    rapl: Option<Rapl>,
}

impl EnergyMeter {
    pub fn start(cfg: EnergyConfig) -> Self {
        Self::start_with(cfg, Path::new("/sys/class/powercap"))
    }

    fn start_with(cfg: EnergyConfig, powercap: &Path) -> Self {
        let rapl = if cfg.rapl { Rapl::open(powercap) } else { None };
        EnergyMeter {
            cfg,
            cpu0: cpu_time::ProcessTime::now(),
            wall0: Instant::now(),
            last: Instant::now(),
            gib_seconds: 0.0,
            rapl,
        }
    }

    /// The model's parameters, by name (for the `gradsift_energy_model_info` labels).
    pub fn parameters(&self) -> [(&'static str, f64); 4] {
        let c = &self.cfg;
        [
            ("watts_per_core", c.watts_per_core),
            ("memory_watts_per_gib", c.memory_watts_per_gib),
            ("pue", c.pue),
            ("grid_g_per_kwh", c.grid_g_per_kwh),
        ]
    }

    pub fn source(&self) -> &'static str {
        if self.rapl.is_some() {
            "rapl"
        } else {
            "cpu_time"
        }
    }

    /// Reads the meters. Memory energy integrates the resident size sampled at each call,
    /// so call it regularly (the pipeline does, every `telemetry.publish_ms`).
    pub fn read(&mut self) -> EnergyReading {
        let now = Instant::now();
        let rss = rss_bytes();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.gib_seconds += rss.unwrap_or(0) as f64 / (1u64 << 30) as f64 * dt;
        self.last = now;
        let cpu_s = self.cpu0.elapsed().as_secs_f64();
        let wall_s = now.duration_since(self.wall0).as_secs_f64();
        let c = &self.cfg;
        let (joules, model) = match &mut self.rapl {
            Some(r) => {
                r.update();
                (
                    r.joules * c.pue,
                    format!(
                        "RAPL package energy (whole CPU package, all processes) x PUE {}; {} gCO2/kWh",
                        c.pue, c.grid_g_per_kwh
                    ),
                )
            }
            None => (
                (cpu_s * c.watts_per_core + self.gib_seconds * c.memory_watts_per_gib) * c.pue,
                format!(
                    "(CPU s x {} W/core + resident GiB x s x {} W/GiB) x PUE {}; {} gCO2/kWh (Green Algorithms model; no readable RAPL)",
                    c.watts_per_core, c.memory_watts_per_gib, c.pue, c.grid_g_per_kwh
                ),
            ),
        };
        EnergyReading {
            joules,
            co2_grams: joules / 3.6e6 * c.grid_g_per_kwh,
            cpu_s,
            wall_s,
            source: self.source().to_string(),
            model,
            rss_bytes: rss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_counts_cpu_time_and_memory() {
        let cfg = EnergyConfig {
            rapl: false,
            ..EnergyConfig::default()
        };
        let mut m = EnergyMeter::start(cfg);
        // Burn some CPU so the reading cannot be zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        let r = m.read();
        assert_eq!(r.source, "cpu_time");
        assert!(r.cpu_s > 0.0);
        // At least the CPU term, and the memory term adds to it.
        assert!(r.joules >= r.cpu_s * 4.4, "{r:?}");
        assert!((r.co2_grams - r.joules / 3.6e6 * 475.0).abs() < 1e-12);
        assert!(r.model.contains("4.4 W/core"));
    }

    #[test]
    fn rapl_counters_are_read_with_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("intel-rapl:0");
        let sub = dir.path().join("intel-rapl:0:0");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(pkg.join("energy_uj"), "999000000\n").unwrap();
        std::fs::write(pkg.join("max_energy_range_uj"), "1000000000\n").unwrap();
        std::fs::write(sub.join("energy_uj"), "5\n").unwrap();
        let mut m = EnergyMeter::start_with(EnergyConfig::default(), dir.path());
        assert_eq!(m.source(), "rapl");
        // 1 J to the wrap point, then 2 J past it; the sub-zone is not added twice.
        std::fs::write(pkg.join("energy_uj"), "2000000\n").unwrap();
        let r = m.read();
        assert!((r.joules - 3.0).abs() < 1e-9, "{r:?}");
        assert!(r.model.starts_with("RAPL"));
    }

    #[test]
    fn bad_values_are_named() {
        let c = EnergyConfig {
            pue: 0.5,
            ..EnergyConfig::default()
        };
        assert_eq!(c.problem().unwrap().0, "energy.pue");
    }
}
