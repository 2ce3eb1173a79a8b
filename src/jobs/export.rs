//! `export`: a checkpoint to ONNX (the unrolled generator or the bare denoiser), and optionally a
//! TensorRT engine from that ONNX, validated against the checkpoint before it is written.

use super::sample::SamplerOverride;
use super::Failure;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use export::tensorrt::{BatchProfile, Toolchain};
use export::validate::{EngineOptions, EngineOutcome};
use graphs::Precision;
use std::path::{Path, PathBuf};

/// What to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportWhat {
    /// noise (+ fresh noise per re-noise step) + class_labels -> images: the deployable model.
    #[default]
    Generator,
    /// One network evaluation: x, sigma (EDM) or timestep (VP), class_labels -> denoised / eps.
    Denoiser,
}

/// A TensorRT engine built from the export (`<stem>.plan` + `<stem>.plan.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrtBuild {
    pub min_batch: usize,
    pub opt_batch: usize,
    pub max_batch: usize,
    pub precision: Precision,
}

impl Default for TrtBuild {
    fn default() -> Self {
        Self {
            min_batch: 1,
            opt_batch: 8,
            max_batch: 16,
            precision: Precision::Fp16,
        }
    }
}

/// `distill export`.
#[derive(Clone, Debug)]
pub struct ExportJob {
    pub checkpoint: PathBuf,
    /// Output folder; the file is `<what>[_fp16].onnx`.
    pub out: PathBuf,
    pub what: ExportWhat,
    pub precision: Precision,
    /// Generator only: overrides of the checkpoint's sampler.
    pub sampler: SamplerOverride,
    /// Also build a TensorRT engine.
    pub trt: Option<TrtBuild>,
}

impl ExportJob {
    pub const DEFAULT_OUT: &'static str = "export";

    /// An ONNX generator export of `checkpoint` into `out` with every other setting at its default.
    pub fn generator(checkpoint: &Path, out: &Path, precision: Precision) -> Self {
        Self {
            checkpoint: checkpoint.to_path_buf(),
            out: out.to_path_buf(),
            precision,
            ..Default::default()
        }
    }
}

impl Default for ExportJob {
    fn default() -> Self {
        Self {
            checkpoint: PathBuf::from("runs/teacher/checkpoint"),
            out: PathBuf::from(Self::DEFAULT_OUT),
            what: ExportWhat::Generator,
            precision: Precision::Fp32,
            sampler: SamplerOverride::default(),
            trt: None,
        }
    }
}

impl ExportJob {
    /// Writes the ONNX file only; returns its path.
    pub fn write_onnx(&self) -> Result<PathBuf> {
        if graphs::diffusers::is_text_to_image(&self.checkpoint) {
            return self.write_text_to_image();
        }
        if let Some(r) = crate::text_student::pipeline_ref(&self.checkpoint)? {
            return self.write_text_student(&r);
        }
        let source = crate::teacher_source::TeacherSource::resolve(&self.checkpoint)?;
        // The bare network of a diffusers model keeps diffusers' own signature.
        if source.is_diffusers() && self.what == ExportWhat::Denoiser {
            let (den, fp16) = (
                self.what == ExportWhat::Denoiser,
                self.precision == Precision::Fp16,
            );
            let trt = self.trt.is_some();
            return crate::diffusers_io::export_unet(&self.checkpoint, &self.out, den, fp16, trt);
        }
        let dev = Device::Cpu;
        let (den, meta) = source.load(&dev)?;
        let opts = export::ExportOptions {
            precision: self.precision,
            method: meta.role.name().into(),
            weights_sha256: Some(source.weights_sha256()?),
            extra_metadata: vec![("checkpoint_step".into(), meta.step.to_string())],
        };
        let (model, stem) = match self.what {
            ExportWhat::Generator => {
                let spec = self.sampler.apply(&meta)?;
                (export::export_generator(&den, &spec, &opts)?, "generator")
            }
            ExportWhat::Denoiser => (export::export_denoiser(&den, &opts)?, "denoiser"),
        };
        let suffix = self.file_suffix();
        let path = self.out.join(format!("{stem}{suffix}.onnx"));
        export::write_model(&model, &path)?;
        Ok(path)
    }

