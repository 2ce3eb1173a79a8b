//! A Stable-Diffusion-like pipeline folder (`model_index.json` of a `StableDiffusionPipeline`:
//! `unet/` a `UNet2DConditionModel`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; or of a
//! `StableDiffusionXLPipeline`, with `text_encoder_2/` + `tokenizer_2/` as well) as a
//! text-to-image teacher: prompts -> prompt embeddings (and the empty prompt's for guidance) ->
//! our ODE sampler on the scheduler's grid over the latent denoiser -> the VAE decoder -> images.
//!
//! SDXL follows diffusers' `StableDiffusionXLPipeline.encode_prompt`: `prompt_embeds` is the
//! concatenation (last axis) of both encoders' `hidden_states[-2]` (no final LayerNorm), the
//! pooled embeddings are `text_encoder_2`'s projected `text_embeds`, the time ids are
//! `(H, W, 0, 0, H, W)` for the UNet's default image size, and with
//! `force_zeros_for_empty_prompt` the unconditional branch is zeros (else the empty prompt's).

use super::teacher::{parameterisation, sampler_for, scheduler_grid};
use super::unet2d_condition::{load_unet_condition, AddedCond, SDXL_TIME_IDS};
use super::vae::{load_vae, AutoencoderKL};
use crate::cond::{Cond, TextCond};
use crate::schedulers::Scheduler;
use crate::transformers::PromptEncoder;
use crate::{Backend, CandleBackend, Denoiser, Network, NetworkConfig, SamplerKind};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The `_class_name`s of `model_index.json` read as text-to-image pipelines.
pub const TEXT_TO_IMAGE_PIPELINES: &[&str] =
    &["StableDiffusionPipeline", "StableDiffusionXLPipeline"];

/// Text-to-image pipelines refused by name, with why: their denoisers and text encoders are
/// networks `graphs` does not have.
pub const REFUSED_PIPELINES: &[(&str, &str)] = &[
    (
        "StableDiffusion3Pipeline",
        "SD3 denoises with an MMDiT (SD3Transformer2DModel, not a UNet2DConditionModel) \
         conditioned on two CLIP encoders and a T5 encoder; neither the MMDiT nor T5 is built",
    ),
    (
        "PixArtAlphaPipeline",
        "PixArt denoises with a DiT (PixArtTransformer2DModel) conditioned on a T5 encoder; \
         neither is built",
    ),
    (
        "PixArtSigmaPipeline",
        "PixArt denoises with a DiT (PixArtTransformer2DModel) conditioned on a T5 encoder; \
         neither is built",
    ),
];

/// `model_index.json`'s `_class_name`, if the folder has one.
fn pipeline_class(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join("model_index.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&s).ok()?;
    v["_class_name"].as_str().map(String::from)
}

/// Whether `dir` holds a `model_index.json` whose `unet/` is a `UNet2DConditionModel` (a
/// text-to-image pipeline, see [`TextToImage::load`]), or one of [`REFUSED_PIPELINES`] (so that
/// loading it says why it is refused).
pub fn is_text_to_image(dir: &Path) -> bool {
    if pipeline_class(dir).is_some_and(|c| REFUSED_PIPELINES.iter().any(|(n, _)| *n == c)) {
        return true;
    }
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

/// SDXL's second text encoder and its micro-conditioning.
pub struct SdxlText {
    /// `tokenizer_2/` + `text_encoder_2/` (a `CLIPTextModelWithProjection`: the pooled
    /// `text_embeds`).
    pub prompts_2: PromptEncoder,
    /// `model_index.json`'s `force_zeros_for_empty_prompt`: the unconditional branch is zeros
    /// (prompt and pooled embeddings) rather than the empty prompt's.
    pub force_zeros_for_empty_prompt: bool,
    /// diffusers' `add_time_ids`: original size, crop top-left, target size (`H, W, 0, 0, H, W`
    /// for the UNet's `sample_size` times the VAE's scale factor), the same for both branches.
    pub time_ids: [f32; SDXL_TIME_IDS],
}

pub struct TextToImage {
    pub dir: PathBuf,
    /// `model_index.json`'s `_class_name` (one of [`TEXT_TO_IMAGE_PIPELINES`]).
    pub class: String,
    /// The latent denoiser: `Network::Condition` with the scheduler's VP parameterisation.
    pub den: Denoiser,
    pub scheduler: Scheduler,
    pub vae: AutoencoderKL,
    /// `tokenizer/` + `text_encoder/`.
    pub prompts: PromptEncoder,
    /// `Some` for a `StableDiffusionXLPipeline`.
    pub sdxl: Option<SdxlText>,
}

impl std::fmt::Debug for TextToImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextToImage({})", self.dir.display())
    }
}

