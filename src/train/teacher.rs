//! Teacher training: the EDM denoising loss (log-normal sigma, lambda(sigma) weighting) or the VP
//! epsilon loss, label dropout for classifier-free guidance, AdamW with warm-up and clipping, and an
//! EMA of the weights (the EMA is what sampling, distillation and export use).

use super::optim::{AdamW, AdamWConfig, Ema, LossScaleConfig, LossScaler, Precision};
use super::{check_finite, progress_bar, randn, step_rng, DataOrder, MetricsLog, RunDir};
use crate::checkpoint::{self, CheckpointMeta, Role};
use crate::data::Dataset;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graphs::{
    BetaSchedule, CandleBackend, Denoiser, GeneratorSpec, ModelConfig, Parameterisation,
    SamplerKind, UNetConfig,
};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

pub const TRAIN_STATE_FILE: &str = "train_state.safetensors";

/// Everything that defines a teacher run (the `config.toml` of the run folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    pub model: UNetConfig,
    /// `edm` or `vp`.
    pub parameterisation: String,
    pub beta_schedule: BetaSchedule,
    pub steps: u64,
    pub batch_size: usize,
    pub optim: AdamWConfig,
    pub ema_decay: f64,
    /// Probability of replacing a label by the null class (trains the unconditional model for CFG).
    pub label_dropout: f64,
    pub seed: u64,
    pub log_every: u64,
    pub sample_every: u64,
    pub checkpoint_every: u64,
    /// Heun steps for the sample grids and the checkpoint's default sampler.
    pub sample_steps: usize,
    /// CFG scale for the sample grids and the checkpoint's default sampler.
    pub cfg_scale: f64,
    /// `fp32`, `fp16` (autocast + dynamic loss scaling) or `bf16` (autocast); weights, optimiser
    /// state and checkpoints stay f32, so a run may resume in another precision.
    pub precision: Precision,
    pub loss_scale: LossScaleConfig,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            model: UNetConfig::mnist_small(),
            parameterisation: "edm".into(),
            beta_schedule: BetaSchedule::Linear,
            steps: 5000,
            batch_size: 32,
            optim: AdamWConfig {
                lr: 1e-3,
                warmup_steps: 100,
                grad_clip: 1.0,
                ..Default::default()
            },
            ema_decay: 0.999,
            label_dropout: 0.1,
            seed: 0,
            log_every: 25,
            sample_every: 500,
            checkpoint_every: 100,
            sample_steps: 18,
            cfg_scale: 2.0,
            precision: Precision::Fp32,
            loss_scale: LossScaleConfig::default(),
        }
    }
}

impl TeacherConfig {
    pub fn param(&self) -> Result<Parameterisation> {
        match self.parameterisation.as_str() {
            "edm" => Ok(Parameterisation::edm()),
            "vp" => Ok(Parameterisation::vp(self.beta_schedule)),
            other => bail!("unknown parameterisation {other:?} (expected edm or vp)"),
        }
    }
    pub fn model_config(&self) -> Result<ModelConfig> {
        Ok(ModelConfig {
            unet: self.model.clone(),
            parameterisation: self.param()?,
        })
    }
    pub fn generator(&self) -> Result<GeneratorSpec> {
        let sampler = if self.parameterisation == "vp" {
            SamplerKind::Ddim
        } else {
            SamplerKind::Heun
        };
        Ok(GeneratorSpec {
            sampler,
            steps: self.sample_steps,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: self.cfg_scale,
        })
    }
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.param()?;
        anyhow::ensure!(
            self.batch_size > 0 && self.steps > 0,
            "steps and batch_size must be positive"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.label_dropout),
            "label_dropout must be in [0, 1)"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "ema_decay must be in [0, 1)"
        );
        anyhow::ensure!(
            self.log_every > 0 && self.checkpoint_every > 0,
            "log_every and checkpoint_every must be positive"
        );
        Ok(())
    }
}

/// Builds a trainable network, initialised deterministically from `seed` (candle's own
/// initialisers draw from an unseeded RNG).
pub fn init_trainable(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, Denoiser, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    let den = Denoiser::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let params = graphs::params::collect(&den);
    let shapes: HashMap<String, Vec<usize>> = params
        .iter()
        .map(|p| (p.name.clone(), p.dims().to_vec()))
        .collect();
    let mut rng = step_rng(seed, 0, 0x1417);
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let is_norm = parent
            .rsplit('.')
            .next()
            .is_some_and(|p| p.starts_with("norm"));
        let values: Vec<f32> = if parent.ends_with("label_emb") {
            (0..n)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        } else if is_norm {
            vec![if leaf == "weight" { 1.0 } else { 0.0 }; n]
        } else {
            let wdims = if leaf == "bias" {
                shapes
                    .get(&format!("{parent}.weight"))
                    .cloned()
                    .unwrap_or(dims.clone())
            } else {
                dims.clone()
            };
            let fan_in: usize = wdims.iter().skip(1).product::<usize>().max(1);
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-b..b)).collect()
        };
        var.set(&Tensor::from_vec(values, dims, device)?)?;
    }
    Ok((varmap, den, vars))
}

