//! Which class to act on, given the predicted distribution: the most probable one
//! (`argmax`), the one whose expected loss is least (`min_expected_loss`), or, per key,
//! whichever of those two has lost less on the key's recent rows (`switch`).
//!
//! Why: in beam selection the label is the best beam, but the cost of a wrong choice is the
//! power lost against it, and that is not the same for every wrong beam: a neighbour of the
//! best beam loses a fraction of a dB, a beam pointing elsewhere 10-20 dB. When the
//! prediction is split between two far-apart beams, the beam between them can lose less on
//! average than either. The losses are learnt, not assumed: every labelled row reveals the
//! loss of every class against its best one (the per-class power the evaluation already
//! reads), and `L[c][b]` is the running mean loss of choosing `b` when `c` was best. The
//! choice is `argmin_b Σ_c p(c)·L[c][b]`; it sets top-1 and the power loss, while top-3 still
//! ranks the classes by probability (the candidates a beam sweep would measure). Before a class has been seen as best, its row of `L` is 0 on the diagonal
//! and the mean off-best loss elsewhere, which makes the rule the argmax. One table is kept
//! for the stream (a codebook's geometry does not change with the site: a new site starts
//! with what earlier ones taught), or one per key (`model.decision_scope = "per_key"`, online
//! only); checkpoints keep them.
//! A class's row is a running mean until the class has been best `model.decision_memory`
//! times, then an exponentially weighted one (weight 1/memory per row), so that the table
//! follows a new site's geometry (the beam pipelines: 30).
//!
//! `switch`: the expected loss is only as good as the predicted distribution's calibration,
//! which changes as a site is learnt (a young site's prediction is mostly the neighbours'
//! vote). Every labelled row reveals what both rules' choices lost, so each key keeps a
//! [`RuleRecord`], the two losses discounted by `model.decision_decay` per row, and acts by
//! the rule with the smaller one (the expected loss on a tie, so a new key starts with it).

use serde::{Deserialize, Serialize};

use super::eval::{argmax, softmax};
use super::model::Head;

/// `model.decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    #[default]
    Argmax,
    MinExpectedLoss,
    /// Per key, the better of the two above on its recent rows (see the module doc).
    Switch,
}

/// `model.decision_decay` unless set: `switch` weighs a key's earlier rows by 0.9 per row
/// (about its last ten rows).
pub const DEFAULT_DECAY: f32 = 0.9;

/// `model.decision_memory` unless set: rows of a class after which its loss row is a running
/// mean over that many.
pub const DEFAULT_MEMORY: f32 = 1000.0;
/// Rows (of any class) over which the prior of an unseen class, the mean off-best loss, is a
/// running mean.
const PRIOR_MEMORY: f32 = 1000.0;
/// The loss of a class that received no power at all, and the most any class is charged: a
/// beam 40 dB below the best is off either way.
const MAX_LOSS_DB: f32 = 40.0;
/// Classes below this probability are left out of the expected loss: each changes it by
/// less than 1e-4 of its loss row (a raw softmax is mostly below it; a blend's 1% smoothing
/// is not).
const MIN_PROB: f32 = 1e-4;

/// The learnt loss table and the scratch of one decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossTable {
    classes: usize,
    /// `L[c][b]`, row-major by the best class `c`.
    mean: Vec<f32>,
    /// Rows seen with each class best (capped at `memory`).
    seen: Vec<f32>,
    /// Mean loss of a non-best class over all rows, the prior of unseen rows.
    off_best: f32,
    rows: f32,
    /// `model.decision_memory`: configuration, not state (a restored table keeps the
    /// pipeline's).
    #[serde(skip, default = "default_memory")]
    memory: f32,
    #[serde(skip)]
    probs: Vec<f32>,
}

fn default_memory() -> f32 {
    DEFAULT_MEMORY
}

impl LossTable {
    /// The table `model.decision` asks for: one for a classification head deciding by
    /// expected loss, none otherwise (the online stage and `gradsift train` both build it so).
    pub fn for_model(decision: Decision, memory: f32, head: Head) -> Option<Self> {
        match (decision, head) {
            (Decision::MinExpectedLoss | Decision::Switch, Head::Classification { classes }) => {
                Some(LossTable::new(classes, memory))
            }
            _ => None,
        }
    }

