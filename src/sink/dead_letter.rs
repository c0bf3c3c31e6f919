//! The dead-letter destination for bad input: one JSON line per rejected row (or per
//! unreadable file), with the reason and where it came from, so nothing is lost silently and
//! a bad feed can be replayed once fixed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::source::Unreadable;

/// One dead letter.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    pub reason: &'a str,
    pub detail: &'a str,
    /// Source file (or topic) it came from.
    pub origin: &'a str,
    /// Row index in `origin` of the first rejected row.
    pub row: u64,
    /// Rows covered by this letter (1, or a whole unreadable file).
    pub rows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
}

impl<'a> DeadLetter<'a> {
    /// A letter for rows `row..row + rows` of `origin` that have no single key or time: an
    /// unreadable file or row group, or a rejected message.
    pub fn span(reason: &'a str, detail: &'a str, origin: &'a str, row: u64, rows: u64) -> Self {
        DeadLetter {
            reason,
            detail,
            origin,
            row,
            rows,
            key: None,
            time: None,
        }
    }

    /// The letter of input a source could not read.
    pub fn unreadable(u: &'a Unreadable) -> Self {
        Self::span(&u.reason, &u.detail, &u.origin, u.first_row, u.rows)
    }
}

/// JSON-lines dead-letter file, created on the first letter.
pub struct DeadLetterSink {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    /// Resuming: continue the file from this length, the one the checkpoint recorded.
    resume_at: Option<u64>,
    /// Bytes of the file written so far (what a checkpoint records).
    len: u64,
    pub letters: u64,
    pub rows: u64,
}

impl DeadLetterSink {
    /// A new file, or (`resume_at`: the length a checkpoint recorded) the old one cut back to
    /// that length: letters written after the checkpoint, or torn by a crash, are dropped
    /// and written again as their rows are replayed.
    pub fn new(path: &Path, resume_at: Option<u64>) -> Self {
        DeadLetterSink {
            path: path.to_path_buf(),
            out: None,
            len: resume_at.unwrap_or(0),
            resume_at,
            letters: 0,
            rows: 0,
        }
    }

    /// Bytes written to the file so far, including what a resume continued.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn open(&self) -> Result<File> {
        let ctx = || format!("cannot open {}", self.path.display());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(self.resume_at.is_none())
            .open(&self.path)
            .with_context(ctx)?;
        if let Some(at) = self.resume_at {
            let had = f.metadata().with_context(ctx)?.len();
            if had < at {
                // Letters the checkpoint covers are gone: not a state to go on from quietly.
                anyhow::bail!(
                    "{} holds {had} bytes, but the checkpoint covers {at}: dead letters the \
                     checkpoint counts are lost (restore the file, or remove the checkpoint \
                     to replay from the start)",
                    self.path.display()
                );
            } else if had > at {
                tracing::info!(file = %self.path.display(), dropped_bytes = had - at, "dead letters past the checkpoint are dropped; their rows are replayed");
                f.set_len(at).with_context(ctx)?;
            }
        }
        let mut f = f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).with_context(ctx)?;
        // The file's own entry in its folder, so that a checkpoint covering its letters
        // never outlives it (the checkpoint may live in another folder).
        crate::durable::sync_dir(&self.path)?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn send(&mut self, letter: &DeadLetter<'_>) -> Result<()> {
        if self.out.is_none() {
            self.out = Some(BufWriter::new(self.open()?));
        }
        let out = self.out.as_mut().expect("opened above");
        let mut line = serde_json::to_vec(letter)?;
        line.push(b'\n');
        out.write_all(&line)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.len += line.len() as u64;
        self.letters += 1;
        self.rows += letter.rows;
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
        }
        Ok(())
    }

    /// Flushes to disk (before a checkpoint covers these rows). A resumed sink that wrote
    /// nothing new still cuts the file back to the checkpointed length here.
    pub fn sync(&mut self) -> Result<()> {
        if self.out.is_none() && self.resume_at.is_some() && self.path.exists() {
            self.out = Some(BufWriter::new(self.open()?));
        }
        if let Some(out) = self.out.as_mut() {
            out.flush()
                .with_context(|| format!("cannot write {}", self.path.display()))?;
            out.get_ref()
                .sync_all()
                .with_context(|| format!("cannot flush {}", self.path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead-letter file shorter than the checkpoint that covers it has lost letters the
    /// checkpoint counts: the resumed run stops with the path, instead of carrying on with
    /// a wrong length (before: a warning).
    #[test]
    fn a_file_shorter_than_its_checkpoint_stops_the_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead_letters.jsonl");
        std::fs::write(&path, b"{}\n").unwrap();
        let mut sink = DeadLetterSink::new(&path, Some(100));
        let err = format!("{:#}", sink.sync().unwrap_err());
        assert!(
            err.contains("dead_letters.jsonl") && err.contains("covers 100"),
            "{err}"
        );
        // As long as the checkpoint says, or longer (cut back): fine.
        let mut sink = DeadLetterSink::new(&path, Some(3));
        sink.sync().unwrap();
    }
}
