//! The one error type of the data loaders. Every variant carries the path (or, for in-memory
//! datasets, the source description) so a user with a directory of a hundred files knows which
//! one to fix, and says what was expected versus what was found.

use std::path::{Path, PathBuf};

/// Formats a path for an error message.
fn p(path: &Path) -> std::path::Display<'_> {
    path.display()
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The io error is part of the message, not a `source`: anyhow's `{:#}` would print it twice.
    #[error("{}: {op}: {err}", p(path))]
    Io {
        path: PathBuf,
        op: &'static str,
        err: std::io::Error,
    },

    #[error("{}: gzip stream is corrupt: {err}", p(path))]
    Gzip { path: PathBuf, err: std::io::Error },

    #[error(
        "{}: wrong magic number for {what}: expected {expected:#010x}, found {found:#010x}",
        p(path)
    )]
    BadMagic {
        path: PathBuf,
        what: &'static str,
        expected: u32,
        found: u32,
    },

    #[error(
        "{}: truncated {what}: expected {expected} bytes, found {actual}",
        p(path)
    )]
    Truncated {
        path: PathBuf,
        what: String,
        expected: u64,
        actual: u64,
    },

    /// A structurally invalid header or file (zero dimensions, absurd counts, trailing bytes).
    #[error("{}: {reason}", p(path))]
    Malformed { path: PathBuf, reason: String },

    #[error(
        "{}: {images} images, but {}: {labels} labels",
        p(images_path),
        p(labels_path)
    )]
    CountMismatch {
        images_path: PathBuf,
        images: usize,
        labels_path: PathBuf,
        labels: usize,
    },

    #[error(
        "{}: no labels file found next to the images file (tried {})",
        p(images_path),
        show_all(tried)
    )]
    MissingLabels {
        images_path: PathBuf,
        tried: Vec<PathBuf>,
    },

    #[error(
        "{}: image is {found}, but {} (the first image) is {expected}; all images must share one size and channel count (or give a target resolution to resize)",
        p(path),
        p(first)
    )]
    MixedShapes {
        path: PathBuf,
        found: String,
        first: PathBuf,
        expected: String,
    },

    #[error("{}: {reason}", p(path))]
    Empty { path: PathBuf, reason: String },

    #[error(
        "{}: record {index} has label {label}, but there are only {num_classes} classes",
        p(path)
    )]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u32,
        num_classes: usize,
    },

    #[error("{}: cannot decode image: {message}", p(path))]
    Decode { path: PathBuf, message: String },

    #[error(
        "{}: unknown dataset format ({reason}); supported: MNIST IDX (*-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz], a file or a directory), CIFAR-10 binary (data_batch_N.bin / test_batch.bin, a file or a directory), image folder (root/<class>/*.png|jpg|jpeg)",
        p(path)
    )]
    UnknownFormat { path: PathBuf, reason: String },

    /// `to_resolution` cannot produce the requested size from this dataset.
    #[error("{source_desc}: cannot bring {height}x{width} images to {res}x{res}: {reason}")]
    Resolution {
        source_desc: String,
        height: usize,
        width: usize,
        res: usize,
        reason: String,
    },
}

fn show_all(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|t| t.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl DataError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            op,
            err: source,
        }
    }
    pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Malformed {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
