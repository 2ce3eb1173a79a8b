//! Training data: one in-memory [`Dataset`] type, read from MNIST IDX, CIFAR-10 binary batches or
//! an image folder (class = sub-folder), or the embedded MNIST default.

use candle_core::{Device, Tensor};

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
            Tensor::from_vec(img, (idx.len(), self.channels, self.height, self.width), device)?,
            Tensor::from_vec(lab, idx.len(), device)?,
        ))
    }
}