pub fn vars_to_tensors(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Result of a finished (or resumed and finished) run.
#[derive(Debug)]
pub struct TeacherOutcome {
    pub checkpoint: std::path::PathBuf,
    pub final_loss: f64,
    pub steps: u64,
    pub seconds: f64,
}

#[derive(Serialize)]
struct Record {
    step: u64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    it_per_s: f64,
    elapsed_s: f64,
    /// fp16 only: the dynamic loss scale and the steps skipped for inf/NaN gradients so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped_steps: Option<u64>,
}

/// Builds a denoiser for inference from a tensor map (EMA weights).
pub fn denoiser_from(
    cfg: &ModelConfig,
    w: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Denoiser> {
    checkpoint::denoiser_from_tensors(cfg, w, device, "in-memory weights")
}

/// Writes the inference checkpoint (EMA) and the resume state (raw weights, AdamW moments, EMA, step).
pub fn save_run(
    run: &RunDir,
    cfg: &TeacherConfig,
    step: u64,
    vars: &[(String, Var)],
    opt: &AdamW,
    ema: &Ema,
    scaler: Option<&LossScaler>,
) -> Result<()> {
    let dir = run.checkpoint();
    let mut state: HashMap<String, Tensor> = vars_to_tensors(vars)
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    state.extend(opt.state());
    state.extend(
        ema.tensors()
            .into_iter()
            .map(|(k, v)| (format!("ema.{k}"), v)),
    );
    let mut meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("adam_t".to_string(), opt.t.to_string()),
        ("config".to_string(), toml::to_string(cfg)?),
    ]);
    if let Some(s) = scaler {
        s.save("scaler", &mut meta);
    }
    checkpoint::write_atomic(
        &dir.join(TRAIN_STATE_FILE),
        &checkpoint::safetensors_bytes_with_meta(&state, Some(meta))?,
    )?;
    let m = CheckpointMeta::new(Role::Teacher, cfg.model_config()?, cfg.generator()?, step);
    checkpoint::save(&dir, &m, &ema.tensors())
}

