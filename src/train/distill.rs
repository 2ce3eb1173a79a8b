//! What the distillation trainers (DMD2 and TDM) share: the frozen teacher, trainable copies of its
//! weights (student, fake score), the guided teacher call, the student's no-grad rollout, and the
//! run loop (resume, metrics, checkpoints, sample grids, in-training evaluation, NaN checks).

pub use super::distill_config::{check_timesteps, DistillCommon};
use super::optim::{AdamW, AdamWConfig, LossScaleConfig, LossScaler, Precision, StepStats};
pub use super::runner::{
    eval_student, run, Method, RunConfig, RunOutcome as DistillOutcome, RunSpec, StepMetrics,
};
use crate::checkpoint::{CheckpointMeta, Role};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graphs::{CandleBackend, Denoiser, ModelConfig, NoiseGrid, NoiseLevel, Renoise};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The frozen teacher a student is distilled from (its EMA weights, detached from autograd).
pub struct Teacher {
    pub den: Denoiser,
    pub meta: CheckpointMeta,
    pub dir: PathBuf,
    /// sha256 of the teacher's `model.safetensors` (a resumed run must see the same teacher;
    /// for a text-to-image teacher: of its UNet's weights and the prompt list together).
    pub sha256: String,
    /// A text-to-image pipeline teacher's prompts, encoded once ([`Teacher::load_text`]).
    pub text: Option<TextPrompts>,
    /// A text-to-image teacher's pipeline (its VAE and text encoder: real images for DMD2's
    /// GAN term, sample grids); its `den` shares the teacher's weights.
    pub pipeline: Option<graphs::diffusers::TextToImage>,
    /// Autoguidance's weaker teacher ([`Teacher::load_guide`]): the real score is guided against
    /// its conditional x0 instead of the unconditional one.
    pub guide: Option<Denoiser>,
}

/// The prompts a text-to-image student is distilled on, encoded once by the pipeline's text
/// encoder: each training sample draws one by index from its own stream.
pub struct TextPrompts {
    /// The prompt file's lines (blank lines dropped).
    pub prompts: Vec<String>,
    /// `[P, S, D]`: the prompts' embeddings (the text encoder's last hidden states; SDXL: both
    /// encoders' penultimate ones, concatenated).
    pub embeds: Tensor,
    /// `[1, S, D]`: the unconditional branch of the real score's guidance (the empty prompt's
    /// embeddings; zeros for SDXL's `force_zeros_for_empty_prompt`).
    pub empty: Tensor,
    /// SDXL's pooled embeddings and time ids, `[P, ...]` (and the unconditional branch's,
    /// `[1, ...]`); `None` for SD.
    pub added: Option<(
        graphs::cond::AddedCond<Tensor>,
        graphs::cond::AddedCond<Tensor>,
    )>,
    /// sha256 of the pipeline's `unet/` weights.
    pub unet_sha256: String,
    /// sha256 of the prompt file.
    pub prompts_sha256: String,
}

/// The file a text-to-image student's checkpoint names its pipeline in (the VAE, text encoder,
/// tokenizer and scheduler it samples and exports with): `{"pipeline": <teacher folder,
/// absolute>, "unet_sha256": <the teacher UNet's weights>, "prompts_sha256", "checkpoint_step"}`.
pub const TEXT_TO_IMAGE_FILE: &str = "text_to_image.json";

impl TextPrompts {
    /// The condition of samples drawing prompts `idx`, with the empty prompt as the
    /// unconditional branch.
    pub fn cond(&self, idx: &[u32]) -> Result<graphs::Cond<Tensor>> {
        let n = idx.len();
        let i = Tensor::from_vec(idx.to_vec(), n, self.embeds.device())?;
        let cond = self.embeds.index_select(&i, 0)?;
        let added = match &self.added {
            Some((a, _)) => Some(graphs::cond::AddedCond {
                text_embeds: a.text_embeds.index_select(&i, 0)?,
                time_ids: a.time_ids.index_select(&i, 0)?,
            }),
            None => None,
        };
        Ok(graphs::Cond::Text {
            cond: graphs::TextCond {
                prompt_embeds: cond,
                added,
            },
            uncond: Some(self.uncond(n)?),
        })
    }

    /// The unconditional branch for `n` samples.
    pub fn uncond(&self, n: usize) -> Result<graphs::TextCond<Tensor>> {
        let added = match &self.added {
            Some((_, u)) => Some(graphs::cond::AddedCond {
                text_embeds: u.text_embeds.repeat((n, 1))?,
                time_ids: u.time_ids.repeat((n, 1))?,
            }),
            None => None,
        };
        Ok(graphs::TextCond {
            prompt_embeds: self.empty.repeat((n, 1, 1))?,
            added,
        })
    }
}

