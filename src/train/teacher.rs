//! Teacher training: the EDM denoising loss (log-normal sigma, lambda(sigma) weighting) or the VP
//! epsilon loss, label dropout for classifier-free guidance, AdamW with warm-up and clipping, and an
//! EMA of the weights (the EMA is what sampling, distillation and export use).

use super::distill::{finite, Trainable};
use super::optim::{AdamWConfig, LossScaleConfig, Precision};
use super::runner::{self, Method, RunConfig, RunSpec, StepMetrics};
pub use super::{denoiser_from, vars_to_tensors};
use super::{seeded_init, DataOrder, RunDir};
use crate::checkpoint::Role;
use crate::data::Dataset;
use crate::rng::SampleRngs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graphs::{
    BetaSchedule, CandleBackend, Denoiser, GeneratorSpec, ModelConfig, Parameterisation, UNetConfig,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Everything that defines a teacher run (the `config.toml` of the run folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    pub model: UNetConfig,
    /// `edm`, `vp` or `flow` (rectified flow, velocity target).
    pub parameterisation: String,
    pub beta_schedule: BetaSchedule,
    /// VP only: what the network predicts (`epsilon`, `v_prediction` or `sample`).
    #[serde(skip_serializing_if = "is_epsilon")]
    pub prediction: graphs::schedulers::Prediction,
    /// Flow only: timestep count, shift and the training draw of `s`.
    #[serde(skip_serializing_if = "is_default_flow")]
    pub flow: graphs::FlowSchedule,
    /// Training iterations in total. (`steps` before; still read, with a deprecation note.)
    #[serde(alias = "steps")]
    pub train_steps: u64,
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
    /// Data-parallel runs: shard the AdamW moments over the ranks (ZeRO-1); may change on resume.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub zero1: bool,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            model: UNetConfig::mnist_small(),
            parameterisation: "edm".into(),
            beta_schedule: BetaSchedule::Linear,
            prediction: Default::default(),
            flow: Default::default(),
            train_steps: 5000,
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
            zero1: false,
        }
    }
}

fn is_epsilon(p: &graphs::schedulers::Prediction) -> bool {
    *p == graphs::schedulers::Prediction::Epsilon
}

fn is_default_flow(f: &graphs::FlowSchedule) -> bool {
    *f == graphs::FlowSchedule::default()
}

impl TeacherConfig {
    pub fn param(&self) -> Result<Parameterisation> {
        if self.parameterisation != "vp" && !is_epsilon(&self.prediction) {
            bail!(
                "prediction {:?} applies to parameterisation vp, not {}",
                self.prediction,
                self.parameterisation
            );
        }
        match self.parameterisation.as_str() {
            "edm" => Ok(Parameterisation::edm()),
            "vp" => {
                let mut p = Parameterisation::vp(self.beta_schedule);
                if let Parameterisation::Vp(v) = &mut p {
                    v.prediction = self.prediction;
                }
                Ok(p)
            }
            "flow" => {
                let f = &self.flow;
                if !(f.shift > 0.0 && f.shift.is_finite()) || f.num_timesteps == 0 {
                    bail!("flow: shift must be positive and num_timesteps at least 1");
                }
                Ok(Parameterisation::Flow(f.clone()))
            }
            other => bail!("unknown parameterisation {other:?} (expected edm, vp or flow)"),
        }
    }
    pub fn model_config(&self) -> Result<ModelConfig> {
        Ok(ModelConfig::ours(self.model.clone(), self.param()?))
    }
    pub fn generator(&self) -> Result<GeneratorSpec> {
        Ok(GeneratorSpec {
            sampler: self.param()?.default_sampler(),
            steps: self.sample_steps,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: self.cfg_scale,
        })
    }
    /// The run-loop settings of this config (the teacher keeps them as top-level TOML fields).
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            train_steps: self.train_steps,
            batch_size: self.batch_size,
            seed: self.seed,
            log_every: self.log_every,
            sample_every: self.sample_every,
            checkpoint_every: self.checkpoint_every,
            eval_every: 0,
            eval_n: 0,
            ema_decay: self.ema_decay,
            precision: self.precision,
            loss_scale: self.loss_scale.clone(),
            zero1: self.zero1,
        }
    }

    /// What a resumed run must agree with: the model, parameterisation, seed and batch size
    /// (the optimiser settings, totals and cadence may change).
    pub fn resume_key(&self) -> Result<String> {
        #[derive(Serialize)]
        struct Key<'a> {
            model: &'a UNetConfig,
            parameterisation: &'a str,
            seed: u64,
            batch_size: usize,
        }
        Ok(toml::to_string(&Key {
            model: &self.model,
            parameterisation: &self.parameterisation,
            seed: self.seed,
            batch_size: self.batch_size,
        })?)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.param()?;
        anyhow::ensure!(
            self.batch_size > 0 && self.train_steps > 0,
            "train_steps and batch_size must be positive"
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
    let vars = seeded_init(&varmap, seed, 0x1417, device)?;
    Ok((varmap, den, vars))
}

