//! Checks of the training configs (every field range-checked with a message naming it) and
//! whether a `--resume` may continue a run with the inputs it is given now.

use super::optim::AdamWConfig;
use super::RunDir;
use crate::checks::{
    all_finite, cfg_scale, in_range, memory, positive, size, training_bytes, unet,
};
use crate::data::Dataset;
use anyhow::{bail, ensure, Context, Result};

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

/// A teacher config, including a memory estimate of one training step.
pub fn teacher(c: &crate::train::teacher::TeacherConfig) -> Result<()> {
    all_finite("teacher config", c)?;
    unet(&c.model)?;
    c.validate()?;
    size("train_steps", c.train_steps, 1, 1_000_000_000)?;
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
    size("run.train_steps", r.train_steps, 1, 1_000_000_000)?;
    size("run.batch_size", r.batch_size as u64, 1, 65_536)?;
    in_range("run.ema_decay", r.ema_decay, 0.0, 0.999_999)
}

/// What every distillation config shares.
pub fn distill_common(c: &crate::train::distill::DistillCommon) -> Result<()> {
    run_config(&c.run)?;
    ensure!(!c.timesteps.is_empty(), "timesteps must not be empty");
    cfg_scale("cfg_scale", c.cfg_scale)?;
    optim("student_optim", &c.student_optim)?;
    optim("fake_optim", &c.fake_optim)
}

/// A DMD2 config.
pub fn dmd2(c: &crate::train::dmd2::Dmd2Config) -> Result<()> {
    all_finite("dmd2 config", c)?;
    distill_common(&c.common)?;
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
    in_range("gan_generator_weight", c.gan_generator_weight, 0.0, 1e3)?;
    in_range("gan_critic_weight", c.gan_critic_weight, 0.0, 1e3)
}

/// A TDM config.
pub fn tdm(c: &crate::train::tdm::TdmConfig) -> Result<()> {
    all_finite("tdm config", c)?;
    distill_common(&c.common)?;
    positive("huber_c", c.huber_c, 1e3)?;
    positive("min_snr_gamma", c.min_snr_gamma, 1e6)?;
    size("update_fake_every", c.update_fake_every, 1, 1_000_000)?;
    size("grad_accum", c.grad_accum as u64, 1, 4096)
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
/// or any config field besides the step target, cadence, precision and `zero1`. A fresh run records its
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

/// The step target of a teacher (`train_steps`) or distillation (`run.train_steps`) config
/// (`steps` in runs written before the rename).
fn step_target(cfg: &toml::Value) -> Option<u64> {
    let get = |t: &toml::Value| t.get("train_steps").or_else(|| t.get("steps")).cloned();
    get(cfg)
        .or_else(|| cfg.get("run").and_then(get))
        .and_then(|v| v.as_integer())
        .map(|v| v as u64)
}

/// A config without the fields a resume may change: step target, cadence, precision.
/// The fields (besides the step target, cadence and precision) in which the finished run in
/// `run` (its `config.toml`) differs from `config_toml`; empty when it is the same run.
pub fn config_changes(run: &RunDir, config_toml: &str) -> Result<Vec<String>> {
    let path = run.config();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let saved: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let new: toml::Value = toml::from_str(config_toml)?;
    Ok(changed_fields("", &strip(before_keys(saved)), &strip(new)))
}

/// Top-level keys added after runs were written, with the value that names what a run written
/// before them did (a key whose default changed the behaviour, like `phased`, is not here: its
/// absence is a change).
fn before_keys(mut saved: toml::Value) -> toml::Value {
    if let toml::Value::Table(t) = &mut saved {
        for (k, v) in [
            ("gan_classifier_weight", toml::Value::Float(0.0)),
            ("gan_classifier_max_timestep", toml::Value::Integer(250)),
            (
                "gan_classifier_misclassified_only",
                toml::Value::Boolean(true),
            ),
            ("f_divergence", toml::Value::String("reverse_kl".into())),
        ] {
            t.entry(k).or_insert(v);
        }
    }
    saved
}

fn strip(mut v: toml::Value) -> toml::Value {
    const FREE: [&str; 11] = [
        "train_steps",
        "steps",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "eval_every",
        "eval_n",
        "precision",
        "loss_scale",
        "decay_steps",
        // ZeRO-1 changes where the moments live during training, not what a checkpoint holds.
        "zero1",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dmd2::Dmd2Config;

    /// The pipeline reuses a finished stage only when this finds no change: a changed default
    /// (`phased`), a missing key (a run of older defaults) and a changed value are all named;
    /// cadence and step totals are not changes.
    #[test]
    fn config_changes_names_what_differs_from_a_finished_run() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path()).unwrap();
        let mut cfg = Dmd2Config::default();
        cfg.common.timesteps = vec![999, 749, 499, 249];
        let saved = toml::to_string(&cfg).unwrap();
        std::fs::write(run.config(), &saved).unwrap();
        assert!(config_changes(&run, &saved).unwrap().is_empty());
        let mut longer = cfg.clone();
        longer.common.run.train_steps += 100;
        longer.common.run.eval_every = 7;
        let t = toml::to_string(&longer).unwrap();
        assert!(config_changes(&run, &t).unwrap().is_empty());
        let mut other = cfg.clone();
        other.phased = false;
        other.common.cfg_interval = Some([0.3, 5.0]);
        let ch = config_changes(&run, &toml::to_string(&other).unwrap()).unwrap();
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(
            ch.iter().any(|c| c.starts_with("phased: true -> false")),
            "{ch:?}"
        );
        assert!(ch.iter().any(|c| c == "cfg_interval"), "{ch:?}");
        // A run written before `phased` existed differs from today's default by that key.
        let old: String = saved
            .lines()
            .filter(|l| !l.starts_with("phased"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(run.config(), old).unwrap();
        assert_eq!(
            config_changes(&run, &saved).unwrap(),
            vec!["phased".to_string()]
        );
        // One written before the GAN classifier existed trained without it: the same run, unless
        // the classifier is asked for now.
        let no_cls: String = saved
            .lines()
            .filter(|l| !l.starts_with("gan_classifier"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(no_cls.len() < saved.len());
        std::fs::write(run.config(), no_cls).unwrap();
        assert!(config_changes(&run, &saved).unwrap().is_empty());
        let mut cls = cfg.clone();
        cls.gan_classifier_weight = 0.1;
        let ch = config_changes(&run, &toml::to_string(&cls).unwrap()).unwrap();
        assert_eq!(ch.len(), 1, "{ch:?}");
    }
}
