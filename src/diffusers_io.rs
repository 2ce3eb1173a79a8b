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
    if let Some(r) = crate::text_student::pipeline_ref(ckpt)? {
        return export_text_folder(ckpt, &r, out);
    }
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
            "{}: a text-conditioned UNet2DConditionModel without the pipeline record of a \
             text-to-image student ({}): --format diffusers writes a text student (from \
             `distill train dmd2|tdm --prompts`) as a whole pipeline folder",
            ckpt.display(),
            crate::train::distill::TEXT_TO_IMAGE_FILE
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
    write_scheduler(out, &sched)?;
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

/// Prompts of the text student's check file.
const CHECK_PROMPTS: [&str; 2] = ["a red circle on a blue square", ""];

/// `distill export CKPT --format diffusers` of a text-to-image student: a whole pipeline folder
/// that diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_pretrained` loads.
/// `unet/` is the student's (LoRA merged), `scheduler/` a DDIMScheduler whose
/// `set_timesteps(k)` gives the student's steps ([`graphs::diffusers::teacher::ddim_scheduler_for`]:
/// trailing timesteps, eta 0, the last step returning x0), every other component (VAE, text
/// encoders, tokenizers, and whatever else the pipeline has) copied from the recorded pipeline,
/// `model_index.json` (the pipeline's, scheduler replaced) written last. Sampling it with
/// `num_inference_steps = k` and `guidance_scale = 1` (the guidance is distilled in) is the
/// student. `distill_check.safetensors` holds `noise`, `prompt_embeds` (+ SDXL's
/// `pooled_prompt_embeds`), `steps` and distill's `images` in [0, 1] for them.
fn export_text_folder(
    ckpt: &Path,
    r: &crate::text_student::PipelineRef,
    out: &Path,
) -> Result<PathBuf> {
    let dev = Device::Cpu;
    let (t2i, spec) = crate::text_student::load(ckpt, r, &dev)?;
    let meta = crate::checkpoint::load_meta(ckpt)?;
    let graphs::NetworkConfig::DiffusersUnet2dCondition(cfg) = &meta.model.network else {
        bail!(
            "{}: a text student's network is a UNet2DConditionModel",
            ckpt.display()
        );
    };
    let (sched, steps) =
        graphs::diffusers::teacher::ddim_scheduler_for(&meta.model.parameterisation, &spec)
            .with_context(|| {
                format!("{} cannot be written as a diffusers folder", ckpt.display())
            })?;
    let index_path = r.pipeline.join("model_index.json");
    let mut index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&index_path)
            .with_context(|| format!("reading {}", index_path.display()))?,
    )
    .with_context(|| format!("parsing {}", index_path.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The components the student shares with its teacher, file by file.
    for entry in std::fs::read_dir(&r.pipeline)
        .with_context(|| format!("reading {}", r.pipeline.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if !entry.file_type()?.is_dir() || name == "unet" || name == "scheduler" {
            continue;
        }
        copy_tree(&entry.path(), &out.join(&name))?;
    }
    let weights: std::collections::HashMap<String, candle_core::Tensor> =
        graphs::params::collect(&t2i.den)
            .into_iter()
            .map(|p| (p.name, p.t))
            .collect();
    graphs::diffusers::save_unet_condition(&out.join("unet"), cfg, &weights)?;
    write_scheduler(out, &sched)?;
    // The check: the student's images for seeded noise and two prompts.
    let b = graphs::CandleBackend::new(&dev);
    let n = CHECK_PROMPTS.len();
    let noise = crate::sample::seeded_noise(&t2i.den, &spec, n, 0, &dev)?.noise;
    let cond = t2i.condition(&b, &CHECK_PROMPTS)?;
    let last = graphs::sampler::student_x0(&b, &t2i.den, &noise, cond.net(), &spec.sigmas)?;
    let images = t2i.decode(&b, &last)?;
    let graphs::Cond::Text { cond: tc, .. } = &cond else {
        bail!("a text student's condition is text");
    };
    let mut t = std::collections::HashMap::from([
        ("noise".to_string(), noise.clone()),
        ("prompt_embeds".to_string(), tc.prompt_embeds.clone()),
        ("images".to_string(), images),
        (
            "steps".to_string(),
            candle_core::Tensor::new(&[steps as i64], &dev)?,
        ),
    ]);
    if let Some(a) = &tc.added {
        t.insert("pooled_prompt_embeds".into(), a.text_embeds.clone());
        t.insert("time_ids".into(), a.time_ids.clone());
    }
    crate::checkpoint::save_tensors(&out.join(CHECK_FILE), &t)?;
    index["scheduler"] = serde_json::json!(["diffusers", "DDIMScheduler"]);
    crate::fsio::write_atomic(
        &out.join("model_index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    println!(
        "wrote {} (diffusers {}: the student's unet/, a DDIMScheduler with trailing timesteps, the \
         rest of {}; sample with num_inference_steps={steps}, guidance_scale=1)",
        out.display(),
        t2i.class,
        r.pipeline.display()
    );
    Ok(out.to_path_buf())
}

/// `out/scheduler/scheduler_config.json` (atomically).
fn write_scheduler(out: &Path, sched: &serde_json::Value) -> Result<()> {
    let sdir = out.join("scheduler");
    std::fs::create_dir_all(&sdir).with_context(|| format!("creating {}", sdir.display()))?;
    crate::fsio::write_atomic(
        &sdir.join("scheduler_config.json"),
        serde_json::to_string_pretty(sched)?.as_bytes(),
    )
}

/// Copies the folder `from` to `to`, file by file (each written atomically).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            crate::fsio::write_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}
