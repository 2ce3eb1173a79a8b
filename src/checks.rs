//! Input validation at the edge: every config field range-checked with a message naming it, a
//! memory estimate before anything large is allocated, labels against `num_classes`, finite
//! weights, and whether a `--resume` may continue a run with the inputs it is given now.
//!
//! Everything here only reads; callers invoke one function where a config is resolved or a run
//! is resumed.

use crate::data::Dataset;
use crate::train::optim::AdamWConfig;
use crate::train::RunDir;
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

/// An optimiser's fields; `name` is the TOML table (`optim`, `student_optim`, ...).
pub fn optim(name: &str, o: &AdamWConfig) -> Result<()> {
    positive(&format!("{name}.lr"), o.lr, 10.0)?;
    in_range(&format!("{name}.beta1"), o.beta1, 0.0, 0.999_999)?;
    in_range(&format!("{name}.beta2"), o.beta2, 0.0, 0.999_999_9)?;
    positive(&format!("{name}.eps"), o.eps, 1.0)?;
    in_range(&format!("{name}.weight_decay"), o.weight_decay, 0.0, 10.0)?;
    in_range(&format!("{name}.grad_clip"), o.grad_clip, 0.0, 1e6)?;
    in_range(&format!("{name}.min_lr_ratio"), o.min_lr_ratio, 0.0, 1.0)?;
    Ok(())
}

/// A classifier-free guidance scale (1 = off).
pub fn cfg_scale(name: &str, v: f64) -> Result<()> {
    in_range(name, v, 0.0, 100.0)
}

/// A teacher config, including a memory estimate of one training step.
pub fn teacher(c: &crate::train::teacher::TeacherConfig) -> Result<()> {
    all_finite("teacher config", c)?;
    unet(&c.model)?;
    c.validate()?;
    size("steps", c.steps, 1, 1_000_000_000)?;
    size("batch_size", c.batch_size as u64, 1, 65_536)?;
    size("sample_steps", c.sample_steps as u64, 1, 1000)?;
    cfg_scale("cfg_scale", c.cfg_scale)?;
    optim("optim", &c.optim)?;
    memory(
        &format!(
            "training at batch {} and resolution {}",
            c.batch_size, c.model.resolution
        ),
        training_bytes(&c.model, c.batch_size),
    )
}

/// The cadence fields shared by the distillation trainers (`[run]`).
pub fn run_config(r: &crate::train::distill::RunConfig) -> Result<()> {
    r.validate()?;
    size("run.steps", r.steps, 1, 1_000_000_000)?;
    size("run.batch_size", r.batch_size as u64, 1, 65_536)?;
    in_range("run.ema_decay", r.ema_decay, 0.0, 0.999_999)
}

/// A DMD2 config.
pub fn dmd2(c: &crate::train::dmd2::Dmd2Config) -> Result<()> {
    all_finite("dmd2 config", c)?;
    run_config(&c.run)?;
    ensure!(!c.timesteps.is_empty(), "timesteps must not be empty");
    if let Some(s) = c.conditioning_sigma {
        positive("conditioning_sigma", s, 1e4)?;
    }
    size(
        "dfake_gen_update_ratio",
        c.dfake_gen_update_ratio,
        1,
        1_000_000,
    )?;
    in_range("min_step", c.min_step, 0.0, 1.0)?;
    in_range("max_step", c.max_step, 0.0, 1.0)?;
    ensure!(
        c.min_step < c.max_step,
        "min_step {} must be below max_step {}",
        c.min_step,
        c.max_step
    );
    cfg_scale("cfg_scale (formerly real_guidance_scale)", c.cfg_scale)?;
    in_range("gan_generator_weight", c.gan_generator_weight, 0.0, 1e3)?;
    in_range("gan_critic_weight", c.gan_critic_weight, 0.0, 1e3)?;
    optim("student_optim", &c.student_optim)?;
    optim("fake_optim", &c.fake_optim)
}