impl Teacher {
    /// One of our teacher checkpoints or a diffusers model / pipeline folder
    /// ([`crate::teacher_source`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let source = crate::teacher_source::TeacherSource::resolve(dir)?;
        let (den, meta) = source
            .load(device)
            .with_context(|| format!("loading the teacher {}", dir.display()))?;
        if meta.role != Role::Teacher {
            bail!(
                "{} is a {} student, not a teacher: distil from a checkpoint made by `distill train teacher`",
                dir.display(),
                meta.role.name()
            );
        }
        let sha256 = source.weights_sha256()?;
        Ok(Self {
            den,
            meta,
            dir: dir.to_path_buf(),
            sha256,
            text: None,
            pipeline: None,
            guide: None,
        })
    }

    /// Loads autoguidance's weaker teacher from `dir`: one of our teacher checkpoints of the same
    /// parameterisation, image shape and classes (e.g. the same config trained for fewer steps).
    pub fn load_guide(&mut self, dir: &Path, device: &Device) -> Result<()> {
        if self.text.is_some() {
            bail!(
                "autoguidance (--autoguidance {}) guides class-conditional and unconditional \
                 teachers; a text-to-image teacher is guided against the empty prompt",
                dir.display()
            );
        }
        let (den, meta) = crate::checkpoint::load(dir, device).with_context(|| {
            format!(
                "--autoguidance {}: loading the weaker teacher",
                dir.display()
            )
        })?;
        let (a, b) = (&self.meta.model, &meta.model);
        if meta.role != Role::Teacher
            || a.parameterisation.name() != b.parameterisation.name()
            || (a.channels(), a.resolution(), a.num_classes())
                != (b.channels(), b.resolution(), b.num_classes())
        {
            bail!(
                "--autoguidance {}: a {} {} {}x{}x{} model with {} classes cannot guide the {} \
                 teacher {} ({}x{}x{}, {} classes): train the weaker teacher with the teacher's \
                 config (e.g. fewer --train-steps)",
                dir.display(),
                meta.role.name(),
                b.parameterisation.name(),
                b.channels(),
                b.resolution(),
                b.resolution(),
                b.num_classes(),
                a.parameterisation.name(),
                self.dir.display(),
                a.channels(),
                a.resolution(),
                a.resolution(),
                a.num_classes()
            );
        }
        // A resumed run must see the same guide too: its weights join the teacher's hash.
        let guide_sha = crate::checkpoint::file_sha256(&dir.join("model.safetensors"))?;
        self.sha256 = crate::checks::sha256_hex(format!("{}{guide_sha}", self.sha256).as_bytes());
        self.guide = Some(den);
        Ok(())
    }

    /// A text-to-image pipeline folder (`graphs::diffusers::TextToImage`) with the prompts of
    /// `prompts_file` (one a line), encoded once with the empty prompt's embeddings.
    pub fn load_text(dir: &Path, prompts_file: &Path, device: &Device) -> Result<Self> {
        let text = std::fs::read_to_string(prompts_file)
            .with_context(|| format!("--prompts {}: cannot read it", prompts_file.display()))?;
        let prompts: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        ensure!(
            !prompts.is_empty(),
            "--prompts {}: no prompts in it (one prompt a line)",
            prompts_file.display()
        );
        ensure!(
            graphs::diffusers::is_text_to_image(dir),
            "--prompts: the teacher {} is not a text-to-image pipeline folder (model_index.json              with a UNet2DConditionModel unet/)",
            dir.display()
        );
        let pipe = graphs::diffusers::TextToImage::load(dir, device)
            .with_context(|| format!("loading the teacher {}", dir.display()))?;
        let b = CandleBackend::new(device);
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cond = pipe.encode(&b, &refs)?;
        let uncond = pipe.uncond(&b, 1)?;
        let (embeds, empty) = (cond.prompt_embeds.detach(), uncond.prompt_embeds.detach());
        let added = match (cond.added, uncond.added) {
            (Some(c), Some(u)) => Some((c, u)),
            _ => None,
        };
        let den = pipe.den.clone();
        let generator = graphs::GeneratorSpec {
            sampler: pipe.default_sampler(),
            steps: crate::teacher_source::DIFFUSERS_SAMPLE_STEPS,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: 1.0,
        };
        let meta = CheckpointMeta::new(Role::Teacher, den.config(), generator, 0);
        let unet_sha256 = dir_weights_sha256(&dir.join("unet"))?;
        let prompts_sha256 = crate::checkpoint::file_sha256(prompts_file)?;
        let sha256 = crate::checks::sha256_hex(format!("{unet_sha256}{prompts_sha256}").as_bytes());
        Ok(Self {
            den,
            meta,
            dir: dir.to_path_buf(),
            sha256,
            text: Some(TextPrompts {
                prompts,
                embeds,
                empty,
                added,
                unet_sha256,
                prompts_sha256,
            }),
            pipeline: Some(pipe),
            guide: None,
        })
    }

    /// A text-to-image teacher's real data for DMD2's GAN term: an image+caption folder
    /// ([`crate::data::load_captioned`]) at the VAE's image size, encoded once by the VAE (the
    /// latent distribution's mean, scaled as the pipeline scales latents) and the text encoder.
    /// The dataset holds latents; its label `i` is caption `i` of the returned prompts.
    pub fn encode_captioned(
        &self,
        root: &Path,
        limit: Option<usize>,
    ) -> Result<(crate::data::Dataset, TextPrompts)> {
        let (Some(pipe), Some(text)) = (&self.pipeline, &self.text) else {
            bail!("an image+caption folder is real data for a text-to-image teacher only");
        };
        let (c, side) = pipe.latent_shape();
        let px = side * pipe.vae.cfg.downscale();
        let (mut images, mut captions) = crate::data::load_captioned(root, px)?;
        if let Some(n) = limit {
            images = images.subset(n);
            captions.truncate(images.len());
        }
        let dev = self.den_device();
        let b = CandleBackend::new(&dev);
        let n = images.len();
        let mut lat = Vec::with_capacity(n * c * side * side);
        for start in (0..n).step_by(8) {
            let idx: Vec<usize> = (start..(start + 8).min(n)).collect();
            let (x, _) = images.batch(&idx, &dev)?;
            let z = pipe.vae.encode_latents(&b, &x, px, px)?;
            lat.extend(z.flatten_all()?.to_vec1::<f32>()?);
        }
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let enc = pipe.encode(&b, &refs)?;
        let embeds = enc.prompt_embeds.detach();
        let added = match (enc.added, &text.added) {
            (Some(c), Some((_, u))) => Some((c, u.clone())),
            _ => None,
        };
        let data = crate::data::Dataset {
            images: lat,
            labels: (0..n as u32).collect(),
            channels: c,
            height: side,
            width: side,
            num_classes: n,
            class_names: captions.clone(),
            source: format!("{} (VAE latents)", images.source),
        };
        let caption_sha = crate::checks::sha256_hex(captions.join("\n").as_bytes());
        Ok((
            data,
            TextPrompts {
                prompts: captions,
                embeds,
                empty: text.empty.clone(),
                added,
                unet_sha256: text.unet_sha256.clone(),
                prompts_sha256: caption_sha,
            },
        ))
    }

    /// The sample grid of this teacher's student `den` (sampling with `spec`): a
    /// class-conditional student's classes ([`crate::sample::class_grid`]); a text-to-image
    /// student's first prompts (up to 8, one image each, noise from `seed`) decoded by the
    /// pipeline's VAE, the prompt under each image.
    pub fn sample_grid(
        &self,
        den: &Denoiser,
        spec: &graphs::GeneratorSpec,
        seed: u64,
        device: &Device,
        png: &Path,
    ) -> Result<()> {
        let (Some(pipe), Some(text)) = (&self.pipeline, &self.text) else {
            return crate::sample::class_grid(den, spec, 10, seed, device, png);
        };
        let k = text.prompts.len().min(8);
        let idx: Vec<u32> = (0..k as u32).collect();
        let cond = text.cond(&idx)?;
        let noise = crate::sample::seeded_noise(den, spec, k, seed, device)?.noise;
        let b = CandleBackend::new(device);
        let lat = graphs::sampler::student_x0(&b, den, &noise, cond.net(), &spec.sigmas)?;
        // [0, 1] -> the grid's [-1, 1].
        let images = pipe.decode(&b, &lat)?.affine(2.0, -1.0)?;
        crate::grid::save_captioned_grid_png(png, &images, &text.prompts[..k], 4)
    }

    fn den_device(&self) -> Device {
        graphs::params::collect(&self.den)
            .first()
            .map(|p| p.t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Refuses a real-score guidance scale the teacher cannot take: classifier-free guidance
    /// needs a null class, which a diffusers model does not have.
    pub fn check_guidance(&self, cfg_scale: f64) -> Result<()> {
        if self.text.is_some() {
            // Guided against the empty prompt's embeddings.
            return Ok(());
        }
        if cfg_scale != 1.0 && self.den.null_class().is_none() {
            bail!(
                "--cfg-scale {cfg_scale}: the teacher {} has no null class (a diffusers model), so \
                 no classifier-free guidance; pass --cfg-scale 1",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// The teacher's weights, by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        graphs::params::collect(&self.den)
            .into_iter()
            .map(|p| (p.name, p.t))
            .collect()
    }
}

/// sha256 of the concatenated sha256s of a folder's `.safetensors` files (sorted by name).
pub fn dir_weights_sha256(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut all = String::new();
    for p in &files {
        all.push_str(&crate::checkpoint::file_sha256(p)?);
    }
    Ok(crate::checks::sha256_hex(all.as_bytes()))
}

/// Trainable variables initialised with copies of `weights` (so training never touches the
/// teacher's tensors), and a denoiser of `cfg` built on them.
pub fn trainable_denoiser(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<(Denoiser, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (k, t) in weights {
            data.insert(k.clone(), Var::from_tensor(&t.to_device(device)?.copy()?)?);
        }
    }
    let den = Denoiser::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let vars = super::sorted_vars(&varmap);
    ensure!(
        vars.len() == weights.len(),
        "the network has {} parameters but {} weights were given",
        vars.len(),
        weights.len()
    );
    Ok((den, vars))
}

/// A network DMD2 and TDM train: every weight (a copy of the teacher's, full fine-tuning) or LoRA
/// adapters on the teacher's own, frozen tensors (`graphs::nn::lora`: one copy of the base in
/// memory for teacher, student and fake score).
pub enum TrainedNet {
    Full(Denoiser),
    Lora {
        /// The teacher's network (its tensors, not a copy).
        base: Denoiser,
        /// `<module>.lora_A.weight` / `.lora_B.weight` (PEFT's keys), sorted by name.
        adapters: Vec<(String, Var)>,
        /// `alpha / rank`.
        scale: f64,
        /// The settings, with the targets resolved.
        cfg: graphs::nn::lora::LoraConfig,
    },
}

/// Name of the adapter file in a LoRA student's checkpoint folder.
pub const LORA_FILE: &str = "lora.safetensors";
/// Its header entry: a JSON object with `lora_rank`, `lora_alpha`, `lora_scale`,
/// `target_modules`, `base_sha256`, `base` (the teacher's folder) and `checkpoint_step`.
pub const LORA_META_KEY: &str = "distill_lora";

impl TrainedNet {
    /// Full fine-tuning (`lora` off: trainable copies of `weights`, see [`trainable_denoiser`]) or
    /// LoRA adapters on `base` (seeded from `(seed, stream)`); returns the variables to train.
    pub fn new(
        cfg: &ModelConfig,
        base: &Denoiser,
        weights: &HashMap<String, Tensor>,
        lora: &graphs::nn::lora::LoraConfig,
        (seed, stream): (u64, u64),
        device: &Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        if lora.is_off() {
            let (den, vars) = trainable_denoiser(cfg, weights, device)?;
            return Ok((Self::Full(den), vars));
        }
        use graphs::nn::lora;
        let layers = lora::select(&base.net, lora)?;
        let mut rng = super::step_rng(seed, 0, stream);
        let init = lora::init_adapters(&layers, lora.rank, &mut rng, device)?;
        let mut adapters: Vec<(String, Var)> = init
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        adapters.sort_by(|a, b| a.0.cmp(&b.0));
        let resolved = graphs::nn::lora::LoraConfig {
            targets: lora.targets_for(&base.net),
            ..lora.clone()
        };
        let vars = adapters.clone();
        Ok((
            Self::Lora {
                base: base.clone(),
                adapters,
                scale: lora.scale(),
                cfg: resolved,
            },
            vars,
        ))
    }

    /// The network as its variables are now (LoRA: the base with the adapters merged; build it
    /// again after an update).
    pub fn net(&self) -> Result<Denoiser> {
        match self {
            Self::Full(d) => Ok(d.clone()),
            Self::Lora {
                base,
                adapters,
                scale,
                ..
            } => {
                let a: HashMap<String, Tensor> = adapters
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                    .collect();
                graphs::nn::lora::apply(base, &a, *scale)
            }
        }
    }

    /// The full weights of the network whose trained variables are `trained` (e.g. their EMA):
    /// themselves, or for LoRA the base with `trained` adapters merged.
    pub fn full_weights(
        &self,
        trained: HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        match self {
            Self::Full(_) => Ok(trained),
            Self::Lora { base, scale, .. } => {
                let b: HashMap<String, Tensor> = graphs::params::collect(base)
                    .into_iter()
                    .map(|p| (p.name, p.t))
                    .collect();
                graphs::nn::lora::merge(&b, &trained, *scale)
            }
        }
    }

    /// The adapter file of a LoRA checkpoint ([`LORA_FILE`]): the `trained` adapters under PEFT's
    /// keys, with rank, alpha, scale, targets, the base teacher's sha256 and folder and the step in
    /// its metadata. Nothing for full fine-tuning.
    pub fn checkpoint_files(
        &self,
        trained: &HashMap<String, Tensor>,
        teacher: &Teacher,
        step: u64,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        if let Some(t) = &teacher.text {
            let dir = std::fs::canonicalize(&teacher.dir).unwrap_or_else(|_| teacher.dir.clone());
            let info = serde_json::json!({
                "pipeline": dir.display().to_string(),
                "unet_sha256": t.unet_sha256,
                "prompts_sha256": t.prompts_sha256,
                "checkpoint_step": step,
            });
            files.push((
                TEXT_TO_IMAGE_FILE.to_string(),
                serde_json::to_vec_pretty(&info)?,
            ));
        }
        let Self::Lora { cfg, scale, .. } = self else {
            return Ok(files);
        };
        // One header entry (safetensors writes a map's entries in no fixed order; one entry
        // keeps the file's bytes reproducible, as a resume test compares them).
        let info = serde_json::json!({
            "lora_rank": cfg.rank,
            "lora_alpha": cfg.alpha(),
            "lora_scale": scale,
            "target_modules": cfg.targets,
            "base_sha256": teacher.sha256,
            "base": teacher.dir.display().to_string(),
            "checkpoint_step": step,
        });
        let meta = HashMap::from([(LORA_META_KEY.to_string(), info.to_string())]);
        let bytes = crate::checkpoint::safetensors_bytes_with_meta(trained, Some(meta))?;
        files.push((LORA_FILE.to_string(), bytes));
        Ok(files)
    }

    /// Trainable parameters (adapters only under LoRA).
    pub fn trainable_count(vars: &[(String, Var)]) -> usize {
        vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Test-only (`DISTILL_TEST_NAN_AT=RANK:STEP:grad`, see `train::runner`): set by the runner for
/// that rank's iteration, makes the first gradient of the next update NaN.
pub static TEST_POISON_GRADS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Applies [`TEST_POISON_GRADS`] (once).
fn test_poison(grads: &mut [Option<Tensor>]) -> Result<()> {
    use std::sync::atomic::Ordering;
    if !TEST_POISON_GRADS.swap(false, Ordering::Relaxed) {
        return Ok(());
    }
    if let Some(g) = grads.iter_mut().flatten().next() {
        *g = (&*g + f64::NAN)?;
    }
    Ok(())
}

/// A trainable network's variables, optimiser and (fp16) loss scaler, saved under `prefix` in the
/// training state.
pub struct Trainable {
    pub prefix: &'static str,
    pub opt: AdamW,
    pub scaler: Option<LossScaler>,
    /// The moments sharded over the ranks (ZeRO-1), once [`Self::shard`] ran.
    zero: Option<super::zero::Zero1>,
}

impl Trainable {
    pub fn new(prefix: &'static str, vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Ok(Self {
            prefix,
            opt: AdamW::new(vars, cfg)?,
            scaler: None,
            zero: None,
        })
    }
    /// Adds a dynamic loss scaler when `precision` needs one (fp16).
    pub fn with_precision(mut self, precision: Precision, cfg: &LossScaleConfig) -> Self {
        self.scaler = precision
            .needs_loss_scaling()
            .then(|| LossScaler::new(cfg.clone()));
        self
    }
    pub fn vars(&self) -> &[(String, Var)] {
        &self.opt.vars
    }
    /// Gradients of `loss` (scaled by the loss scaler, if any) for this network's variables.
    pub fn backward(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = match &self.scaler {
            Some(s) => s.scale_loss(loss)?.backward()?,
            None => loss.backward()?,
        };
        Ok(self.opt.grads_of(&grads))
    }
    /// Applies (possibly accumulated) gradients from [`Self::backward`]: averages them over the
    /// ranks (data-parallel training; nothing in one process), unscales them and skips the
    /// update on inf/NaN under fp16 (`None`, then on every rank alike), else steps the optimiser.
    /// Under ZeRO-1 ([`Self::shard`]) the exchange is a reduce-scatter, the step one of this
    /// rank's shard, then an all-gather of the parameters. Without fp16, non-finite averaged
    /// gradients are an error on every rank alike, naming the ranks whose own were not finite.
    pub fn apply(&mut self, mut grads: Vec<Option<Tensor>>) -> Result<Option<StepStats>> {
        test_poison(&mut grads)?;
        if let Some(z) = &mut self.zero {
            let c = crate::parallel::world();
            return z.step(c, &mut self.opt, self.scaler.as_mut(), grads, self.prefix);
        }
        let bad = crate::parallel::average_grads(&mut grads, self.prefix)?;
        if self.scaler.is_none() && !bad.is_empty() {
            let world = crate::parallel::world().world_size();
            return Err(crate::parallel::nonfinite_grads(
                self.prefix,
                &bad,
                world,
                self.opt.t,
            ));
        }
        super::optim::precision_step(&mut self.opt, self.scaler.as_mut(), grads)
    }
    /// Shards the optimiser moments over the ranks (ZeRO-1; nothing in a world of one). Every
    /// rank must hold the same full moments (after the start's broadcast).
    pub fn shard(&mut self) -> Result<()> {
        let c = crate::parallel::world();
        if c.world_size() > 1 && self.zero.is_none() {
            self.zero = Some(super::zero::Zero1::new(&mut self.opt, c)?);
        }
        Ok(())
    }
    /// Bytes of optimiser moments this rank holds.
    pub fn moment_bytes(&self) -> u64 {
        self.zero
            .as_ref()
            .map_or(self.opt.moment_bytes(), |z| z.moment_bytes())
    }
    /// Under ZeRO-1: gathers the full moments to rank 0 for a checkpoint ([`Self::save`] needs
    /// them); every rank calls it at the same iterations. Nothing otherwise.
    pub fn gather_moments(&mut self) -> Result<()> {
        match &self.zero {
            Some(z) => z.gather(crate::parallel::world(), &mut self.opt, self.prefix),
            None => Ok(()),
        }
    }
    /// Drops what [`Self::gather_moments`] gathered (after the checkpoint is serialised).
    pub fn release_moments(&mut self) {
        if let Some(z) = &self.zero {
            z.release(&mut self.opt);
        }
    }
    /// `backward` then `apply`.
    pub fn update(&mut self, loss: &Tensor) -> Result<Option<StepStats>> {
        let g = self.backward(loss)?;
        self.apply(g)
    }
    /// Records a step's stats (or the skip) as `grad_norm_<name>`, `lr_<name>`, and under fp16
    /// `loss_scale_<name>`, `skipped_<name>`.
    pub fn log(&self, m: &mut StepMetrics, name: &str, st: &Option<StepStats>) {
        let key = |k: &str| format!("{k}_{name}");
        if let Some(st) = st {
            m.insert(key("grad_norm"), st.grad_norm);
            m.insert(key("lr"), st.lr);
        }
        if let Some(s) = &self.scaler {
            m.insert(key("loss_scale"), s.scale);
            m.insert(key("skipped"), s.skipped as f64);
        }
    }
    /// Weights and optimiser moments as `<prefix>.<name>` / `adam.<prefix>.{m,v}.<name>`, and the
    /// update count as metadata `adam_t.<prefix>` (plus the loss scaler's state under fp16).
    pub fn save(&self, tensors: &mut HashMap<String, Tensor>, meta: &mut HashMap<String, String>) {
        for (n, v) in self.vars() {
            tensors.insert(format!("{}.{n}", self.prefix), v.as_tensor().detach());
        }
        tensors.extend(
            self.opt
                .state_with_prefix(&format!("adam.{}.", self.prefix)),
        );
        meta.insert(format!("adam_t.{}", self.prefix), self.opt.t.to_string());
        if let Some(s) = &self.scaler {
            s.save(&format!("scaler.{}", self.prefix), meta);
        }
    }
    pub fn load(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<()> {
        for (n, v) in &self.opt.vars {
            let key = format!("{}.{n}", self.prefix);
            let t = tensors
                .get(&key)
                .with_context(|| format!("training state lacks {key}"))?;
            ensure!(
                t.dims() == v.dims(),
                "training state {key} has shape {:?}, the model needs {:?}",
                t.dims(),
                v.dims()
            );
            v.set(&t.to_device(v.device())?)?;
        }
        let t: u64 = meta
            .get(&format!("adam_t.{}", self.prefix))
            .with_context(|| format!("training state lacks adam_t.{}", self.prefix))?
            .parse()?;
        let prefix = format!("adam.{}.", self.prefix);
        self.opt.load_state_with_prefix(tensors, &prefix, t)?;
        if let Some(s) = &mut self.scaler {
            s.load(&format!("scaler.{}", self.prefix), meta)?;
        }
        Ok(())
    }
}

/// Per-sample noise level `[N]` at grid timesteps `ts`.
pub fn grid_level(grid: &NoiseGrid, ts: &[usize], device: &Device) -> Result<NoiseLevel<Tensor>> {
    let n = ts.len();
    let s: Vec<f32> = ts.iter().map(|&t| grid.sigma(t) as f32).collect();
    let c: Vec<f32> = ts.iter().map(|&t| grid.c_noise(t) as f32).collect();
    Ok(NoiseLevel {
        sigma: Tensor::from_vec(s, n, device)?,
        c_noise: Tensor::from_vec(c, n, device)?,
    })
}

/// Per-sample noise level from explicit sigmas (student steps may sit off the grid, e.g. a
/// conditioning sigma of 80 on a VP teacher's grid).
pub fn sigma_level(den: &Denoiser, sigmas: &[f64], device: &Device) -> Result<NoiseLevel<Tensor>> {
    let n = sigmas.len();
    let s: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    let c: Vec<f32> = sigmas
        .iter()
        .map(|&s| den.param.c_noise(s) as f32)
        .collect();
    Ok(NoiseLevel {
        sigma: Tensor::from_vec(s, n, device)?,
        c_noise: Tensor::from_vec(c, n, device)?,
    })
}

/// A no-grad student rollout: the input `x` of each step and the x0 estimate there.
pub struct Rollout {
    /// `xs[k]`: the input of step `k` (`xs[0]` is the scaled pure noise); one more than `x0s`
    /// when the rollout stopped before the student's last step (the next step's input).
    pub xs: Vec<Tensor>,
    /// `x0s[k]`: the student's x0 estimate at step `k`.
    pub x0s: Vec<Tensor>,
}

/// Runs the student (detached weights: no gradient) from unit noise `z` for `steps` steps of its
/// own sampler over `sigmas` ([`graphs::sampler::student_rollout`]), re-noising
/// deterministically (`fresh == None`, DDIM along the student's steps: TDM) or with the given
/// fresh unit noise (DMD2's backward simulation).
pub fn rollout(
    b: &CandleBackend,
    student: &Denoiser,
    z: &Tensor,
    labels: &Tensor,
    sigmas: &[f64],
    steps: usize,
    fresh: Option<&[Tensor]>,
) -> Result<Rollout> {
    rollout_with(
        b,
        student,
        z,
        graphs::cond::NetCond::Labels(labels),
        sigmas,
        steps,
        fresh,
    )
}

/// A network call's condition: the text condition when there is one, else the labels.
pub fn net_cond<'c>(
    text: &'c Option<graphs::Cond<Tensor>>,
    labels: &'c Tensor,
) -> graphs::NetCond<'c, Tensor> {
    match text {
        Some(c) => c.net(),
        None => graphs::NetCond::Labels(labels),
    }
}

/// Each sample's condition draw from its own stream: a class label, or for a text-to-image
/// teacher the index of its prompt (`labels` then holds those indices) and the prompts' condition.
pub fn draw_condition(
    text: Option<&TextPrompts>,
    num_classes: usize,
    rngs: &mut crate::rng::SampleRngs,
    device: &Device,
) -> Result<(Vec<u32>, Tensor, Option<graphs::Cond<Tensor>>)> {
    use rand::Rng;
    let draws = match text {
        None => num_classes as u32,
        Some(t) => t.prompts.len() as u32,
    };
    let ids: Vec<u32> = rngs.each(|r| r.gen_range(0..draws));
    let labels = Tensor::from_vec(ids.clone(), ids.len(), device)?;
    let cond = text.map(|t| t.cond(&ids)).transpose()?;
    Ok((ids, labels, cond))
}

/// The real score: the teacher's x0 at `x_t`, guided at `scale` (labels against the null class
/// in one batched call; prompts against the empty prompt). With a guidance `interval`
/// `[lo, hi]` of sigmas, a sample is guided only where its sigma lies in `(lo, hi]` and gets the
/// conditional x0 elsewhere (guidance in a limited interval, Kynkaanniemi et al. 2024: guidance
/// at high noise is what collapses the modes). With a `guide` (autoguidance), the direction is
/// the teacher's conditional x0 against the guide's conditional x0 instead of against the
/// unconditional one (Karras et al. 2024: it corrects the teacher's errors without CFG's pull
/// towards each class's prototypes).
#[allow(clippy::too_many_arguments)]
pub fn real_score(
    b: &CandleBackend,
    teacher: &Denoiser,
    guide: Option<&Denoiser>,
    x_t: &Tensor,
    level: &NoiseLevel<Tensor>,
    labels: &Tensor,
    cond: &Option<graphs::Cond<Tensor>>,
    scale: f64,
    interval: Option<[f64; 2]>,
) -> Result<Tensor> {
    if let Some(g) = guide {
        let nc = net_cond(cond, labels);
        let c = teacher.forward_with(b, x_t, level, nc)?;
        if scale == 1.0 {
            return Ok(c);
        }
        let n = x_t.dim(0)?;
        let weights =
            interval_weights(level, scale, interval)?.unwrap_or_else(|| vec![scale as f32; n]);
        if weights.iter().all(|&w| w == 1.0) {
            return Ok(c);
        }
        let u = g.forward_with(b, x_t, level, nc)?;
        let w = Tensor::from_vec(weights, n, x_t.device())?.to_dtype(c.dtype())?;
        return Ok((&u + (&c - &u)?.broadcast_mul(&graphs::losses::per_image(&w)?)?)?);
    }
    let Some(weights) = interval_weights(level, scale, interval)? else {
        return Ok(match cond {
            None => graphs::guidance::cond_uncond_batched(b, teacher, x_t, level, labels, scale)?
                .guided(b, scale)?,
            Some(c) => graphs::guidance::guided_by_cond(b, teacher, c, scale, |nc| {
                teacher.forward_with(b, x_t, level, nc)
            })?,
        });
    };
    if weights.iter().all(|&w| w == 1.0) {
        return teacher.forward_with(b, x_t, level, net_cond(cond, labels));
    }
    let (c, u) = match cond {
        None | Some(graphs::Cond::Labels(_)) => {
            let l = match cond {
                Some(graphs::Cond::Labels(l)) => l,
                _ => labels,
            };
            let cu = graphs::guidance::cond_uncond_batched(b, teacher, x_t, level, l, scale)?;
            let u = cu
                .uncond
                .expect("an unconditional x0 at a scale other than 1");
            (cu.cond, u)
        }
        Some(graphs::Cond::Text { cond: c, uncond }) => {
            let u = uncond.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "classifier-free guidance at scale {scale} needs the empty prompt's embeddings"
                )
            })?;
            (
                teacher.forward_with(b, x_t, level, graphs::NetCond::Text(c))?,
                teacher.forward_with(b, x_t, level, graphs::NetCond::Text(u))?,
            )
        }
    };
    let w = Tensor::from_vec(weights, x_t.dim(0)?, x_t.device())?.to_dtype(c.dtype())?;
    Ok((&u + (&c - &u)?.broadcast_mul(&graphs::losses::per_image(&w)?)?)?)
}

