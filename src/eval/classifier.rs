//! A small MNIST CNN whose penultimate layer is the feature space of the Frechet distance and whose
//! predictions give class accuracy. Trained once (about a minute on 2 idle CPU cores) on the
//! embedded digits and cached on disk.
//!
//! Architecture (input `[N, 1, 32, 32]` in `[-1, 1]`, MNIST padded to 32, standardised with the
//! MNIST pixel mean/std): conv(1->16, 3, pad 1)-ReLU-maxpool2 -> conv(16->32, 3, pad 1)-ReLU-maxpool2
//! -> conv(32->64, 3, pad 1)-ReLU-maxpool2 -> flatten (1024) -> linear(1024->128)-ReLU (the 128-d
//! features) -> linear(128->10) (logits). The convolutions use the graphs crate's im2col+GEMM
//! kernel (several times faster than stock candle on CPU, forward and backward).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bumped whenever the architecture, the training recipe or the file layout changes; a cache with
/// another version is retrained.
pub const ARCH_VERSION: u32 = 2;
/// Side of the square input images.
pub const IMAGE_SIZE: usize = 32;
/// Number of classes (digits).
pub const NUM_CLASSES: usize = 10;
/// Length of a feature vector.
pub const FEATURE_DIM: usize = 128;
/// Digits used for training (the first ones of the embedded set); the next ones are held out.
pub const TRAIN_IMAGES: usize = 8000;
/// Held-out digits for the test accuracy (after the training ones).
pub const TEST_IMAGES: usize = 2000;
/// Training must reach this held-out accuracy, or `load_or_train` fails.
pub const MIN_TEST_ACCURACY: f64 = 0.97;

const WEIGHTS_FILE: &str = "classifier.safetensors";
const META_FILE: &str = "classifier.json";
const SEED: u64 = 0x5EED_C1A5;
const EPOCHS: usize = 4;
const BATCH: usize = 64;
const LR: f64 = 2e-3;
const MAX_SHIFT: i64 = 1;
/// MNIST pixel mean and std in `[-1, 1]` units (0.1307 and 0.3081 in `[0, 1]`).
const PIXEL_MEAN: f64 = -0.7386;
const PIXEL_STD: f64 = 0.6162;
const EVAL_BATCH: usize = 256;

/// Parameter names and shapes, in a fixed order.
fn param_specs() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("conv1.weight", vec![16, 1, 3, 3]),
        ("conv1.bias", vec![16]),
        ("conv2.weight", vec![32, 16, 3, 3]),
        ("conv2.bias", vec![32]),
        ("conv3.weight", vec![64, 32, 3, 3]),
        ("conv3.bias", vec![64]),
        ("fc1.weight", vec![FEATURE_DIM, 1024]),
        ("fc1.bias", vec![FEATURE_DIM]),
        ("fc2.weight", vec![NUM_CLASSES, FEATURE_DIM]),
        ("fc2.bias", vec![NUM_CLASSES]),
    ]
}

/// What `classifier.json` records next to the weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassifierMeta {
    pub version: u32,
    /// Accuracy on the held-out digits, in `[0, 1]`.
    pub test_accuracy: f64,
    pub train_images: usize,
    pub test_images: usize,
    /// sha256 (hex) of the padded embedded digits and labels it was trained and tested on.
    pub data_sha256: String,
    /// sha256 (hex) of `classifier.safetensors`, to detect a corrupt or mismatched weights file.
    pub weights_sha256: String,
    pub train_seconds: f64,
}

/// The trained classifier (inference only).
pub struct Classifier {
    params: Vec<Tensor>,
    device: Device,
    meta: ClassifierMeta,
    from_cache: bool,
}

/// Forward pass to the 128-d features (post-ReLU). `p` in [`param_specs`] order.
fn forward_features(p: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
    let conv = |x: &Tensor, w: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        graphs::kernels::conv2d(x, w, Some(b), 1, 1)?
            .relu()?
            .max_pool2d(2)
    };
    let x = ((x - PIXEL_MEAN)? * (1.0 / PIXEL_STD))?;
    let x = conv(&x, &p[0], &p[1])?;
    let x = conv(&x, &p[2], &p[3])?;
    let x = conv(&x, &p[4], &p[5])?;
    let x = x.flatten_from(1)?;
    x.matmul(&p[6].t()?)?.broadcast_add(&p[7])?.relu()
}

