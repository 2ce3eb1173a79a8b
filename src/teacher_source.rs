//! Where a model folder comes from, resolved once from its contents: one of our checkpoints
//! (`config.json` with `format_version` + `model.safetensors`) or a diffusers model / pipeline
//! folder (`config.json` with `_class_name` + `diffusion_pytorch_model.safetensors`, or
//! `model_index.json` + `unet/` + `scheduler/`). Every command that reads a model (`sample`,
//! `eval`, `export`, `validate`, `train dmd2|tdm --teacher`) loads it through [`load`], so a
//! diffusers teacher is a [`Denoiser`] with a [`CheckpointMeta`] like any other: its network is
//! the diffusers `UNet2DModel` and its parameterisation and default sampler come from the
//! folder's `scheduler_config.json`. A student distilled from it is one of our checkpoints
//! (its config records the diffusers config, the parameterisation and the schedule).

use crate::checkpoint::{self, CheckpointMeta, Role};
use anyhow::{Context, Result};
use candle_core::Device;
use graphs::diffusers::{load, DiffusersFolder, UNet2DConfig};
use graphs::schedulers::Scheduler;
use graphs::{Denoiser, GeneratorSpec, ModelConfig, NetworkConfig};
use std::path::{Path, PathBuf};

/// Sampling steps of a diffusers teacher's default sampler (its scheduler config has none).
pub const DIFFUSERS_SAMPLE_STEPS: usize = 50;

#[derive(Clone, Debug, PartialEq)]
pub enum TeacherSource {
    /// One of our checkpoint folders (or the path of its `model.safetensors`).
    Ours(PathBuf),
    /// A diffusers model or pipeline folder.
    Diffusers(DiffusersFolder),
}

impl TeacherSource {
    pub fn resolve(path: &Path) -> Result<Self> {
        if path.is_dir() && DiffusersFolder::is_diffusers(path) {
            Ok(Self::Diffusers(DiffusersFolder::resolve(path)?))
        } else {
            Ok(Self::Ours(path.to_path_buf()))
        }
    }

    /// The model's `config.json` as ours reads it (cheap: no weights are read).
    pub fn meta(&self) -> Result<CheckpointMeta> {
        match self {
            Self::Ours(p) => checkpoint::load_meta(&checkpoint_dir(p)),
            Self::Diffusers(f) => diffusers_meta(f),
        }
    }

    /// The network for inference and its record.
    pub fn load(&self, device: &Device) -> Result<(Denoiser, CheckpointMeta)> {
        match self {
            Self::Ours(p) => checkpoint::load(p, device),
            Self::Diffusers(f) => {
                let meta = diffusers_meta(f)?;
                let w = load::rename_legacy(load::load_weights(&f.unet, device)?)?;
                if let NetworkConfig::DiffusersUnet2d(c) = &meta.model.network {
                    load::check_weights(c, &w)
                        .with_context(|| format!("in {}", f.unet.display()))?;
                }
                crate::checks::tensors_finite(&f.unet.display().to_string(), &w)?;
                let den = checkpoint::denoiser_from_tensors(
                    &meta.model,
                    w,
                    device,
                    &f.unet.display().to_string(),
                )?;
                Ok((den, meta))
            }
        }
    }

    /// sha256 of the weights: `model.safetensors`, or for diffusers the sha256 of the
    /// concatenated sha256s of its weight files (one file or the shards, sorted).
    pub fn weights_sha256(&self) -> Result<String> {
        match self {
            Self::Ours(p) => {
                checkpoint::file_sha256(&checkpoint_dir(p).join(checkpoint::WEIGHTS_FILE))
            }
            Self::Diffusers(f) => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&f.unet)
                    .with_context(|| format!("listing {}", f.unet.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                let mut all = String::new();
                for p in &files {
                    all.push_str(&checkpoint::file_sha256(p)?);
                }
                Ok(crate::checks::sha256_hex(all.as_bytes()))
            }
        }
    }

    pub fn is_diffusers(&self) -> bool {
        matches!(self, Self::Diffusers(_))
    }
}

fn checkpoint_dir(p: &Path) -> PathBuf {
    if p.is_file() {
        p.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        p.to_path_buf()
    }
}

/// Resolves `path` and loads it (see [`TeacherSource::load`]).
pub fn load(path: &Path, device: &Device) -> Result<(Denoiser, CheckpointMeta)> {
    TeacherSource::resolve(path)?.load(device)
}

/// Resolves `path` and reads its record (see [`TeacherSource::meta`]).
pub fn load_meta(path: &Path) -> Result<CheckpointMeta> {
    TeacherSource::resolve(path)?.meta()
}

/// A diffusers folder's record: role teacher, the network's config, the parameterisation of its
/// scheduler and our sampler for it (`graphs::diffusers::teacher::sampler_for`).
fn diffusers_meta(f: &DiffusersFolder) -> Result<CheckpointMeta> {
    if let Some(p) = f
        .unet
        .parent()
        .filter(|p| graphs::diffusers::is_text_to_image(p))
    {
        anyhow::bail!(
            "{}: a text-to-image pipeline (UNet2DConditionModel): `distill sample {} --prompts \
             FILE`, `distill export`, `distill validate --reference` and `distill train tdm \
             --teacher {} --prompts FILE` take it; DMD2 training and eval of text-to-image \
             teachers are not implemented yet",
            p.display(),
            p.display(),
            p.display()
        );
    }
    let sched_path = f.scheduler_config.as_ref().with_context(|| {
        format!(
            "{}: no scheduler_config.json (in the folder, its scheduler/ or its pipeline's): \
             the noise schedule the model was trained with is needed",
            f.unet.display()
        )
    })?;
    let sched = Scheduler::from_file(sched_path)?;
    let parameterisation = graphs::diffusers::teacher::parameterisation(&sched)
        .with_context(|| format!("in {}", sched_path.display()))?;
    let cfg_path = f.unet.join("config.json");
    let unet = UNet2DConfig::from_file(&cfg_path)?;
    let network = NetworkConfig::DiffusersUnet2d(unet);
    network
        .validate()
        .with_context(|| format!("{}: not usable as a teacher", cfg_path.display()))?;
    let generator = GeneratorSpec {
        sampler: graphs::diffusers::teacher::sampler_for(&sched),
        steps: DIFFUSERS_SAMPLE_STEPS,
        sigmas: vec![],
        fresh_noise: false,
        cfg_scale: 1.0,
    };
    let model = ModelConfig {
        network,
        parameterisation,
    };
    Ok(CheckpointMeta::new(Role::Teacher, model, generator, 0))
}