/// Trains (or, with `resume`, continues) a teacher in `run`.
pub fn train(
    cfg: &TeacherConfig,
    data: &Dataset,
    run: &RunDir,
    resume: bool,
    show_progress: bool,
    device: &Device,
) -> Result<TeacherOutcome> {
    cfg.validate()?;
    let m = &cfg.model;
    if data.channels != m.channels || data.height != m.resolution || data.width != m.resolution {
        bail!(
            "data {} is {}x{}x{} but the model expects {}x{}x{} (channels x height x width)",
            data.source,
            data.channels,
            data.height,
            data.width,
            m.channels,
            m.resolution,
            m.resolution
        );
    }
    if let Some(&bad) = data.labels.iter().find(|&&l| l as usize >= m.num_classes) {
        bail!(
            "data {} has label {bad} but the model has {} classes",
            data.source,
            m.num_classes
        );
    }
    let mcfg = cfg.model_config()?;
    let (_varmap, den, vars) = init_trainable(&mcfg, cfg.seed, device)?;
    let mut opt = AdamW::new(vars.clone(), cfg.optim.clone())?;
    let vars = opt.vars.clone();
    let mut ema = Ema::new(&vars, cfg.ema_decay)?;
    let mut scaler = cfg
        .precision
        .needs_loss_scaling()
        .then(|| LossScaler::new(cfg.loss_scale.clone()));
    let mut start = 0u64;
    let state_path = run.checkpoint().join(TRAIN_STATE_FILE);
    if resume {
        let (state, meta) =
            checkpoint::load_tensors_with_meta(&state_path, device).with_context(|| {
                format!(
                    "--resume: no usable training state in {}",
                    run.checkpoint().display()
                )
            })?;
        let saved_cfg: TeacherConfig = toml::from_str(
            meta.get("config")
                .context("training state lacks its config")?,
        )?;
        if saved_cfg.model != cfg.model
            || saved_cfg.parameterisation != cfg.parameterisation
            || saved_cfg.seed != cfg.seed
            || saved_cfg.batch_size != cfg.batch_size
        {
            bail!("--resume: the run in {} was started with a different model, parameterisation, seed or batch size", run.root.display());
        }
        start = meta
            .get("step")
            .context("training state lacks its step")?
            .parse()?;
        let adam_t: u64 = meta
            .get("adam_t")
            .context("training state lacks adam_t")?
            .parse()?;
        for (n, v) in &vars {
            let t = state
                .get(&format!("model.{n}"))
                .with_context(|| format!("training state lacks model.{n}"))?;
            v.set(t)?;
        }
        opt.load_state(&state, adam_t)?;
        let ema_w: HashMap<String, Tensor> = state
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("ema.").map(|n| (n.to_string(), v.clone())))
            .collect();
        ema.load(&ema_w)?;
        if let Some(s) = &mut scaler {
            s.load("scaler", &meta)?;
        }
    } else if state_path.exists() {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            run.root.display()
        );
    }
    checkpoint::write_atomic(&run.config(), toml::to_string(cfg)?.as_bytes())?;
    let mut log = MetricsLog::open(&run.metrics(), resume.then_some(start))?;
    let mut order = DataOrder::new(data.len(), cfg.seed);
    let b = CandleBackend::training(device).with_autocast(cfg.precision.autocast());
    let param = mcfg.parameterisation.clone();
    let pb = progress_bar(cfg.steps, start, show_progress, "teacher");
    let t0 = Instant::now();
    let (mut acc_loss, mut acc_n, mut last_loss) = (0.0, 0u64, f64::NAN);
    let mut last_log = Instant::now();
    let mut last_norm = 0.0;
    for step in start..cfg.steps {
        let idx = order.batch(step, cfg.batch_size);
        let (x0, labels) = data.batch(&idx, device)?;
        let mut rng = step_rng(cfg.seed, step, 1);
        let n = idx.len();
        let labels: Vec<u32> = labels
            .to_vec1::<u32>()?
            .into_iter()
            .map(|l| {
                if rng.gen::<f64>() < cfg.label_dropout {
                    m.num_classes as u32
                } else {
                    l
                }
            })
            .collect();
        let labels = Tensor::from_vec(labels, n, device)?;
        let noise_cond = match &param {
            Parameterisation::Edm(e) => {
                let s: Vec<f32> = (0..n)
                    .map(|_| {
                        (e.p_mean + e.p_std * rng.sample::<f64, _>(StandardNormal)).exp() as f32
                    })
                    .collect();
                Tensor::from_vec(s, n, device)?
            }
            Parameterisation::Vp(v) => {
                let t: Vec<u32> = (0..n)
                    .map(|_| rng.gen_range(0..v.num_timesteps as u32))
                    .collect();
                Tensor::from_vec(t, n, device)?
            }
        };
        let noise = randn(&mut rng, x0.dims(), device)?;
        let loss = graphs::losses::teacher_loss(&b, &den, &x0, &labels, &noise_cond, &noise)?;
        let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        check_finite("loss", lv, step, &run.checkpoint())?;
        let grads = match &scaler {
            Some(s) => s.scale_loss(&loss)?.backward()?,
            None => loss.backward()?,
        };
        let g = opt.grads_of(&grads);
        let stats =
            super::optim::precision_step(&mut opt, scaler.as_mut(), g).with_context(|| {
                format!(
                    "the last good checkpoint is kept in {}",
                    run.checkpoint().display()
                )
            })?;
        if let Some(st) = &stats {
            ema.update(&vars, step)?;
            last_norm = st.grad_norm;
        }
        acc_loss += lv;
        acc_n += 1;
        let done = step + 1;
        pb.set_position(done);
        if done % cfg.log_every == 0 || done == cfg.steps {
            last_loss = acc_loss / acc_n as f64;
            let rate = acc_n as f64 / last_log.elapsed().as_secs_f64();
            log.write(&Record {
                step: done,
                loss: last_loss,
                grad_norm: last_norm,
                lr: opt.lr_at(opt.t.saturating_sub(1)),
                it_per_s: rate,
                elapsed_s: t0.elapsed().as_secs_f64(),
                loss_scale: scaler.as_ref().map(|s| s.scale),
                skipped_steps: scaler.as_ref().map(|s| s.skipped),
            })?;
            pb.set_message(format!("loss {last_loss:.4}"));
            (acc_loss, acc_n, last_log) = (0.0, 0, Instant::now());
        }
        if done % cfg.checkpoint_every == 0 || done == cfg.steps {
            save_run(run, cfg, done, &vars, &opt, &ema, scaler.as_ref())?;
        }
        if cfg.sample_every > 0 && (done % cfg.sample_every == 0 || done == cfg.steps) {
            let ema_den = denoiser_from(&mcfg, ema.tensors(), device)?;
            let png = run.samples().join(format!("step_{done:06}.png"));
            crate::sample::class_grid(&ema_den, &cfg.generator()?, 10, cfg.seed, device, &png)?;
        }
    }
    pb.finish_with_message(format!("loss {last_loss:.4} grad-norm {last_norm:.3}"));
    super::distill::write_curves(run)?;
    Ok(TeacherOutcome {
        checkpoint: run.checkpoint(),
        final_loss: last_loss,
        steps: cfg.steps,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
