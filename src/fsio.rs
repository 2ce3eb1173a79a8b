//! Crash-safe file writing: every file goes to a temporary name in its folder, is fsynced, then
//! renamed over the target; temp files of killed writers are cleaned on the next write.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {} (disk full?)", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        clean_stale_temps(dir);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Removes temp files (`.NAME.tmpPID`) that a killed atomic write left in `dir`.
pub fn clean_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id().to_string();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .starts_with('.')
            .then(|| name.rsplit_once(".tmp"))
            .flatten()
        {
            if !pid.1.is_empty()
                && pid.1.chars().all(|c| c.is_ascii_digit())
                && pid.1 != me
                && !Path::new("/proc").join(pid.1).exists()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
