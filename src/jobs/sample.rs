//! `sample` and `eval`: generate images from a checkpoint, and score images or a checkpoint.

use crate::checkpoint::{self, CheckpointMeta};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use graphs::{GeneratorSpec, SamplerKind};
use std::path::{Path, PathBuf};

/// Overrides of a checkpoint's own sampler (each `None` keeps the checkpoint's value).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplerOverride {
    pub sampler: Option<SamplerKind>,
    /// Sampling steps (a student: a subset of its trained steps).
    pub sample_steps: Option<usize>,
    pub cfg_scale: Option<f64>,
}

impl SamplerOverride {
    /// The checkpoint's default generator with these overrides applied.
    pub fn apply(&self, meta: &CheckpointMeta) -> Result<GeneratorSpec> {
        if let Some(n) = self.sample_steps {
            crate::checks::size("--sample-steps (--steps)", n as u64, 1, 1000)?;
        }
        if let Some(c) = self.cfg_scale {
            crate::checks::cfg_scale("--cfg-scale", c)?;
        }
        let mut spec = meta.generator.clone();
        if let Some(s) = self.sampler {
            spec.sampler = s;
            if s == SamplerKind::Student && meta.generator.sampler != SamplerKind::Student {
                bail!(
                    "this checkpoint is a {}: it has no student sampler",
                    meta.role.name()
                );
            }
        }
        if let Some(n) = self.sample_steps {
            if spec.sampler == SamplerKind::Student {
                spec = spec.student_substeps(n)?;
            } else {
                spec.steps = n;
            }
        }
        if let Some(c) = self.cfg_scale {
            spec.cfg_scale = c;
        }
        Ok(spec)
    }
}

/// `distill sample`: a PNG grid and a safetensors sample file from a checkpoint.
#[derive(Clone, Debug)]
pub struct SampleJob {
    pub checkpoint: PathBuf,
    /// The PNG grid; the raw samples go beside it as `.safetensors`.
    pub out: PathBuf,
    pub sampler: SamplerOverride,
    pub seed: u64,
    /// Labels to draw (default: every class).
    pub labels: Option<Vec<u32>>,
    pub per_class: usize,
    /// Noise from this safetensors file instead of seeded noise.
    pub noise: Option<PathBuf>,
    pub batch_size: usize,
    /// A text-to-image pipeline folder's prompts (one a line); images per prompt: `per_class`.
    pub prompts: Option<PathBuf>,
}

impl SampleJob {
    /// Sampling steps of a text-to-image pipeline when `--sample-steps` is not given.
    pub const TEXT_TO_IMAGE_STEPS: usize = 25;
    /// Guidance scale of a text-to-image pipeline when `--cfg-scale` is not given (the SD
    /// pipelines' default).
    pub const TEXT_TO_IMAGE_CFG: f64 = 7.5;
    pub const DEFAULT_OUT: &'static str = "samples.png";
    pub const DEFAULT_PER_CLASS: usize = 10;
    pub const DEFAULT_BATCH_SIZE: usize = 100;
}

impl Default for SampleJob {
    fn default() -> Self {
        Self {
            checkpoint: PathBuf::from("runs/teacher/checkpoint"),
            out: PathBuf::from(Self::DEFAULT_OUT),
            sampler: SamplerOverride::default(),
            seed: 0,
            labels: None,
            per_class: Self::DEFAULT_PER_CLASS,
            noise: None,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            prompts: None,
        }
    }
}

