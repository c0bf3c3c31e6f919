//! The dead-letter destination for bad input: one JSON line per rejected row (or per
//! unreadable file), with the reason and where it came from, so nothing is lost silently and
//! a bad feed can be replayed once fixed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

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

/// JSON-lines dead-letter file, created on the first letter.
pub struct DeadLetterSink {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    /// Continue an existing file (a run resumed from a checkpoint) instead of replacing it.
    append: bool,
    pub letters: u64,
    pub rows: u64,
}

impl DeadLetterSink {
    pub fn new(path: &Path, append: bool) -> Self {
        DeadLetterSink {
            path: path.to_path_buf(),
            out: None,
            append,
            letters: 0,
            rows: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn send(&mut self, letter: &DeadLetter<'_>) -> Result<()> {
        if self.out.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(self.append)
                .truncate(!self.append)
                .open(&self.path)
                .with_context(|| format!("cannot create {}", self.path.display()))?;
            self.out = Some(BufWriter::new(f));
        }
        let out = self.out.as_mut().expect("opened above");
        serde_json::to_writer(&mut *out, letter)?;
        out.write_all(b"\n")?;
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

    /// Flushes to disk (before a checkpoint covers these rows).
    pub fn sync(&mut self) -> Result<()> {
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
            out.get_ref().sync_all()?;
        }
        Ok(())
    }
}
