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

/// Images in the check file [`export_folder`] writes.
pub const CHECK_IMAGES: usize = 4;
/// The check file: inputs and what distill computes for them.
pub const CHECK_FILE: &str = "distill_check.safetensors";

/// `distill export CKPT --format diffusers`: a model whose network is a diffusers
/// `UNet2DModel` (a diffusers teacher, or a student distilled from one) written back as a
/// diffusers pipeline folder: `unet/` (`config.json` + `diffusion_pytorch_model.safetensors`),
/// `scheduler/scheduler_config.json` (a DDIMScheduler whose `set_timesteps(k)` gives the
/// student's steps, see `graphs::diffusers::teacher::ddim_scheduler_for`) and
/// `model_index.json` (a `DDIMPipeline`, written last). For a student, `distill_check.safetensors`
/// holds seeded `noise`, `class_labels`, the step count and distill's `images` for them, which
/// `scripts/make-diffusers-fixtures.py --check` compares with diffusers' own sampling loop.
pub fn export_folder(ckpt: &Path, out: &Path) -> Result<PathBuf> {
    use graphs::NetworkConfig;
    let dev = Device::Cpu;
    let (den, meta) = crate::teacher_source::load(ckpt, &dev)?;
    let cfg = match &meta.model.network {
        NetworkConfig::DiffusersUnet2d(c) => c.clone(),
        NetworkConfig::Unet(_) => bail!(
            "{}: its network is distill's own UNet (`\"unet\"` in config.json), not a diffusers \
             UNet2DModel, so diffusers has no class to load it into. Export it as ONNX \
             (`distill export {}`), or distil from a diffusers teacher (`--teacher DIR` with a \
             UNet2DModel folder): its students export with --format diffusers",
            ckpt.display(),
            ckpt.display()
        ),
        NetworkConfig::DiffusersUnet2dCondition(_) => bail!(
            "{}: a text-conditioned UNet2DConditionModel; --format diffusers writes DDIMPipeline \
             folders of UNet2DModels (for a UNet2DConditionModel use \
             graphs::diffusers::save_unet_condition)",
            ckpt.display()
        ),
    };
    let (sched, steps) = graphs::diffusers::teacher::ddim_scheduler_for(
        &meta.model.parameterisation,
        &meta.generator,
    )
    .with_context(|| format!("{} cannot be written as a diffusers folder", ckpt.display()))?;
    let weights: std::collections::HashMap<String, candle_core::Tensor> =
        graphs::params::collect(&den)
            .into_iter()
            .map(|p| (p.name, p.t))
            .collect();
    graphs::diffusers::save_unet(&out.join("unet"), &cfg, &weights)?;
    let sdir = out.join("scheduler");
    std::fs::create_dir_all(&sdir).with_context(|| format!("creating {}", sdir.display()))?;
    crate::fsio::write_atomic(
        &sdir.join("scheduler_config.json"),
        serde_json::to_string_pretty(&sched)?.as_bytes(),
    )?;
    if meta.generator.sampler == graphs::SamplerKind::Student {
        let n = CHECK_IMAGES;
        let spec = &meta.generator;
        let inputs = crate::sample::seeded_noise(&den, spec, n, 0, &dev)?;
        let ncls = den.num_classes();
        let labels: Vec<u32> = (0..n).map(|i| (i % ncls) as u32).collect();
        let lt = candle_core::Tensor::from_vec(labels, n, &dev)?;
        let images = crate::sample::generate(&den, spec, &inputs, &lt, n, &dev)?;
        let t = std::collections::HashMap::from([
            ("noise".to_string(), inputs.noise.clone()),
            (
                "class_labels".to_string(),
                lt.to_dtype(candle_core::DType::I64)?,
            ),
            ("images".to_string(), images),
            (
                "steps".to_string(),
                candle_core::Tensor::new(&[steps as i64], &dev)?,
            ),
        ]);
        crate::checkpoint::save_tensors(&out.join(CHECK_FILE), &t)?;
    }
    let index = serde_json::json!({
        "_class_name": "DDIMPipeline",
        "_diffusers_version": graphs::diffusers::save::DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    });
    crate::fsio::write_atomic(
        &out.join("model_index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    println!(
        "wrote {} (diffusers DDIMPipeline: unet/, scheduler/ with trailing timesteps; sample with \
         {steps} steps, eta 0{})",
        out.display(),
        if cfg.class_embed == graphs::diffusers::ClassEmbed::None {
            ""
        } else {
            "; the model takes class_labels, which DDIMPipeline does not pass: call the unet \
             and scheduler in your own loop"
        }
    );
    Ok(out.to_path_buf())
}