/// A TDM config.
pub fn tdm(c: &crate::train::tdm::TdmConfig) -> Result<()> {
    all_finite("tdm config", c)?;
    run_config(&c.run)?;
    ensure!(!c.timesteps.is_empty(), "timesteps must not be empty");
    cfg_scale("cfg_scale", c.cfg_scale)?;
    positive("huber_c", c.huber_c, 1e3)?;
    positive("min_snr_gamma", c.min_snr_gamma, 1e6)?;
    size("update_fake_every", c.update_fake_every, 1, 1_000_000)?;
    size("grad_accum", c.grad_accum as u64, 1, 4096)?;
    optim("student_optim", &c.student_optim)?;
    optim("fake_optim", &c.fake_optim)
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

const INPUTS_FILE: &str = "inputs.json";

/// What identifies a dataset for `--resume`: its source, size, shape and a hash of its labels
/// and pixels.
pub fn data_fingerprint(data: &Dataset) -> serde_json::Value {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for l in &data.labels {
        h.update(l.to_le_bytes());
    }
    for x in &data.images {
        h.update(x.to_le_bytes());
    }
    serde_json::json!({
        "source": data.source,
        "len": data.len(),
        "shape": [data.channels, data.height, data.width],
        "sha256": format!("{:x}", h.finalize()),
    })
}

/// Whether `--resume` may continue the run in `run` with this config and data.
///
/// Always refused: a step target below the step the run already reached (it would "finish"
/// without training and rewrite the config). Refused unless `allow_change`: a different data set
/// or any config field besides the step target, cadence and precision. A fresh run records its
/// data here; `--resume` of a run without a record (older runs) checks the config only.
pub fn resume(
    run: &RunDir,
    state_file: &str,
    config_toml: &str,
    data: Option<&Dataset>,
    resume: bool,
    allow_change: bool,
) -> Result<()> {
    let state = run.checkpoint().join(state_file);
    let inputs = run.root.join(INPUTS_FILE);
    let record = serde_json::json!({ "data": data.map(data_fingerprint) });
    if !state.exists() {
        // A fresh run (or one killed before its first checkpoint): record what it trains on.
        return crate::fsio::write_atomic(&inputs, record.to_string().as_bytes());
    }
    if !resume {
        // The trainer refuses to overwrite an existing run.
        return Ok(());
    }
    let bytes = std::fs::read(&state).with_context(|| format!("reading {}", state.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: bad header", state.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let step: u64 = meta
        .get("step")
        .with_context(|| format!("{} lacks its step", state.display()))?
        .parse()
        .with_context(|| format!("{}: bad step", state.display()))?;
    let new: toml::Value = toml::from_str(config_toml)?;
    let target = step_target(&new);
    if let Some(t) = target {
        ensure!(
            t >= step,
            "--resume: the run in {} is already at step {step}; a step target of {t} is below it (nothing is trained and nothing was changed; pass --steps {step} or more)",
            run.root.display()
        );
    }
    if allow_change {
        return Ok(());
    }
    if let Some(saved) = meta.get("config") {
        let saved: toml::Value = toml::from_str(saved)
            .with_context(|| format!("{}: bad saved config", state.display()))?;
        let changed = changed_fields("", &strip(saved), &strip(new.clone()));
        ensure!(
            changed.is_empty(),
            "--resume: the run in {} was started with a different configuration ({}); pass --allow-resume-change to continue it anyway, or start a new run with another --out",
            run.root.display(),
            changed.join(", ")
        );
    }
    if let (Some(data), Ok(text)) = (data, std::fs::read_to_string(&inputs)) {
        let saved: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", inputs.display()))?;
        let now = data_fingerprint(data);
        if !saved["data"].is_null() && saved["data"] != now {
            bail!(
                "--resume: the run in {} was trained on {} ({} images) but is now given {} ({} images, other contents); pass --allow-resume-change to continue on the new data anyway",
                run.root.display(),
                saved["data"]["source"].as_str().unwrap_or("?"),
                saved["data"]["len"],
                data.source,
                data.len()
            );
        }
    }
    Ok(())
}

/// The step target of a teacher (`steps`) or distillation (`run.steps`) config.
fn step_target(cfg: &toml::Value) -> Option<u64> {
    cfg.get("steps")
        .or_else(|| cfg.get("run").and_then(|r| r.get("steps")))
        .and_then(|v| v.as_integer())
        .map(|v| v as u64)
}

/// A config without the fields a resume may change: step target, cadence, precision.
fn strip(mut v: toml::Value) -> toml::Value {
    const FREE: [&str; 9] = [
        "steps",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "eval_every",
        "eval_n",
        "precision",
        "loss_scale",
        "decay_steps",
    ];
    fn go(v: &mut toml::Value) {
        if let toml::Value::Table(t) = v {
            for k in FREE {
                t.remove(k);
            }
            t.iter_mut().for_each(|(_, v)| go(v));
        }
    }
    go(&mut v);
    v
}

fn changed_fields(path: &str, a: &toml::Value, b: &toml::Value) -> Vec<String> {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => changed_fields(&p, u, v),
                        _ => vec![p],
                    }
                })
                .collect()
        }
        _ if a == b => vec![],
        _ => vec![format!("{path}: {a} -> {b}")],
    }
}

pub use crate::fsio::clean_stale_temps;
