//! Image folders laid out like torchvision's `ImageFolder`: `root/<class>/*.png|jpg|jpeg`.
//! Classes are the sorted sub-folder names, files are sorted within a class, so the class index
//! of a folder is the same as in PyTorch code reading the same tree.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::DynamicImage;
use rayon::prelude::*;

use super::read::{list_dir, read_capped};
use super::{DataError, Dataset};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether `name` has one of the supported image extensions (case-insensitive).
pub fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// One decoded image as CHW u8.
pub(super) struct Decoded {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub chw: Vec<u8>,
}

impl Decoded {
    fn shape(&self) -> String {
        format!("{}x{}x{} (CxHxW)", self.channels, self.height, self.width)
    }
}

/// HWC-interleaved bytes to CHW planes.
fn hwc_to_chw(hwc: &[u8], c: usize) -> Vec<u8> {
    let hw = hwc.len() / c.max(1);
    let mut out = vec![0u8; hwc.len()];
    for (i, px) in hwc.chunks_exact(c).enumerate() {
        for (k, &v) in px.iter().enumerate() {
            out[k * hw + i] = v;
        }
    }
    out
}

/// Decodes one file; grayscale (with or without alpha) becomes 1 channel, everything else RGB
/// with alpha dropped. `resolution` resizes to a square of that side with a triangle filter.
fn decode(path: &Path, resolution: Option<usize>) -> Result<Decoded, DataError> {
    decode_as(path, resolution, false)
}

/// [`decode`], with `rgb`: grayscale as RGB too (PIL's `convert("RGB")`, for a VAE's 3 channels).
pub(super) fn decode_as(
    path: &Path,
    resolution: Option<usize>,
    rgb: bool,
) -> Result<Decoded, DataError> {
    let bytes = read_capped(path)?;
    let decode_err = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    // Guess the format from the content: a mis-named JPEG still loads.
    let mut img: DynamicImage = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?
        .decode()
        .map_err(|e| decode_err(e.to_string()))?;
    if let Some(r) = resolution {
        let side = u32::try_from(r)
            .map_err(|_| decode_err(format!("target resolution {r} is too large")))?;
        img = img.resize_exact(side, side, FilterType::Triangle);
    }
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(decode_err("image has zero width or height".into()));
    }
    let (channels, hwc) = if rgb || img.color().has_color() {
        (3, img.to_rgb8().into_raw())
    } else {
        (1, img.to_luma8().into_raw())
    };
    Ok(Decoded {
        channels,
        height,
        width,
        chw: hwc_to_chw(&hwc, channels),
    })
}

/// The sorted class folders and their sorted image files.
fn scan(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DataError> {
    let (_, dirs) = list_dir(root)?;
    if dirs.is_empty() {
        return Err(DataError::Empty {
            path: root.to_path_buf(),
            reason: "no class sub-folders (expected root/<class>/*.png|jpg|jpeg)".into(),
        });
    }
    let mut classes = Vec::with_capacity(dirs.len());
    for d in dirs {
        let class_dir = root.join(&d);
        let (files, _) = list_dir(&class_dir)?;
        let images: Vec<PathBuf> = files
            .iter()
            .filter(|n| is_image_name(n))
            .map(|n| class_dir.join(n))
            .collect();
        // Like torchvision, an empty class is an error: it would silently shift nothing but
        // leave a class the model can never learn, which is almost always a copy mistake.
        if images.is_empty() {
            return Err(DataError::Empty {
                path: class_dir,
                reason: "class folder holds no .png/.jpg/.jpeg images".into(),
            });
        }
        classes.push((d, images));
    }
    Ok(classes)
}

/// Loads an image folder. Without `resolution` all images must share one size and channel
/// count; with it every image is resized to `resolution` x `resolution` (channel counts must
/// still agree: silently colourising grayscale images would change the data).
pub fn load_folder(root: &Path, resolution: Option<usize>) -> Result<Dataset, DataError> {
    if resolution == Some(0) {
        return Err(DataError::malformed(
            root,
            "target resolution must be at least 1",
        ));
    }
    let classes = scan(root)?;
    let files: Vec<(u32, &PathBuf)> = classes
        .iter()
        .enumerate()
        .flat_map(|(k, (_, fs))| fs.iter().map(move |f| (k as u32, f)))
        .collect();
    // Decode in parallel but check in file order, so the error names the first bad file.
    let decoded: Vec<Result<Decoded, DataError>> = files
        .par_iter()
        .map(|(_, f)| decode(f, resolution))
        .collect();
    let mut first: Option<(Decoded, &PathBuf)> = None;
    let mut pixels: Vec<u8> = Vec::new();
    for (d, (_, path)) in decoded.into_iter().zip(&files) {
        let d = d?;
        match &first {
            None => {
                pixels.reserve(d.chw.len() * files.len());
                pixels.extend_from_slice(&d.chw);
                first = Some((d, path));
                continue;
            }
            Some((f, first_path)) => {
                if (f.channels, f.height, f.width) != (d.channels, d.height, d.width) {
                    return Err(DataError::MixedShapes {
                        path: path.to_path_buf(),
                        found: d.shape(),
                        first: first_path.to_path_buf(),
                        expected: f.shape(),
                    });
                }
            }
        }
        pixels.extend_from_slice(&d.chw);
    }
    let Some((shape, _)) = first else {
        return Err(DataError::Empty {
            path: root.to_path_buf(),
            reason: "no images found".into(),
        });
    };
    Ok(Dataset {
        images: super::scale_u8(&pixels),
        labels: files.iter().map(|(k, _)| *k).collect(),
        channels: shape.channels,
        height: shape.height,
        width: shape.width,
        num_classes: classes.len(),
        class_names: classes.into_iter().map(|(n, _)| n).collect(),
        source: format!("image folder {}", root.display()),
    })
}