/// Each sample's guidance scale under a guidance interval (`None`: no interval, or no guidance).
pub fn interval_weights(
    level: &NoiseLevel<Tensor>,
    scale: f64,
    interval: Option<[f64; 2]>,
) -> Result<Option<Vec<f32>>> {
    let Some([lo, hi]) = interval.filter(|_| scale != 1.0) else {
        return Ok(None);
    };
    let sigma: Vec<f32> = level.sigma.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(Some(
        sigma
            .iter()
            .map(|&s| {
                let s = s as f64;
                if s > lo && s <= hi {
                    scale as f32
                } else {
                    1.0
                }
            })
            .collect(),
    ))
}

/// [`rollout`] under either condition (labels or a text-to-image teacher's prompt embeddings).
pub fn rollout_with(
    b: &CandleBackend,
    student: &Denoiser,
    z: &Tensor,
    cond: graphs::cond::NetCond<'_, Tensor>,
    sigmas: &[f64],
    steps: usize,
    fresh: Option<&[Tensor]>,
) -> Result<Rollout> {
    let renoise = match fresh {
        None => Renoise::Deterministic,
        Some(f) => Renoise::Fresh(f.to_vec()),
    };
    let (mut xs, mut x0s) = (Vec::new(), Vec::new());
    let next = graphs::sampler::student_rollout_with(
        b,
        student,
        z,
        cond,
        sigmas,
        &renoise,
        steps,
        |_, x, x0| {
            xs.push(x.clone());
            x0s.push(x0.detach());
            Ok(())
        },
    )?;
    xs.extend(next);
    Ok(Rollout { xs, x0s })
}

