//! A classification pipeline's prediction as a blend of the MLP and the report's baselines.
//!
//! An MLP starts knowing nothing, and a new site (a new key) starts it over in part, while
//! the 5 nearest past positions of the same site already name a good beam and the site's last
//! beam is often the next one. Two schedules hand over between them, per key:
//! - `schedule`: (1 − a)·softmax(logits) + a·vote, a = n0 / (n0 + labelled rows of the key);
//!   persistence is not used.
//! - `bayes`: Bayesian model averaging with forgetting over three experts (the MLP, the
//!   neighbours' vote, persistence): each expert's weight is the likelihood it gave the key's
//!   past labels, discounted by `decay` per row, so the blend follows whichever has been
//!   right on this key lately and moves when that changes.
//!
//! Both are fixed rules with a guess inside (how long the neighbours stay better than the
//! model; that the experts' likelihoods weigh as they are, with no prior). With a positive
//! `learn_rate` a [`BlendGate`] learns the rule's slope and the experts' priors online from
//! each revealed label, starting from the fixed rule.
//!
//! Each neighbour (or the last label) votes 1 for its class and `spread` for the classes
//! either side (a codebook's neighbouring beams point a few degrees apart). Every expert is
//! smoothed by 1% of uniform mass so that no label is impossible. Training is unaffected:
//! the MLP learns from its own loss, and the report keeps its own metrics beside the blend's.

use serde::{Deserialize, Serialize};

use super::eval::{ClassBaselines, KNN_K, softmax};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlendMode {
    Schedule,
    Bayes,
}

/// `[model.blend]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlendConfig {
    pub mode: BlendMode,
    /// `schedule`: rows of a key at which the vote and the MLP weigh the same.
    #[serde(default)]
    pub n0: f64,
    #[serde(default)]
    pub spread: f32,
    /// `bayes`: the factor each expert's log-likelihood is discounted by per row of the key.
    #[serde(default = "default_decay")]
    pub decay: f32,
    /// AdaGrad's step size for learning the blend ([`BlendGate`]); 0 keeps the fixed rule.
    #[serde(default)]
    pub learn_rate: f32,
    /// How much more a nearer neighbour's vote weighs: the neighbour of rank r (0 the
    /// nearest) votes 1 + nearness·(k − r). 0 (the default) gives equal votes, whose ties the
    /// MLP's share of the blend then breaks; the report's 5-NN baseline breaks them by
    /// nearness (0.001).
    #[serde(default)]
    pub nearness: f32,
}

fn default_decay() -> f32 {
    0.99
}

impl BlendConfig {
    /// What is wrong with these settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        if self.mode == BlendMode::Schedule && !(self.n0 > 0.0 && self.n0.is_finite()) {
            return Err(format!("n0 > 0 for mode \"schedule\", found {}", self.n0));
        }
        if !(0.0..=1.0).contains(&self.spread) {
            return Err(format!("spread in [0, 1], found {}", self.spread));
        }
        if !(self.decay > 0.0 && self.decay <= 1.0) {
            return Err(format!("decay in (0, 1], found {}", self.decay));
        }
        if !(self.learn_rate >= 0.0 && self.learn_rate.is_finite()) {
            return Err(format!("learn_rate ≥ 0, found {}", self.learn_rate));
        }
        if !(self.nearness >= 0.0 && self.nearness.is_finite()) {
            return Err(format!("nearness ≥ 0, found {}", self.nearness));
        }
        Ok(())
    }
}

/// Each expert's discounted log-likelihood on one key: the MLP, the vote, persistence.
pub type ExpertWeights = [f32; 3];

const SMOOTHING: f32 = 0.01;

/// A blend learnt online. Each live expert e gets z_e = θ₁·x_e + b_e and the weight
/// softmax(z)_e, where x_e is the fixed rule's evidence for it: for `schedule` logit(a) for
/// the vote and 0 for the MLP (so the vote's weight is σ(θ₀ + θ₁·logit(a))); for `bayes`
/// each expert's discounted log-likelihood. The priors are b = (0, θ₀, θ₂) for the MLP, the
/// vote and persistence. θ = (0, 1, 0) is the fixed rule; each revealed label moves θ down
/// the gradient of the blend's log-loss (AdaGrad), over all keys. Kept in checkpoints, with
/// the mode it was learnt for: θ₁ means another thing in the other mode, so a gate resumed
/// under another mode starts again from the fixed rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlendGate {
    pub theta: [f32; 3],
    /// AdaGrad's sums of squared gradients.
    sq_grads: [f32; 3],
    /// The mode θ was learnt for (`None` until the first learnt blend).
    mode: Option<BlendMode>,
}