impl TextToImage {
    /// A `StableDiffusionPipeline` or `StableDiffusionXLPipeline` folder; every component
    /// checked by name and shape. Other pipelines (SD3, PixArt) are refused by name.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model_index.json");
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("parsing {}", index.display()))?;
        let class = v["_class_name"].as_str().unwrap_or("(none)");
        if let Some((_, why)) = REFUSED_PIPELINES.iter().find(|(n, _)| *n == class) {
            bail!(
                "{}: _class_name {class:?} is not supported: {why} (supported: \
                 {TEXT_TO_IMAGE_PIPELINES:?})",
                index.display()
            );
        }
        if !TEXT_TO_IMAGE_PIPELINES.contains(&class) {
            bail!(
                "{}: _class_name {class:?} is not a supported text-to-image pipeline (supported: \
                 {TEXT_TO_IMAGE_PIPELINES:?})",
                index.display()
            );
        }
        let is_sdxl = class == "StableDiffusionXLPipeline";
        if is_sdxl && v["requires_aesthetics_score"].as_bool() == Some(true) {
            bail!(
                "{}: requires_aesthetics_score = true (the SDXL refiner's aesthetic-score time \
                 ids) is not supported",
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
        let den = Denoiser { net, param };
        let (cross, text_embeds_dim) = match &den.net {
            Network::Condition(n) => (
                n.model.cfg.cross_attention_dim[0],
                n.model.text_embeds_dim(SDXL_TIME_IDS),
            ),
            _ => unreachable!(),
        };
        let sdxl = if is_sdxl {
            // Named `text_encoder_2.…`: both encoders lower into one ONNX graph.
            let prompts_2 = PromptEncoder::new_as(
                &dir.join("tokenizer_2"),
                &dir.join("text_encoder_2"),
                device,
                Some("text_encoder_2"),
            )
            .with_context(|| format!("the second prompt encoder of {}", dir.display()))?;
            let proj = prompts_2.model.cfg.projection_dim.with_context(|| {
                format!(
                    "{}/text_encoder_2: not a CLIPTextModelWithProjection (SDXL's pooled \
                     text_embeds come from its text_projection)",
                    dir.display()
                )
            })?;
            let (h1, h2) = (
                prompts.model.cfg.hidden_size,
                prompts_2.model.cfg.hidden_size,
            );
            ensure!(
                h1 + h2 == cross,
                "{}: text_encoder hidden_size {h1} + text_encoder_2 hidden_size {h2} != unet \
                 cross_attention_dim {cross}",
                dir.display()
            );
            ensure!(
                text_embeds_dim == Some(proj),
                "{}: unet addition_embed_type / projection_class_embeddings_input_dim do not take \
                 text_encoder_2's projection_dim {proj} + {SDXL_TIME_IDS} time ids (SDXL's \
                 addition_embed_type = \"text_time\")",
                dir.display()
            );
            let (l1, l2) = (prompts.tokenizer.max_length, prompts_2.tokenizer.max_length);
            ensure!(
                l1 == l2,
                "{}: tokenizer max length {l1} != tokenizer_2 max length {l2} (the two encoders' \
                 hidden states are concatenated token by token)",
                dir.display()
            );
            let force_zeros = match &v["force_zeros_for_empty_prompt"] {
                serde_json::Value::Null => true, // diffusers' default
                serde_json::Value::Bool(b) => *b,
                other => bail!(
                    "{}: force_zeros_for_empty_prompt = {other} is not a boolean",
                    index.display()
                ),
            };
            let px = (den.image_shape().1 * vae.cfg.downscale()) as f32;
            Some(SdxlText {
                prompts_2,
                force_zeros_for_empty_prompt: force_zeros,
                time_ids: [px, px, 0.0, 0.0, px, px],
            })
        } else {
            if text_embeds_dim.is_some() {
                bail!(
                    "{}: unet has addition_embed_type = \"text_time\" (SDXL's pooled embeddings \
                     and time ids) but the pipeline is a {class}, which has no second text \
                     encoder to give them",
                    dir.display()
                );
            }
            if prompts.model.cfg.hidden_size != cross {
                bail!(
                    "{}: text_encoder hidden_size {} != unet cross_attention_dim {cross}",
                    dir.display(),
                    prompts.model.cfg.hidden_size
                );
            }
            None
        };
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
            class: class.to_string(),
            den,
            scheduler,
            vae,
            prompts,
            sdxl,
        })
    }

    /// Tokens per prompt (every tokenizer pads and truncates to it).
    pub fn seq_len(&self) -> usize {
        self.prompts.tokenizer.max_length
    }

    /// The width of `prompt_embeds` (SDXL: both encoders' hidden sizes).
    pub fn embed_dim(&self) -> usize {
        self.prompts.model.cfg.hidden_size
            + self
                .sdxl
                .as_ref()
                .map_or(0, |s| s.prompts_2.model.cfg.hidden_size)
    }

    /// The width of the pooled prompt embeddings (SDXL's `text_embeds`), `None` without.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.sdxl
            .as_ref()
            .and_then(|s| s.prompts_2.model.cfg.projection_dim)
    }

    /// Token ids -> `(prompt_embeds, pooled_prompt_embeds)` on any backend: `ids` from
    /// `tokenizer`, `ids_2` from `tokenizer_2` (SDXL only), both `[N, seq_len]`. SD: the text
    /// encoder's `last_hidden_state` (with `clip_skip`, as the SD pipelines); SDXL: both encoders'
    /// `hidden_states[-(clip_skip + 2)]` concatenated and `text_encoder_2`'s `text_embeds`.
    pub fn embed_ids<B: Backend>(
        &self,
        b: &B,
        ids: &B::T,
        ids_2: Option<&B::T>,
    ) -> Result<(B::T, Option<B::T>)> {
        let l = self.seq_len();
        match (&self.sdxl, ids_2) {
            (None, None) => Ok((
                self.prompts
                    .model
                    .forward(b, ids, l, self.prompts.clip_skip, false)?
                    .hidden,
                None,
            )),
            (Some(s), Some(ids_2)) => {
                let (h1, _) =
                    self.prompts
                        .model
                        .penultimate(b, ids, l, self.prompts.clip_skip, false)?;
                let (h2, pooled) =
                    s.prompts_2
                        .model
                        .penultimate(b, ids_2, l, s.prompts_2.clip_skip, true)?;
                Ok((b.concat(&[&h1, &h2], 2)?, pooled))
            }
            (None, Some(_)) => bail!("{}: a {} has one tokenizer", self.dir.display(), self.class),
            (Some(_), None) => bail!(
                "{}: an SDXL pipeline needs tokenizer_2's ids as well",
                self.dir.display()
            ),
        }
    }

    /// `[N, 6]` time ids (the same row for every sample).
    pub fn time_ids(&self, b: &CandleBackend, n: usize) -> Result<Option<Tensor>> {
        Ok(match &self.sdxl {
            Some(s) => Some(
                Tensor::from_slice(&s.time_ids, (1, SDXL_TIME_IDS), &b.device)?.repeat((n, 1))?,
            ),
            None => None,
        })
    }

    /// The prompts' condition for one branch: `prompt_embeds` and (SDXL) the pooled embeddings
    /// with the time ids, as the pipelines' `encode_prompt` gives them.
    pub fn encode(&self, b: &CandleBackend, prompts: &[&str]) -> Result<TextCond<Tensor>> {
        let ids = self.prompts.tokenizer.encode_tensor(prompts, &b.device)?;
        let ids_2 = match &self.sdxl {
            Some(s) => Some(s.prompts_2.tokenizer.encode_tensor(prompts, &b.device)?),
            None => None,
        };
        let (prompt_embeds, pooled) = self.embed_ids(b, &ids, ids_2.as_ref())?;
        Ok(TextCond {
            prompt_embeds,
            added: self.added(b, pooled, prompts.len())?,
        })
    }

    /// SDXL's extra inputs for `pooled` (`None` otherwise).
    fn added(
        &self,
        b: &CandleBackend,
        pooled: Option<Tensor>,
        n: usize,
    ) -> Result<Option<AddedCond<Tensor>>> {
        Ok(match (pooled, self.time_ids(b, n)?) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
                text_embeds,
                time_ids,
            }),
            _ => None,
        })
    }

    /// The unconditional branch for `n` samples: the empty prompt's condition, or zeros for an
    /// SDXL pipeline with `force_zeros_for_empty_prompt` (as diffusers, for no negative prompt).
    pub fn uncond(&self, b: &CandleBackend, n: usize) -> Result<TextCond<Tensor>> {
        let one = self.encode(b, &[""])?;
        let zeros = self
            .sdxl
            .as_ref()
            .is_some_and(|s| s.force_zeros_for_empty_prompt);
        let fill = |t: &Tensor| -> Result<Tensor> {
            let t = if zeros { t.zeros_like()? } else { t.clone() };
            let mut reps = vec![1; t.rank()];
            reps[0] = n;
            Ok(t.repeat(reps)?)
        };
        Ok(TextCond {
            prompt_embeds: fill(&one.prompt_embeds)?,
            added: match one.added {
                Some(a) => Some(AddedCond {
                    text_embeds: fill(&a.text_embeds)?,
                    time_ids: a.time_ids.repeat((n, 1))?,
                }),
                None => None,
            },
        })
    }

    /// The prompts' condition, with the empty prompt's (SDXL: maybe zeros, see
    /// [`Self::uncond`]) as the unconditional branch.
    pub fn condition(&self, b: &CandleBackend, prompts: &[&str]) -> Result<Cond<Tensor>> {
        Ok(Cond::Text {
            cond: self.encode(b, prompts)?,
            uncond: Some(self.uncond(b, prompts.len())?),
        })
    }

    /// Latent `(channels, side)`.
    pub fn latent_shape(&self) -> (usize, usize) {
        self.den.image_shape()
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
