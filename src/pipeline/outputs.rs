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
/// The plot `--plot` draws (`crate::sink::metric_plot`).
const PLOT_PNG: &str = "metric.png";
const PLOT_SVG: &str = "metric.svg";

/// An earlier checkpointed run's score segments, which a fresh run without checkpoints would
/// leave beside its `scores.parquet` (a fresh checkpointed run starts them again at 1).
fn clear_stale_segments(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("part-") && (name.ends_with(".parquet") || name.ends_with(".tmp")) {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove the stale {}", p.display()))?;
            tracing::info!(file = %p.display(), "removed an earlier run's score segment (a fresh run, no checkpoint to resume)");
        }
    }
    Ok(())
}

/// A fresh run (nothing to resume) removes the outputs an earlier run left in its folder,
/// so that an old report or dead-letter file never sits beside new results; it says which.
/// An output name taken by a folder is refused at start, not after the replay.
pub(super) fn clear_stale(out_dir: &Path, resuming: bool) -> Result<()> {
    if !resuming {
        clear_stale_segments(&out_dir.join(SCORE_SEGMENTS))?;
    }
    for name in [REPORT, DEAD_LETTERS, SCORES, PLOT_PNG, PLOT_SVG] {
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