/// Result of a finished (or resumed and finished) run.
#[derive(Debug)]
pub struct TeacherOutcome {
    pub checkpoint: std::path::PathBuf,
    pub final_loss: f64,
    pub train_steps: u64,
    pub seconds: f64,
}

/// Teacher training as a [`Method`] of the shared runner: the denoising loss on real data.
pub struct TeacherMethod<'a> {
    cfg: TeacherConfig,
    mcfg: ModelConfig,
    data: &'a Dataset,
    den: Denoiser,
    net: Trainable,
    order: DataOrder,
    device: Device,
    last_norm: f64,
    _varmap: VarMap,
}

impl<'a> TeacherMethod<'a> {
    pub fn new(cfg: &TeacherConfig, data: &'a Dataset, device: &Device) -> Result<Self> {
        let mcfg = cfg.model_config()?;
        let (varmap, den, vars) = init_trainable(&mcfg, cfg.seed, device)?;
        let net = Trainable::new("model", vars, cfg.optim.clone())?
            .with_precision(cfg.precision, &cfg.loss_scale);
        Ok(Self {
            cfg: cfg.clone(),
            mcfg,
            data,
            den,
            net,
            order: DataOrder::new(data.len(), cfg.seed),
            device: device.clone(),
            last_norm: 0.0,
            _varmap: varmap,
        })
    }
}

