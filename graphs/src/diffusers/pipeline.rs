//! A Stable-Diffusion-like pipeline folder (`model_index.json` of a `StableDiffusionPipeline`:
//! `unet/` a `UNet2DConditionModel`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) as a
//! text-to-image teacher: prompts -> prompt embeddings (and the empty prompt's for guidance) ->
//! our ODE sampler on the scheduler's grid over the latent denoiser -> the VAE decoder -> images.

use super::teacher::{parameterisation, sampler_for, scheduler_grid};
use super::unet2d_condition::load_unet_condition;
use super::vae::{load_vae, AutoencoderKL};
use crate::cond::{Cond, TextCond};
use crate::schedulers::Scheduler;
use crate::transformers::PromptEncoder;
use crate::{CandleBackend, Denoiser, Network, NetworkConfig, SamplerKind};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The `_class_name`s of `model_index.json` read as text-to-image pipelines.
pub const TEXT_TO_IMAGE_PIPELINES: &[&str] = &["StableDiffusionPipeline"];

/// Whether `dir` holds a `model_index.json` whose `unet/` is a `UNet2DConditionModel` (a
/// text-to-image pipeline, see [`TextToImage::load`]).
pub fn is_text_to_image(dir: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string(dir.join("unet").join("config.json")) else {
        return false;
    };
    dir.join("model_index.json").is_file()
        && serde_json::from_str::<serde_json::Value>(&s)
            .ok()
            .and_then(|v| {
                v["_class_name"]
                    .as_str()
                    .map(|c| c == "UNet2DConditionModel")
            })
            .unwrap_or(false)
}

pub struct TextToImage {
    pub dir: PathBuf,
    /// The latent denoiser: `Network::Condition` with the scheduler's VP parameterisation.
    pub den: Denoiser,
    pub scheduler: Scheduler,
    pub vae: AutoencoderKL,
    pub prompts: PromptEncoder,
}

impl std::fmt::Debug for TextToImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextToImage({})", self.dir.display())
    }
}

impl TextToImage {
    /// A `StableDiffusionPipeline` folder; every component checked by name and shape. Other
    /// pipelines (SDXL's two text encoders, SD3's transformer) are refused by name.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model_index.json");
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("parsing {}", index.display()))?;
        let class = v["_class_name"].as_str().unwrap_or("(none)");
        if !TEXT_TO_IMAGE_PIPELINES.contains(&class) {
            bail!(
                "{}: _class_name {class:?} is not a supported text-to-image pipeline (supported: \
                 {TEXT_TO_IMAGE_PIPELINES:?}; SDXL's second text encoder is not wired yet)",
                index.display()
            );
        }
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = Scheduler::from_file(&sched_path)?;
        let param =
            parameterisation(&scheduler).with_context(|| format!("in {}", sched_path.display()))?;
        let (unet, w) = load_unet_condition(dir, device)?;
        let cfg = NetworkConfig::DiffusersUnet2dCondition(unet.cfg);
        cfg.validate()
            .with_context(|| format!("{}/unet: not usable as a teacher", dir.display()))?;
        let net = Network::new(VarBuilder::from_tensors(w, DType::F32, device), &cfg)?;
        let (vae, _) = load_vae(dir, device)?;
        let prompts = PromptEncoder::from_pipeline(dir, device)?;
        let cross = match &cfg {
            NetworkConfig::DiffusersUnet2dCondition(c) => c.cross_attention_dim[0],
            _ => unreachable!(),
        };
        if prompts.model.cfg.hidden_size != cross {
            bail!(
                "{}: text_encoder hidden_size {} != unet cross_attention_dim {cross}",
                dir.display(),
                prompts.model.cfg.hidden_size
            );
        }
        if vae.cfg.latent_channels != cfg.channels() {
            bail!(
                "{}: vae latent_channels {} != unet in_channels {}",
                dir.display(),
                vae.cfg.latent_channels,
                cfg.channels()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            den: Denoiser { net, param },
            scheduler,
            vae,
            prompts,
        })
    }

    /// Latent `(channels, side)`.
    pub fn latent_shape(&self) -> (usize, usize) {
        self.den.image_shape()
    }

    /// The prompts' condition, with the empty prompt's embeddings as the unconditional branch.
    pub fn condition(&self, b: &CandleBackend, prompts: &[&str]) -> Result<Cond<Tensor>> {
        let cond = self.prompts.encode(b, prompts)?;
        let empty = vec![""; prompts.len()];
        let uncond = self.prompts.encode(b, &empty)?;
        Ok(Cond::Text {
            cond: TextCond {
                prompt_embeds: cond,
                added: None,
            },
            uncond: Some(TextCond {
                prompt_embeds: uncond,
                added: None,
            }),
        })
    }

    /// Our default sampler for the folder's scheduler.
    pub fn default_sampler(&self) -> SamplerKind {
        sampler_for(&self.scheduler)
    }

    /// Latents for `noise` `[N, C, h, w]` (unit Gaussian, diffusers' `latents` argument) under
    /// `cond`: our ODE sampler `kind` on the scheduler's grid of `steps` (our own grid where the
    /// scheduler has none we follow, DPM-Solver), guidance `scale` against the empty prompt,
    /// returned in the scheduler's space (what the pipeline hands the VAE).
    pub fn latents(
        &self,
        b: &CandleBackend,
        noise: &Tensor,
        cond: &Cond<Tensor>,
        kind: SamplerKind,
        steps: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (grid, last) = match &self.scheduler {
            Scheduler::DpmMultistep(_) => {
                (crate::sampler::sampling_sigmas(&self.den.param, steps), 0.0)
            }
            s => scheduler_grid(s, steps)?,
        };
        let (x, _) =
            crate::sampler::sample_ode_grid(b, &self.den, kind, noise, cond, &grid, last, scale)?;
        // Sigma-space at `last` -> the VP latents x_t (flow: x_t = x / (1 + sigma)).
        let k = match &self.den.param {
            crate::Parameterisation::Flow(_) => 1.0 / (1.0 + last),
            _ => 1.0 / (1.0 + last * last).sqrt(),
        };
        Ok(x.affine(k, 0.0)?)
    }

    /// Decoded images `[N, 3, H, W]` in [0, 1] (diffusers' `output_type="np"`, NCHW):
    /// `(vae.decode(latents / scaling_factor) / 2 + 0.5).clamp(0, 1)`.
    pub fn decode(&self, b: &CandleBackend, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let img = self.vae.decode_latents(b, latents, h, w)?;
        Ok(img.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Prompts + unit noise -> images in [0, 1] (one call of the pipeline).
    pub fn generate(
        &self,
        b: &CandleBackend,
        prompts: &[&str],
        noise: &Tensor,
        kind: SamplerKind,
        steps: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let cond = self.condition(b, prompts)?;
        let lat = self.latents(b, noise, &cond, kind, steps, scale)?;
        self.decode(b, &lat)
    }
}