    /// An empty table for `classes` classes whose rows become running means over `memory`
    /// rows of their class.
    pub fn new(classes: usize, memory: f32) -> Self {
        LossTable {
            classes,
            mean: vec![0.0; classes * classes],
            seen: vec![0.0; classes],
            off_best: 1.0,
            rows: 0.0,
            memory,
            probs: Vec::new(),
        }
    }

    /// Continues from a checkpoint's table, with this table's memory (configuration).
    pub fn restore(&mut self, saved: LossTable) {
        *self = LossTable {
            memory: self.memory,
            ..saved
        };
    }

    /// Sets the memory (configuration, which a checkpoint does not keep).
    pub fn set_memory(&mut self, memory: f32) {
        self.memory = memory;
    }

    /// Classes the table is for.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Rows learnt from (capped at the table's memory, 1,000).
    pub fn rows(&self) -> f32 {
        self.rows
    }

    /// Decision scores (higher is better: minus the expected loss) from a distribution,
    /// given as probabilities or, when `logits`, as logits (through [`LossTable::choose`]).
    fn decide(&mut self, dist: &[f32], logits: bool, out: &mut Vec<f32>) {
        let c = self.classes;
        debug_assert_eq!(dist.len(), c);
        self.probs.clear();
        self.probs.extend_from_slice(dist);
        if logits {
            softmax(&mut self.probs);
        } else {
            let s: f32 = self.probs.iter().sum();
            if s > 0.0 && s.is_finite() {
                self.probs.iter_mut().for_each(|p| *p /= s);
            }
        }
        out.clear();
        out.resize(c, 0.0);
        if !self.probs.iter().all(|p| p.is_finite()) {
            // A non-finite prediction stays one: the scoreboard counts it as such.
            out.fill(f32::NAN);
            return;
        }
        // Unseen classes' prior rows (0 for the class itself, the mean off-best loss
        // elsewhere) add up to one constant row plus a correction on their own classes.
        expected_losses(out, &self.probs, &self.seen, &self.mean, self.off_best);
    }

    /// One row's action: the decision scores into `out` and the classes both rules would
    /// act on. Under `switch` the key's `record` says which acts; without one (another rule,
    /// or a new key) the expected loss does. Online and offline evaluation both act through
    /// here, so `gradsift train` scores as `gradsift run` acts.
    pub fn choose(
        &mut self,
        dist: &[f32],
        logits: bool,
        record: Option<&RuleRecord>,
        out: &mut Vec<f32>,
    ) -> Action {
        self.decide(dist, logits, out);
        let (most, least) = (argmax(dist), argmax(out));
        let on_most = record.is_some_and(RuleRecord::prefers_argmax);
        Action {
            most,
            least,
            on_most,
        }
    }

    /// Learns from a labelled row's per-class power (linear units; a class with none is
    /// charged `MAX_LOSS_DB`). A row with a non-finite power, or none above zero, is not
    /// learnt from.
    pub fn learn(&mut self, power: &[f32]) {
        let c = self.classes;
        if power.len() != c || !power.iter().all(|p| p.is_finite()) {
            return;
        }
        let best = argmax(power);
        let p_best = power[best];
        if p_best <= 0.0 {
            return;
        }
        let n = (self.seen[best] + 1.0).min(self.memory);
        self.seen[best] = n;
        let row = &mut self.mean[best * c..(best + 1) * c];
        let mut off = 0.0;
        for (m, &p) in row.iter_mut().zip(power) {
            let loss = loss_db(p_best, p);
            *m += (loss - *m) / n;
            off += loss;
        }
        self.rows = (self.rows + 1.0).min(PRIOR_MEMORY);
        self.off_best += (off / (c - 1).max(1) as f32 - self.off_best) / self.rows;
    }
}

/// The loss in dB of a class receiving `p` against the best class's `p_best` (linear
/// units), at most [`MAX_LOSS_DB`].
fn loss_db(p_best: f32, p: f32) -> f32 {
    if p > 0.0 {
        (10.0 * (p_best / p).log10()).min(MAX_LOSS_DB)
    } else {
        MAX_LOSS_DB
    }
}

/// What [`LossTable::choose`] decided for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// The most probable class.
    pub most: usize,
    /// The class of least expected loss.
    pub least: usize,
    /// Whether `most` is acted on (else `least`).
    pub on_most: bool,
}

impl Action {
    /// The class acted on.
    pub fn class(&self) -> usize {
        if self.on_most { self.most } else { self.least }
    }
}

