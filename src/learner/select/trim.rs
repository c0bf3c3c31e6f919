//! `trim`: an outlier filter, then random sampling. Rows scoring above the (1 − trim)
//! quantile of the window are dropped; the rest are kept with probability
//! keep / (1 − trim), so the kept fraction is still `keep` while keep ≤ 1 − trim (above
//! it every row under the quantile trains: 1 − trim of them), and more while the window's
//! scores tie at the quantile (none is above it).
//!
//! Why: on our telecom streams the highest gradient norms are mostly noise (traffic spikes,
//! weak-link beams whose best beam is barely better than the next), and dropping a few
//! percent of them measured better than random where keeping the top-k measured worse
//! (`../shared/notes/findings.md`).

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Decision, ScoreWindow, SelectionConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trim;

impl Trim {
    pub fn decide(
        &mut self,
        cfg: &SelectionConfig,
        win: &mut ScoreWindow,
        scores: &[f32],
        rng: &mut impl Rng,
        d: &mut Decision,
    ) {
        let cut = if cfg.trim > 0.0 {
            win.quantile(1.0 - cfg.trim)
        } else {
            f32::INFINITY
        };
        let p = (cfg.keep / (1.0 - cfg.trim)).min(1.0);
        for &s in scores {
            let keep = s <= cut && rng.random::<f64>() < p;
            d.push(keep, keep as u8 as f32);
        }
        d.threshold = cut;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::super::{PolicyKind, Selector};
    use rand::SeedableRng;

    #[test]
    fn never_trains_the_trimmed_top() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(4);
        let mut sel = Selector::new(cfg(PolicyKind::Trim, 0.9, 0));
        let scores: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let d = sel.decide(&scores, &mut rng);
        // trim = 0.05: the top 100 scores never train.
        assert!(d.selected[1901..].iter().all(|s| !*s));
        let kept = d.trained() as f64 / 2000.0;
        assert!((kept - 0.9).abs() < 0.03, "kept {kept}");
    }
}