fn forward_logits(p: &[Tensor], features: &Tensor) -> candle_core::Result<Tensor> {
    features.matmul(&p[8].t()?)?.broadcast_add(&p[9])
}

impl Classifier {
    /// Training/caching record of these weights.
    pub fn meta(&self) -> &ClassifierMeta {
        &self.meta
    }

    /// Held-out accuracy measured when the weights were trained, in `[0, 1]`.
    pub fn test_accuracy(&self) -> f64 {
        self.meta.test_accuracy
    }

    /// Whether these weights were read from the cache (`false`: trained by this call).
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `f` over `x` (`[N, 1, 32, 32]`) in batches of 256 and concatenates the results.
    fn batched(
        &self,
        x: &Tensor,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        check_image_shape(x)?;
        let n = x.dim(0)?;
        let x = x.to_device(&self.device)?.to_dtype(DType::F32)?;
        let mut outs = Vec::with_capacity(n.div_ceil(EVAL_BATCH));
        let mut i = 0;
        while i < n {
            let b = EVAL_BATCH.min(n - i);
            outs.push(f(&x.narrow(0, i, b)?.contiguous()?)?);
            i += b;
        }
        if outs.is_empty() {
            let width = f(&Tensor::zeros(
                (1, 1, IMAGE_SIZE, IMAGE_SIZE),
                DType::F32,
                &self.device,
            )?)?
            .dim(1)?;
            return Ok(Tensor::zeros((0, width), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Penultimate-layer features `[N, 128]` of images `[N, 1, 32, 32]` in `[-1, 1]`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.batched(x, |b| forward_features(&self.params, b))
    }

    /// Class logits `[N, 10]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.batched(x, |b| {
            forward_logits(&self.params, &forward_features(&self.params, b)?)
        })
    }

    /// Features `[N, 128]` and logits `[N, 10]` in one pass.
    pub fn features_and_logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let both = self.batched(x, |b| {
            let f = forward_features(&self.params, b)?;
            let l = forward_logits(&self.params, &f)?;
            Tensor::cat(&[&f, &l], 1)
        })?;
        Ok((
            both.narrow(1, 0, FEATURE_DIM)?,
            both.narrow(1, FEATURE_DIM, NUM_CLASSES)?,
        ))
    }

    /// Predicted digit of each image.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        argmax_rows(&self.logits(x)?)
    }
}

/// Index of the largest value of each row of a `[N, C]` tensor.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    if logits.dim(0)? == 0 {
        return Ok(Vec::new());
    }
    Ok(logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?)
}

/// Errors unless `x` is `[N, 1, 32, 32]`.
pub(crate) fn check_image_shape(x: &Tensor) -> Result<()> {
    match x.dims() {
        [_, 1, h, w] if *h == IMAGE_SIZE && *w == IMAGE_SIZE => Ok(()),
        dims => bail!(
            "eval supports 1x32x32 MNIST-like images (a tensor [N, 1, 32, 32] in [-1, 1]), got shape {dims:?}; \
             bring grayscale 28x28 digits to 32x32 with Dataset::to_resolution(32)"
        ),
    }
}

/// `$DISTILL_CACHE` if set, else `$XDG_CACHE_HOME/distill`, else `~/.cache/distill` (falling back
/// to the system temp dir without a home), then `classifier-v1`.
pub fn default_cache_dir() -> PathBuf {
    let nonempty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = nonempty("DISTILL_CACHE")
        .or_else(|| {
            nonempty("XDG_CACHE_HOME")
                .filter(|p| p.is_absolute())
                .map(|p| p.join("distill"))
        })
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache").join("distill")))
        .unwrap_or_else(|| std::env::temp_dir().join("distill-cache"));
    base.join(format!("classifier-v{ARCH_VERSION}"))
}

/// The classifier's data: the embedded digits at 32x32, `(images, labels)` with the images
/// `[len, 1, 32, 32]` row-major in `[-1, 1]`.
pub(crate) struct EvalData {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
}

