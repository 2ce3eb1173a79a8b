//! MNIST-style IDX files: `*-images-idx3-ubyte` (magic 0x803: count, rows, cols, u8 pixels) with a
//! matching `*-labels-idx1-ubyte` (magic 0x801: count, u8 labels), raw or gzip-compressed.
//! Also covers Fashion-MNIST, KMNIST and EMNIST, which use the same container.

use std::path::{Path, PathBuf};

use super::read::{be_u32, list_dir, read_maybe_gz};
use super::{DataError, Dataset};

pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// A header claiming more items than this is corrupt (MNIST has 70k, EMNIST ~800k).
pub const MAX_ITEMS: u32 = 100_000_000;
/// Largest accepted image side; IDX image sets are tiny, a bigger side means a wrong file.
pub const MAX_SIDE: u32 = 16_384;

const EMBEDDED_IMAGES: &[u8] = include_bytes!("../../data/mnist/mnist10k-images-idx3-ubyte.gz");
const EMBEDDED_LABELS: &[u8] = include_bytes!("../../data/mnist/mnist10k-labels-idx1-ubyte.gz");

/// A parsed IDX image file borrowing its pixel bytes.
#[derive(Debug)]
pub struct IdxImages<'a> {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: &'a [u8],
}

fn check_count(path: &Path, count: u32) -> Result<usize, DataError> {
    if count == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            reason: "IDX header says the file holds 0 items".into(),
        });
    }
    if count > MAX_ITEMS {
        return Err(DataError::malformed(
            path,
            format!("IDX header claims {count} items, more than the limit of {MAX_ITEMS}"),
        ));
    }
    Ok(count as usize)
}

fn check_magic(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
    expected: u32,
    header_len: usize,
) -> Result<(), DataError> {
    // Check the magic before the header length so a 3-byte non-IDX file still reads "wrong
    // magic" where possible; shorter than 4 bytes can only be "truncated".
    match be_u32(bytes, 0) {
        Some(found) if found != expected => {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                what,
                expected,
                found,
            })
        }
        _ => {}
    }
    if bytes.len() < header_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("{what} header"),
            expected: header_len as u64,
            actual: bytes.len() as u64,
        });
    }
    Ok(())
}

/// Checks that the payload after `header` has exactly `payload` bytes.
fn check_payload(
    bytes: &[u8],
    path: &Path,
    what: &str,
    header: usize,
    payload: u64,
) -> Result<(), DataError> {
    let expected = header as u64 + payload;
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: what.to_string(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(DataError::malformed(
            path,
            format!(
                "{} trailing bytes after the {what} ({expected} bytes expected, {actual} found)",
                actual - expected
            ),
        ));
    }
    Ok(())
}

/// Parses an (already decompressed) IDX images file. `path` names errors.
pub fn parse_images<'a>(bytes: &'a [u8], path: &Path) -> Result<IdxImages<'a>, DataError> {
    check_magic(bytes, path, "IDX images (idx3-ubyte)", IMAGES_MAGIC, 16)?;
    let field =
        |off| be_u32(bytes, off).ok_or_else(|| DataError::malformed(path, "header too short"));
    let count = check_count(path, field(4)?)?;
    let (rows, cols) = (field(8)?, field(12)?);
    if rows == 0 || cols == 0 || rows > MAX_SIDE || cols > MAX_SIDE {
        return Err(DataError::malformed(
            path,
            format!("IDX header claims {rows}x{cols} images; each side must be 1..={MAX_SIDE}"),
        ));
    }
    let payload = count as u64 * rows as u64 * cols as u64;
    check_payload(bytes, path, "image data", 16, payload)?;
    Ok(IdxImages {
        count,
        rows: rows as usize,
        cols: cols as usize,
        pixels: &bytes[16..],
    })
}

/// Parses an (already decompressed) IDX labels file into its label bytes.
pub fn parse_labels<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8], DataError> {
    check_magic(bytes, path, "IDX labels (idx1-ubyte)", LABELS_MAGIC, 8)?;
    let count = check_count(
        path,
        be_u32(bytes, 4).ok_or_else(|| DataError::malformed(path, "header too short"))?,
    )?;
    check_payload(bytes, path, "label data", 8, count as u64)?;
    Ok(&bytes[8..])
}

/// Builds a dataset from decompressed IDX image and label bytes.
pub fn from_idx_bytes(
    images: &[u8],
    images_path: &Path,
    labels: &[u8],
    labels_path: &Path,
    source: String,
) -> Result<Dataset, DataError> {
    let img = parse_images(images, images_path)?;
    let lab = parse_labels(labels, labels_path)?;
    if img.count != lab.len() {
        return Err(DataError::CountMismatch {
            images_path: images_path.to_path_buf(),
            images: img.count,
            labels_path: labels_path.to_path_buf(),
            labels: lab.len(),
        });
    }
    // MNIST has 10 classes; IDX variants like EMNIST have more, so grow to the largest label.
    let num_classes = lab
        .iter()
        .map(|&l| l as usize + 1)
        .max()
        .unwrap_or(0)
        .max(10);
    Ok(Dataset {
        images: super::scale_u8(img.pixels),
        labels: lab.iter().map(|&l| l as u32).collect(),
        channels: 1,
        height: img.rows,
        width: img.cols,
        num_classes,
        class_names: (0..num_classes).map(|k| k.to_string()).collect(),
        source,
    })
}

