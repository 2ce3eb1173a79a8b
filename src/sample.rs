//! Sampling a checkpoint: seeded noise, batched generation with any sampler, PNG grids and the raw
//! safetensors sample file (`images` `[N, C, H, W]` f32 in [-1, 1], `labels` `[N]` i64).

use crate::checkpoint;
use crate::rng::{randn, step_rng};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use graphs::{CandleBackend, Denoiser, GeneratorSpec};
use std::collections::HashMap;
use std::path::Path;

/// The generator's inputs: `noise` `[N, C, H, W]` plus one unit-noise tensor per re-noise step.
pub struct NoiseInputs {
    pub noise: Tensor,
    pub fresh: Vec<Tensor>,
}

/// Seeded unit noise for `n` images (same seed -> same images, whatever the batch size).
pub fn seeded_noise(
    den: &Denoiser,
    spec: &GeneratorSpec,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<NoiseInputs> {
    let (c, r) = den.image_shape();
    let shape = [n, c, r, r];
    let noise = randn(&mut step_rng(seed, 0, 0x5A3), &shape, device)?;
    let fresh = (0..spec.num_fresh_noise())
        .map(|i| randn(&mut step_rng(seed, 1 + i as u64, 0x5A3), &shape, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(NoiseInputs { noise, fresh })
}

/// Reads noise from a safetensors file: `noise` and, for fresh-noise students, `noise_1`, `noise_2`, ...
pub fn load_noise(
    path: &Path,
    den: &Denoiser,
    spec: &GeneratorSpec,
    device: &Device,
) -> Result<NoiseInputs> {
    let t = checkpoint::load_tensors(path, device)?;
    crate::checks::tensors_finite(&path.display().to_string(), &t)?;
    let (channels, resolution) = den.image_shape();
    let get = |name: &str| -> Result<Tensor> {
        let x = t
            .get(name)
            .with_context(|| format!("{}: no tensor named {name:?}", path.display()))?
            .to_dtype(DType::F32)?;
        let d = x.dims();
        if d.len() != 4 || d[1..] != [channels, resolution, resolution] {
            bail!(
                "{}: {name} has shape {d:?}, expected [N, {channels}, {resolution}, {resolution}]",
                path.display(),
            );
        }
        Ok(x)
    };
    let noise = get("noise")?;
    let fresh = (1..=spec.num_fresh_noise())
        .map(|i| get(&format!("noise_{i}")))
        .collect::<Result<Vec<_>>>()?;
    for f in &fresh {
        if f.dims() != noise.dims() {
            bail!(
                "{}: fresh noise tensors must have the shape of `noise` {:?}",
                path.display(),
                noise.dims()
            );
        }
    }
    Ok(NoiseInputs { noise, fresh })
}

/// Runs the generator over all inputs in chunks of `batch`.
pub fn generate(
    den: &Denoiser,
    spec: &GeneratorSpec,
    inputs: &NoiseInputs,
    labels: &Tensor,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let n = inputs.noise.dim(0)?;
    if labels.dim(0)? != n {
        bail!("{} labels for {n} noise images", labels.dim(0)?);
    }
    let ncls = den.num_classes() as u32;
    if let Some(bad) = labels.to_vec1::<u32>()?.into_iter().find(|&l| l >= ncls) {
        bail!(
            "class label {bad} is out of range: the model has {ncls} classes (0..{})",
            ncls - 1
        );
    }
    let b = CandleBackend::new(device);
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let len = batch.min(n - i);
        let z = inputs.noise.narrow(0, i, len)?;
        let l = labels.narrow(0, i, len)?;
        let fresh = inputs
            .fresh
            .iter()
            .map(|f| f.narrow(0, i, len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        out.push(graphs::generate(&b, den, spec, &z, &l, &fresh)?);
        i += len;
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// `per_class` images of every class, class `k` in row `k`.
pub fn class_labels(num_classes: usize, per_class: usize) -> Vec<u32> {
    (0..num_classes as u32)
        .flat_map(|k| std::iter::repeat_n(k, per_class))
        .collect()
}

/// A PNG grid with one row per class (the training-time preview).
pub fn class_grid(
    den: &Denoiser,
    spec: &GeneratorSpec,
    per_class: usize,
    seed: u64,
    device: &Device,
    png: &Path,
) -> Result<()> {
    let labels = class_labels(den.num_classes(), per_class);
    let n = labels.len();
    let inputs = seeded_noise(den, spec, n, seed, device)?;
    let imgs = generate(
        den,
        spec,
        &inputs,
        &Tensor::from_vec(labels, n, device)?,
        100,
        device,
    )?;
    crate::grid::tensor_grid_png(png, &imgs, per_class)
}

/// Writes `images` `[N, C, H, W]` f32 and `labels` `[N]` i64 to a safetensors file.
pub fn save_samples(path: &Path, images: &Tensor, labels: &Tensor) -> Result<()> {
    let t = HashMap::from([
        ("images".to_string(), images.to_dtype(DType::F32)?),
        ("labels".to_string(), labels.to_dtype(DType::I64)?),
    ]);
    checkpoint::save_tensors(path, &t)
}

/// Reads a sample file written by [`save_samples`] (labels optional).
pub fn load_samples(path: &Path, device: &Device) -> Result<(Tensor, Option<Vec<u32>>)> {
    let t = checkpoint::load_tensors(path, device)?;
    let images = t
        .get("images")
        .with_context(|| format!("{}: no tensor named \"images\"", path.display()))?
        .to_dtype(DType::F32)?;
    if images.rank() != 4 {
        bail!(
            "{}: images must be [N, C, H, W], got {:?}",
            path.display(),
            images.dims()
        );
    }
    let labels = match t.get("labels") {
        Some(l) => Some(
            l.to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|v| v as u32)
                .collect(),
        ),
        None => None,
    };
    Ok((images, labels))
}
