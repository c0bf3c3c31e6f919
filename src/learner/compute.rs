//! Compute accounting: what learning actually cost, counted, next to what training on every
//! row would have cost on the same stream.
//!
//! Selection is only worth its name if it saves work, so the learner counts its work in the
//! units the work is made of: rows through a forward pass, rows whose activation gradients
//! were back-propagated, rows in a weight gradient, optimiser steps, and thread CPU time.
//! Three buckets keep the purposes apart: `inference` (the prequential prediction of every
//! fresh row, needed whatever is trained), `scoring` (work done only to know a score: the
//! backward of rows that are then not trained, re-scoring the buffer) and `training`. The
//! `reference` bucket counts, step by step, what every-row training would have done on the
//! same micro-batches (every fresh row plus `reference_replay_ratio` replayed rows per fresh
//! row, one step per micro-batch), so "compute saved" is derived from counts, not guessed.
//! FLOPs follow from the layer widths: per row, a forward costs Σ 2·d_in·d_out, the
//! activation-gradient backward Σ over all layers but the first, a weight gradient
//! Σ 2·d_in·d_out again; an Adam step about 12 FLOPs per parameter, 3 more when averaged
//! weights follow each step (`training.average_decay`).

use serde::{Deserialize, Serialize};

/// Work of one kind, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub rows_forward: u64,
    pub rows_backward: u64,
    pub rows_weight_grad: u64,
    pub optimizer_steps: u64,
    /// Thread CPU seconds (the reference has none: it was not run).
    pub cpu_s: f64,
}

impl Work {
    pub fn add(&mut self, o: &Work) {
        self.rows_forward += o.rows_forward;
        self.rows_backward += o.rows_backward;
        self.rows_weight_grad += o.rows_weight_grad;
        self.optimizer_steps += o.optimizer_steps;
        self.cpu_s += o.cpu_s;
    }
}

/// The learner's running account (kept in checkpoints).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ComputeLedger {
    pub inference: Work,
    pub scoring: Work,
    pub training: Work,
    pub reference: Work,
}

/// FLOPs of an Adam step per parameter, and of moving an average of the weights toward them.
const ADAM_FLOPS_PER_PARAM: f64 = 12.0;
const AVERAGE_FLOPS_PER_PARAM: f64 = 3.0;

/// FLOPs per unit of work for one MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopModel {
    pub forward_row: f64,
    pub backward_row: f64,
    pub weight_grad_row: f64,
    pub step: f64,
}

impl FlopModel {
    /// From the layer widths `[inputs, hidden…, outputs]`.
    pub fn new(widths: &[usize]) -> Self {
        let layers: Vec<f64> = widths
            .windows(2)
            .map(|w| 2.0 * (w[0] * w[1]) as f64)
            .collect();
        let params: f64 = widths.windows(2).map(|w| (w[0] * w[1] + w[1]) as f64).sum();
        FlopModel {
            forward_row: layers.iter().sum(),
            backward_row: layers.iter().skip(1).sum(),
            weight_grad_row: layers.iter().sum(),
            step: ADAM_FLOPS_PER_PARAM * params,
        }
    }

    /// A learner's: with averaged weights (`training.average_decay` > 0) each step also
    /// updates the average. One place, so the stream's count and each learner's agree.
    pub fn of_learner(widths: &[usize], average_decay: f64) -> Self {
        let m = FlopModel::new(widths);
        if average_decay > 0.0 {
            m.with_averaging()
        } else {
            m
        }
    }

    /// The same with averaged weights updated after every step (a lerp of each parameter).
    pub fn with_averaging(mut self) -> Self {
        self.step *= (ADAM_FLOPS_PER_PARAM + AVERAGE_FLOPS_PER_PARAM) / ADAM_FLOPS_PER_PARAM;
        self
    }

    pub fn flops(&self, w: &Work) -> f64 {
        w.rows_forward as f64 * self.forward_row
            + w.rows_backward as f64 * self.backward_row
            + w.rows_weight_grad as f64 * self.weight_grad_row
            + w.optimizer_steps as f64 * self.step
    }
}

/// One bucket in a report: the counts, their FLOPs and their energy.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WorkReport {
    #[serde(flatten)]
    pub work: Work,
    pub flops: f64,
    /// Joules of this bucket's CPU time under the CPU-time power model (see `[energy]`).
    pub energy_j: f64,
}

/// The `compute` block of a report.
#[derive(Debug, Clone, Serialize)]
pub struct ComputeReport {
    pub inference: WorkReport,
    pub scoring: WorkReport,
    pub training: WorkReport,
    /// Every-row training on the same micro-batches (counted, not run).
    pub reference: WorkReport,
    pub reference_replay_ratio: f64,
    /// Scoring + training FLOPs.
    pub learn_flops: f64,
    pub learn_cpu_s: f64,
    /// 1 − learn FLOPs / reference FLOPs.
    pub saved_flops_fraction: f64,
    /// 1 − back-propagated rows / reference back-propagated rows.
    pub saved_backward_fraction: f64,
}