impl Default for BlendGate {
    fn default() -> Self {
        BlendGate {
            theta: [0.0, 1.0, 0.0],
            sq_grads: [1e-6; 3],
            mode: None,
        }
    }
}

impl BlendGate {
    /// The live experts' weights for evidence `x`.
    fn weights(&self, x: &[f32; 3], live: [bool; 3]) -> [f32; 3] {
        let [b1, slope, b2] = self.theta;
        live_softmax(&[slope * x[0], b1 + slope * x[1], b2 + slope * x[2]], live)
    }

    /// One AdaGrad step on −ln Σ_e π_e·q_e for the experts' probabilities `q` of the label,
    /// with the weights `pi` that [`Self::weights`] gave for `x`.
    fn learn(&mut self, rate: f32, x: &[f32; 3], pi: &[f32; 3], q: &[f32; 3]) {
        let p = pi.iter().zip(q).map(|(w, q)| w * q).sum::<f32>().max(1e-6);
        // ∂(−ln p)/∂z_e (0 for an expert that is not live: its π_e is 0).
        let dz = [0, 1, 2].map(|e| -pi[e] * (q[e] - p) / p);
        let slope = dz.iter().zip(x).map(|(d, x)| d * x).sum::<f32>();
        for ((t, s), g) in self
            .theta
            .iter_mut()
            .zip(&mut self.sq_grads)
            .zip([dz[1], slope, dz[2]])
        {
            *s += g * g;
            *t -= rate * g / s.sqrt();
        }
    }
}

/// Blends predictions; holds the experts' distributions of the row at hand.
#[derive(Debug, Default)]
pub struct Blender {
    experts: [Vec<f32>; 3],
    live: [bool; 3],
    pub gate: BlendGate,
    /// The last row's evidence and weights, for [`BlendGate::learn`].
    last_x: [f32; 3],
    last_mix: [f32; 3],
}

impl Blender {
    /// The experts' distributions for one row.
    fn experts(&mut self, cfg: &BlendConfig, b: &ClassBaselines, logits: &[f32]) {
        let c = logits.len();
        let [mlp, vote, last] = &mut self.experts;
        mlp.clear();
        mlp.extend_from_slice(logits);
        softmax(mlp);
        let n = b.knn_len as usize;
        let mut votes = [(0u16, 1.0f32); KNN_K];
        for (rank, (v, nb)) in votes.iter_mut().zip(&b.knn[..n]).enumerate() {
            *v = (nb.0, 1.0 + cfg.nearness * (KNN_K - rank) as f32);
        }
        let persistence = b.persistence.map(|p| [(p, 1.0)]);
        self.live = [
            true,
            spread_votes(vote, c, &votes[..n], cfg.spread),
            cfg.mode == BlendMode::Bayes
                && spread_votes(last, c, persistence.as_ref().map_or(&[], |p| p), cfg.spread),
        ];
        for (e, live) in self.experts.iter_mut().zip(self.live) {
            if live {
                e.iter_mut()
                    .for_each(|p| *p = (1.0 - SMOOTHING) * *p + SMOOTHING / c as f32);
            }
        }
    }

    /// The blended distribution for a row of a key with expert weights `w` (zeros for a new
    /// key), in `out`.
    pub fn blend(
        &mut self,
        cfg: &BlendConfig,
        b: &ClassBaselines,
        logits: &[f32],
        w: &ExpertWeights,
        out: &mut Vec<f32>,
    ) {
        self.experts(cfg, b, logits);
        let a = (cfg.n0 / (cfg.n0 + f64::from(b.key_seen))) as f32;
        let mix = match cfg.mode {
            _ if cfg.learn_rate > 0.0 => self.learnt_mix(cfg.mode, a, w),
            BlendMode::Schedule => {
                let a = if self.live[1] { a } else { 0.0 };
                [1.0 - a, a, 0.0]
            }
            BlendMode::Bayes => live_softmax(w, self.live),
        };
        self.last_mix = mix;
        out.clear();
        out.resize(logits.len(), 0.0);
        for (e, m) in mix.iter().enumerate() {
            if *m > 0.0 {
                for (o, p) in out.iter_mut().zip(&self.experts[e]) {
                    *o += m * p;
                }
            }
        }
    }

