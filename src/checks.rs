//! Input validation at the edge: ranges with a message naming the field, a memory estimate
//! before anything large is allocated, labels against `num_classes`, finite weights, model
//! configs, sha256. The training configs and `--resume` are checked in `crate::train::checks`
//! (on top of these; this module knows nothing of training).
//!
//! Everything here only reads; callers invoke one function where a config is resolved or a run
//! is resumed.

use crate::data::Dataset;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use graphs::UNetConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// A finite value in `[lo, hi]`.
pub fn in_range(name: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    ensure!(
        v.is_finite() && (lo..=hi).contains(&v),
        "{name} = {v} is out of range: expected a finite value in [{lo}, {hi}]"
    );
    Ok(())
}

/// A finite value `> 0` and `<= hi`.
pub fn positive(name: &str, v: f64, hi: f64) -> Result<()> {
    ensure!(
        v.is_finite() && v > 0.0 && v <= hi,
        "{name} = {v} is out of range: expected a finite value in (0, {hi}]"
    );
    Ok(())
}

/// An integer size in `[lo, hi]`.
pub fn size(name: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    ensure!(
        (lo..=hi).contains(&v),
        "{name} = {v} is out of range: expected {lo}..={hi}"
    );
    Ok(())
}

/// Every float anywhere in a serialisable config is finite (NaN/inf would be written as
/// `nan`/`null` and make the run folder unloadable).
pub fn all_finite<T: serde::Serialize>(what: &str, cfg: &T) -> Result<()> {
    fn walk(path: &str, v: &toml::Value) -> Result<()> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => {
                bail!("{path} = {f} is not a finite number")
            }
            toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| {
                walk(
                    &if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    },
                    v,
                )
            }),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| walk(&format!("{path}[{i}]"), v)),
            _ => Ok(()),
        }
    }
    let v = toml::Value::try_from(cfg).with_context(|| format!("serialising the {what}"))?;
    walk("", &v).with_context(|| format!("invalid {what}"))
}

/// The network's size fields (beyond [`UNetConfig::validate`]'s divisibility rules).
pub fn unet(m: &UNetConfig) -> Result<()> {
    size("model.resolution", m.resolution as u64, 4, 4096)?;
    size("model.channels", m.channels as u64, 1, 64)?;
    size("model.base_channels", m.base_channels as u64, 1, 4096)?;
    size("model.groups", m.groups as u64, 1, 4096)?;
    size("model.num_res_blocks", m.num_res_blocks as u64, 1, 16)?;
    size("model.num_classes", m.num_classes as u64, 1, 1_000_000)?;
    size(
        "model.channel_mult levels",
        m.channel_mult.len() as u64,
        1,
        8,
    )?;
    for &c in &m.channel_mult {
        size("model.channel_mult entry", c as u64, 1, 64)?;
    }
    in_range("model.dropout", m.dropout, 0.0, 0.99)?;
    m.validate()
}

/// A classifier-free guidance scale (1 = off).
pub fn cfg_scale(name: &str, v: f64) -> Result<()> {
    in_range(name, v, 0.0, 100.0)
}

/// Rough bytes one training step of `m` at `batch` needs: every activation the backward pass
/// keeps (about 12 tensors per block and level, encoder and decoder) plus weights, gradients,
/// two AdamW moments and the EMA. Within 2-3x of what a run really uses; its job is to refuse
/// absurd sizes before they allocate, not to predict.
pub fn training_bytes(m: &UNetConfig, batch: usize) -> u128 {
    let mut acts: u128 = 0;
    let mut params: u128 = 0;
    let mut prev = m.base_channels as u128;
    for (level, &mult) in m.channel_mult.iter().enumerate() {
        let ch = (m.base_channels * mult) as u128;
        let side = (m.resolution >> level).max(1) as u128;
        acts += ch * side * side * (m.num_res_blocks as u128 + 1) * 2 * 12;
        params += 9 * ch * (ch + prev) * (m.num_res_blocks as u128 + 1) * 2;
        prev = ch;
    }
    let input = (m.channels * m.resolution * m.resolution) as u128;
    4 * (batch as u128 * (acts + 4 * input) + 5 * params)
}

/// Bytes of RAM available now (`MemAvailable` of /proc/meminfo), if known.
pub fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses `bytes` beyond the memory this machine has available (`DISTILL_MEMORY_LIMIT` in
/// bytes overrides the limit, e.g. for tests).
pub fn memory(what: &str, bytes: u128) -> Result<()> {
    let limit = std::env::var("DISTILL_MEMORY_LIMIT")
        .ok()
        .and_then(|v| v.parse::<u128>().ok())
        .or_else(available_memory);
    if let Some(limit) = limit {
        ensure!(
            bytes <= limit,
            "{what} needs about {} but only {} of memory is available: refusing before allocating (lower the size)",
            human(bytes),
            human(limit)
        );
    }
    Ok(())
}

fn human(b: u128) -> String {
    const G: f64 = (1u64 << 30) as f64;
    if b as f64 >= G {
        format!("{:.1} GiB", b as f64 / G)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// The data's labels fit the model: a label at or above `num_classes` is an error naming it
/// (an IDX file's label 42 must not silently grow a 10-class config to 43 classes).
pub fn labels_fit(data: &Dataset, num_classes: usize) -> Result<()> {
    if let Some(&bad) = data.labels.iter().find(|&&l| l as usize >= num_classes) {
        bail!(
            "data {} has label {bad} but num_classes is {num_classes}: fix the labels, or pass --num-classes {} (TOML: [model] num_classes)",
            data.source,
            data.num_classes.max(bad as usize + 1)
        );
    }
    Ok(())
}

/// Every value of every tensor is finite; `origin` names the file or the weights.
pub fn tensors_finite(origin: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        ensure!(
            bad == 0,
            "{origin}: tensor {name} holds {bad} NaN/inf values of {} (diverged or corrupted weights)",
            v.len()
        );
    }
    Ok(())
}

/// The physical constants of a checkpoint's `config.json` (a hand-edited `sigma_data = 0` would
/// make every sample NaN).
pub fn model_config(origin: &str, m: &graphs::ModelConfig) -> Result<()> {
    // A diffusers config holds JSON nulls, which TOML cannot: its numbers come from JSON, finite.
    all_finite(origin, &m.parameterisation)?;
    match &m.network {
        graphs::NetworkConfig::Unet(u) => all_finite(origin, u).and_then(|_| unet(u)),
        n => n.validate(),
    }
    .with_context(|| format!("{origin}: model"))?;
    if let graphs::Parameterisation::Edm(e) = &m.parameterisation {
        positive("sigma_data", e.sigma_data, 1e3)?;
        positive("sigma_min", e.sigma_min, 1e3)?;
        positive("sigma_max", e.sigma_max, 1e5)?;
        positive("rho", e.rho, 1e3)?;
        ensure!(
            e.sigma_min < e.sigma_max,
            "{origin}: sigma_min {} must be below sigma_max {}",
            e.sigma_min,
            e.sigma_max
        );
    }
    Ok(())
}

static VERIFY_WEIGHTS: AtomicBool = AtomicBool::new(true);

/// Turns the sha256 check of `model.safetensors` against `config.json` off (`--no-verify`, for
/// hand-edited weights).
pub fn set_verify_weights(on: bool) {
    VERIFY_WEIGHTS.store(on, Ordering::Relaxed);
}

pub fn verify_weights() -> bool {
    VERIFY_WEIGHTS.load(Ordering::Relaxed)
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    export::sha256_hex(bytes)
}
