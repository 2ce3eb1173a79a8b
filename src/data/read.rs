//! Reading whole dataset files into memory with a size cap, transparently gunzipping. Gzip is
//! detected by its magic bytes, not the extension, because renamed and re-compressed MNIST
//! mirrors are common.

use std::io::Read;
use std::path::Path;

use super::DataError;

/// Largest (decompressed) dataset file we accept: 4 GiB of u8 pixels is already 16 GiB of f32,
/// so anything bigger is a wrong file or a gzip bomb rather than a dataset we could train on.
pub(crate) const MAX_FILE_BYTES: u64 = 4 << 30;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// True when `bytes` start with the gzip magic.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// Reads `path` fully, refusing files larger than [`MAX_FILE_BYTES`].
pub(crate) fn read_capped(path: &Path) -> Result<Vec<u8>, DataError> {
    let meta =
        std::fs::metadata(path).map_err(|e| DataError::io(path, "reading file metadata", e))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(DataError::malformed(
            path,
            format!(
                "file is {} bytes, more than the {MAX_FILE_BYTES}-byte limit",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| DataError::io(path, "reading file", e))
}

/// Decompresses `bytes` if they are gzip, else returns them unchanged. `path` only names errors.
pub(crate) fn gunzip_if_needed(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>, DataError> {
    if !is_gzip(&bytes) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    // Read one byte past the cap so an over-long stream is detected instead of silently cut.
    flate2::read::GzDecoder::new(bytes.as_slice())
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Gzip {
            path: path.to_path_buf(),
            err: e,
        })?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(DataError::malformed(
            path,
            format!("gzip stream decompresses to more than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(out)
}

/// [`read_capped`] then [`gunzip_if_needed`].
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    gunzip_if_needed(read_capped(path)?, path)
}

/// Big-endian u32 at `off`; the caller has checked the length, but stay total anyway.
pub(crate) fn be_u32(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Sorted names of the directory's entries, split into (files, sub-directories). Hidden entries
/// (leading `.`) are skipped: they are editor/OS litter (`.DS_Store`, `.ipynb_checkpoints`).
pub(crate) fn list_dir(dir: &Path) -> Result<(Vec<String>, Vec<String>), DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, "listing directory", e))?;
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, "listing directory", e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // Follow symlinks: datasets are often linked in from a shared location.
        let path = entry.path();
        if path.is_dir() {
            dirs.push(name);
        } else if path.is_file() {
            files.push(name);
        }
    }
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}