impl EvalData {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn load() -> Result<Self> {
        let d = crate::data::embedded_mnist()
            .map_err(|e| anyhow::anyhow!("loading the embedded MNIST digits: {e}"))?;
        let d = d
            .to_resolution(IMAGE_SIZE)
            .map_err(|e| anyhow::anyhow!("padding the embedded MNIST digits to 32x32: {e}"))?;
        ensure!(
            d.channels == 1 && d.height == IMAGE_SIZE && d.width == IMAGE_SIZE,
            "embedded MNIST came back as {}x{}x{}, expected 1x{IMAGE_SIZE}x{IMAGE_SIZE}",
            d.channels,
            d.height,
            d.width
        );
        ensure!(
            d.len() >= TRAIN_IMAGES + TEST_IMAGES,
            "embedded MNIST has {} digits, need {}",
            d.len(),
            TRAIN_IMAGES + TEST_IMAGES
        );
        ensure!(
            d.labels.iter().all(|&l| (l as usize) < NUM_CLASSES),
            "embedded MNIST has a label outside 0..10"
        );
        Ok(Self {
            images: d.images,
            labels: d.labels,
        })
    }

    /// Images `range` as a `[n, 1, 32, 32]` tensor.
    pub fn tensor(&self, range: std::ops::Range<usize>, device: &Device) -> Result<Tensor> {
        let m = IMAGE_SIZE * IMAGE_SIZE;
        let n = range.len();
        Ok(Tensor::from_slice(
            &self.images[range.start * m..range.end * m],
            (n, 1, IMAGE_SIZE, IMAGE_SIZE),
            device,
        )?)
    }