    /// The gate's weights, from the fixed rule's evidence: the `schedule` weight `a`, or the
    /// `bayes` expert weights `w`. A gate learnt for the other mode starts again.
    fn learnt_mix(&mut self, mode: BlendMode, a: f32, w: &ExpertWeights) -> [f32; 3] {
        if self.gate.mode != Some(mode) {
            self.gate = BlendGate {
                mode: Some(mode),
                ..BlendGate::default()
            };
        }
        self.last_x = match mode {
            BlendMode::Schedule => {
                let a = a.clamp(1e-4, 1.0 - 1e-4);
                [0.0, (a / (1.0 - a)).ln(), 0.0]
            }
            // Shifted so that the largest is 0 (softmax and its gradient ignore a shift common
            // to all experts; AdaGrad's step does not).
            BlendMode::Bayes => {
                let top = live_max(w, self.live);
                [0, 1, 2].map(|e| if self.live[e] { w[e] - top } else { 0.0 })
            }
        };
        self.gate.weights(&self.last_x, self.live)
    }

    /// After the row's label is revealed (the experts of the last [`Blender::blend`]): a
    /// learnt blend's gate takes a step; each live expert's weight is discounted and gains
    /// the log-probability it gave the label.
    ///
    /// A row whose experts are not all finite (a diverged model's logits) teaches nothing:
    /// one NaN in θ or in a key's weights would blend every later row to zeros.
    pub fn learn(&mut self, cfg: &BlendConfig, target: usize, w: &mut ExpertWeights) {
        let finite = (self.experts.iter().zip(self.live))
            .all(|(e, live)| !live || e.iter().all(|p| p.is_finite()));
        if !finite {
            return;
        }
        let live = self.live.iter().filter(|&&l| l).count();
        if cfg.learn_rate > 0.0 && live > 1 {
            let q = [0, 1, 2].map(|e| {
                let p = self.experts[e].get(target).copied().unwrap_or(SMOOTHING);
                if self.live[e] { p } else { 0.0 }
            });
            self.gate
                .learn(cfg.learn_rate, &self.last_x, &self.last_mix, &q);
        }
        for ((w, e), live) in w.iter_mut().zip(&self.experts).zip(self.live) {
            if live {
                let p = e.get(target).copied().unwrap_or(SMOOTHING);
                *w = cfg.decay * *w + p.ln();
            }
        }
    }
}

/// The largest of the live experts' values.
fn live_max(v: &[f32; 3], live: [bool; 3]) -> f32 {
    (0..3)
        .filter(|&e| live[e])
        .map(|e| v[e])
        .fold(f32::NEG_INFINITY, f32::max)
}

/// softmax(z) over the live experts (0 for the others).
fn live_softmax(z: &[f32; 3], live: [bool; 3]) -> [f32; 3] {
    let top = live_max(z, live);
    let raw = [0, 1, 2].map(|e| if live[e] { (z[e] - top).exp() } else { 0.0 });
    let total: f32 = raw.iter().sum();
    raw.map(|v| v / total)
}

