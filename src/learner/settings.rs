//! The learner's settings from the pipeline file: `[model]` (what runs the model, its
//! shape, the blend, the decision, one model or one per key) and `[training]` (micro-batch,
//! steps, learning rate). Apart from the learner's code so that both read as one list of
//! what a user can set, each with its default.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{blend, decision, per_key};

/// What runs the model (see [`super::net`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The fused CPU kernel ([`super::fused`]): the default, several times burn's speed on CPU.
    Fused,
    /// burn-flex, burn's pure-Rust CPU backend (about 3× burn-ndarray here).
    Flex,
    /// burn-ndarray.
    Ndarray,
}

impl Backend {
    /// burn's device for this backend (the fused kernel initialises, and runs its side
    /// models, on burn-flex).
    pub fn device(self) -> Device {
        match self {
            Backend::Fused | Backend::Flex => Device::flex(),
            #[allow(deprecated)]
            // burn 0.22 deprecates ndarray in favour of flex; the design names it
            Backend::Ndarray => Device::ndarray(),
        }
    }
}

/// Model settings (the `[model]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// Hidden layer widths.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Classification: the prediction blends the MLP with the neighbours' vote and
    /// persistence (see [`blend`]); absent: the MLP alone.
    #[serde(default)]
    pub blend: Option<blend::BlendConfig>,
    /// Classification: the class acted on (top-1, power loss; top-k still ranks by
    /// probability), see [`decision`].
    #[serde(default)]
    pub decision: decision::Decision,
    /// `min_expected_loss`: rows of a class after which its row of the loss table stops being
    /// a plain mean and weighs each new row 1/memory (so it follows a change of site).
    #[serde(default = "default_decision_memory")]
    pub decision_memory: f32,
    /// `switch`: the weight of a key's earlier rows, per row, in each rule's record of
    /// recent losses.
    #[serde(default = "default_decision_decay")]
    pub decision_decay: f32,
    /// `min_expected_loss` and `switch`: one loss table for the stream (`shared`) or one per
    /// key (`per_key`; at most `features.max_keys`, made at a key's first row; `gradsift
    /// train` keeps one). Per key, a new site starts from nothing instead of from what the
    /// other sites taught: on the four beam sites that costs power and gains top-1.
    #[serde(default)]
    pub decision_scope: per_key::ModelScope,
    /// One model for the stream, or one per key (see [`per_key`]).
    #[serde(default)]
    pub scope: per_key::ModelScope,
    /// `per_key`: models kept at most (the least recently used key's is dropped).
    #[serde(default = "default_max_models")]
    pub max_models: usize,
}

fn default_decision_memory() -> f32 {
    decision::DEFAULT_MEMORY
}

fn default_decision_decay() -> f32 {
    decision::DEFAULT_DECAY
}

fn default_max_models() -> usize {
    16
}

fn default_backend() -> Backend {
    Backend::Fused
}
fn default_hidden() -> Vec<usize> {
    vec![64, 64]
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backend: default_backend(),
            hidden: default_hidden(),
            blend: None,
            decision: decision::Decision::Argmax,
            decision_memory: default_decision_memory(),
            decision_decay: default_decision_decay(),
            decision_scope: per_key::ModelScope::Shared,
            scope: per_key::ModelScope::Shared,
            max_models: default_max_models(),
        }
    }
}

/// Optimisation settings (the `[training]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Fresh samples per learner step.
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Adam learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Seed of every random choice, weight initialisation included.
    #[serde(default)]
    pub seed: u64,
    /// A step whose gradient is not finite is skipped; after this many in a row the learner
    /// goes back to its last good weights with fresh Adam moments, and warns.
    #[serde(default = "default_max_nonfinite_steps")]
    pub max_nonfinite_steps: u32,
    /// Optimiser steps per micro-batch: the first on the scored pass, each further one on the
    /// trained fresh rows and a fresh draw of replayed rows (a small, slow stream learns more
    /// from each row; every step is counted as training work, and in the every-row reference).
    #[serde(default = "default_steps_per_batch")]
    pub steps_per_batch: u32,
    /// Predict with an exponential moving average of the weights, this much of the old
    /// average kept at each step (0: the live weights predict; see `learner/average.rs`).
    #[serde(default)]
    pub average_decay: f64,
}

fn default_steps_per_batch() -> u32 {
    1
}

fn default_max_nonfinite_steps() -> u32 {
    8
}

fn default_micro_batch() -> usize {
    256
}
fn default_lr() -> f64 {
    1e-3
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            micro_batch: default_micro_batch(),
            learning_rate: default_lr(),
            seed: 0,
            max_nonfinite_steps: default_max_nonfinite_steps(),
            steps_per_batch: default_steps_per_batch(),
            average_decay: 0.0,
        }
    }
}
