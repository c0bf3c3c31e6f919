//! `surprise`: compute follows surprise. The keep fraction and the replay ratio scale with
//! f = g / ḡ, g = (short-term mean score / long-term mean score)^γ and ḡ the long-term mean
//! of g, clamped so that the keep fraction stays in [min_keep, 1]: a stream that surprises the
//! model (gradient norms above their running baseline: a new pattern, a drift) is trained on
//! more, a calm one less. Dividing by ḡ matters: with skewed scores the short mean sits below
//! the long one most of the time, and without it a stationary stream would train well under
//! `keep`; with it f averages about 1 and compute matches `keep`. Rows are then chosen at
//! random: the scores decide how much to train, not which rows.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Decision, SelectionConfig};

/// `[selection.surprise]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurpriseConfig {
    /// Exponent of the score ratio.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Lowest keep fraction.
    #[serde(default = "default_min_keep")]
    pub min_keep: f64,
    /// Rows in the short-term mean (EMA span).
    #[serde(default = "default_short")]
    pub short: f64,
    /// Rows in the long-term baseline (EMA span).
    #[serde(default = "default_long")]
    pub long: f64,
}

fn default_gamma() -> f64 {
    1.0
}
fn default_min_keep() -> f64 {
    0.1
}
fn default_short() -> f64 {
    64.0
}
fn default_long() -> f64 {
    4096.0
}

impl Default for SurpriseConfig {
    fn default() -> Self {
        SurpriseConfig {
            gamma: default_gamma(),
            min_keep: default_min_keep(),
            short: default_short(),
            long: default_long(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Surprise {
    short: f64,
    long: f64,
    /// Long-term mean of g.
    norm: f64,
    started: bool,
}

impl Surprise {
    /// Feeds scores into both means (also during warm-up).
    pub fn observe(&mut self, c: &SurpriseConfig, scores: &[f32]) {
        for &s in scores {
            let s = if s.is_finite() {
                s.max(0.0) as f64
            } else {
                continue;
            };
            if !self.started {
                (self.short, self.long, self.norm, self.started) = (s, s, 1.0, true);
                continue;
            }
            self.short += (s - self.short) / c.short.max(1.0);
            self.long += (s - self.long) / c.long.max(1.0);
            self.norm += (self.level(c) - self.norm) / c.long.max(1.0);
        }
    }

    /// g = (short / long)^γ.
    fn level(&self, c: &SurpriseConfig) -> f64 {
        let ratio = if self.long > 0.0 {
            self.short / self.long
        } else {
            1.0
        };
        ratio.powf(c.gamma)
    }

    /// The current factor f = g / ḡ on keep and replay.
    pub fn factor(&self, cfg: &SelectionConfig) -> f64 {
        let c = &cfg.surprise;
        let lo = (c.min_keep / cfg.keep).min(1.0);
        let norm = if self.norm > 0.0 { self.norm } else { 1.0 };
        (self.level(c) / norm).clamp(lo, 1.0 / cfg.keep)
    }

    pub fn decide(
        &mut self,
        cfg: &SelectionConfig,
        scores: &[f32],
        rng: &mut impl Rng,
        d: &mut Decision,
    ) {
        let f = self.factor(cfg);
        let p = (cfg.keep * f).min(1.0);
        for _ in scores {
            let keep = rng.random::<f64>() < p;
            d.push(keep, keep as u8 as f32);
        }
        self.observe(&cfg.surprise, scores);
        d.replay_scale = f;
        d.threshold = f32::NEG_INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::super::{PolicyKind, Selector};
    use rand::SeedableRng;

    #[test]
    fn trains_more_when_scores_jump_above_their_baseline() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(7);
        let mut sel = Selector::new(cfg(PolicyKind::Surprise, 0.5, 0));
        let calm = vec![1.0f32; 64];
        for _ in 0..200 {
            sel.decide(&calm, &mut rng);
        }
        let d = sel.decide(&calm, &mut rng);
        assert!((d.replay_scale - 1.0).abs() < 0.05, "{}", d.replay_scale);
        let storm = vec![10.0f32; 64];
        sel.decide(&storm, &mut rng);
        let d = sel.decide(&storm, &mut rng);
        assert!(d.replay_scale > 1.9, "scale {}", d.replay_scale);
        assert!(d.trained() > 56, "trained {}", d.trained());
    }
}
