//! `top_k`, the published rule: train the rows whose score is at least τ, the (1 − keep)
//! quantile of the score window (method.md §2).
//!
//! While scores trend (the model learns, the stream drifts) the window lags behind and the
//! realised fraction would stray from `keep`; feeding back the running surplus or deficit of
//! kept rows (the debt) holds it at `keep` over the long run. With `unbiased_q > 0` a row
//! under τ still trains with probability q and weight 1/q (InfoBatch's unbiased option), and
//! is admitted to the replay buffer with that weight.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Decision, ScoreWindow, SelectionConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopK {
    /// Σ (kept − keep) over the rows decided after warm-up, bounded by what moves the
    /// quantile level within [0, 1].
    debt: f64,
}

impl TopK {
    pub fn decide(
        &mut self,
        cfg: &SelectionConfig,
        win: &mut ScoreWindow,
        scores: &[f32],
        rng: &mut impl Rng,
        d: &mut Decision,
    ) {
        let threshold = if cfg.keep >= 1.0 {
            f32::NEG_INFINITY
        } else {
            let level = (1.0 - cfg.keep) + self.debt / win.len().max(1) as f64;
            win.quantile(level)
        };
        let q = cfg.unbiased_q;
        // Beyond these the level leaves [0, 1] and clamps anyway: a debt run up while the
        // window ties (every row at τ is kept) must not lock training out for long after.
        let n = win.len().max(1) as f64;
        let (least, most) = (-(1.0 - cfg.keep) * n, cfg.keep * n);
        for &s in scores {
            let keep = s >= threshold;
            self.debt = (self.debt + keep as u8 as f64 - cfg.keep).clamp(least, most);
            if keep {
                d.push(true, 1.0);
            } else if q > 0.0 && rng.random::<f64>() < q {
                // Chosen too, at 1/q: it enters the buffer with that weight.
                d.push(true, (1.0 / q) as f32);
            } else {
                d.push(false, 0.0);
            }
        }
        // With sampled rows the weights are inverse probabilities (1 above τ, 1/q below).
        d.unbiased = q > 0.0;
        d.threshold = threshold;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::super::{PolicyKind, Selector};
    use rand::SeedableRng;

    /// A window of tied scores keeps every row (all are at τ); the debt that runs up is
    /// bounded, so once scores vary again the rule keeps rows within a window, not after
    /// tens of thousands of rows kept by nobody.
    #[test]
    fn a_tied_stretch_does_not_lock_training_out_afterwards() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(3);
        let mut c = cfg(PolicyKind::TopK, 0.25, 0);
        c.window = 512;
        let mut sel = Selector::new(c);
        for _ in 0..40 {
            sel.decide(&[0.0; 256], &mut rng);
        }
        let mut kept = 0;
        for i in 0..8 {
            let scores: Vec<f32> = (0..256).map(|j| ((i * 256 + j) % 97) as f32).collect();
            kept += sel
                .decide(&scores, &mut rng)
                .selected
                .iter()
                .filter(|s| **s)
                .count();
        }
        // 2,048 varied rows: paying back at most a window's debt (128 rows at 0.25 each, 512
        // rows), then about a quarter of the rest: at least 300.
        assert!(kept > 300, "{kept} of 2,048 kept");
    }

    #[test]
    fn keeps_the_highest_scores() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(1);
        let mut sel = Selector::new(cfg(PolicyKind::TopK, 0.25, 0));
        let scores: Vec<f32> = (0..400).map(|i| i as f32).collect();
        let d = sel.decide(&scores, &mut rng);
        assert!(d.selected[300..].iter().all(|s| *s));
        assert!(d.selected[..290].iter().all(|s| !*s));
    }

    #[test]
    fn unbiased_option_weights_sampled_rows_by_inverse_probability() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(2);
        let mut c = cfg(PolicyKind::TopK, 0.5, 0);
        c.window = 4096;
        c.unbiased_q = 0.25;
        let mut sel = Selector::new(c);
        let scores: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        let d = sel.decide(&scores, &mut rng);
        // Below τ (the lower half): dropped, or chosen at weight 1/q; the rest weigh 1.
        let below = &d.weights[..2048];
        let sampled = below.iter().filter(|w| **w > 0.0).count();
        assert!(below.iter().all(|w| *w == 0.0 || (*w - 4.0).abs() < 1e-6));
        assert!(d.weights[2048..].iter().all(|w| *w == 1.0));
        assert!(
            d.weights
                .iter()
                .zip(&d.selected)
                .all(|(w, s)| *s == (*w > 0.0))
        );
        assert!(d.unbiased, "the learner normalises by the rows considered");
        let frac = sampled as f64 / 2048.0;
        assert!((frac - 0.25).abs() < 0.04, "sampled {frac}");
    }
}