    /// sha256 of the first `TRAIN_IMAGES + TEST_IMAGES` images (f32 LE) and labels (u32 LE).
    pub fn sha256(&self) -> String {
        let n = TRAIN_IMAGES + TEST_IMAGES;
        let m = IMAGE_SIZE * IMAGE_SIZE;
        let mut h = Sha256::new();
        h.update(
            format!("distill-eval-classifier v{ARCH_VERSION} {n}x1x{IMAGE_SIZE}x{IMAGE_SIZE}\n")
                .as_bytes(),
        );
        let mut buf = Vec::with_capacity(m * 4);
        for img in self.images[..n * m].chunks_exact(m) {
            buf.clear();
            for v in img {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            h.update(&buf);
        }
        for l in &self.labels[..n] {
            h.update(l.to_le_bytes());
        }
        hex(&h.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the cached classifier from `cache_dir`, or trains one (and caches it) when the cache is
/// missing, unreadable, corrupt, of another version or made from other data. Training takes about
/// a minute on 2 CPU cores; `progress` shows a progress bar meanwhile.
pub fn load_or_train(cache_dir: &Path, device: &Device, progress: bool) -> Result<Classifier> {
    let data = EvalData::load()?;
    load_or_train_with(cache_dir, device, progress, &data)
}

pub(crate) fn load_or_train_with(
    cache_dir: &Path,
    device: &Device,
    progress: bool,
    data: &EvalData,
) -> Result<Classifier> {
    let data_sha = data.sha256();
    let reason = match load_checked(cache_dir, device, &data_sha) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    if cache_dir.join(META_FILE).exists() || cache_dir.join(WEIGHTS_FILE).exists() {
        eprintln!(
            "eval classifier: cache in {} not usable ({reason:#}); retraining",
            cache_dir.display()
        );
    } else if progress {
        eprintln!(
            "eval classifier: no cache in {}; training (about a minute)",
            cache_dir.display()
        );
    }
    let (params, meta) = train(data, &data_sha, device, progress)?;
    eprintln!(
        "eval classifier: trained in {:.1}s, held-out accuracy {:.2}% on {} digits",
        meta.train_seconds,
        100.0 * meta.test_accuracy,
        meta.test_images
    );
    ensure!(
        meta.test_accuracy >= MIN_TEST_ACCURACY,
        "eval classifier reached only {:.2}% held-out accuracy (need {:.0}%)",
        100.0 * meta.test_accuracy,
        100.0 * MIN_TEST_ACCURACY
    );
    let meta = save(cache_dir, &params, meta)
        .with_context(|| format!("caching the eval classifier in {}", cache_dir.display()))?;
    Ok(Classifier {
        params,
        device: device.clone(),
        meta,
        from_cache: false,
    })
}

/// Loads the cached classifier without ever training; errors (with the reason) on a cache miss,
/// a corrupt file, another version or other training data.
pub fn load_cached(cache_dir: &Path, device: &Device) -> Result<Classifier> {
    let data = EvalData::load()?;
    load_checked(cache_dir, device, &data.sha256())
}

fn load_checked(dir: &Path, device: &Device, data_sha: &str) -> Result<Classifier> {
    let meta_path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&meta_path)
        .with_context(|| format!("reading {}", meta_path.display()))?;
    let meta: ClassifierMeta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", meta_path.display()))?;
    ensure!(
        meta.version == ARCH_VERSION,
        "cached classifier is version {}, this build uses {ARCH_VERSION}",
        meta.version
    );
    ensure!(
        meta.data_sha256 == data_sha,
        "cached classifier was trained on other data (sha256 {})",
        meta.data_sha256
    );
    ensure!(
        meta.test_accuracy >= MIN_TEST_ACCURACY,
        "cached classifier's accuracy {:.4} is below the minimum",
        meta.test_accuracy
    );
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let sha = export::sha256_hex(&bytes);
    ensure!(
        sha == meta.weights_sha256,
        "{} does not match the sha256 recorded in {META_FILE} (corrupt or replaced)",
        wpath.display()
    );
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("parsing {}", wpath.display()))?;
    let mut params = Vec::new();
    for (name, shape) in param_specs() {
        let t = tensors
            .remove(name)
            .with_context(|| format!("{} has no tensor {name}", wpath.display()))?;
        ensure!(
            t.dims() == shape.as_slice(),
            "{}: {name} has shape {:?}, expected {shape:?}",
            wpath.display(),
            t.dims()
        );
        params.push(t.to_dtype(DType::F32)?);
    }
    Ok(Classifier {
        params,
        device: device.clone(),
        meta,
        from_cache: true,
    })
}

/// Writes weights then metadata (the commit marker), each atomically; returns `meta` with the
/// weights' sha256 filled in.
fn save(dir: &Path, params: &[Tensor], mut meta: ClassifierMeta) -> Result<ClassifierMeta> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let map: HashMap<String, Tensor> = param_specs()
        .iter()
        .zip(params)
        .map(|((n, _), t)| (n.to_string(), t.clone()))
        .collect();
    let bytes = crate::checkpoint::safetensors_bytes(&map)?;
    meta.weights_sha256 = export::sha256_hex(&bytes);
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    write_atomic(
        &dir.join(META_FILE),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    Ok(meta)
}

/// Temp file in the same directory (unique per process and call), fsync, rename over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().context("cache path has no parent")?;
    let name = path
        .file_name()
        .context("cache path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// He-uniform weights (fan-in), zero biases; the last layer uses the smaller 1/sqrt(fan_in) bound.
fn init_params(rng: &mut StdRng, device: &Device) -> Result<Vec<Var>> {
    let specs = param_specs();
    let last = specs.len() - 2;
    let mut out = Vec::with_capacity(specs.len());
    for (i, (_name, shape)) in specs.iter().enumerate() {
        let numel: usize = shape.iter().product();
        let v: Vec<f32> = if shape.len() == 1 {
            vec![0.0; numel]
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let bound = if i == last {
                (1.0 / fan_in as f64).sqrt()
            } else {
                (6.0 / fan_in as f64).sqrt()
            } as f32;
            (0..numel).map(|_| rng.gen_range(-bound..bound)).collect()
        };
        out.push(Var::from_tensor(&Tensor::from_vec(
            v,
            shape.as_slice(),
            device,
        )?)?);
    }
    Ok(out)
}

/// Copies image `src` (32x32) into `dst` shifted by `(dy, dx)`, filling with background (-1).
fn shifted(src: &[f32], dst: &mut [f32], dy: i64, dx: i64) {
    let s = IMAGE_SIZE as i64;
    for y in 0..s {
        for x in 0..s {
            let (sy, sx) = (y - dy, x - dx);
            dst[(y * s + x) as usize] = if (0..s).contains(&sy) && (0..s).contains(&sx) {
                src[(sy * s + sx) as usize]
            } else {
                -1.0
            };
        }
    }
}

/// Trains on the first `TRAIN_IMAGES` digits (random shifts of up to 1 pixel, AdamW, cosine
/// learning rate), measures accuracy on the next `TEST_IMAGES`. Seeded: the same data and thread
/// count give the same weights.
fn train(
    data: &EvalData,
    data_sha: &str,
    device: &Device,
    progress: bool,
) -> Result<(Vec<Tensor>, ClassifierMeta)> {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(SEED);
    let vars = init_params(&mut rng, device)?;
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: LR,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let m = IMAGE_SIZE * IMAGE_SIZE;
    let steps_per_epoch = TRAIN_IMAGES.div_ceil(BATCH);
    let total = EPOCHS * steps_per_epoch;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "eval classifier {bar:30} {pos}/{len} steps {elapsed}<{eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut order: Vec<usize> = (0..TRAIN_IMAGES).collect();
    let mut step = 0usize;
    let mut img = vec![0f32; BATCH * m];
    for _epoch in 0..EPOCHS {
        order.shuffle(&mut rng);
        for chunk in order.chunks(BATCH) {
            let b = chunk.len();
            let mut labels = Vec::with_capacity(b);
            for (j, &i) in chunk.iter().enumerate() {
                let (dy, dx) = (
                    rng.gen_range(-MAX_SHIFT..=MAX_SHIFT),
                    rng.gen_range(-MAX_SHIFT..=MAX_SHIFT),
                );
                shifted(
                    &data.images[i * m..(i + 1) * m],
                    &mut img[j * m..(j + 1) * m],
                    dy,
                    dx,
                );
                labels.push(data.labels[i]);
            }
            let x = Tensor::from_slice(&img[..b * m], (b, 1, IMAGE_SIZE, IMAGE_SIZE), device)?;
            let y = Tensor::from_vec(labels, b, device)?;
            let p: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let logits = forward_logits(&p, &forward_features(&p, &x)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let lr = 0.1 * LR
                + 0.9
                    * LR
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_learning_rate(lr);
            opt.backward_step(&loss)?;
            step += 1;
            bar.inc(1);
            if step.is_multiple_of(10) {
                let l = loss.to_scalar::<f32>()?;
                ensure!(
                    l.is_finite(),
                    "eval classifier training diverged (loss {l})"
                );
                bar.set_message(format!("loss {l:.4}"));
            }
        }
    }
    bar.finish_and_clear();
    let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
    let clf = Classifier {
        params,
        device: device.clone(),
        meta: dummy_meta(),
        from_cache: false,
    };
    let test = TRAIN_IMAGES..TRAIN_IMAGES + TEST_IMAGES;
    let pred = clf.predict(&data.tensor(test.clone(), device)?)?;
    let correct = pred
        .iter()
        .zip(&data.labels[test])
        .filter(|(a, b)| a == b)
        .count();
    let meta = ClassifierMeta {
        version: ARCH_VERSION,
        test_accuracy: correct as f64 / TEST_IMAGES as f64,
        train_images: TRAIN_IMAGES,
        test_images: TEST_IMAGES,
        data_sha256: data_sha.to_string(),
        weights_sha256: String::new(),
        train_seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((clf.params, meta))
}

fn dummy_meta() -> ClassifierMeta {
    ClassifierMeta {
        version: ARCH_VERSION,
        test_accuracy: 0.0,
        train_images: 0,
        test_images: 0,
        data_sha256: String::new(),
        weights_sha256: String::new(),
        train_seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_moves_pixels_and_fills_background() {
        let src: Vec<f32> = (0..IMAGE_SIZE * IMAGE_SIZE).map(|i| i as f32).collect();
        let mut dst = vec![0f32; src.len()];
        shifted(&src, &mut dst, 1, -2);
        // dst[y][x] = src[y-1][x+2]
        assert_eq!(dst[5 * IMAGE_SIZE + 3], src[4 * IMAGE_SIZE + 5]);
        assert_eq!(dst[3], -1.0); // row 0 comes from row -1
        assert_eq!(dst[10 * IMAGE_SIZE + IMAGE_SIZE - 1], -1.0); // column 31 from column 33
        shifted(&src, &mut dst, 0, 0);
        assert_eq!(dst, src);
    }

    #[test]
    fn shape_check_names_the_supported_shape() {
        let dev = Device::Cpu;
        assert!(
            check_image_shape(&Tensor::zeros((3, 1, 32, 32), DType::F32, &dev).unwrap()).is_ok()
        );
        for bad in [vec![3, 3, 32, 32], vec![3, 1, 28, 28], vec![1, 32, 32]] {
            let e = check_image_shape(&Tensor::zeros(bad.as_slice(), DType::F32, &dev).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains("1x32x32"), "{e}");
        }
    }

    #[test]
    fn default_cache_dir_ends_in_versioned_folder() {
        assert!(default_cache_dir().ends_with(format!("classifier-v{ARCH_VERSION}")));
    }
}
