//! The output folder of a run: what it holds, and the checks made at start so that a run
//! never leaves an earlier run's files beside its own, never fails after the replay for a
//! reason it could see before, and never resumes into data that changed.

use std::path::Path;

use anyhow::{Context, Result};

pub(super) const REPORT: &str = "report.json";
pub(super) const DEAD_LETTERS: &str = "dead_letters.jsonl";
pub(super) const SCORES: &str = "scores.parquet";
/// The score segments' folder (checkpoints on).
pub(super) const SCORE_SEGMENTS: &str = "scores";

/// A fresh run (nothing to resume) removes the outputs an earlier run left in its folder,
/// so that an old report or dead-letter file never sits beside new results; it says which.
/// An output name taken by a folder is refused at start, not after the replay.
pub(super) fn clear_stale(out_dir: &Path, resuming: bool) -> Result<()> {
    for name in [REPORT, DEAD_LETTERS, SCORES] {
        let p = out_dir.join(name);
        if p.is_dir() {
            anyhow::bail!("{} is a folder; gradsift writes a file there", p.display());
        }
        if !resuming && p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove the stale {}", p.display()))?;
            tracing::info!(file = %p.display(), "removed an earlier run's output (a fresh run, no checkpoint to resume)");
        }
    }
    Ok(())
}