impl ComputeLedger {
    /// CPU seconds of inference, scoring and training.
    fn cpu_parts(&self) -> [f64; 3] {
        [
            self.inference.cpu_s,
            self.scoring.cpu_s,
            self.training.cpu_s,
        ]
    }

    pub fn add(&mut self, o: &ComputeLedger) {
        self.inference.add(&o.inference);
        self.scoring.add(&o.scoring);
        self.training.add(&o.training);
        self.reference.add(&o.reference);
    }

    pub fn report(&self, model: &FlopModel, reference_replay_ratio: f64) -> ComputeReport {
        let r = |w: &Work| WorkReport {
            work: *w,
            flops: model.flops(w),
            energy_j: 0.0,
        };
        let learn_flops = model.flops(&self.scoring) + model.flops(&self.training);
        let ref_flops = model.flops(&self.reference);
        let backward = self.scoring.rows_backward + self.training.rows_backward;
        ComputeReport {
            inference: r(&self.inference),
            scoring: r(&self.scoring),
            training: r(&self.training),
            reference: r(&self.reference),
            reference_replay_ratio,
            learn_flops,
            learn_cpu_s: self.scoring.cpu_s + self.training.cpu_s,
            saved_flops_fraction: saved(learn_flops, ref_flops),
            saved_backward_fraction: saved(backward as f64, self.reference.rows_backward as f64),
        }
    }
}

impl ComputeReport {
    /// Fills each bucket's energy from its CPU time at `watts_per_cpu_second` (the CPU-time
    /// model of [`crate::energy`]: watts per busy core × PUE).
    pub fn with_energy(mut self, watts_per_cpu_second: f64) -> Self {
        for b in [&mut self.inference, &mut self.scoring, &mut self.training] {
            b.energy_j = b.work.cpu_s * watts_per_cpu_second;
        }
        self
    }
}

fn saved(used: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        1.0 - used / reference
    } else {
        f64::NAN
    }
}

/// A stretch of the learner's work whose thread CPU time is split between the ledger's
/// buckets. Laps are timed with the monotonic clock (a vDSO read, tens of nanoseconds) and
/// booked as they come; the settle scales the stretch's bookings to its CPU time. The thread
/// CPU clock is a system call (a few tenths of a microsecond in this VM): read at the start
/// and the settle of every stretch, it was 8% of a Milan run's CPU at micro-batches of 8
/// (`perf`), and it was booked as learning work. So only one stretch in
/// [`CpuSampler::EVERY`] reads it; the others are scaled by the sampled stretches' recent
/// CPU-to-wall ratio (1 on an idle core; below 1 when the thread was preempted or asleep).
pub struct Stopwatch {
    cpu: Option<cpu_time::ThreadTime>,
    last: std::time::Instant,
    before: [f64; 3],
}

/// The CPU-to-wall ratio of the learner's sampled stretches, decayed so that it follows the
/// machine's load. Not checkpointed: a restarted learner samples its first stretch.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSampler {
    stretches: u64,
    cpu: f64,
    wall: f64,
}

impl CpuSampler {
    /// One stretch in this many reads the thread CPU clock.
    pub const EVERY: u64 = 16;
    /// Weight of the past at each sampled stretch (a memory of about 20 samples).
    const DECAY: f64 = 0.95;

    fn ratio(&self) -> f64 {
        if self.wall > 0.0 {
            self.cpu / self.wall
        } else {
            1.0
        }
    }

    fn record(&mut self, cpu: f64, wall: f64) {
        self.cpu = self.cpu * Self::DECAY + cpu;
        self.wall = self.wall * Self::DECAY + wall;
    }
}

/// The thread CPU time one read of the thread CPU clock adds between two readings (the
/// least of a few back-to-back pairs, measured once): a sampled stretch's CPU time spans the
/// return from its first read and the entry into its last, which its wall laps do not.
/// Without it, every stretch would be booked that much too long in proportion.
fn clock_read_cost() -> f64 {
    static COST: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        (0..16)
            .map(|_| cpu_time::ThreadTime::now().elapsed().as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    })
}

impl Stopwatch {
    pub fn start(ledger: &ComputeLedger, sampler: &mut CpuSampler) -> Self {
        let sampled = sampler.stretches.is_multiple_of(CpuSampler::EVERY);
        sampler.stretches += 1;
        Stopwatch {
            cpu: sampled.then(cpu_time::ThreadTime::now),
            last: std::time::Instant::now(),
            before: ledger.cpu_parts(),
        }
    }

    /// Wall seconds since the start or the last lap, to book into a bucket.
    pub fn lap(&mut self) -> f64 {
        let now = std::time::Instant::now();
        let d = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        d
    }

