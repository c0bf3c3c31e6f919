//! Selection: which fresh samples are trained on.
//!
//! The threshold τ is the (1 − keep) quantile of the last `window` scores, so the kept
//! fraction holds at `keep` while the score scale drifts (method.md §2). The quantile is
//! exact over a ring buffer and computed once per micro-batch with a linear-time selection
//! (a few microseconds for a few thousand scores): the quantile-sketch crates on crates.io
//! (CKMS, GK, t-digest) summarise a whole stream and cannot forget, and forgetting is the
//! point here. The first `warmup` samples train unconditionally (an untrained model's scores
//! mean little). With `unbiased_q > 0` a sample under τ still trains with probability q and
//! loss weight 1/q, so the expected gradient equals the full-data gradient (InfoBatch).

use rand::Rng;

/// Selection settings (the `[selection]` table of a pipeline).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionConfig {
    /// Fraction of samples to train on after warm-up, in (0, 1].
    pub keep: f64,
    /// Number of samples that train unconditionally at the start.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    /// Number of recent scores the quantile is taken over.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Probability of training a below-threshold sample (0 disables the unbiased option).
    #[serde(default)]
    pub unbiased_q: f64,
}

fn default_warmup() -> u64 {
    1000
}
fn default_window() -> usize {
    4096
}

/// The decision for one micro-batch.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// τ used for this batch (−∞ while warming up or with keep = 1).
    pub threshold: f32,
    /// Whether each row scored at or above τ.
    pub selected: Vec<bool>,
    /// Loss weight of each row in the training step: 1 selected, 1/q sampled, 0 dropped.
    pub weights: Vec<f32>,
}

impl Decision {
    /// Number of rows with a non-zero training weight.
    pub fn trained(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }
}

/// Streaming top-fraction selector with a sliding-window quantile threshold.
#[derive(Debug, Clone)]
pub struct Selector {
    cfg: SelectionConfig,
    ring: Vec<f32>,
    next: usize,
    seen: u64,
    scratch: Vec<f32>,
    /// Σ (selected − keep) over the samples decided after warm-up.
    debt: f64,
}

/// What a checkpoint keeps of a [`Selector`]: the score window and the selection debt.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SelectorState {
    ring: Vec<f32>,
    next: usize,
    seen: u64,
    debt: f64,
}

impl Selector {
    pub fn state(&self) -> SelectorState {
        SelectorState {
            ring: self.ring.clone(),
            next: self.next,
            seen: self.seen,
            debt: self.debt,
        }
    }

    /// Continues from a saved state (a window of another size is cut or padded as it fills).
    pub fn restore(&mut self, s: SelectorState) {
        let cap = self.cfg.window.max(1);
        self.ring = s.ring;
        self.ring.truncate(cap);
        self.next = s.next % cap;
        self.seen = s.seen;
        self.debt = s.debt;
    }

    pub fn new(cfg: SelectionConfig) -> Self {
        let cap = cfg.window.max(1);
        Selector {
            cfg,
            ring: Vec::with_capacity(cap),
            next: 0,
            seen: 0,
            scratch: Vec::with_capacity(cap),
            debt: 0.0,
        }
    }

    /// Current threshold: the (1 − keep) quantile of the window, shifted by the selection
    /// debt; −∞ when keep = 1 or the window is empty.
    pub fn threshold(&mut self) -> f32 {
        if self.cfg.keep >= 1.0 || self.ring.is_empty() {
            return f32::NEG_INFINITY;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.ring);
        let len = self.scratch.len() as f64;
        // While scores trend (the model learns, the stream drifts) the window lags behind
        // and the realised fraction would stray from `keep`; feeding back the running
        // surplus or deficit of selected samples holds it at `keep` over the long run.
        let level = ((1.0 - self.cfg.keep) + self.debt / len).clamp(0.0, 1.0);
        let k = ((level * len).floor() as usize).min(self.scratch.len() - 1);
        let (_, kth, _) = self.scratch.select_nth_unstable_by(k, f32::total_cmp);
        *kth
    }

    fn push(&mut self, s: f32) {
        let cap = self.cfg.window.max(1);
        if self.ring.len() < cap {
            self.ring.push(s);
        } else {
            self.ring[self.next] = s;
        }
        self.next = (self.next + 1) % cap;
    }

    /// Decides a micro-batch. Its own scores join the window first, so a batch is judged
    /// against a window that includes it (the kept fraction then holds even in small windows).
    pub fn decide(&mut self, scores: &[f32], rng: &mut impl Rng) -> Decision {
        for &s in scores {
            self.push(if s.is_finite() { s } else { f32::MAX });
        }
        let warm = self.seen < self.cfg.warmup;
        let threshold = if warm {
            f32::NEG_INFINITY
        } else {
            self.threshold()
        };
        let q = self.cfg.unbiased_q;
        let mut selected = Vec::with_capacity(scores.len());
        let mut weights = Vec::with_capacity(scores.len());
        for (i, &s) in scores.iter().enumerate() {
            let in_warmup = self.seen + (i as u64) < self.cfg.warmup;
            let keep = in_warmup || s >= threshold;
            if !in_warmup {
                self.debt += keep as u8 as f64 - self.cfg.keep;
            }
            selected.push(keep);
            weights.push(if keep {
                1.0
            } else if q > 0.0 && rng.random::<f64>() < q {
                (1.0 / q) as f32
            } else {
                0.0
            });
        }
        self.seen += scores.len() as u64;
        Decision {
            threshold,
            selected,
            weights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn selector(keep: f64, warmup: u64) -> Selector {
        Selector::new(SelectionConfig {
            keep,
            warmup,
            window: 2048,
            unbiased_q: 0.0,
        })
    }

    #[test]
    fn keeps_the_configured_fraction_after_warmup() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut sel = selector(0.7, 512);
        let (mut kept, mut total) = (0, 0);
        for b in 0..200 {
            // Scores that shrink as a model learns: the window lags behind them.
            let scale = 1.0 / (1.0 + b as f32 * 0.05);
            let scores: Vec<f32> = (0..64)
                .map(|_| rng.random::<f32>().powi(3) * scale)
                .collect();
            let d = sel.decide(&scores, &mut rng);
            if b >= 8 {
                kept += d.trained();
                total += scores.len();
            } else {
                assert_eq!(d.trained(), 64, "warm-up trains everything");
            }
        }
        let frac = kept as f64 / total as f64;
        assert!((frac - 0.7).abs() < 0.03, "kept {frac}");
    }

    #[test]
    fn unbiased_option_weights_sampled_rows_by_inverse_probability() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        let mut sel = Selector::new(SelectionConfig {
            keep: 0.5,
            warmup: 0,
            window: 4096,
            unbiased_q: 0.25,
        });
        let scores: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        let d = sel.decide(&scores, &mut rng);
        let sampled: Vec<f32> = d
            .weights
            .iter()
            .zip(&d.selected)
            .filter(|(w, s)| !**s && **w > 0.0)
            .map(|(w, _)| *w)
            .collect();
        assert!(sampled.iter().all(|w| (*w - 4.0).abs() < 1e-6));
        let frac = sampled.len() as f64 / 2048.0;
        assert!((frac - 0.25).abs() < 0.04, "sampled {frac}");
    }
}