/// The two networks DMD2 and TDM train (student and fake score) and how often the fake score
/// was updated: their [`Method`] state, gauges and generator in one place.
pub mod pair {
    use super::{StepMetrics, Trainable};
    use anyhow::{Context, Result};
    use candle_core::Tensor;
    use graphs::{GeneratorSpec, SamplerKind};
    use std::collections::HashMap;

    /// `student_updates`, logged as it is at a log line.
    pub fn gauges(student: &Trainable) -> StepMetrics {
        StepMetrics::from([("student_updates".to_string(), student.opt.t as f64)])
    }

    pub fn save(
        student: &Trainable,
        fake: &Trainable,
        fake_updates: u64,
        t: &mut HashMap<String, Tensor>,
        meta: &mut HashMap<String, String>,
    ) {
        student.save(t, meta);
        fake.save(t, meta);
        meta.insert("fake_updates".into(), fake_updates.to_string());
    }

    /// Loads both networks; returns the fake score's update count.
    pub fn load(
        student: &mut Trainable,
        fake: &mut Trainable,
        t: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<u64> {
        student.load(t, meta)?;
        fake.load(t, meta)?;
        Ok(meta
            .get("fake_updates")
            .context("training state lacks fake_updates")?
            .parse()?)
    }

    /// The [`super::Method`] items DMD2 and TDM share, for their `impl Method` blocks: they need
    /// fields `student` ([`super::TrainedNet`]), `student_t`, `fake_t` ([`Trainable`]),
    /// `fake_updates` and `teacher` (`&Teacher`).
    macro_rules! methods {
        () => {
            fn gauges(&self) -> StepMetrics {
                pair::gauges(&self.student_t)
            }
            fn student_vars(&self) -> &[(String, Var)] {
                self.student_t.vars()
            }
            fn student_updates(&self) -> u64 {
                self.student_t.opt.t
            }
            fn trainables(&mut self) -> Vec<&mut Trainable> {
                vec![&mut self.student_t, &mut self.fake_t]
            }
            fn save_state(
                &self,
                t: &mut HashMap<String, Tensor>,
                meta: &mut HashMap<String, String>,
            ) {
                pair::save(&self.student_t, &self.fake_t, self.fake_updates, t, meta);
            }
            fn load_state(
                &mut self,
                t: &HashMap<String, Tensor>,
                meta: &HashMap<String, String>,
            ) -> Result<()> {
                self.fake_updates = pair::load(&mut self.student_t, &mut self.fake_t, t, meta)?;
                Ok(())
            }
            fn model_config(&self) -> ModelConfig {
                self.teacher.meta.model.clone()
            }
            fn sample_grid(
                &self,
                den: &graphs::Denoiser,
                seed: u64,
                device: &candle_core::Device,
                png: &std::path::Path,
            ) -> Result<()> {
                self.teacher
                    .sample_grid(den, &self.spec(), seed, device, png)
            }
            fn inference_weights(
                &self,
                trained: HashMap<String, Tensor>,
            ) -> Result<HashMap<String, Tensor>> {
                self.student.full_weights(trained)
            }
            fn checkpoint_files(
                &self,
                trained: &HashMap<String, Tensor>,
                step: u64,
            ) -> Result<Vec<(String, Vec<u8>)>> {
                self.student.checkpoint_files(trained, self.teacher, step)
            }
        };
    }
    pub(crate) use methods;

    /// The student's sampler at its own sigmas (never guided: the guidance is distilled in).
    pub fn spec(sigmas: &[f64], fresh_noise: bool) -> GeneratorSpec {
        GeneratorSpec {
            sampler: SamplerKind::Student,
            steps: sigmas.len(),
            sigmas: sigmas.to_vec(),
            fresh_noise,
            cfg_scale: 1.0,
        }
    }
}

/// A scalar loss as f64, refused when it is not finite.
pub fn finite(name: &str, t: &Tensor) -> Result<f64> {
    let v = scalar(t)?;
    ensure!(v.is_finite(), "{name} is {v}: training diverged");
    Ok(v)
}

/// Draws `n` integers uniformly from `[lo, hi]` (inclusive).
pub fn uniform_ints<R: rand::Rng>(rng: &mut R, n: usize, lo: usize, hi: usize) -> Vec<usize> {
    (0..n).map(|_| rng.gen_range(lo..=hi)).collect()
}

/// Random class labels `[N]` in `0..num_classes`.
pub fn random_labels<R: rand::Rng>(
    rng: &mut R,
    n: usize,
    num_classes: usize,
    device: &Device,
) -> Result<Tensor> {
    let l: Vec<u32> = (0..n)
        .map(|_| rng.gen_range(0..num_classes as u32))
        .collect();
    Ok(Tensor::from_vec(l, n, device)?)
}

/// Picks row `n` of `xs[idx[n]]` for every sample: per-sample step selection out of a rollout.
pub fn gather_steps(xs: &[Tensor], idx: &[usize]) -> Result<Tensor> {
    let rows = idx
        .iter()
        .enumerate()
        .map(|(n, &k)| xs[k].narrow(0, n, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Host f64 scalar of a 0-d tensor.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