/// Each (class, weight) in `votes` votes its weight, `spread` of it to each neighbouring
/// class, as a distribution in `out`; false (and `out` zeros) when there is no vote.
fn spread_votes(out: &mut Vec<f32>, c: usize, votes: &[(u16, f32)], spread: f32) -> bool {
    out.clear();
    out.resize(c, 0.0);
    for &(class, weight) in votes {
        let class = class as usize;
        if class >= c {
            continue;
        }
        let (left, right) = (class > 0, class + 1 < c);
        let mass = 1.0 + spread * (f32::from(u8::from(left)) + f32::from(u8::from(right)));
        let unit = weight / (votes.len() as f32 * mass);
        out[class] += unit;
        if left {
            out[class - 1] += unit * spread;
        }
        if right {
            out[class + 1] += unit * spread;
        }
    }
    let total: f32 = out.iter().sum();
    if total > 0.0 {
        out.iter_mut().for_each(|p| *p /= total);
    }
    total > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::eval::argmax;

    fn config(mode: BlendMode, n0: f64, decay: f32, learn_rate: f32) -> BlendConfig {
        BlendConfig {
            mode,
            n0,
            spread: 0.0,
            decay,
            learn_rate,
            nearness: 0.0,
        }
    }

    fn baselines(knn: &[u16], persistence: Option<u16>, key_seen: u32) -> ClassBaselines {
        let mut b = ClassBaselines {
            persistence,
            knn_len: knn.len() as u8,
            key_seen,
            ..Default::default()
        };
        for (i, &c) in knn.iter().enumerate() {
            b.knn[i] = (c, 1.0);
        }
        b
    }

    #[test]
    fn the_schedule_hands_over_from_the_neighbours_to_the_model() {
        let cfg = BlendConfig {
            mode: BlendMode::Schedule,
            n0: 100.0,
            spread: 0.5,
            decay: 0.99,
            learn_rate: 0.0,
            nearness: 0.0,
        };
        let logits = [0.0, 0.0, 0.0, 5.0];
        let (mut bl, mut out) = (Blender::default(), Vec::new());
        bl.blend(
            &cfg,
            &baselines(&[0, 0], None, 0),
            &logits,
            &[0.0; 3],
            &mut out,
        );
        assert_eq!(argmax(&out), 0, "a = 1: the vote alone");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(out[1] > out[2] && out[2] > 0.0, "spread, then smoothing");
        bl.blend(
            &cfg,
            &baselines(&[0, 0], None, 10_000),
            &logits,
            &[0.0; 3],
            &mut out,
        );
        assert_eq!(argmax(&out), 3, "a ≈ 0.01: the model");
        bl.blend(&cfg, &baselines(&[], None, 0), &logits, &[0.0; 3], &mut out);
        assert!(
            (out[3] - (0.99 * 5f32.exp() / (3.0 + 5f32.exp()) + 0.0025)).abs() < 1e-6,
            "no vote: the smoothed softmax"
        );
    }

    #[test]
    fn bayes_follows_the_expert_that_has_been_right_on_the_key() {
        let cfg = config(BlendMode::Bayes, 0.0, 0.9, 0.0);
        let logits = [3.0, 0.0, 0.0, 0.0];
        let b = baselines(&[1], Some(2), 5);
        let (mut bl, mut out, mut w) = (Blender::default(), Vec::new(), [0.0f32; 3]);
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert!(
            (out[1] - out[2]).abs() < 1e-6 && out[0] > 0.28,
            "equal weights: {out:?}"
        );
        // Persistence is right five times in a row.
        for _ in 0..5 {
            bl.blend(&cfg, &b, &logits, &w, &mut out);
            bl.learn(&cfg, 2, &mut w);
        }
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert_eq!(argmax(&out), 2, "{w:?}");
        assert!(w[2] > w[0] && w[2] > w[1]);
        // Then the MLP, long enough for the old evidence to fade.
        for _ in 0..30 {
            bl.blend(&cfg, &b, &logits, &w, &mut out);
            bl.learn(&cfg, 0, &mut w);
        }
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert_eq!(argmax(&out), 0, "{w:?}");
    }

    #[test]
    fn a_learnt_schedule_leans_on_the_expert_that_is_right() {
        let cfg = config(BlendMode::Schedule, 100.0, 0.99, 0.05);
        let fixed = config(BlendMode::Schedule, 100.0, 0.99, 0.0);
        let logits = [4.0, 0.0, 0.0, 0.0];
        let b = baselines(&[2], None, 400);
        let (mut bl, mut out, mut w) = (Blender::default(), Vec::new(), [0.0f32; 3]);
        bl.blend(&fixed, &b, &logits, &w, &mut out);
        let vote_fixed = out[2];
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert!(
            (out[2] - vote_fixed).abs() < 1e-6,
            "an untrained gate is the schedule"
        );
        // The neighbours are right and the model wrong, row after row.
        for _ in 0..200 {
            bl.blend(&cfg, &b, &logits, &w, &mut out);
            bl.learn(&cfg, 2, &mut w);
        }
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert!(
            out[2] > 0.6 && vote_fixed < 0.25,
            "{} vs {vote_fixed}",
            out[2]
        );
        assert!(bl.gate.theta[0] > 0.0, "{:?}", bl.gate);
        // Then the model is right: the gate turns back.
        for _ in 0..400 {
            bl.blend(&cfg, &b, &logits, &w, &mut out);
            bl.learn(&cfg, 0, &mut w);
        }
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        assert_eq!(argmax(&out), 0, "{:?}", bl.gate);
        // A fixed schedule learns nothing.
        let before = bl.gate;
        bl.blend(&fixed, &b, &logits, &w, &mut out);
        bl.learn(&fixed, 2, &mut w);
        assert_eq!(bl.gate, before);
    }

    #[test]
    fn a_learnt_bayes_blend_starts_as_the_fixed_rule_and_learns_a_prior() {
        let fixed = config(BlendMode::Bayes, 0.0, 0.5, 0.0);
        let cfg = config(BlendMode::Bayes, 0.0, 0.5, 0.1);
        let logits = [3.0, 0.0, 0.0, 0.0];
        let b = baselines(&[1], Some(2), 5);
        let w = [-1.0f32, -2.0, -0.5];
        let (mut bl, mut out, mut fixed_out) = (Blender::default(), Vec::new(), Vec::new());
        bl.blend(&fixed, &b, &logits, &w, &mut fixed_out);
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        for (x, y) in out.iter().zip(&fixed_out) {
            assert!((x - y).abs() < 1e-6, "{out:?} vs {fixed_out:?}");
        }
        // Persistence is right every time, the others never: beyond what the discounted
        // likelihoods say (they forget by half per row), persistence earns a prior.
        let mut w = [0.0f32; 3];
        for _ in 0..300 {
            bl.blend(&cfg, &b, &logits, &w, &mut out);
            bl.learn(&cfg, 2, &mut w);
        }
        assert!(bl.gate.theta[2] > bl.gate.theta[0], "{:?}", bl.gate);
        // Resumed under the other mode, the gate starts again from that mode's fixed rule.
        let mut resumed = Blender {
            gate: bl.gate,
            ..Blender::default()
        };
        let schedule = config(BlendMode::Schedule, 100.0, 0.5, 0.1);
        let (mut a, mut b_out) = (Vec::new(), Vec::new());
        resumed.blend(&schedule, &b, &logits, &w, &mut a);
        Blender::default().blend(
            &BlendConfig {
                learn_rate: 0.0,
                ..schedule
            },
            &b,
            &logits,
            &w,
            &mut b_out,
        );
        for (x, y) in a.iter().zip(&b_out) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b_out:?}");
        }
        assert_eq!(resumed.gate.theta, BlendGate::default().theta);
        bl.blend(&cfg, &b, &logits, &w, &mut out);
        bl.blend(&fixed, &b, &logits, &w, &mut fixed_out);
        assert!(out[2] > fixed_out[2], "{} vs {}", out[2], fixed_out[2]);
    }

    /// A diverged model's row (infinite logits, so a NaN softmax) leaves the learnt gate and
    /// the key's weights as they were: the next finite row blends to a distribution.
    #[test]
    fn a_non_finite_row_teaches_the_blend_nothing() {
        for cfg in [
            config(BlendMode::Schedule, 300.0, 0.99, 0.1),
            config(BlendMode::Bayes, 0.0, 0.3, 0.0),
        ] {
            let (mut b, base) = (Blender::default(), baselines(&[1, 1, 1], None, 5));
            let (mut w, mut out) = ([0.0; 3], Vec::new());
            b.blend(&cfg, &base, &[f32::INFINITY, 0.0, 0.0], &w, &mut out);
            b.learn(&cfg, 1, &mut w);
            b.blend(&cfg, &base, &[0.0, 3.0, 0.0], &w, &mut out);
            assert!(b.gate.theta.iter().all(|t| t.is_finite()), "{cfg:?}");
            assert!(w.iter().all(|v| v.is_finite()), "{cfg:?}");
            assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-3, "{out:?}");
        }
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let ok = BlendConfig {
            mode: BlendMode::Schedule,
            n0: 300.0,
            spread: 0.5,
            decay: 0.99,
            learn_rate: 0.0,
            nearness: 0.0,
        };
        assert!(ok.check().is_ok());
        assert!(
            BlendConfig { n0: 0.0, ..ok }
                .check()
                .unwrap_err()
                .contains("n0")
        );
        assert!(
            BlendConfig { decay: 1.5, ..ok }
                .check()
                .unwrap_err()
                .contains("decay")
        );
        for rate in [-0.1, f32::NAN] {
            let bad = BlendConfig {
                learn_rate: rate,
                ..ok
            };
            assert!(bad.check().unwrap_err().contains("learn_rate"), "{bad:?}");
            let bad = BlendConfig {
                nearness: rate,
                ..ok
            };
            assert!(bad.check().unwrap_err().contains("nearness"), "{bad:?}");
        }
    }

    #[test]
    fn nearness_breaks_the_vote_s_ties_toward_the_nearest() {
        // Two neighbours each for classes 1 and 3, the nearest of class 3; the model leans to 1.
        let b = baselines(&[3, 1, 3, 1], None, 10);
        let logits = [0.0, 0.2, 0.0, 0.0];
        let cfg = |nearness| BlendConfig {
            nearness,
            ..config(BlendMode::Schedule, 1000.0, 0.99, 0.0)
        };
        let (mut bl, mut out) = (Blender::default(), Vec::new());
        let w = ExpertWeights::default();
        bl.blend(&cfg(0.0), &b, &logits, &w, &mut out);
        assert_eq!(argmax(&out), 1, "equal votes: the model breaks the tie");
        bl.blend(&cfg(0.05), &b, &logits, &w, &mut out);
        assert_eq!(
            argmax(&out),
            3,
            "the nearest neighbour's class wins the tie"
        );
        let total: f32 = out.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "still a distribution: {total}");
    }
}