impl SampleJob {
    pub fn run(&self, dev: &Device) -> Result<()> {
        crate::checks::size("--per-class", self.per_class as u64, 1, 1_000_000)?;
        crate::checks::size("--batch-size", self.batch_size as u64, 1, 65_536)?;
        if graphs::diffusers::is_text_to_image(&self.checkpoint)
            || crate::text_student::pipeline_ref(&self.checkpoint)?.is_some()
        {
            return self.run_text_to_image(dev);
        }
        if let Some(p) = &self.prompts {
            bail!(
                "--prompts {}: {} is not a text-to-image pipeline folder (model_index.json with a \
                 UNet2DConditionModel unet/)",
                p.display(),
                self.checkpoint.display()
            );
        }
        let (den, meta) = crate::teacher_source::load(&self.checkpoint, dev)?;
        let spec = self.sampler.apply(&meta)?;
        let ncls = den.num_classes();
        if let Some(bad) = self.labels.iter().flatten().find(|&&l| l as usize >= ncls) {
            bail!(
                "--labels: label {bad} is out of range (the model has {ncls} classes: 0..{})",
                ncls - 1
            );
        }
        let (inputs, labels) = match &self.noise {
            Some(p) => {
                let inputs = crate::sample::load_noise(p, &den, &spec, dev)?;
                let n = inputs.noise.dim(0)?;
                let labels: Vec<u32> = match &self.labels {
                    Some(l) if l.len() == n => l.clone(),
                    Some(l) if !l.is_empty() => (0..n).map(|i| l[i % l.len()]).collect(),
                    _ => (0..n).map(|i| (i % ncls) as u32).collect(),
                };
                (inputs, labels)
            }
            None => {
                let labels: Vec<u32> = match &self.labels {
                    Some(l) => l
                        .iter()
                        .flat_map(|&k| std::iter::repeat_n(k, self.per_class))
                        .collect(),
                    None => crate::sample::class_labels(ncls, self.per_class),
                };
                (
                    crate::sample::seeded_noise(&den, &spec, labels.len(), self.seed, dev)?,
                    labels,
                )
            }
        };
        let n = labels.len();
        let lt = Tensor::from_vec(labels, n, dev)?;
        let t0 = std::time::Instant::now();
        let images = crate::sample::generate(&den, &spec, &inputs, &lt, self.batch_size, dev)?;
        let secs = t0.elapsed().as_secs_f64();
        crate::grid::tensor_grid_png(&self.out, &images, self.per_class.max(1))?;
        let raw = self.out.with_extension("safetensors");
        crate::sample::save_samples(&raw, &images, &lt)?;
        println!(
            "{n} images with {:?} ({} steps, {} NFE, cfg {}) in {secs:.2}s ({:.1} ms/image): {} and {}",
            spec.sampler,
            spec.steps,
            spec.nfe(),
            spec.cfg_scale,
            1000.0 * secs / n as f64,
            self.out.display(),
            raw.display()
        );
        Ok(())
    }
}

