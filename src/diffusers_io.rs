//! diffusers folders at the CLI's edge. `distill export DIR --what denoiser` of a diffusers
//! model (or pipeline) folder writes the bare `UNet2DModel` with diffusers' own signature.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Whether `path` is a diffusers model or pipeline folder rather than one of our checkpoints.
pub fn is_diffusers(path: &Path) -> bool {
    graphs::diffusers::DiffusersFolder::is_diffusers(path)
}

/// Exports the folder's UNet as `<out>/denoiser[_fp16].onnx` (inputs `sample`, `timestep`,
/// `class_labels` where the model has them; output `out_sample`). `--what generator` does not
/// come here: it unrolls our sampler for the folder's scheduler like any checkpoint
/// ([`crate::teacher_source`]); `--trt` of the bare diffusers network is refused.
pub fn export_unet(
    dir: &Path,
    out: &Path,
    denoiser: bool,
    fp16: bool,
    trt: bool,
) -> Result<PathBuf> {
    if trt {
        bail!(
            "{}: --trt is not supported for a diffusers model yet",
            dir.display()
        );
    }
    if !denoiser {
        bail!(
            "{}: a diffusers model exports with --what denoiser (its scheduler is not unrolled \
             into a generator graph yet)",
            dir.display()
        );
    }
    let folder = graphs::diffusers::DiffusersFolder::resolve(dir)?;
    let (model, _) = graphs::diffusers::load_unet(dir, &Device::Cpu)?;
    let side = model.cfg.sample_size.with_context(|| {
        format!(
            "{}: config.json has no sample_size (the exported graph needs a static H = W)",
            folder.unet.display()
        )
    })?;
    let opts = export::ExportOptions {
        precision: if fp16 {
            export::Precision::Fp16
        } else {
            export::Precision::Fp32
        },
        method: "diffusers".into(),
        weights_sha256: None,
        extra_metadata: vec![("source".into(), folder.unet.display().to_string())],
    };
    let m = export::export_unet2d(&model, side, &opts)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(if fp16 {
        "denoiser_fp16.onnx"
    } else {
        "denoiser.onnx"
    });
    export::write_model(&m, &path)?;
    Ok(path)
}