    /// Scales what was booked since the start to the stretch's thread CPU time, measured or
    /// (unsampled) estimated from the sampler's ratio.
    pub fn settle(self, ledger: &mut ComputeLedger, sampler: &mut CpuSampler) {
        let now = ledger.cpu_parts();
        let booked: f64 = now.iter().zip(&self.before).map(|(n, b)| n - b).sum();
        if booked <= 0.0 {
            return;
        }
        let f = match self.cpu {
            Some(t) => {
                let cpu = (t.elapsed().as_secs_f64() - clock_read_cost()).max(0.0);
                sampler.record(cpu, booked);
                cpu / booked
            }
            None => sampler.ratio(),
        };
        let parts = [
            &mut ledger.inference.cpu_s,
            &mut ledger.scoring.cpu_s,
            &mut ledger.training.cpu_s,
        ];
        for ((p, n), b) in parts.into_iter().zip(now).zip(self.before) {
            *p = b + (n - b) * f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stretch's bookings are scaled to its thread CPU time: the laps keep their shares,
    /// and time spent asleep (wall time without CPU) is not counted as work.
    #[test]
    fn a_stopwatch_books_its_thread_cpu_time_in_the_laps_shares() {
        let spin = |d: std::time::Duration| {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < d {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        };
        let mut l = ComputeLedger::default();
        l.training.cpu_s = 1.0;
        let cpu0 = cpu_time::ThreadTime::now();
        let mut sampler = CpuSampler::default();
        let mut clock = Stopwatch::start(&l, &mut sampler);
        spin(std::time::Duration::from_millis(20));
        l.inference.cpu_s += clock.lap();
        spin(std::time::Duration::from_millis(60));
        std::thread::sleep(std::time::Duration::from_millis(40));
        l.training.cpu_s += clock.lap();
        clock.settle(&mut l, &mut sampler);
        let cpu = cpu0.elapsed().as_secs_f64();
        let booked = l.inference.cpu_s + l.training.cpu_s - 1.0;
        assert!((booked - cpu).abs() < 0.002, "{booked} booked, {cpu} spent");
        assert!(booked < 0.1, "the sleep is not work: {booked}");
        // Shares of the wall laps (20 of 120 ms): preemption on a busy machine moves them.
        let share = l.inference.cpu_s / booked;
        assert!((0.05..0.4).contains(&share), "{share}: {l:?}");
        assert_eq!(l.scoring.cpu_s, 0.0);
        // The next stretches do not read the CPU clock: they are booked at the sampled
        // ratio (a third of the first stretch was asleep, and a busy machine preempts the
        // spinning), until the next sampled one.
        let ratio = sampler.ratio();
        assert!(ratio > 0.0 && ratio < 0.8, "{ratio}");
        for i in 1..CpuSampler::EVERY {
            let before = l.scoring.cpu_s;
            let mut clock = Stopwatch::start(&l, &mut sampler);
            assert!(clock.cpu.is_none(), "stretch {i} is not sampled");
            spin(std::time::Duration::from_millis(1));
            let lap = clock.lap();
            l.scoring.cpu_s += lap;
            clock.settle(&mut l, &mut sampler);
            let booked = l.scoring.cpu_s - before;
            assert!(
                (booked - lap * ratio).abs() < 1e-9,
                "{booked} vs {lap} × {ratio}"
            );
        }
        assert!(Stopwatch::start(&l, &mut sampler).cpu.is_some());
    }

    #[test]
    fn flops_follow_the_layer_widths() {
        // 16 → 64 → 64 → 1: the shapes of issue 11's table (7.4 MFLOP per 256 rows).
        let m = FlopModel::new(&[16, 64, 64, 1]);
        assert_eq!(m.forward_row, 2.0 * (16.0 * 64.0 + 64.0 * 64.0 + 64.0));
        assert_eq!(m.backward_row, 2.0 * (64.0 * 64.0 + 64.0));
        let per_256 = 256.0 * (m.forward_row + m.backward_row + m.weight_grad_row);
        assert!((per_256 / 1e6 - 7.44).abs() < 0.05, "{per_256}");
    }

    #[test]
    fn saved_fraction_compares_learning_with_the_reference() {
        let m = FlopModel::new(&[4, 8, 1]);
        let mut l = ComputeLedger {
            training: Work {
                rows_forward: 10,
                rows_backward: 40,
                rows_weight_grad: 40,
                optimizer_steps: 5,
                cpu_s: 0.5,
            },
            reference: Work {
                rows_forward: 20,
                rows_backward: 80,
                rows_weight_grad: 80,
                optimizer_steps: 10,
                cpu_s: 0.0,
            },
            ..ComputeLedger::default()
        };
        let r = l.report(&m, 1.0);
        assert!((r.saved_flops_fraction - 0.5).abs() < 1e-12);
        assert!((r.saved_backward_fraction - 0.5).abs() < 1e-12);
        assert_eq!(r.learn_cpu_s, 0.5);
        let e = r.clone().with_energy(4.4);
        assert!((e.training.energy_j - 2.2).abs() < 1e-12 && e.reference.energy_j == 0.0);
        // Scoring work counts against the saving.
        l.scoring.rows_backward = 40;
        let r = l.report(&m, 1.0);
        assert!(r.saved_backward_fraction.abs() < 1e-12);
    }
}