impl SampleJob {
    /// A text-to-image pipeline: `per_class` images per prompt of `--prompts`, guided against the
    /// empty prompt, decoded by the VAE; one grid row per prompt, the prompts listed in
    /// `<out>.prompts.txt` (row order), raw images in [-1, 1] in the `.safetensors` beside it
    /// (`labels` = the prompt's row).
    fn run_text_to_image(&self, dev: &Device) -> Result<()> {
        let path = self.prompts.as_ref().with_context(|| {
            format!(
                "{} is a text-to-image pipeline: give --prompts FILE (one prompt a line)",
                self.checkpoint.display()
            )
        })?;
        if self.labels.is_some() {
            bail!("--labels: a text-to-image pipeline is conditioned on --prompts, not labels");
        }
        if self.sampler.sampler == Some(SamplerKind::Student) {
            bail!("--sampler student: a diffusers pipeline is a teacher (no student sampler)");
        }
        if let Some(n) = self.sampler.sample_steps {
            crate::checks::size("--sample-steps (--steps)", n as u64, 1, 1000)?;
        }
        if let Some(c) = self.sampler.cfg_scale {
            crate::checks::cfg_scale("--cfg-scale", c)?;
        }
        let prompts = graphs::transformers::read_prompts(path)?;
        if let Some(r) = crate::text_student::pipeline_ref(&self.checkpoint)? {
            return self.run_text_student(&r, &prompts, dev);
        }
        let t2i = graphs::diffusers::TextToImage::load(&self.checkpoint, dev)?;
        let kind = self
            .sampler
            .sampler
            .unwrap_or_else(|| t2i.default_sampler());
        let steps = self
            .sampler
            .sample_steps
            .unwrap_or(Self::TEXT_TO_IMAGE_STEPS);
        let scale = self.sampler.cfg_scale.unwrap_or(Self::TEXT_TO_IMAGE_CFG);
        let spec = GeneratorSpec {
            sampler: kind,
            steps,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: scale,
        };
        let all: Vec<&str> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_str(), self.per_class))
            .collect();
        let noise = match &self.noise {
            Some(p) => crate::sample::load_noise(p, &t2i.den, &spec, dev)?.noise,
            None => crate::sample::seeded_noise(&t2i.den, &spec, all.len(), self.seed, dev)?.noise,
        };
        let n = noise.dim(0)?;
        if n != all.len() {
            bail!(
                "--noise: {n} noise samples for {} prompts x {} per prompt",
                prompts.len(),
                self.per_class
            );
        }
        let b = graphs::CandleBackend::new(dev);
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let k = self.batch_size.min(n - i);
            out.push(t2i.generate(
                &b,
                &all[i..i + k],
                &noise.narrow(0, i, k)?,
                kind,
                steps,
                scale,
            )?);
            i += k;
        }
        let secs = t0.elapsed().as_secs_f64();
        self.write_text_samples(&prompts, out, n)?;
        println!(
            "{n} images of {} prompts with {kind:?} ({steps} steps, cfg {scale}) in {secs:.2}s: {}",
            prompts.len(),
            self.out.display(),
        );
        Ok(())
    }

    /// A text-to-image student checkpoint: its own steps (the guidance is distilled in: no
    /// `--cfg-scale`), the last step's latents decoded by the recorded pipeline's VAE.
    fn run_text_student(
        &self,
        r: &crate::text_student::PipelineRef,
        prompts: &[String],
        dev: &Device,
    ) -> Result<()> {
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
        let (t2i, spec) = crate::text_student::load(&self.checkpoint, r, dev)?;
        let all: Vec<&str> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_str(), self.per_class))
            .collect();
        let noise = match &self.noise {
            Some(p) => crate::sample::load_noise(p, &t2i.den, &spec, dev)?.noise,
            None => crate::sample::seeded_noise(&t2i.den, &spec, all.len(), self.seed, dev)?.noise,
        };
        let n = noise.dim(0)?;
        if n != all.len() {
            bail!(
                "--noise: {n} noise samples for {} prompts x {} per prompt",
                prompts.len(),
                self.per_class
            );
        }
        let b = graphs::CandleBackend::new(dev);
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let k = self.batch_size.min(n - i);
            let cond = t2i.condition(&b, &all[i..i + k])?;
            let lat = graphs::sampler::student_x0(
                &b,
                &t2i.den,
                &noise.narrow(0, i, k)?,
                cond.net(),
                &spec.sigmas,
            )?;
            out.push(t2i.decode(&b, &lat)?);
            i += k;
        }
        let secs = t0.elapsed().as_secs_f64();
        self.write_text_samples(prompts, out, n)?;
        println!(
            "{n} images of {} prompts with the {}-step student in {secs:.2}s: {}",
            prompts.len(),
            spec.sigmas.len(),
            self.out.display(),
        );
        Ok(())
    }

    /// The grid, `<out>.prompts.txt` and the raw `.safetensors` (images in [-1, 1], `labels` = the
    /// prompt's row) of decoded images `out` in [0, 1].
    fn write_text_samples(&self, prompts: &[String], out: Vec<Tensor>, n: usize) -> Result<()> {
        let dev = out[0].device().clone();
        // [0, 1] -> the grid's and sample files' [-1, 1].
        let images = Tensor::cat(&out, 0)?.affine(2.0, -1.0)?;
        crate::grid::tensor_grid_png(&self.out, &images, self.per_class)?;
        let listed = self.out.with_extension("prompts.txt");
        let mut text = String::new();
        for (r, p) in prompts.iter().enumerate() {
            text.push_str(&format!("row {r}: {p}\n"));
        }
        checkpoint::write_atomic(&listed, text.as_bytes())?;
        let raw = self.out.with_extension("safetensors");
        let rows: Vec<u32> = (0..n).map(|j| (j / self.per_class) as u32).collect();
        crate::sample::save_samples(&raw, &images, &Tensor::from_vec(rows, n, &dev)?)?;
        println!("wrote {} and {}", listed.display(), raw.display());
        Ok(())
    }
}

/// `distill eval`: scores a sample file, or samples a checkpoint and scores that.
#[derive(Clone, Debug)]
pub struct EvalJob {
    /// A sample file from `distill sample`, or a checkpoint folder.
    pub input: PathBuf,
    /// When `input` is a checkpoint.
    pub sampler: SamplerOverride,
    /// Images to generate when `input` is a checkpoint (class-balanced).
    pub n: usize,
    /// Noise seed when `input` is a checkpoint.
    pub seed: u64,
    /// Also write the report as JSON here.
    pub json: Option<PathBuf>,
    /// Where the evaluation classifier is cached (default: $DISTILL_CACHE or ~/.cache/distill).
    pub cache_dir: Option<PathBuf>,
    pub show_progress: bool,
}

