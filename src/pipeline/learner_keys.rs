//! What the learner stage keeps per key: the prediction blend's expert weights, the
//! decision's record of its two rules (`model.decision = "switch"`) and the key's loss
//! detectors (`drift.per_key`). The keys are the feature stage's: it tells every key it
//! starts or forgets tracking in-band, with the batch that did it, so this map follows the
//! features' keys batch by batch and is bounded by `features.max_keys` like them: keys a batch
//! tracks are added before its rows, keys it forgets dropped after them (within a batch the
//! order of rows and changes is not kept: a key forgotten mid-batch keeps its parts for the
//! whole batch). A checkpoint stores these parts inside the features' per-key state, as one
//! [`KeyLearnerParts`] per key (format 09; its loss table since format 12).

use std::sync::Arc;

use crate::features::{FeatureState, KeyChange, KeyLearnerParts, SavedLearnerParts};
use crate::learner::blend::ExpertWeights;
use crate::learner::decision::{LossTable, RuleRecord};
use crate::learner::drift::{DriftConfig, KeyDetectors};

/// Per-key learner state, by key (see the module doc).
#[derive(Default)]
pub(crate) struct LearnerKeys {
    keys: foldhash::HashMap<Arc<str>, KeyLearnerParts>,
}

impl LearnerKeys {
    /// The parts a resumed checkpoint kept; their loss detectors take `cfg`'s settings.
    pub fn restored(parts: SavedLearnerParts, cfg: &DriftConfig) -> Self {
        let mut keys: foldhash::HashMap<Arc<str>, KeyLearnerParts> = parts.into_iter().collect();
        for d in keys.values_mut().filter_map(|p| p.drift.as_mut()) {
            d.retune(cfg);
        }
        LearnerKeys { keys }
    }

    /// Follows the feature stage's keys (both halves of a batch's changes at once).
    #[cfg(test)]
    pub fn apply(&mut self, changes: &[KeyChange]) {
        self.track(changes);
        self.forget(changes);
    }

    /// Before a batch's rows: the keys it started tracking get fresh parts, so that their
    /// rows find them (a key forgotten and tracked again within the batch starts over).
    pub fn track(&mut self, changes: &[KeyChange]) {
        for c in changes {
            if let KeyChange::Tracked(k) = c {
                self.keys.insert(k.clone(), KeyLearnerParts::default());
            }
        }
    }

    /// After a batch's rows: the keys it stopped tracking (and did not track again) are
    /// dropped. Why after: the batch's rows of such a key came before it was forgotten, and
    /// they read and update its parts.
    pub fn forget(&mut self, changes: &[KeyChange]) {
        for k in KeyChange::forgotten(changes) {
            self.keys.remove(k);
        }
    }

    /// The blend's expert weights on `key` (fresh ones for a key not tracked).
    pub fn expert_weights(&self, key: &str) -> ExpertWeights {
        self.keys.get(key).map(|p| p.experts).unwrap_or_default()
    }

    pub fn set_expert_weights(&mut self, key: &str, w: ExpertWeights) {
        if let Some(p) = self.keys.get_mut(key) {
            p.experts = w;
        }
    }

    /// Under `model.decision_scope = "per_key"`: swaps `key`'s loss table with `table`, the
    /// stage's table in use, so that a row is decided and learnt by its key's table; the
    /// same call after the row puts it back. A key's table is made by `fresh` at its first
    /// row. A key not tracked has none: the stage's own table serves it.
    pub fn swap_losses(
        &mut self,
        key: &str,
        table: &mut Option<LossTable>,
        fresh: impl FnOnce() -> Option<LossTable>,
    ) {
        if let Some(p) = self.keys.get_mut(key) {
            if p.losses.is_none() {
                p.losses = fresh();
            }
            std::mem::swap(&mut p.losses, table);
        }
    }

    /// `key`'s record of the decision's two rules (a fresh one for a key not tracked).
    pub fn rules(&self, key: &str) -> RuleRecord {
        self.keys.get(key).map(|p| p.rules).unwrap_or_default()
    }

    /// Mutable access to `key`'s record; none for a key not tracked.
    pub fn rules_mut(&mut self, key: &str) -> Option<&mut RuleRecord> {
        self.keys.get_mut(key).map(|p| &mut p.rules)
    }