    /// A text-to-image student checkpoint (`train tdm --prompts`): `generator[_fp16].onnx`
    /// (`noise` + `prompt_embeds` -> the student's steps -> the recorded pipeline's VAE ->
    /// images in [0, 1]) and the pipeline's `text_encoder[_fp16].onnx` beside it.
    fn write_text_student(&self, r: &crate::text_student::PipelineRef) -> Result<PathBuf> {
        if self.sampler.sampler.is_some()
            || self.sampler.sample_steps.is_some()
            || self.sampler.cfg_scale.is_some()
        {
            bail!(
                "--sampler / --sample-steps / --cfg-scale: {} is a distilled student; it samples \
                 with its own steps and its guidance distilled in",
                self.checkpoint.display()
            );
        }
        let dev = Device::Cpu;
        let (t2i, spec) = crate::text_student::load(&self.checkpoint, r, &dev)?;
        let meta = crate::checkpoint::load_meta(&self.checkpoint)?;
        let opts = export::ExportOptions {
            precision: self.precision,
            method: meta.role.name().into(),
            weights_sha256: Some(crate::checkpoint::file_sha256(
                &self.checkpoint.join(crate::checkpoint::WEIGHTS_FILE),
            )?),
            extra_metadata: vec![
                ("checkpoint_step".into(), meta.step.to_string()),
                ("pipeline".into(), r.pipeline.display().to_string()),
            ],
        };
        let suffix = self.file_suffix();
        if self.what == ExportWhat::Denoiser {
            return write_text_unet(&t2i, &opts, &self.out, suffix);
        }
        write_prompt_encoder(&t2i, &opts, &self.out, suffix)?;
        let m = export::export_text_to_image_student(&t2i, &spec.sigmas, &opts)?;
        let path = self.out.join(format!("generator{suffix}.onnx"));
        export::write_model(&m, &path)?;
        Ok(path)
    }

    /// A text-to-image pipeline folder: `generator[_fp16].onnx` (`noise` + `prompt_embeds` ->
    /// images in [0, 1]) and `text_encoder[_fp16].onnx` (`input_ids` -> `prompt_embeds`) beside
    /// it; `--what denoiser`: the bare UNet with optimum's signature (`denoiser.onnx`).
    fn write_text_to_image(&self) -> Result<PathBuf> {
        let dev = Device::Cpu;
        let t2i = graphs::diffusers::TextToImage::load(&self.checkpoint, &dev)?;
        let opts = export::ExportOptions {
            precision: self.precision,
            method: "teacher".into(),
            weights_sha256: None,
            extra_metadata: vec![],
        };
        let suffix = self.file_suffix();
        match self.what {
            ExportWhat::Denoiser => write_text_unet(&t2i, &opts, &self.out, suffix),
            ExportWhat::Generator => {
                if self.sampler.sampler == Some(graphs::SamplerKind::Student) {
                    bail!(
                        "--sampler student: a diffusers pipeline is a teacher (no student sampler)"
                    );
                }
                let kind = self
                    .sampler
                    .sampler
                    .unwrap_or_else(|| t2i.default_sampler());
                let steps = self
                    .sampler
                    .sample_steps
                    .unwrap_or(crate::jobs::SampleJob::TEXT_TO_IMAGE_STEPS);
                let scale = self
                    .sampler
                    .cfg_scale
                    .unwrap_or(crate::jobs::SampleJob::TEXT_TO_IMAGE_CFG);
                write_prompt_encoder(&t2i, &opts, &self.out, suffix)?;
                let m = export::export_text_to_image(&t2i, kind, steps, scale, &opts)?;
                let path = self.out.join(format!("generator{suffix}.onnx"));
                export::write_model(&m, &path)?;
                Ok(path)
            }
        }
    }