impl EvalJob {
    pub const DEFAULT_N: usize = 1000;
    pub const DEFAULT_SEED: u64 = 1;
}

impl Default for EvalJob {
    fn default() -> Self {
        Self {
            input: PathBuf::new(),
            sampler: SamplerOverride::default(),
            n: Self::DEFAULT_N,
            seed: Self::DEFAULT_SEED,
            json: None,
            cache_dir: None,
            show_progress: false,
        }
    }
}

/// The evaluator, its classifier cached in `cache` (default: $DISTILL_CACHE or ~/.cache/distill).
pub fn evaluator(
    cache: Option<&Path>,
    dev: &Device,
    show_progress: bool,
) -> Result<crate::eval::Evaluator> {
    let dir = cache
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::eval::classifier::default_cache_dir);
    crate::eval::Evaluator::new(&dir, dev, show_progress)
}

/// Generates `n` class-balanced images from a checkpoint and scores them; also returns the
/// sampler used and the milliseconds per image.
pub fn eval_checkpoint(
    ev: &crate::eval::Evaluator,
    ckpt: &Path,
    sampler: &SamplerOverride,
    n: usize,
    seed: u64,
    dev: &Device,
) -> Result<(crate::eval::EvalReport, GeneratorSpec, f64)> {
    let (den, meta) = crate::teacher_source::load(ckpt, dev)?;
    let spec = sampler.apply(&meta)?;
    let ncls = den.num_classes();
    let labels: Vec<u32> = (0..n).map(|i| (i % ncls) as u32).collect();
    let inputs = crate::sample::seeded_noise(&den, &spec, n, seed, dev)?;
    let t0 = std::time::Instant::now();
    let images = crate::sample::generate(
        &den,
        &spec,
        &inputs,
        &Tensor::from_vec(labels.clone(), n, dev)?,
        250,
        dev,
    )?;
    let ms_per_image = 1000.0 * t0.elapsed().as_secs_f64() / n as f64;
    // An unconditional network's labels are not classes: no class accuracy.
    let given = den
        .net
        .config()
        .is_class_conditional()
        .then_some(labels.as_slice());
    Ok((ev.evaluate(&images, given)?, spec, ms_per_image))
}

impl EvalJob {
    pub fn run(&self, dev: &Device) -> Result<crate::eval::EvalReport> {
        if !self.input.is_dir() && self.sampler != SamplerOverride::default() {
            bail!(
                "--sampler, --sample-steps (--steps) and --cfg-scale apply to a checkpoint folder; {} is a sample file",
                self.input.display()
            );
        }
        // Reject what the classifier cannot score before training (or loading) it.
        let samples = if self.input.is_dir() {
            crate::checks::size("--n", self.n as u64, 2, 10_000_000)?;
            let m = crate::teacher_source::load_meta(&self.input)?.model;
            let like = Tensor::zeros(
                (1, m.channels(), m.resolution(), m.resolution()),
                candle_core::DType::F32,
                &Device::Cpu,
            )?;
            crate::eval::classifier::check_image_shape(&like)
                .with_context(|| format!("{} cannot be evaluated", self.input.display()))?;
            None
        } else {
            let (images, labels) = crate::sample::load_samples(&self.input, dev)?;
            crate::eval::classifier::check_image_shape(&images)
                .with_context(|| format!("{} cannot be evaluated", self.input.display()))?;
            Some((images, labels))
        };
        let ev = evaluator(self.cache_dir.as_deref(), dev, self.show_progress)?;
        let report = if let Some((images, labels)) = samples {
            ev.evaluate(&images, labels.as_deref())?
        } else {
            let (r, spec, ms) =
                eval_checkpoint(&ev, &self.input, &self.sampler, self.n, self.seed, dev)?;
            println!(
                "{} on {} images: {:?}, {} steps, {} NFE, cfg {} ({ms:.1} ms/image)",
                self.input.display(),
                self.n,
                spec.sampler,
                spec.steps,
                spec.nfe(),
                spec.cfg_scale
            );
            r
        };
        println!("{report}");
        if let Some(p) = &self.json {
            checkpoint::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
        }
        Ok(report)
    }
}
