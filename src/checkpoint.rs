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
    /// sha256 of `model.safetensors`, recorded by [`save`] and verified by [`load`] (absent in
    /// checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
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
            weights_sha256: None,
        }
    }
}

pub use crate::fsio::write_atomic;

/// SHA-256 (lowercase hex) of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::checks::sha256_hex(&bytes))
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
    tensors_from_bytes(&bytes, path, device)
}

/// Parses safetensors bytes read from `path` (named in every error) into tensors + metadata.
pub fn tensors_from_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).with_context(|| {
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
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{}: bad header", path.display()))?;
    Ok((out, header.metadata().clone().unwrap_or_default()))
}

/// Header metadata key of `model.safetensors`: sha256 of its tensor data (after the header).
pub const DATA_SHA_KEY: &str = "data_sha256";

/// Offset of the tensor data in safetensors bytes (8-byte header length + header).
fn data_start(bytes: &[u8]) -> Result<usize> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .context("shorter than a safetensors header")?;
    usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .context("safetensors header length past the end of the file")
}

/// Whether `bytes` match the sha256 `config.json` recorded, or (a kill between the weights' and
/// the config's rename) the data hash the weights carry in their own header.
fn weights_intact(bytes: &[u8], recorded: &str) -> bool {
    if crate::checks::sha256_hex(bytes) == recorded {
        return true;
    }
    let Ok(start) = data_start(bytes) else {
        return false;
    };
    let Ok((_, header)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return false;
    };
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(DATA_SHA_KEY))
        .is_some_and(|h| *h == crate::checks::sha256_hex(&bytes[start..]))
}

/// Writes a checkpoint folder: weights first, config last (the config's presence marks it
/// complete; it records the weights' sha256). Non-finite weights are refused before anything
/// is written, so the previous checkpoint stays.
pub fn save(dir: &Path, meta: &CheckpointMeta, weights: &HashMap<String, Tensor>) -> Result<()> {
    let (bytes, config) =
        serialise(meta, weights).with_context(|| format!("not writing {}", dir.display()))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    write_atomic(&dir.join(CONFIG_FILE), &config)
}

/// The bytes [`save`] writes: `model.safetensors` (carrying its data hash) and `config.json`
/// (recording the file's sha256). Non-finite weights are refused.
pub fn serialise(
    meta: &CheckpointMeta,
    weights: &HashMap<String, Tensor>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    crate::checks::tensors_finite("weights to checkpoint", weights)?;
    // The weights carry their own data hash too: a kill between the two renames of `save` leaves
    // new weights beside the previous config.json, which is consistent, not corrupted.
    let plain = safetensors_bytes(weights)?;
    let data_sha = crate::checks::sha256_hex(&plain[data_start(&plain)?..]);
    let bytes = safetensors_bytes_with_meta(
        weights,
        Some(HashMap::from([(DATA_SHA_KEY.to_string(), data_sha)])),
    )?;
    let meta = CheckpointMeta {
        weights_sha256: Some(crate::checks::sha256_hex(&bytes)),
        ..meta.clone()
    };
    Ok((bytes, serde_json::to_string_pretty(&meta)?.into_bytes()))
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
    crate::checks::model_config(&p.display().to_string(), &meta.model)?;
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
    let bytes = std::fs::read(&wp).with_context(|| format!("reading {}", wp.display()))?;
    if let (Some(want), true) = (&meta.weights_sha256, crate::checks::verify_weights()) {
        if !weights_intact(&bytes, want) {
            let got = crate::checks::sha256_hex(&bytes);
            bail!(
                "{} is corrupted: its sha256 {got} is not the {want} recorded in {} (pass --no-verify to load hand-edited weights anyway)",
                wp.display(),
                dir.join(CONFIG_FILE).display()
            );
        }
    }
    let (weights, _) = tensors_from_bytes(&bytes, &wp, device)?;
    crate::checks::tensors_finite(&wp.display().to_string(), &weights)?;
    let den = denoiser_from_tensors(&meta.model, weights, device, &wp.display().to_string())?;
    Ok((den, meta))
}
