//! Self-describing checkpoints: a folder with `config.json` (what the network is and how to sample
//! it) and `model.safetensors` (the weights inference uses: the EMA for a teacher). Training state
//! for `--resume` lives beside them in `train_state.safetensors` + `train_state.json`.
//! Every file is written to a temporary name, fsynced, then renamed: a crash never leaves a
//! half-written checkpoint behind.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use graphs::{Denoiser, GeneratorSpec, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What produced the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Teacher,
    Dmd2,
    Tdm,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Dmd2 => "dmd2",
            Role::Tdm => "tdm",
        }
    }
}

/// `config.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub producer: String,
    pub role: Role,
    pub model: ModelConfig,
    /// The default way to sample this checkpoint (a student: its own few-step sampler).
    pub generator: GeneratorSpec,
    /// Optimiser steps taken when the checkpoint was written.
    pub step: u64,
}

impl CheckpointMeta {
    pub fn new(role: Role, model: ModelConfig, generator: GeneratorSpec, step: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            producer: format!("distill {}", env!("CARGO_PKG_VERSION")),
            role,
            model,
            generator,
            step,
        }
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {} (disk full?)", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// SHA-256 (lowercase hex) of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// Serialises tensors (sorted by name) to safetensors bytes.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    safetensors_bytes_with_meta(tensors, None)
}

/// Like [`safetensors_bytes`], with string metadata in the header (one atomic file for state + step).
pub fn safetensors_bytes_with_meta(
    tensors: &HashMap<String, Tensor>,
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut data: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
    for n in names {
        data.push((n.clone(), tensors[n].to_device(&Device::Cpu)?.contiguous()?));
    }
    let views: Vec<(&str, &Tensor)> = data.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::tensor::serialize(views, meta).context("serialising safetensors")
}

/// Writes tensors to a safetensors file atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors)?)
}

/// Reads a safetensors file, naming the file in every error.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(load_tensors_with_meta(path, device)?.0)
}

/// Reads a safetensors file and its header metadata.
pub fn load_tensors_with_meta(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        out.insert(name, t);
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: bad header", path.display()))?;
    Ok((out, header.metadata().clone().unwrap_or_default()))
}

/// Writes a checkpoint folder: weights first, config last (the config's presence marks it complete).
pub fn save(dir: &Path, meta: &CheckpointMeta, weights: &HashMap<String, Tensor>) -> Result<()> {
    save_tensors(&dir.join(WEIGHTS_FILE), weights)?;
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(meta)?.as_bytes(),
    )
}

pub fn load_meta(dir: &Path) -> Result<CheckpointMeta> {
    let p = dir.join(CONFIG_FILE);
    if !dir.exists() {
        bail!("checkpoint {} does not exist", dir.display());
    }
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (is {} a distill checkpoint folder?)",
            p.display(),
            dir.display()
        )
    })?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} is not supported (this distill reads {FORMAT_VERSION})",
            p.display(),
            meta.format_version
        );
    }
    Ok(meta)
}

/// Builds a denoiser from tensors, checking that every parameter is present with the right shape.
pub fn denoiser_from_tensors(
    cfg: &ModelConfig,
    weights: HashMap<String, Tensor>,
    device: &Device,
    origin: &str,
) -> Result<Denoiser> {
    let n = weights.len();
    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
    let den = Denoiser::new(vb, cfg)
        .with_context(|| format!("{origin}: weights do not match the model config"))?;
    let expected = graphs::params::collect(&den).len();
    if expected != n {
        bail!("{origin}: holds {n} tensors but the model config needs {expected}");
    }
    Ok(den)
}

/// Loads a checkpoint folder (or a path to its `model.safetensors`) for inference.
pub fn load(path: &Path, device: &Device) -> Result<(Denoiser, CheckpointMeta)> {
    let dir: PathBuf = if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    let meta = load_meta(&dir)?;
    let wp = dir.join(WEIGHTS_FILE);
    let weights = load_tensors(&wp, device)?;
    let den = denoiser_from_tensors(&meta.model, weights, device, &wp.display().to_string())?;
    Ok((den, meta))
}
