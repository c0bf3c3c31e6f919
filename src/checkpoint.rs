//! Durable checkpoints: what a restarted gradsift needs to carry on as if it had not stopped.
//!
//! A checkpoint holds the model, Adam's state, the selector's score window, the replay
//! buffer, the feature state (scalers, every key's lag window), the prequential metrics and
//! counters, and the source positions its effects cover. It is written every
//! `every_rows` rows or `every_seconds` seconds (and at a clean stop) to a temporary file,
//! flushed to disk, then renamed over the previous one: a crash leaves either the old or the
//! new checkpoint, never half of one. Feeds commit their offsets only after the checkpoint
//! that covers them is on disk (at-least-once), and a restart skips rows the checkpoint
//! already covers, so the model does not learn them twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::features::FeatureState;
use crate::learner::blend::BlendGate;
use crate::learner::decision::LossTable;
use crate::learner::drift::DriftMonitor;
use crate::learner::eval::Scoreboard;
use crate::learner::per_key::LearnersState;
use crate::learner::trace::MetricTrace;

/// Counters that span restarts (kept in checkpoints).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunCounters {
    pub skipped: BTreeMap<String, u64>,
    pub rows_read: u64,
    pub seen_after_warmup: u64,
    pub trained_after_warmup: u64,
    pub last_loss: f64,
    pub dead_letters: u64,
    pub dead_rows: u64,
    pub resumes: u64,
}

/// `[checkpoint]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write checkpoints and resume from them.
    #[serde(default)]
    pub enabled: bool,
    /// Rows between checkpoints (the bound on what a crash makes the pipeline redo).
    #[serde(default = "default_every_rows")]
    pub every_rows: u64,
    /// Longest time between checkpoints while rows arrive.
    #[serde(default = "default_every_seconds")]
    pub every_seconds: f64,
    /// The checkpoint file (default `checkpoint.bin` in the output folder).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

fn default_every_rows() -> u64 {
    20_000
}
fn default_every_seconds() -> f64 {
    30.0
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            enabled: false,
            every_rows: default_every_rows(),
            every_seconds: default_every_seconds(),
            path: None,
        }
    }
}

/// Everything a checkpoint holds.
#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    pub pipeline: String,
    pub schema: String,
    /// Milliseconds since the Unix epoch.
    pub written_ms: u64,
    /// Per source (`topic[partition]`, or a file): the next position not yet covered.
    pub positions: BTreeMap<String, u64>,
    /// Per replayed file: its [`crate::source::parquet::fingerprint`], so that a resume
    /// refuses a file whose content changed under the same name.
    pub files: BTreeMap<String, String>,
    /// Number of the next score segment file.
    pub next_segment: u64,
    /// Length of the dead-letter file when this checkpoint was taken (a resume cuts it back).
    pub dead_letter_bytes: u64,
    pub learner: LearnersState,
    pub features: FeatureState,
    pub metrics: Scoreboard,
    pub counters: RunCounters,
    pub drift: DriftMonitor,
    pub trace: MetricTrace,
    /// `model.decision = "min_expected_loss"` or `"switch"`: the learnt loss table.
    pub decision: Option<LossTable>,
    /// `model.blend` with a `learn_rate`: the learnt blend (the fixed rule's otherwise).
    pub blend_gate: BlendGate,
}

/// 02: compute ledger, selection policies, evaluation periods.
/// 03: non-finite predictions and steps counted (metrics, learner stats).
/// 04: classification baselines and label history, encodings, per-key models.
/// 05: the score-shift detector keeps one history (a seasonal reference).
/// 06: the decision's loss table; norm clipping's window (and its count of rows cut).
/// 07: the learnt blend.
/// 08: replayed entries keep their key's length, not the key.
/// 09: each key keeps the decision's record of its two rules (`model.decision = "switch"`).
/// 10: each learner keeps its random generator's state (a resume draws on where it was), and
/// the features keep the partial micro-batch (a checkpoint no longer learns it early).
/// 11: each learner keeps its averaged weights (`training.average_decay`).
/// 12: each key may keep its own loss table (`model.decision_scope = "per_key"`).
/// 13: each replayed entry keeps its admission weight (replay under `sample` and `infobatch`).
/// 14: the metric trace keeps running totals, and each change mark the total at the change.
/// 15: the replay buffer's layout (slots, free list, queue, weight sum); the per-key models'
/// use ticks and dropped models' buffer counters.
/// 16: each learner's divergence guard (its snapshot of good weights and runs of steps).
/// 17: the reducible score's held-out model and its Adam state; norm clipping's flag that
/// its threshold was computed; each change mark's first detection.
const MAGIC: &[u8; 8] = b"GSCKPT17";

/// Writes `ckpt` to `path` atomically (see [`crate::durable`]). Returns the bytes written.
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<u64> {
    let payload = postcard::to_stdvec(ckpt).context("cannot serialise the checkpoint")?;
    let crc = crc32fast::hash(&payload).to_le_bytes();
    let len = (payload.len() as u64).to_le_bytes();
    crate::durable::write_atomic(path, &[MAGIC, &crc, &len, &payload])
}

/// Reads the checkpoint at `path`; `None` when there is none.
pub fn load(path: &Path) -> Result<Option<Checkpoint>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if bytes.len() >= 8 && bytes[..6] == MAGIC[..6] && &bytes[..8] != MAGIC {
        bail!(
            "{}: a checkpoint of another gradsift version (format {}; this one reads {}): \
             delete it, or choose another output folder, to start afresh",
            path.display(),
            String::from_utf8_lossy(&bytes[..8]),
            String::from_utf8_lossy(MAGIC)
        );
    }
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        bail!("{}: not a gradsift checkpoint", path.display());
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let payload = &bytes[20..];
    if payload.len() != len || crc32fast::hash(payload) != crc {
        bail!(
            "{}: checkpoint is damaged (length or checksum mismatch)",
            path.display()
        );
    }
    let ckpt = postcard::from_bytes(payload).with_context(|| {
        format!(
            "{}: checkpoint written by another version of gradsift",
            path.display()
        )
    })?;
    Ok(Some(ckpt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_a_cut_file_and_another_format_are_each_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        // Any payload will do for the frame: write one by hand as save() does.
        let payload = b"not a real checkpoint, but a framed one".to_vec();
        let frame = |magic: &[u8], payload: &[u8]| {
            let mut b = magic.to_vec();
            b.extend(crc32fast::hash(payload).to_le_bytes());
            b.extend((payload.len() as u64).to_le_bytes());
            b.extend(payload);
            b
        };
        let err = |bytes: Vec<u8>| {
            std::fs::write(&path, bytes).unwrap();
            format!("{:#}", load(&path).err().expect("refused"))
        };
        let mut flipped = frame(MAGIC, &payload);
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        assert!(err(flipped).contains("damaged"));
        let mut cut = frame(MAGIC, &payload);
        cut.truncate(cut.len() - 5);
        assert!(err(cut).contains("damaged"));
        assert!(err(frame(b"GSCKPT05", &payload)).contains("another gradsift version"));
        assert!(err(b"hello".to_vec()).contains("not a gradsift checkpoint"));
        // A sound frame around a payload of another shape: named, not a panic.
        assert!(err(frame(MAGIC, &payload)).contains("another version"));
        assert!(load(&dir.path().join("none.bin")).unwrap().is_none());
    }
}