    /// The loss detectors of `key` (made on first use); none for a key not tracked.
    pub fn detectors(&mut self, key: &str, cfg: &DriftConfig) -> Option<&mut KeyDetectors> {
        let p = self.keys.get_mut(key)?;
        Some(
            p.drift
                .get_or_insert_with(|| Box::new(KeyDetectors::new(cfg))),
        )
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Writes every key's parts into the features' state a checkpoint stores.
    pub fn save_into(&self, state: &mut FeatureState) {
        state.put_learner_parts(|k| self.keys.get(k).cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_follow_the_feature_stage_and_start_fresh() {
        let cfg = DriftConfig::default();
        let mut keys = LearnerKeys::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        keys.apply(&[KeyChange::Tracked(a.clone()), KeyChange::Tracked(b.clone())]);
        keys.set_expert_weights("a", [1.0, 2.0, 3.0]);
        assert!(keys.detectors("b", &cfg).is_some());
        assert!(
            keys.detectors("c", &cfg).is_none(),
            "an untracked key has none"
        );
        keys.set_expert_weights("c", [9.0; 3]);
        keys.rules_mut("a").unwrap().learn(0.9, &[1.0, 2.0], 0, 1);
        assert!(!keys.rules("a").prefers_argmax() && keys.rules("a") != RuleRecord::default());
        assert!(keys.rules_mut("c").is_none());
        assert_eq!(keys.len(), 2, "an untracked key is not added");
        // Forgotten and seen again: it starts over, as the features' key does.
        keys.apply(&[KeyChange::Forgotten(a.clone()), KeyChange::Tracked(a)]);
        assert_eq!(keys.expert_weights("a"), ExpertWeights::default());
        assert_eq!(keys.rules("a"), RuleRecord::default());
        keys.apply(&[KeyChange::Forgotten(b)]);
        assert_eq!(keys.len(), 1);
    }

    /// A batch's changes around its rows: a key tracked and forgotten within the batch has
    /// its parts while the rows run; one forgotten and tracked again starts over and stays.
    #[test]
    fn a_batchs_key_changes_frame_its_rows() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut keys = LearnerKeys::default();
        keys.apply(&[KeyChange::Tracked(b.clone())]);
        keys.set_expert_weights("b", [1.0; 3]);
        let changes = [
            KeyChange::Tracked(a.clone()),
            KeyChange::Forgotten(a.clone()),
            KeyChange::Forgotten(b.clone()),
            KeyChange::Tracked(b.clone()),
        ];
        keys.track(&changes);
        // The rows: a's parts are there to update; b's are fresh.
        keys.set_expert_weights("a", [2.0; 3]);
        assert_eq!(keys.expert_weights("a"), [2.0; 3]);
        assert_eq!(keys.expert_weights("b"), ExpertWeights::default());
        keys.forget(&changes);
        assert_eq!(keys.len(), 1, "a is gone, b stays");
        assert!(keys.rules_mut("b").is_some() && keys.rules_mut("a").is_none());
    }

    /// Per-key loss tables: each key's row is decided and learnt by its own table, which
    /// stays with the key between rows; an untracked key uses the stage's table.
    #[test]
    fn each_key_learns_its_own_loss_table() {
        let mut keys = LearnerKeys::default();
        keys.apply(&[
            KeyChange::Tracked(Arc::from("a")),
            KeyChange::Tracked(Arc::from("b")),
        ]);
        let fresh = || Some(LossTable::new(2, 30.0));
        let mut in_use = fresh();
        let learn = |keys: &mut LearnerKeys, in_use: &mut Option<LossTable>, key: &str| {
            keys.swap_losses(key, in_use, fresh);
            in_use.as_mut().unwrap().learn(&[1.0, 2.0]);
            keys.swap_losses(key, in_use, fresh);
        };
        learn(&mut keys, &mut in_use, "a");
        learn(&mut keys, &mut in_use, "a");
        learn(&mut keys, &mut in_use, "b");
        assert_eq!(
            in_use.as_ref().unwrap().rows(),
            0.0,
            "the stage's table is back"
        );
        let rows = |keys: &mut LearnerKeys, key: &str| {
            let mut t = None;
            keys.swap_losses(key, &mut t, fresh);
            let rows = t.as_ref().map(LossTable::rows);
            keys.swap_losses(key, &mut t, fresh);
            rows
        };
        assert_eq!(rows(&mut keys, "a"), Some(2.0));
        assert_eq!(rows(&mut keys, "b"), Some(1.0));
        learn(&mut keys, &mut in_use, "c");
        assert_eq!(
            in_use.as_ref().unwrap().rows(),
            1.0,
            "untracked: the stage's table"
        );
        assert_eq!(rows(&mut keys, "c"), None);
    }
}
