//! LoRA students on disk. A student trained with `--lora-rank` is a complete checkpoint
//! (`model.safetensors` holds the base with the adapters merged, so `sample`, `eval`, `export`
//! and `validate` read it like any other) plus `lora.safetensors`, the adapters alone (PEFT keys,
//! rank / alpha / targets, the base teacher's sha256 and folder and the step in its metadata).
//!
//! `distill export CKPT --format lora -o FILE` writes that adapter as diffusers writes a UNet
//! LoRA (`StableDiffusionPipeline.save_lora_weights`): keys `unet.<module>.lora_A.weight` /
//! `.lora_B.weight`, and the PEFT `LoraConfig` (`unet.r`, `unet.lora_alpha`,
//! `unet.target_modules`) as JSON under the `lora_adapter_metadata` header key, so a loader that
//! reads it applies the scale `alpha / r` by itself; `lora_scale` in the header (and the printed
//! message) is that scale, for loaders that ignore the metadata (they assume alpha = r, scale 1:
//! set the adapter's weight to `lora_scale`).

use crate::checkpoint;
use crate::train::distill::{LORA_FILE, LORA_META_KEY};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Key prefix of the UNet's tensors in a diffusers LoRA file.
pub const PREFIX: &str = "unet.";
/// The file name diffusers' `save_lora_weights` uses (written into `-o` when it is a folder).
pub const DEFAULT_FILE: &str = "pytorch_lora_weights.safetensors";
/// The safetensors header key diffusers reads the PEFT config from.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// A LoRA: adapters by PEFT key (`<module>.lora_A.weight`, no prefix) and their settings.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub adapters: HashMap<String, Tensor>,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// The file's other header entries.
    pub meta: HashMap<String, String>,
}

impl LoraFile {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The diffusers file's bytes.
    pub fn diffusers_bytes(&self) -> Result<Vec<u8>> {
        let t: HashMap<String, Tensor> = self
            .adapters
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.clone()))
            .collect();
        let config = serde_json::json!({
            "unet.r": self.rank,
            "unet.lora_alpha": self.alpha,
            "unet.target_modules": self.targets,
        });
        let mut meta = self.meta.clone();
        meta.insert("format".into(), "pt".into());
        meta.insert(METADATA_KEY.into(), config.to_string());
        meta.insert("lora_rank".into(), self.rank.to_string());
        meta.insert("lora_alpha".into(), self.alpha.to_string());
        meta.insert("lora_scale".into(), self.scale().to_string());
        checkpoint::safetensors_bytes_with_meta(&t, Some(meta))
    }
}

/// Checks that every adapter pair is complete and of one rank.
fn check_rank(adapters: &HashMap<String, Tensor>, rank: usize, file: &Path) -> Result<()> {
    let paths = graphs::nn::lora::adapter_paths(adapters)
        .with_context(|| format!("in {}", file.display()))?;
    ensure!(
        !paths.is_empty(),
        "{} holds no LoRA adapters",
        file.display()
    );
    for p in &paths {
        let a = &adapters[&graphs::nn::lora::down_key(p)];
        ensure!(
            a.dim(0)? == rank,
            "{}: {p}'s lora_A has rank {}, the header says {rank}",
            file.display(),
            a.dim(0)?
        );
    }
    Ok(())
}

/// The adapter file of a LoRA student's checkpoint folder, checked to belong to the checkpoint
/// beside it (the same step).
pub fn read_checkpoint_lora(ckpt: &Path) -> Result<LoraFile> {
    let meta = checkpoint::load_meta(ckpt)?;
    let path = ckpt.join(LORA_FILE);
    if !path.is_file() {
        bail!(
            "{} is not a LoRA student: it has no {LORA_FILE} (it was trained without \
             --lora-rank, or is a teacher); export it with --format onnx or --format diffusers",
            ckpt.display()
        );
    }
    let (adapters, h) = checkpoint::load_tensors_with_meta(&path, &Device::Cpu)?;
    let info: serde_json::Value = serde_json::from_str(
        h.get(LORA_META_KEY)
            .with_context(|| format!("{}: its header lacks {LORA_META_KEY}", path.display()))?,
    )
    .with_context(|| format!("{}: bad {LORA_META_KEY}", path.display()))?;
    let field = |k: &str| {
        info.get(k)
            .with_context(|| format!("{}: {LORA_META_KEY} lacks {k}", path.display()))
    };
    let num = |k: &str| -> Result<f64> {
        field(k)?
            .as_f64()
            .with_context(|| format!("{}: {LORA_META_KEY}.{k} is not a number", path.display()))
    };
    let step = num("checkpoint_step")? as u64;
    ensure!(
        step == meta.step,
        "{} is of step {step}, the checkpoint beside it of step {}: it is left over from another \
         run, not this student's adapter",
        path.display(),
        meta.step
    );
    let rank = num("lora_rank")? as usize;
    let alpha = num("lora_alpha")?;
    let targets: Vec<String> = serde_json::from_value(field("target_modules")?.clone())
        .with_context(|| format!("{}: bad target_modules", path.display()))?;
    check_rank(&adapters, rank, &path)?;
    let mut keep = HashMap::new();
    for (k, name) in [
        ("base_sha256", "distill_base_sha256"),
        ("base", "distill_base"),
        ("checkpoint_step", "distill_checkpoint_step"),
    ] {
        let v = field(k)?;
        keep.insert(
            name.to_string(),
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
        );
    }
    keep.insert(
        "distill_network".into(),
        match meta.model.network {
            graphs::NetworkConfig::Unet(_) => "unet",
            graphs::NetworkConfig::DiffusersUnet2d(_) => "diffusers_unet2d",
            graphs::NetworkConfig::DiffusersUnet2dCondition(_) => "diffusers_unet2d_condition",
        }
        .into(),
    );
    Ok(LoraFile {
        adapters,
        rank,
        alpha,
        targets,
        meta: keep,
    })
}

