//! Training data: one in-memory [`Dataset`] type, read from MNIST IDX, CIFAR-10 binary batches or
//! an image folder (class = sub-folder), or the embedded MNIST default.
//!
//! Loaders never panic on bad files: every failure is a [`DataError`] naming the file and what was
//! expected, because datasets come from downloads and hand-made folders that are often broken.

use std::path::Path;

use candle_core::{Device, Tensor};

pub mod captioned;
pub mod cifar;
mod error;
pub mod folder;
pub mod mnist;
mod read;
mod resample;

pub use captioned::load_captioned;
pub use cifar::load_cifar;
pub use error::DataError;
pub use folder::load_folder;
pub use mnist::{embedded_mnist, load_mnist};

/// Pixel value of padding added by [`Dataset::to_resolution`]: black, i.e. the MNIST background.
pub const BACKGROUND: f32 = -1.0;

/// Maps u8 pixels to `[-1, 1]` as `v / 127.5 - 1` (the inverse of the PNG grid writer's mapping).
pub fn scale_u8(pixels: &[u8]) -> Vec<f32> {
    let lut: [f32; 256] = std::array::from_fn(|v| v as f32 / 127.5 - 1.0);
    pixels.iter().map(|&v| lut[v as usize]).collect()
}

/// The dataset kinds [`load`] recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Mnist,
    Cifar,
    Folder,
}

/// Works out which loader `path` needs from names on disk (and, for a lone file with an
/// unhelpful name, its first bytes).
pub fn detect(path: &Path) -> Result<Format, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, "opening dataset", e))?;
    if meta.is_dir() {
        let (files, dirs) = read::list_dir(path)?;
        if files.iter().any(|n| mnist::is_idx_name(n)) {
            return Ok(Format::Mnist);
        }
        if files
            .iter()
            .any(|n| n.to_ascii_lowercase().ends_with(".bin"))
        {
            return Ok(Format::Cifar);
        }
        if !dirs.is_empty() {
            return Ok(Format::Folder);
        }
        return Err(DataError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "directory has no IDX files, no .bin batches and no class sub-folders".into(),
        });
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if name.ends_with(".bin") {
        return Ok(Format::Cifar);
    }
    if mnist::is_idx_name(&name) {
        return Ok(Format::Mnist);
    }
    // Sniff: an IDX magic, raw or inside gzip.
    let head = sniff(path)?;
    if read::be_u32(&head, 0).is_some_and(|m| m == mnist::IMAGES_MAGIC || m == mnist::LABELS_MAGIC)
    {
        return Ok(Format::Mnist);
    }
    Err(DataError::UnknownFormat {
        path: path.to_path_buf(),
        reason: "file is neither an IDX file nor a CIFAR .bin batch".into(),
    })
}

/// The first few (decompressed) bytes of a file.
fn sniff(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let open = || std::fs::File::open(path).map_err(|e| DataError::io(path, "opening file", e));
    let mut raw = Vec::new();
    open()?
        .take(64)
        .read_to_end(&mut raw)
        .map_err(|e| DataError::io(path, "reading file", e))?;
    if !read::is_gzip(&raw) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    // A corrupt gzip stream just means "not a dataset we know"; the caller reports that.
    let _ = flate2::read::GzDecoder::new(open()?)
        .take(4)
        .read_to_end(&mut out);
    Ok(out)
}

/// Loads a dataset: `None` is the embedded MNIST digits, otherwise the format is detected from
/// `path` (see [`detect`]). Image folders must then hold images of one size.
pub fn load(path: Option<&Path>) -> Result<Dataset, DataError> {
    load_at_resolution(path, None)
}

/// Like [`load`], but image folders are resized to `resolution` x `resolution` while decoding
/// (so folders of mixed sizes load); other formats are returned as stored.
pub fn load_at_resolution(
    path: Option<&Path>,
    resolution: Option<usize>,
) -> Result<Dataset, DataError> {
    let Some(path) = path else {
        return embedded_mnist();
    };
    match detect(path)? {
        Format::Mnist => load_mnist(path),
        Format::Cifar => load_cifar(path),
        Format::Folder => load_folder(path, resolution),
    }
}

/// Images in `[-1, 1]`, NCHW, row-major in one buffer, with integer class labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// `[len, channels, height, width]` f32 in `[-1, 1]`.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
    /// Name of each class (`"0"`..`"9"` for MNIST, sub-folder names for an image folder).
    pub class_names: Vec<String>,
    /// Where the data came from, for logs and errors.
    pub source: String,
}

impl Dataset {
    /// No images (a run that reads no real data).
    pub fn empty() -> Self {
        Self {
            images: vec![],
            labels: vec![],
            channels: 0,
            height: 0,
            width: 0,
            num_classes: 0,
            class_names: vec![],
            source: "no data".into(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_numel(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// The images at `idx` as `[n, C, H, W]` f32 and their labels as `[n]` u32.
    pub fn batch(&self, idx: &[usize], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let m = self.image_numel();
        let mut img = Vec::with_capacity(idx.len() * m);
        let mut lab = Vec::with_capacity(idx.len());
        for &i in idx {
            img.extend_from_slice(&self.images[i * m..(i + 1) * m]);
            lab.push(self.labels[i]);
        }
        Ok((
            Tensor::from_vec(
                img,
                (idx.len(), self.channels, self.height, self.width),
                device,
            )?,
            Tensor::from_vec(lab, idx.len(), device)?,
        ))
    }
}

impl Dataset {
    /// Brings the images to `res` x `res`. Smaller images are padded symmetrically with
    /// [`BACKGROUND`] (MNIST 28 -> 32 adds 2 pixels per side and leaves the digits untouched,
    /// as the classic LeNet setup does); larger square images are area-averaged down. Shrinking
    /// non-square images would distort or crop them, so that is an error.
    pub fn to_resolution(self, res: usize) -> Result<Dataset, DataError> {
        let (h, w) = (self.height, self.width);
        let err = |reason: &str| DataError::Resolution {
            source_desc: self.source.clone(),
            height: h,
            width: w,
            res,
            reason: reason.into(),
        };
        if res == 0 {
            return Err(err("the target resolution must be at least 1"));
        }
        if h == res && w == res {
            return Ok(self);
        }
        let planes = self.len() * self.channels;
        if self.images.len() != planes * h * w {
            return Err(err(
                "the image buffer does not match len x channels x height x width",
            ));
        }
        let images = if h <= res && w <= res {
            resample::pad(&self.images, planes, h, w, res, res, BACKGROUND)
        } else if h == w {
            resample::area_downscale(&self.images, planes, h, w, res, res)
        } else {
            return Err(err(
                "non-square images cannot be shrunk to a square without distortion; load an image folder with a target resolution instead",
            ));
        };
        Ok(Dataset {
            images,
            height: res,
            width: res,
            ..self
        })
    }

    /// The first `n` items (all of them if there are fewer).
    pub fn subset(&self, n: usize) -> Dataset {
        self.split(n).0
    }

    /// The first `n_first` items and the rest (`n_first` is clamped to the length).
    pub fn split(&self, n_first: usize) -> (Dataset, Dataset) {
        let k = n_first.min(self.len());
        let cut = (k * self.image_numel()).min(self.images.len());
        let part = |images: &[f32], labels: &[u32]| Dataset {
            images: images.to_vec(),
            labels: labels.to_vec(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            source: self.source.clone(),
        };
        (
            part(&self.images[..cut], &self.labels[..k]),
            part(&self.images[cut..], &self.labels[k..]),
        )
    }
}
