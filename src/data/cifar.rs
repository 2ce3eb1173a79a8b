//! CIFAR-10 binary batches (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`): each
//! record is one label byte followed by 3072 pixel bytes, 3x32x32 in CHW order.

use std::path::{Path, PathBuf};

use super::read::{list_dir, read_capped};
use super::{DataError, Dataset};

pub const SIDE: usize = 32;
pub const PIXELS: usize = 3 * SIDE * SIDE;
pub const RECORD: usize = 1 + PIXELS;
pub const NUM_CLASSES: usize = 10;
const META: &str = "batches.meta.txt";

/// Appends the records of one batch file (already in memory) to `pixels` / `labels`.
pub fn parse_batch(
    bytes: &[u8],
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<(), DataError> {
    if bytes.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            reason: "CIFAR batch file is empty".into(),
        });
    }
    let (whole, partial) = (bytes.len() / RECORD, bytes.len() % RECORD);
    if partial > 0 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "CIFAR-10 record {} ({RECORD}-byte records: 1 label + 3x32x32 pixels)",
                whole
            ),
            expected: ((whole + 1) * RECORD) as u64,
            actual: bytes.len() as u64,
        });
    }
    pixels.reserve(whole * PIXELS);
    labels.reserve(whole);
    for (index, rec) in bytes.chunks_exact(RECORD).enumerate() {
        let label = rec[0] as u32;
        if label as usize >= NUM_CLASSES {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index,
                label,
                num_classes: NUM_CLASSES,
            });
        }
        labels.push(label);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// The numeric suffix of `data_batch_N.bin`, so batch 10 sorts after batch 9.
fn batch_number(name: &str) -> Option<u64> {
    name.strip_prefix("data_batch_")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

/// The batch files a directory stands for: all training batches in order, else the test batch.
fn batches_in_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let (files, _) = list_dir(dir)?;
    let mut train: Vec<(u64, &String)> = files
        .iter()
        .filter_map(|n| batch_number(n).map(|k| (k, n)))
        .collect();
    train.sort();
    if !train.is_empty() {
        return Ok(train.into_iter().map(|(_, n)| dir.join(n)).collect());
    }
    if files.iter().any(|n| n == "test_batch.bin") {
        return Ok(vec![dir.join("test_batch.bin")]);
    }
    Err(DataError::Empty {
        path: dir.to_path_buf(),
        reason: "no data_batch_N.bin or test_batch.bin in this directory".into(),
    })
}

/// Class names from `batches.meta.txt` (one per line) when it lists at least ten; otherwise the
/// digits `"0".."9"`. The meta file only labels logs and grids, so a missing or odd one is not
/// worth failing a training run over.
fn class_names(dir: &Path) -> Vec<String> {
    let names: Vec<String> = std::fs::read_to_string(dir.join(META))
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if names.len() >= NUM_CLASSES {
        names.into_iter().take(NUM_CLASSES).collect()
    } else {
        (0..NUM_CLASSES).map(|k| k.to_string()).collect()
    }
}

/// Loads a CIFAR-10 directory (all `data_batch_*.bin`, else `test_batch.bin`) or one `.bin` file.
pub fn load_cifar(path: &Path) -> Result<Dataset, DataError> {
    let (files, dir) = if path.is_dir() {
        (batches_in_dir(path)?, path.to_path_buf())
    } else {
        (
            vec![path.to_path_buf()],
            path.parent().unwrap_or(Path::new("")).to_path_buf(),
        )
    };
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in &files {
        parse_batch(&read_capped(f)?, f, &mut pixels, &mut labels)?;
    }
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name()?.to_str().map(str::to_owned))
        .collect();
    Ok(Dataset {
        images: super::scale_u8(&pixels),
        labels,
        channels: 3,
        height: SIDE,
        width: SIDE,
        num_classes: NUM_CLASSES,
        class_names: class_names(&dir),
        source: format!("CIFAR-10 {} ({})", dir.display(), names.join(", ")),
    })
}
