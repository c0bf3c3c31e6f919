//! Durable writes: a file is either wholly the old one or wholly the new one after a crash.
//! Write a temporary file beside it, flush it to disk, rename it over the target, then flush
//! the folder entry. On any error the temporary file is removed and the error names the file
//! (a full disk must not leave `.tmp` litter or an anonymous "No space left on device").

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The temporary name a durable write of `path` uses.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `parts` (concatenated) to `path` atomically; returns the bytes written.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<u64> {
    let tmp = tmp_path(path);
    let written = (|| -> Result<u64> {
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut n = 0u64;
        for p in parts {
            f.write_all(p)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            n += p.len() as u64;
        }
        f.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(n)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let n = written?;
    sync_dir(path);
    Ok(n)
}

/// Flushes a file's folder entry (a rename) to disk; best effort where unsupported.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a folder: the rename fails after the temporary file was written.
        let target = dir.path().join("report.json");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"keep").unwrap();
        let err = write_atomic(&target, &[b"{}"]).unwrap_err();
        assert!(format!("{err:#}").contains("report.json"), "{err:#}");
        assert!(!tmp_path(&target).exists());
        let ok = dir.path().join("a.json");
        assert_eq!(write_atomic(&ok, &[b"{", b"}"]).unwrap(), 2);
        assert_eq!(std::fs::read(&ok).unwrap(), b"{}");
    }
}