impl Method for TeacherMethod<'_> {
    const ROLE: Role = Role::Teacher;

    fn name(&self) -> &'static str {
        "teacher"
    }

    fn step(&mut self, step: u64) -> Result<StepMetrics> {
        let (cfg, device) = (&self.cfg, &self.device);
        let b = CandleBackend::training(device).with_autocast(cfg.precision.autocast());
        // This rank's slice of the global batch; every per-sample draw from its sample's stream.
        let range = crate::parallel::shard(cfg.batch_size)?;
        let idx = self.order.batch(step, cfg.batch_size)[range.clone()].to_vec();
        let (x0, labels) = self.data.batch(&idx, device)?;
        let mut rngs = SampleRngs::new(cfg.seed, step, 1, range);
        let n = idx.len();
        let null = self.cfg.model.num_classes as u32;
        let dropped = rngs.each(|r| r.gen::<f64>() < cfg.label_dropout);
        let labels: Vec<u32> = labels
            .to_vec1::<u32>()?
            .into_iter()
            .zip(dropped)
            .map(|(l, d)| if d { null } else { l })
            .collect();
        let labels = Tensor::from_vec(labels, n, device)?;
        let param = &self.mcfg.parameterisation;
        let noise_cond =
            graphs::TrainingLevel::concat(rngs.each(|r| param.draw_training_level(r, 1)))
                .context("empty batch slice")?
                .to_tensor(device)?;
        let noise = rngs.randn(&x0.dims()[1..], device)?;
        let loss = graphs::losses::teacher_loss(&b, &self.den, &x0, &labels, &noise_cond, &noise)?;
        let lv = finite("loss", &loss)?;
        if let Some(st) = self.net.update(&loss)? {
            self.last_norm = st.grad_norm;
        }
        Ok(StepMetrics::from([("loss".to_string(), lv)]))
    }

    fn gauges(&self) -> StepMetrics {
        let opt = &self.net.opt;
        let mut g = StepMetrics::from([
            ("grad_norm".to_string(), self.last_norm),
            ("lr".to_string(), opt.lr_at(opt.t.saturating_sub(1))),
        ]);
        if let Some(s) = &self.net.scaler {
            g.insert("loss_scale".into(), s.scale);
            g.insert("skipped_steps".into(), s.skipped as f64);
        }
        g
    }

    fn student_vars(&self) -> &[(String, Var)] {
        self.net.vars()
    }
    fn student_updates(&self) -> u64 {
        self.net.opt.t
    }
    /// The teacher's EMA warms up over iterations, not updates (fp16 may skip some).
    fn ema_step(&self, step: u64, updates_before: u64) -> Option<u64> {
        (self.student_updates() > updates_before).then_some(step)
    }
    fn trainables(&mut self) -> Vec<&mut Trainable> {
        vec![&mut self.net]
    }
    fn save_state(&self, t: &mut HashMap<String, Tensor>, meta: &mut HashMap<String, String>) {
        self.net.save(t, meta);
    }
    fn load_state(
        &mut self,
        t: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<()> {
        self.net.load(t, meta)
    }
    /// Layout 1 (the teacher's own loop): moments as `adam.{m,v}.<name>`, metadata `adam_t` and
    /// `scaler.*`, no resume key (derived from the stored config).
    fn upgrade_state(
        &self,
        _version: u32,
        tensors: &mut HashMap<String, Tensor>,
        meta: &mut HashMap<String, String>,
    ) -> Result<()> {
        let keys: Vec<String> = tensors.keys().cloned().collect();
        for k in keys {
            if let Some(rest) = k.strip_prefix("adam.") {
                if rest.starts_with("m.") || rest.starts_with("v.") {
                    let t = tensors.remove(&k).expect("listed");
                    tensors.insert(format!("adam.model.{rest}"), t);
                }
            }
        }
        let t = meta
            .remove("adam_t")
            .context("training state lacks adam_t")?;
        meta.insert("adam_t.model".into(), t);
        let scaler: Vec<String> = meta
            .keys()
            .filter(|k| k.starts_with("scaler."))
            .cloned()
            .collect();
        for k in scaler {
            let v = meta.remove(&k).expect("listed");
            meta.insert(k.replacen("scaler.", "scaler.model.", 1), v);
        }
        let saved: TeacherConfig = toml::from_str(
            meta.get("config")
                .context("training state lacks its config")?,
        )
        .context("parsing the training state's config")?;
        meta.insert("resume_key".into(), saved.resume_key()?);
        Ok(())
    }
    fn spec(&self) -> GeneratorSpec {
        self.cfg.generator().expect("validated config")
    }
    fn model_config(&self) -> ModelConfig {
        self.mcfg.clone()
    }
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
    let mut method = TeacherMethod::new(cfg, data, device)?;
    let rc = cfg.run_config();
    let rs = RunSpec {
        cfg: &rc,
        config_toml: toml::to_string(cfg)?,
        resume_key: cfg.resume_key()?,
        rekey: Some(&|t: &str| toml::from_str::<TeacherConfig>(t)?.resume_key()),
        teacher: None,
        resume,
        show_progress,
        evaluator: None,
        device,
    };
    let out = runner::run(&mut method, &rs, run)?;
    Ok(TeacherOutcome {
        checkpoint: out.checkpoint,
        final_loss: out.last.get("loss").copied().unwrap_or(f64::NAN),
        train_steps: out.train_steps,
        seconds: out.seconds,
    })
}