/// The first 10,000 MNIST training digits, compiled into the binary so that every command works
/// without a download (the evaluation classifier and the default teacher run use them).
pub fn embedded_mnist() -> Result<Dataset, DataError> {
    let ip = Path::new("<embedded>/mnist10k-images-idx3-ubyte.gz");
    let lp = Path::new("<embedded>/mnist10k-labels-idx1-ubyte.gz");
    let images = super::read::gunzip_if_needed(EMBEDDED_IMAGES.to_vec(), ip)?;
    let labels = super::read::gunzip_if_needed(EMBEDDED_LABELS.to_vec(), lp)?;
    from_idx_bytes(
        &images,
        ip,
        &labels,
        lp,
        "embedded MNIST (first 10k training digits)".into(),
    )
}

/// True for file names that look like IDX files (`*idx1*` / `*idx3*`).
pub fn is_idx_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("idx3") || n.contains("idx1")
}

fn is_images_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains("idx3")
}

/// Candidate partner names for an IDX file: `images`<->`labels`, `idx3`<->`idx1`, and the same
/// with and without `.gz` (the original extension's variant first).
fn partner_names(name: &str, to_labels: bool) -> Vec<String> {
    let (gz, base) = match name.strip_suffix(".gz") {
        Some(b) => (true, b),
        None => (false, name),
    };
    let swapped = if to_labels {
        base.replace("images", "labels").replace("idx3", "idx1")
    } else {
        base.replace("labels", "images").replace("idx1", "idx3")
    };
    if swapped == base {
        return Vec::new();
    }
    let zipped = format!("{swapped}.gz");
    if gz {
        vec![zipped, swapped]
    } else {
        vec![swapped, zipped]
    }
}

/// Finds the file next to `path` that pairs with it (labels for an images file and vice versa).
fn find_partner(path: &Path, to_labels: bool) -> Result<PathBuf, DataError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let dir = path.parent().unwrap_or(Path::new(""));
    let tried: Vec<PathBuf> = partner_names(name, to_labels)
        .into_iter()
        .map(|n| dir.join(n))
        .collect();
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    if tried.is_empty() {
        return Err(DataError::malformed(
            path,
            "file name does not follow the *-images-idx3-ubyte / *-labels-idx1-ubyte pattern, so its partner file cannot be found",
        ));
    }
    Err(DataError::MissingLabels {
        images_path: path.to_path_buf(),
        tried,
    })
}

/// Picks the images file in a directory: the training split when several are present.
fn images_in_dir(dir: &Path) -> Result<PathBuf, DataError> {
    let (files, _) = list_dir(dir)?;
    let images: Vec<&String> = files.iter().filter(|n| is_images_name(n)).collect();
    let pick = images
        .iter()
        .find(|n| n.to_ascii_lowercase().contains("train"))
        .or(images.first());
    match pick {
        Some(n) => Ok(dir.join(n.as_str())),
        None => Err(DataError::Empty {
            path: dir.to_path_buf(),
            reason: "no *-images-idx3-ubyte[.gz] file in this directory".into(),
        }),
    }
}

/// Loads an IDX dataset from a directory, an images file or a labels file (the partner file is
/// looked up next to it).
pub fn load_mnist(path: &Path) -> Result<Dataset, DataError> {
    let images_path = if path.is_dir() {
        images_in_dir(path)?
    } else {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_images_name(name) || !name.to_ascii_lowercase().contains("idx1") {
            path.to_path_buf()
        } else {
            find_partner(path, false)?
        }
    };
    let labels_path = find_partner(&images_path, true)?;
    let images = read_maybe_gz(&images_path)?;
    let labels = read_maybe_gz(&labels_path)?;
    from_idx_bytes(
        &images,
        &images_path,
        &labels,
        &labels_path,
        format!("MNIST IDX {}", images_path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partner_names_cover_gz_and_dot_variants() {
        assert_eq!(
            partner_names("train-images-idx3-ubyte.gz", true),
            ["train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte"]
        );
        assert_eq!(
            partner_names("t10k-images.idx3-ubyte", true),
            ["t10k-labels.idx1-ubyte", "t10k-labels.idx1-ubyte.gz"]
        );
        assert_eq!(
            partner_names("x-labels-idx1-ubyte", false),
            ["x-images-idx3-ubyte", "x-images-idx3-ubyte.gz"]
        );
        assert!(partner_names("digits.bin", true).is_empty());
    }

    #[test]
    fn header_limits_are_enforced() {
        let p = Path::new("h");
        let mut b = IMAGES_MAGIC.to_be_bytes().to_vec();
        b.extend((MAX_ITEMS + 1).to_be_bytes());
        b.extend(28u32.to_be_bytes());
        b.extend(28u32.to_be_bytes());
        assert!(matches!(
            parse_images(&b, p),
            Err(DataError::Malformed { .. })
        ));
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        b[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            parse_images(&b, p),
            Err(DataError::Malformed { .. })
        ));
        assert!(matches!(
            parse_images(&b[..2], p),
            Err(DataError::Truncated { .. })
        ));
    }
}
