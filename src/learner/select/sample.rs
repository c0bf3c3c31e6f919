//! `sample`: importance sampling. Row i is trained with probability p_i = min(1, c·s_i / s̄)
//! (s̄ the window mean) and loss weight 1/p_i, so the expected gradient is the full-data
//! gradient while the high-score rows are the likely ones (Katharopoulos & Fleuret 2018;
//! Zhao & Zhang 2015). The scale c is refitted on the window every `window / 8` rows so that
//! the mean of p over the window is `keep`; p is floored at `keep / 20` so that no weight
//! exceeds 20/keep (an unclipped 1/p lets one near-zero score dominate a step).

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Decision, ScoreWindow, SelectionConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Proportional {
    /// c / s̄, fitted on the window.
    scale: f64,
    /// Rows decided since the last fit.
    since_fit: usize,
}

fn probability(scale: f64, s: f32, floor: f64) -> f64 {
    (scale * s.max(0.0) as f64).clamp(floor, 1.0)
}

impl Proportional {
    /// Bisection on c so that mean_i p_i = keep over the window.
    fn fit(&mut self, keep: f64, win: &ScoreWindow) {
        let mean = win.mean();
        if mean <= 0.0 || !mean.is_finite() {
            self.scale = 0.0;
            return;
        }
        let floor = keep / 20.0;
        let avg = |c: f64| {
            let scale = c / mean;
            win.values()
                .iter()
                .map(|s| probability(scale, *s, floor))
                .sum::<f64>()
                / win.len() as f64
        };
        let (mut lo, mut hi) = (0.0, 1.0);
        while avg(hi) < keep && hi < 1e6 {
            hi *= 2.0;
        }
        for _ in 0..30 {
            let mid = 0.5 * (lo + hi);
            if avg(mid) < keep { lo = mid } else { hi = mid }
        }
        self.scale = hi / mean;
    }

    pub fn decide(
        &mut self,
        cfg: &SelectionConfig,
        win: &mut ScoreWindow,
        scores: &[f32],
        rng: &mut impl Rng,
        d: &mut Decision,
    ) {
        if cfg.keep >= 1.0 {
            // Everything, weight 1 (a zero score would otherwise keep its floor probability).
            scores.iter().for_each(|_| d.push(true, 1.0));
            return;
        }
        if self.scale == 0.0 || self.since_fit >= (cfg.window / 8).max(1) {
            self.fit(cfg.keep, win);
            self.since_fit = 0;
        }
        self.since_fit += scores.len();
        let floor = cfg.keep / 20.0;
        for &s in scores {
            let p = if self.scale > 0.0 {
                probability(self.scale, s, floor)
            } else {
                cfg.keep
            };
            let keep = rng.random::<f64>() < p;
            d.push(keep, if keep { (1.0 / p) as f32 } else { 0.0 });
        }
        d.unbiased = true;
        d.threshold = win.mean() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::super::{PolicyKind, Selector};
    use rand::SeedableRng;

    #[test]
    fn weights_are_inverse_probabilities_and_favour_high_scores() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(5);
        let mut sel = Selector::new(cfg(PolicyKind::Sample, 0.5, 0));
        let scores: Vec<f32> = (0..2000).map(|i| (i % 100) as f32 + 1.0).collect();
        sel.decide(&scores, &mut rng);
        let d = sel.decide(&scores, &mut rng);
        assert!(d.unbiased);
        let (mut hi, mut lo) = (0, 0);
        let mut weighted = 0.0;
        for (i, (&s, &w)) in scores.iter().zip(&d.weights).enumerate() {
            if w > 0.0 {
                // Σ w over kept rows estimates the population size.
                weighted += w as f64;
                if s > 80.0 {
                    hi += 1
                } else if s < 20.0 {
                    lo += 1
                }
                assert!(w >= 1.0, "row {i}: weight {w}");
            }
        }
        assert!(hi > 2 * lo, "high {hi} low {lo}");
        assert!(
            (weighted / 2000.0 - 1.0).abs() < 0.1,
            "Σw/n {}",
            weighted / 2000.0
        );
    }
}