    /// `_fp16` for an fp16 export, empty for fp32: the suffix of every file it writes.
    fn file_suffix(&self) -> &'static str {
        if self.precision == Precision::Fp16 {
            "_fp16"
        } else {
            ""
        }
    }

    /// The whole export: ONNX (with a summary on stdout) and, when asked, the TensorRT engine.
    pub fn run(&self) -> Result<PathBuf> {
        // Fail fast: find trtexec and the GPU before spending time on the export.
        let toolchain = match &self.trt {
            Some(_) => Some(Toolchain::locate()?),
            None => None,
        };
        let path = self.write_onnx()?;
        let model = export::runtime::load_model(&path)?;
        let g = model
            .graph
            .as_ref()
            .context("exported model has no graph")?;
        println!(
            "wrote {} ({} nodes, {} initializers, opset {}, IR {})",
            path.display(),
            g.node.len(),
            g.initializer.len(),
            export::OPSET,
            export::IR_VERSION
        );
        for m in export::metadata(&model) {
            println!("  {} = {}", m.0, m.1);
        }
        let text = graphs::diffusers::is_text_to_image(&self.checkpoint)
            || crate::text_student::pipeline_ref(&self.checkpoint)?.is_some();
        // Written beside a text-to-image generator by `write_onnx`.
        let text_encoder = path.with_file_name(format!("text_encoder{}.onnx", self.file_suffix()));
        if text
            || !(crate::diffusers_io::is_diffusers(&self.checkpoint)
                && self.what == ExportWhat::Denoiser)
        {
            let encoder = if text && self.what == ExportWhat::Generator {
                format!(" (and {} the same way)", text_encoder.display())
            } else {
                String::new()
            };
            println!(
                "next: distill validate {} --reference {}{encoder}",
                path.display(),
                self.checkpoint.display()
            );
        }
        if let (Some(tc), Some(trt)) = (toolchain, &self.trt) {
            build_engine(&self.checkpoint, trt, &path, &tc)?;
            // A text-to-image generator needs its prompt encoder at run time: its engine too.
            if text && self.what == ExportWhat::Generator {
                build_engine(&self.checkpoint, trt, &text_encoder, &tc)?;
            }
        }
        Ok(path)
    }
}

/// `denoiser[_fp16].onnx`: the pipeline's (or student's) bare UNet with diffusers' signature, as
/// optimum exports it.
fn write_text_unet(
    t2i: &graphs::diffusers::TextToImage,
    opts: &export::ExportOptions,
    out: &Path,
    suffix: &str,
) -> Result<PathBuf> {
    let graphs::Network::Condition(net) = &t2i.den.net else {
        bail!("{}: unet/ is not a UNet2DConditionModel", t2i.dir.display());
    };
    let (_, side) = t2i.latent_shape();
    let m = export::export_unet2d_condition(&net.model, (side, side), t2i.seq_len(), opts)?;
    let path = out.join(format!("denoiser{suffix}.onnx"));
    export::write_model(&m, &path)?;
    Ok(path)
}

/// `text_encoder[_fp16].onnx` of a text-to-image pipeline beside the generator (one file for
/// SDXL's two encoders too: its outputs are the generator's text inputs).
fn write_prompt_encoder(
    t2i: &graphs::diffusers::TextToImage,
    opts: &export::ExportOptions,
    out: &Path,
    suffix: &str,
) -> Result<()> {
    let te = export::export_prompt_encoder(t2i, opts)?;
    let te_path = out.join(format!("text_encoder{suffix}.onnx"));
    export::write_model(&te, &te_path)?;
    if t2i.sdxl.is_some() {
        println!(
            "wrote {} (input_ids + input_ids_2 -> prompt_embeds, pooled_prompt_embeds)",
            te_path.display()
        );
    } else {
        println!(
            "wrote {} (input_ids -> last_hidden_state = prompt_embeds)",
            te_path.display()
        );
    }
    Ok(())
}

/// Builds, validates and writes the engine for `onnx` (exported from `checkpoint`).
pub fn build_engine(
    checkpoint: &Path,
    trt: &TrtBuild,
    onnx: &Path,
    tc: &Toolchain,
) -> Result<EngineOutcome> {
    let opts = EngineOptions {
        profile: BatchProfile::new(trt.min_batch, trt.opt_batch, trt.max_batch)?,
        precision: trt.precision,
        ..Default::default()
    };
    let plan = onnx.with_extension("plan");
    eprintln!(
        "tensorrt: building {} ({}, batch {}..{} opt {}) with {} on {} (compute capability {})",
        plan.display(),
        opts.precision.name(),
        opts.profile.min_batch,
        opts.profile.max_batch,
        opts.profile.opt_batch,
        tc.trtexec.display(),
        tc.gpu.name,
        tc.gpu.compute_capability
    );
    let out = crate::jobs::validate::with_reference(onnx, checkpoint, |den, target| {
        export::validate::build_validated(tc, onnx, &plan, den, target, &opts)
    })?;
    println!("{}", out.report);
    if !out.written {
        return Err(Failure::ValidationFailed(format!(
            "the TensorRT engine built from {} is past tolerance (max abs error {:.3e}); no plan written",
            onnx.display(),
            out.report.max_abs()
        ))
        .into());
    }
    println!(
        "wrote {} and {} (TensorRT {}, {})",
        out.plan.display(),
        out.sidecar_path.display(),
        out.sidecar.tensorrt.version.as_deref().unwrap_or("?"),
        out.sidecar.gpu.name
    );
    Ok(out)
}
