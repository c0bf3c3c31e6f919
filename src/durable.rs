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
    sync_dir(path)?;
    Ok(n)
}

/// Flushes a file's folder entry (a rename) to disk. A file system that cannot sync a folder
/// (`EINVAL`, unsupported) is let be; any other failure (an I/O error) is an error naming
/// the folder: the rename may not survive a power cut.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let sync = File::open(dir).and_then(|d| d.sync_all());
    match sync {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        r => r.with_context(|| format!("cannot sync the folder {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder that cannot be synced is an error naming it (it was ignored); a bare file
    /// name syncs the working folder.
    #[test]
    fn a_folder_that_cannot_be_synced_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        sync_dir(&dir.path().join("f")).unwrap();
        sync_dir(Path::new("f")).unwrap();
        let gone = dir.path().join("gone");
        let err = format!("{:#}", sync_dir(&gone.join("f")).unwrap_err());
        assert!(
            err.contains("cannot sync the folder") && err.contains("gone"),
            "{err}"
        );
    }

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
