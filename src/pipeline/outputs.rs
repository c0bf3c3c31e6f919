//! The output folder of a run: what it holds, and the checks made at start so that a run
//! never leaves an earlier run's files beside its own, never fails after the replay for a
//! reason it could see before, and never resumes into data that changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::checkpoint::Checkpoint;
use crate::source::parquet;

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

/// The fingerprints of `files`; an error naming the file when one the checkpoint covers has
/// changed since (its positions would point into other data).
pub(super) fn same_files_as_checkpoint(
    files: &[PathBuf],
    resume: Option<&Checkpoint>,
    ckpt_path: &Path,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in files {
        let name = f.to_string_lossy().into_owned();
        let Some(fp) = parquet::fingerprint(f) else {
            continue;
        };
        if let Some(old) = resume.and_then(|c| c.files.get(&name))
            && *old != fp
        {
            anyhow::bail!(
                "{name} changed since the checkpoint {} was written (size:footer CRC {old}, now {fp}): \
                 its covered rows would point into other data; delete the checkpoint, or restore the file",
                ckpt_path.display()
            );
        }
        out.insert(name, fp);
    }
    Ok(out)
}
