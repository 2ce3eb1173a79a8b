//! Loading a diffusers folder: a model folder (`config.json` + `diffusion_pytorch_model
//! .safetensors`, or a sharded `.safetensors.index.json`) or a pipeline folder
//! (`model_index.json`, `unet/`, `scheduler/`). Every weight is checked against the network the
//! config describes: missing, extra, mis-shaped or truncated tensors are errors naming it.

use super::config::UNet2DConfig;
use super::unet2d::UNet2DModel;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// Where a diffusers model's parts are.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusersFolder {
    /// The folder with the UNet's `config.json` and weights.
    pub unet: PathBuf,
    /// `scheduler_config.json`, when the folder (or its pipeline) has one.
    pub scheduler_config: Option<PathBuf>,
}

impl DiffusersFolder {
    /// Whether `dir` looks like a diffusers model or pipeline folder (rather than one of our
    /// checkpoints, whose `config.json` has no `_class_name`).
    pub fn is_diffusers(dir: &Path) -> bool {
        if dir.join("model_index.json").is_file() {
            return true;
        }
        std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v.get("_class_name").is_some())
    }

    pub fn resolve(dir: &Path) -> Result<Self> {
        let sched = |d: &Path| {
            [
                d.join("scheduler").join("scheduler_config.json"),
                d.join("scheduler_config.json"),
            ]
            .into_iter()
            .find(|p| p.is_file())
        };
        if dir.join("model_index.json").is_file() {
            let unet = dir.join("unet");
            if !unet.join("config.json").is_file() {
                bail!(
                    "{}: a pipeline folder (model_index.json) without unet/config.json",
                    dir.display()
                );
            }
            return Ok(Self {
                unet,
                scheduler_config: sched(dir),
            });
        }
        if !dir.join("config.json").is_file() {
            bail!(
                "{}: not a diffusers folder (neither model_index.json nor config.json)",
                dir.display()
            );
        }
        // A model folder inside a pipeline finds the pipeline's scheduler beside it.
        let parent_sched = dir
            .parent()
            .filter(|p| p.join("model_index.json").is_file())
            .and_then(sched);
        Ok(Self {
            unet: dir.to_path_buf(),
            scheduler_config: sched(dir).or(parent_sched),
        })
    }
}

/// Checks a safetensors file's header against its length, naming the first tensor whose bytes
/// lie past the end (a truncated download), then loads every tensor as f32.
fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 8 {
        bail!("{}: truncated safetensors file (no header)", path.display());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = bytes
        .get(8..8 + n)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    let data = bytes.len() - 8 - n;
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = v["data_offsets"][1].as_u64().unwrap_or(u64::MAX) as usize;
        if end > data {
            bail!(
                "{}: tensor {name} is truncated (needs bytes up to {end}, the file holds {data})",
                path.display()
            );
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("loading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect()
}

/// Every tensor of a model folder: the single file, or the shards of the index.
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return load_file(&single, device);
    }
    let index = dir.join(INDEX);
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (k, f) in map {
            let f = f.as_str().with_context(|| {
                format!("{}: weight_map[{k}] is not a file name", index.display())
            })?;
            shards.entry(f).or_default().push(k);
        }
        let mut all = HashMap::new();
        for (file, keys) in shards {
            let mut t = load_file(&dir.join(file), device)?;
            for k in keys {
                let v = t.remove(k).with_context(|| {
                    format!(
                        "tensor {k}: listed in {} but not in shard {file}",
                        index.display()
                    )
                })?;
                all.insert(k.to_string(), v);
            }
            if let Some(k) = t.keys().next() {
                bail!("tensor {k}: in shard {file} but not in {}", index.display());
            }
        }
        return Ok(all);
    }
    if dir.join("diffusion_pytorch_model.bin").is_file() {
        bail!(
            "{}: only PyTorch pickle weights (diffusion_pytorch_model.bin); convert them to \
             safetensors (`save_pretrained(dir, safe_serialization=True)`)",
            dir.display()
        );
    }
    bail!("{}: no {WEIGHTS} nor {INDEX}", dir.display())
}

/// diffusers' old attention-block names (`query`, `key`, `value`, `proj_attn`) renamed to the
/// current ones, as diffusers' own loader does; conv-shaped `[o, i, 1, 1]` weights flattened.
pub fn rename_legacy(weights: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(weights.len());
    for (k, t) in weights {
        let mut parts: Vec<&str> = k.split('.').collect();
        let in_attn = parts.contains(&"attentions");
        let mut legacy = false;
        if in_attn && parts.len() >= 2 {
            let i = parts.len() - 2;
            let new = match parts[i] {
                "query" => Some("to_q"),
                "key" => Some("to_k"),
                "value" => Some("to_v"),
                "proj_attn" => Some("to_out.0"),
                _ => None,
            };
            if let Some(n) = new {
                parts[i] = n;
                legacy = true;
            }
        }
        let name = parts.join(".");
        let t = if legacy && t.rank() == 4 {
            t.flatten_from(1)?
        } else {
            t
        };
        if out.insert(name.clone(), t).is_some() {
            bail!("tensor {name}: present under both its legacy and its current name");
        }
    }
    Ok(out)
}

/// Loads the `UNet2DModel` of a diffusers folder (model or pipeline) onto `device`.
///
/// Returns the network and the weights by their diffusers keys (the model's tensors, e.g. to
/// build a `VarMap` for fine-tuning).
pub fn load_unet(dir: &Path, device: &Device) -> Result<(UNet2DModel, HashMap<String, Tensor>)> {
    let folder = DiffusersFolder::resolve(dir)?;
    let cfg = UNet2DConfig::from_file(&folder.unet.join("config.json"))?;
    let weights = rename_legacy(load_weights(&folder.unet, device)?)?;
    check_weights(&cfg, &weights).with_context(|| format!("in {}", folder.unet.display()))?;
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, device);
    Ok((UNet2DModel::new(vb, &cfg)?, weights))
}

/// Every parameter (name, shape) of the network `cfg` describes.
pub fn expected_params(cfg: &UNet2DConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let vm = candle_nn::VarMap::new();
    // Shapes only: built on the CPU with zeros (cheap), never used.
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    UNet2DModel::new(vb, cfg)?;
    let data = vm.data().lock().expect("varmap lock");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect())
}

/// Missing, extra and mis-shaped weights, each an error naming the tensor.
pub fn check_weights(cfg: &UNet2DConfig, weights: &HashMap<String, Tensor>) -> Result<()> {
    check_named(&expected_params(cfg)?, weights)
}

/// Missing, extra and mis-shaped weights against the parameters (name, shape) a network needs,
/// each an error naming the tensor.
pub fn check_named(
    want: &BTreeMap<String, Vec<usize>>,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    for (k, shape) in want {
        match weights.get(k) {
            None => bail!("missing weight {k} (shape {shape:?})"),
            Some(t) if t.dims() != shape.as_slice() => bail!(
                "weight {k} has shape {:?}, the config needs {shape:?}",
                t.dims()
            ),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = weights.keys().filter(|k| !want.contains_key(*k)).collect();
    extra.sort();
    if let Some(k) = extra.first() {
        bail!(
            "unexpected weight {k} ({} extra in all): not part of the network the config describes",
            extra.len()
        );
    }
    Ok(())
}
