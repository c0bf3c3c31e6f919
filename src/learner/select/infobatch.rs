//! `infobatch` (Qin et al., ICLR 2024): rows scoring below the window mean are the
//! well-learned ones; prune each with probability r and weight the survivors 1/(1 − r), so
//! the expected gradient is unchanged. r is set from the window so that the kept fraction is
//! `keep` (r = (1 − keep) / fraction below the mean, at most 0.95); rows above the mean are
//! always kept, so a window of equal scores (none below its mean) keeps every row. Online
//! there is no last epoch to anneal on; `gradsift train` anneals.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Decision, ScoreWindow, SelectionConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InfoBatch;

impl InfoBatch {
    pub fn decide(
        &mut self,
        cfg: &SelectionConfig,
        win: &mut ScoreWindow,
        scores: &[f32],
        rng: &mut impl Rng,
        d: &mut Decision,
    ) {
        let mean = win.mean() as f32;
        let below = win.count_below(mean) as f64 / win.len().max(1) as f64;
        let r = if below > 0.0 {
            ((1.0 - cfg.keep) / below).clamp(0.0, 0.95)
        } else {
            0.0
        };
        for &s in scores {
            if s >= mean {
                d.push(true, 1.0);
            } else if rng.random::<f64>() >= r {
                d.push(true, (1.0 / (1.0 - r)) as f32);
            } else {
                d.push(false, 0.0);
            }
        }
        d.unbiased = true;
        d.threshold = mean;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::super::{PolicyKind, Selector};
    use rand::SeedableRng;

    #[test]
    fn prunes_only_below_the_mean_and_reweights_survivors() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(6);
        let mut sel = Selector::new(cfg(PolicyKind::Infobatch, 0.7, 0));
        let scores: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let d = sel.decide(&scores, &mut rng);
        // Mean 999.5: everything above it is kept with weight 1.
        assert!(d.weights[1000..].iter().all(|w| *w == 1.0));
        // Below it r = 0.3 / 0.5 = 0.6: survivors weigh 1 / 0.4.
        let w: Vec<f32> = d.weights[..1000]
            .iter()
            .copied()
            .filter(|w| *w > 0.0)
            .collect();
        assert!(w.iter().all(|w| (*w - 2.5).abs() < 1e-5));
        assert!((w.len() as f64 / 1000.0 - 0.4).abs() < 0.05, "{}", w.len());
    }
}