/// Reads a LoRA file in diffusers' format (`unet.`-prefixed PEFT keys, the config under
/// `lora_adapter_metadata`; without it alpha = rank, as diffusers assumes).
pub fn read_diffusers_lora(path: &Path, device: &Device) -> Result<LoraFile> {
    let (t, h) = checkpoint::load_tensors_with_meta(path, device)?;
    let mut adapters = HashMap::new();
    for (k, v) in t {
        let Some(k) = k.strip_prefix(PREFIX) else {
            bail!(
                "{}: tensor {k} is not a UNet adapter (diffusers' UNet LoRA keys start with \
                 {PREFIX:?})",
                path.display()
            );
        };
        adapters.insert(k.to_string(), v);
    }
    let paths = graphs::nn::lora::adapter_paths(&adapters)
        .with_context(|| format!("in {}", path.display()))?;
    let first = paths
        .first()
        .with_context(|| format!("{} holds no LoRA adapters", path.display()))?;
    let rank = adapters[&graphs::nn::lora::down_key(first)].dim(0)?;
    let (mut alpha, mut targets) = (rank as f64, Vec::new());
    if let Some(cfg) = h.get(METADATA_KEY) {
        let v: serde_json::Value = serde_json::from_str(cfg)
            .with_context(|| format!("{}: bad {METADATA_KEY}", path.display()))?;
        if let Some(r) = v.get("unet.r").and_then(|r| r.as_u64()) {
            ensure!(
                r as usize == rank,
                "{}: {METADATA_KEY} says r = {r}, the tensors have rank {rank}",
                path.display()
            );
        }
        if let Some(a) = v.get("unet.lora_alpha").and_then(|a| a.as_f64()) {
            alpha = a;
        }
        if let Some(t) = v.get("unet.target_modules") {
            targets = serde_json::from_value(t.clone()).unwrap_or_default();
        }
    }
    check_rank(&adapters, rank, path)?;
    Ok(LoraFile {
        adapters,
        rank,
        alpha,
        targets,
        meta: h,
    })
}

/// Where `--format lora -o OUT` writes: OUT itself when it names a `.safetensors` file, else
/// [`DEFAULT_FILE`] inside the folder OUT.
pub fn output_path(out: &Path) -> PathBuf {
    if out.extension().is_some_and(|e| e == "safetensors") {
        out.to_path_buf()
    } else {
        out.join(DEFAULT_FILE)
    }
}

/// `distill export CKPT --format lora -o OUT`: the student's adapter as a diffusers LoRA file.
pub fn export_lora(ckpt: &Path, out: &Path) -> Result<PathBuf> {
    let lf = read_checkpoint_lora(ckpt)?;
    let path = output_path(out);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsio::write_atomic(&path, &lf.diffusers_bytes()?)?;
    let n = graphs::nn::lora::count(&lf.adapters);
    println!(
        "wrote {} ({} adapted layers, {n} parameters, rank {}, alpha {}; targets {}). A loader \
         that reads its lora_adapter_metadata (diffusers) applies the scale alpha / rank = {} \
         itself; one that ignores it assumes scale 1: set the adapter weight to {}",
        path.display(),
        lf.adapters.len() / 2,
        lf.rank,
        lf.alpha,
        lf.targets.join(","),
        lf.scale(),
        lf.scale()
    );
    Ok(path)
}