/// `switch`, per key: the power each rule's choice lost on the key's recent rows, each
/// earlier row weighed `decay` per row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleRecord {
    argmax: f32,
    expected: f32,
}

impl RuleRecord {
    /// Whether the key's most probable class is to be acted on (else the least expected
    /// loss; also on a tie, as for a new key).
    pub fn prefers_argmax(&self) -> bool {
        self.argmax < self.expected
    }

    /// Books a labelled row: what choosing `argmax` and `expected` lost against its best
    /// class, from its per-class power (linear units). A row with a non-finite power, or none
    /// above zero, is not booked.
    pub fn learn(&mut self, decay: f32, power: &[f32], argmax: usize, expected: usize) {
        if !power.iter().all(|p| p.is_finite()) || argmax.max(expected) >= power.len() {
            return;
        }
        let p_best = power.iter().copied().fold(0.0, f32::max);
        if p_best <= 0.0 {
            return;
        }
        self.argmax = decay * self.argmax + loss_db(p_best, power[argmax]);
        self.expected = decay * self.expected + loss_db(p_best, power[expected]);
    }
}

/// `out[b] -= Σ_k p_k · L[k][b]` (`out` zeroed by the caller), vectorised where the CPU
/// allows: a 64-class decision is a 64 × 64 product per row. Unseen classes' prior rows (0
/// for the class itself, the mean off-best loss elsewhere) add up to one constant row plus
/// a correction on their own classes.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn expected_losses(out: &mut [f32], probs: &[f32], seen: &[f32], mean: &[f32], off_best: f32) {
    let c = out.len();
    let mut unseen = 0.0;
    for (k, (&p, &n)) in probs.iter().zip(seen).enumerate() {
        if p < MIN_PROB {
            continue;
        }
        if n > 0.0 {
            for (o, &l) in out.iter_mut().zip(&mean[k * c..(k + 1) * c]) {
                *o -= p * l;
            }
        } else {
            unseen += p;
            out[k] += p * off_best;
        }
    }
    if unseen > 0.0 {
        out.iter_mut().for_each(|o| *o -= unseen * off_best);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlearnt_table_is_the_argmax() {
        let mut t = LossTable::new(4, DEFAULT_MEMORY);
        let mut out = Vec::new();
        t.decide(&[0.1, 0.5, 0.3, 0.1], false, &mut out);
        assert_eq!(crate::learner::eval::argmax(&out), 1);
        t.decide(&[0.0, 1.0, 3.0, 2.0], true, &mut out);
        assert_eq!(crate::learner::eval::argmax(&out), 2);
    }

    #[test]
    fn a_split_prediction_chooses_the_beam_that_loses_least() {
        // Beams 0 and 2 are each best half the time; beam 1 loses 1 dB to either, while
        // 0 and 2 lose 20 dB to each other.
        let mut t = LossTable::new(3, DEFAULT_MEMORY);
        for _ in 0..10 {
            t.learn(&[100.0, 79.4, 1.0]);
            t.learn(&[1.0, 79.4, 100.0]);
        }
        let mut out = Vec::new();
        t.decide(&[0.45, 0.1, 0.45], false, &mut out);
        assert_eq!(crate::learner::eval::argmax(&out), 1, "{out:?}");
        // A confident prediction keeps its class (at 0.9 beam 1 would still lose less).
        t.decide(&[0.98, 0.01, 0.01], false, &mut out);
        assert_eq!(crate::learner::eval::argmax(&out), 0, "{out:?}");
        // The expected loss of beam 1 is about 1 dB.
        t.decide(&[0.5, 0.0, 0.5], false, &mut out);
        assert!((out[1] + 1.0).abs() < 0.01, "{out:?}");
    }

    #[test]
    fn a_short_memory_follows_a_change_of_losses() {
        // Beam 1 loses 1 dB when 0 is best for 200 rows, then 20 dB (a new site).
        let (mut short, mut long) = (LossTable::new(3, 10.0), LossTable::new(3, DEFAULT_MEMORY));
        for t in [&mut short, &mut long] {
            for _ in 0..200 {
                t.learn(&[100.0, 79.4, 1.0]);
            }
            for _ in 0..60 {
                t.learn(&[100.0, 1.0, 1.0]);
            }
        }
        // Weighted 1/10 per row, the old loss has faded (0.9^60); a plain mean over all 260
        // rows is (200 · 1 + 60 · 20) / 260 = 5.4 dB.
        assert!((short.mean[1] - 20.0).abs() < 0.1, "{}", short.mean[1]);
        assert!((long.mean[1] - 5.38).abs() < 0.05, "{}", long.mean[1]);
        // A restored table keeps the pipeline's memory, not the saved one's.
        let mut restored = LossTable::new(3, 10.0);
        restored.restore(postcard::from_bytes(&postcard::to_stdvec(&long).unwrap()).unwrap());
        assert_eq!(
            (restored.memory, restored.mean.clone()),
            (10.0, long.mean.clone())
        );
    }

    #[test]
    fn a_checkpointed_table_decides_the_same() {
        let mut t = LossTable::new(3, DEFAULT_MEMORY);
        t.learn(&[100.0, 79.4, 1.0]);
        t.learn(&[1.0, 50.0, 100.0]);
        let mut back: LossTable = postcard::from_bytes(&postcard::to_stdvec(&t).unwrap()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.decide(&[0.2, 0.3, 1.0], true, &mut a);
        back.decide(&[0.2, 0.3, 1.0], true, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn choose_acts_on_the_expected_loss_unless_the_record_prefers_the_most_probable() {
        let mut t = LossTable::new(3, DEFAULT_MEMORY);
        t.learn(&[100.0, 79.4, 1.0]); // class 0 best: 1 costs 1 dB, 2 costs 20
        t.learn(&[1.0, 50.0, 100.0]); // class 2 best: 1 costs 3 dB, 0 costs 20
        let (p, mut out) = ([0.45, 0.1, 0.45], Vec::new());
        let a = t.choose(&p, false, None, &mut out);
        assert_eq!((a.most, a.least, a.on_most, a.class()), (0, 1, false, 1));
        // A key whose most probable beam lost less lately acts on it; a tie does not.
        let mut record = RuleRecord::default();
        assert_eq!(t.choose(&p, false, Some(&record), &mut out).class(), 1);
        record.learn(0.9, &[100.0, 79.4, 1.0], 0, 1);
        let a = t.choose(&p, false, Some(&record), &mut out);
        assert_eq!((a.on_most, a.class()), (true, 0));
    }

    #[test]
    fn the_switch_follows_the_rule_that_lost_less_recently() {
        let mut r = RuleRecord::default();
        assert!(!r.prefers_argmax(), "a new key acts on the expected loss");
        // Beam 0 is best; the argmax chose it, the expected loss chose beam 1 (1 dB less).
        let power = [100.0, 79.4, 1.0];
        r.learn(0.9, &power, 0, 1);
        assert!(r.prefers_argmax());
        // Then the expected loss is right for three rows: 0.9^3 of the 1 dB is left.
        for _ in 0..3 {
            r.learn(0.9, &power, 2, 0);
        }
        assert!(!r.prefers_argmax(), "{r:?}");
        assert!((r.argmax - 20.0 * (0.9 + 0.81 + 1.0)).abs() < 0.01, "{r:?}");
        assert!((r.expected - 0.729).abs() < 0.01, "{r:?}");
        // Rows that cannot be read change nothing.
        let before = r;
        r.learn(0.9, &[f32::NAN, 1.0, 1.0], 0, 1);
        r.learn(0.9, &[0.0, 0.0, 0.0], 0, 1);
        r.learn(0.9, &power, 3, 0);
        assert_eq!(r, before);
        // A class with no power is charged the cap.
        let mut r = RuleRecord::default();
        r.learn(0.5, &[1.0, 0.0, 2.0], 1, 2);
        assert_eq!((r.argmax, r.expected), (MAX_LOSS_DB, 0.0));
    }

    #[test]
    fn non_finite_predictions_and_powers_are_not_learnt_or_chosen_and_no_power_is_capped() {
        let mut t = LossTable::new(3, DEFAULT_MEMORY);
        t.learn(&[1.0, f32::NAN, 2.0]);
        t.learn(&[0.0, 0.0, 0.0]);
        assert!(t.seen.iter().all(|&n| n == 0.0));
        // A beam with no power is charged the cap, not an infinite loss.
        t.learn(&[1.0, 0.0, 2.0]);
        assert_eq!(t.seen[2], 1.0);
        assert_eq!(t.mean[2 * 3 + 1], MAX_LOSS_DB);
        let mut out = Vec::new();
        t.decide(&[f32::NAN, 0.0, 1.0], true, &mut out);
        assert!(out.iter().all(|o| o.is_nan()));
    }
}
