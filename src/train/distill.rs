//! What the distillation trainers (DMD2 and TDM) share: the frozen teacher, trainable copies of its
//! weights (student, fake score), the guided teacher call, the student's no-grad rollout, and the
//! run loop (resume, metrics, checkpoints, sample grids, in-training evaluation, NaN checks).

use super::optim::{AdamW, AdamWConfig, Ema, LossScaleConfig, LossScaler, Precision, StepStats};
use super::{check_finite, progress_bar, MetricsLog, RunDir};
use crate::checkpoint::{self, CheckpointMeta, Role};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graphs::{CandleBackend, Denoiser, GeneratorSpec, ModelConfig, NoiseGrid, NoiseLevel};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TRAIN_STATE_FILE: &str = "train_state.safetensors";

/// The frozen teacher a student is distilled from (its EMA weights, detached from autograd).
pub struct Teacher {
    pub den: Denoiser,
    pub meta: CheckpointMeta,
    pub dir: PathBuf,
    /// sha256 of the teacher's `model.safetensors` (a resumed run must see the same teacher).
    pub sha256: String,
}

impl Teacher {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (den, meta) = checkpoint::load(dir, device)
            .with_context(|| format!("loading the teacher {}", dir.display()))?;
        if meta.role != Role::Teacher {
            bail!(
                "{} is a {} student, not a teacher: distil from a checkpoint made by `distill train teacher`",
                dir.display(),
                meta.role.name()
            );
        }
        let bytes = std::fs::read(dir.join(checkpoint::WEIGHTS_FILE))?;
        use sha2::Digest;
        let sha256 = format!("{:x}", sha2::Sha256::digest(&bytes));
        Ok(Self {
            den,
            meta,
            dir: dir.to_path_buf(),
            sha256,
        })
    }

    /// The teacher's weights, by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        graphs::params::collect(&self.den)
            .into_iter()
            .map(|p| (p.name, p.t))
            .collect()
    }
}

/// Trainable variables initialised with copies of `weights` (so training never touches the
/// teacher's tensors), and a denoiser of `cfg` built on them.
pub fn trainable_denoiser(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<(Denoiser, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (k, t) in weights {
            data.insert(k.clone(), Var::from_tensor(&t.to_device(device)?.copy()?)?);
        }
    }
    let den = Denoiser::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        vars.len() == weights.len(),
        "the network has {} parameters but {} weights were given",
        vars.len(),
        weights.len()
    );
    Ok((den, vars))
}

/// A trainable network's variables, optimiser and (fp16) loss scaler, saved under `prefix` in the
/// training state.
pub struct Trainable {
    pub prefix: &'static str,
    pub opt: AdamW,
    pub scaler: Option<LossScaler>,
}

impl Trainable {
    pub fn new(prefix: &'static str, vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Ok(Self {
            prefix,
            opt: AdamW::new(vars, cfg)?,
            scaler: None,
        })
    }
    /// Adds a dynamic loss scaler when `precision` needs one (fp16).
    pub fn with_precision(mut self, precision: Precision, cfg: &LossScaleConfig) -> Self {
        self.scaler = precision
            .needs_loss_scaling()
            .then(|| LossScaler::new(cfg.clone()));
        self
    }
    pub fn vars(&self) -> &[(String, Var)] {
        &self.opt.vars
    }
    /// Gradients of `loss` (scaled by the loss scaler, if any) for this network's variables.
    pub fn backward(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = match &self.scaler {
            Some(s) => s.scale_loss(loss)?.backward()?,
            None => loss.backward()?,
        };
        Ok(self.opt.grads_of(&grads))
    }
    /// Applies (possibly accumulated) gradients from [`Self::backward`]: unscales them and skips
    /// the update on inf/NaN under fp16 (`None`), else steps the optimiser.
    pub fn apply(&mut self, grads: Vec<Option<Tensor>>) -> Result<Option<StepStats>> {
        super::optim::precision_step(&mut self.opt, self.scaler.as_mut(), grads)
    }
    /// `backward` then `apply`.
    pub fn update(&mut self, loss: &Tensor) -> Result<Option<StepStats>> {
        let g = self.backward(loss)?;
        self.apply(g)
    }
    /// Records a step's stats (or the skip) as `grad_norm_<name>`, `lr_<name>`, and under fp16
    /// `loss_scale_<name>`, `skipped_<name>`.
    pub fn log(&self, m: &mut StepMetrics, name: &str, st: &Option<StepStats>) {
        let key = |k: &str| format!("{k}_{name}");
        if let Some(st) = st {
            m.insert(key("grad_norm"), st.grad_norm);
            m.insert(key("lr"), st.lr);
        }
        if let Some(s) = &self.scaler {
            m.insert(key("loss_scale"), s.scale);
            m.insert(key("skipped"), s.skipped as f64);
        }
    }
    /// Weights and optimiser moments as `<prefix>.<name>` / `adam.<prefix>.{m,v}.<name>`, and the
    /// update count as metadata `adam_t.<prefix>` (plus the loss scaler's state under fp16).
    pub fn save(&self, tensors: &mut HashMap<String, Tensor>, meta: &mut HashMap<String, String>) {
        for (n, v) in self.vars() {
            tensors.insert(format!("{}.{n}", self.prefix), v.as_tensor().detach());
        }
        tensors.extend(
            self.opt
                .state_with_prefix(&format!("adam.{}.", self.prefix)),
        );
        meta.insert(format!("adam_t.{}", self.prefix), self.opt.t.to_string());
        if let Some(s) = &self.scaler {
            s.save(&format!("scaler.{}", self.prefix), meta);
        }
    }
    pub fn load(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<()> {
        for (n, v) in &self.opt.vars {
            let key = format!("{}.{n}", self.prefix);
            let t = tensors
                .get(&key)
                .with_context(|| format!("training state lacks {key}"))?;
            ensure!(
                t.dims() == v.dims(),
                "training state {key} has shape {:?}, the model needs {:?}",
                t.dims(),
                v.dims()
            );
            v.set(&t.to_device(v.device())?)?;
        }
        let t: u64 = meta
            .get(&format!("adam_t.{}", self.prefix))
            .with_context(|| format!("training state lacks adam_t.{}", self.prefix))?
            .parse()?;
        let prefix = format!("adam.{}.", self.prefix);
        self.opt.load_state_with_prefix(tensors, &prefix, t)?;
        if let Some(s) = &mut self.scaler {
            s.load(&format!("scaler.{}", self.prefix), meta)?;
        }
        Ok(())
    }
}

/// Per-sample noise level `[N]` at grid timesteps `ts`.
pub fn grid_level(grid: &NoiseGrid, ts: &[usize], device: &Device) -> Result<NoiseLevel<Tensor>> {
    let n = ts.len();
    let s: Vec<f32> = ts.iter().map(|&t| grid.sigma(t) as f32).collect();
    let c: Vec<f32> = ts.iter().map(|&t| grid.c_noise(t) as f32).collect();
    Ok(NoiseLevel {
        sigma: Tensor::from_vec(s, n, device)?,
        c_noise: Tensor::from_vec(c, n, device)?,
    })
}

/// Per-sample noise level from explicit sigmas (student steps may sit off the grid, e.g. a
/// conditioning sigma of 80 on a VP teacher's grid).
pub fn sigma_level(den: &Denoiser, sigmas: &[f64], device: &Device) -> Result<NoiseLevel<Tensor>> {
    let n = sigmas.len();
    let s: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    let c: Vec<f32> = sigmas
        .iter()
        .map(|&s| den.param.c_noise(s) as f32)
        .collect();
    Ok(NoiseLevel {
        sigma: Tensor::from_vec(s, n, device)?,
        c_noise: Tensor::from_vec(c, n, device)?,
    })
}

/// The teacher's x0 at `x` for `labels` (`cond`) and, when `cfg != 1`, for the null class
/// (`uncond`), both in one batched network call.
pub fn teacher_x0(
    b: &CandleBackend,
    teacher: &Denoiser,
    x: &Tensor,
    level: &NoiseLevel<Tensor>,
    labels: &Tensor,
    cfg: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    if cfg == 1.0 {
        return Ok((teacher.forward(b, x, level, labels)?, None));
    }
    let n = x.dim(0)?;
    let null = Tensor::full(teacher.unet.cfg.null_class() as u32, n, x.device())?;
    let both = NoiseLevel {
        sigma: Tensor::cat(&[&level.sigma, &level.sigma], 0)?,
        c_noise: Tensor::cat(&[&level.c_noise, &level.c_noise], 0)?,
    };
    let out = teacher.forward(
        b,
        &Tensor::cat(&[x, x], 0)?,
        &both,
        &Tensor::cat(&[labels, &null], 0)?,
    )?;
    Ok((out.narrow(0, 0, n)?, Some(out.narrow(0, n, n)?)))
}

/// `cond + (cfg - 1) * (cond - uncond)`: classifier-free guidance in x0-space.
pub fn guide(cond: &Tensor, uncond: Option<&Tensor>, cfg: f64) -> Result<Tensor> {
    match uncond {
        Some(u) if cfg != 1.0 => Ok((cond + ((cond - u)? * (cfg - 1.0))?)?),
        _ => Ok(cond.clone()),
    }
}

/// A no-grad student rollout: the input `x` of each step and the x0 estimate there.
pub struct Rollout {
    /// `xs[k]`: the input of step `k` (`xs[0]` is the scaled pure noise); one more than `x0s`
    /// when the rollout stopped before the student's last step (the next step's input).
    pub xs: Vec<Tensor>,
    /// `x0s[k]`: the student's x0 estimate at step `k`.
    pub x0s: Vec<Tensor>,
}

/// Runs the student (detached weights: no gradient) from unit noise `z` for `steps` steps of its
/// own sampler over `sigmas`, re-noising deterministically (`fresh == None`, DDIM along the
/// student's steps: TDM) or with the given fresh unit noise (DMD2's backward simulation).
pub fn rollout(
    b: &CandleBackend,
    student: &Denoiser,
    z: &Tensor,
    labels: &Tensor,
    sigmas: &[f64],
    steps: usize,
    fresh: Option<&[Tensor]>,
) -> Result<Rollout> {
    ensure!(
        steps <= sigmas.len(),
        "rollout of {steps} steps over {} sigmas",
        sigmas.len()
    );
    let n = z.dim(0)?;
    let mut x = (z * graphs::sampler::initial_scale(&student.param, sigmas[0]))?;
    let (mut xs, mut x0s) = (Vec::new(), Vec::new());
    for k in 0..steps {
        let level = sigma_level(student, &vec![sigmas[k]; n], z.device())?;
        let x0 = student.forward(b, &x, &level, labels)?.detach();
        xs.push(x.clone());
        x0s.push(x0.clone());
        if let Some(&next) = sigmas.get(k + 1) {
            x = match fresh {
                None => (&x0 + ((&x - &x0)? * (next / sigmas[k]))?)?,
                Some(f) => {
                    (&x0 + (f
                        .get(k)
                        .context("rollout needs one fresh noise per re-noise")?
                        * next)?)?
                }
            };
        }
    }
    if steps < sigmas.len() {
        xs.push(x);
    }
    Ok(Rollout { xs, x0s })
}

/// Run-loop cadence shared by the distillation trainers (`[run]` in their TOML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Training iterations in total (a resumed run stops at the same total).
    pub steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    pub log_every: u64,
    /// PNG grid of the student every N iterations (0 = only at the end).
    pub sample_every: u64,
    pub checkpoint_every: u64,
    /// Frechet distance, class accuracy and diversity of the student every N iterations (0 = off);
    /// needs 1x32x32 data with 10 classes (the evaluation classifier is an MNIST model).
    pub eval_every: u64,
    /// Images per in-training evaluation.
    pub eval_n: usize,
    /// EMA decay of the student's weights over its updates (0 = use the raw weights).
    pub ema_decay: f64,
    /// `fp32`, `fp16` (autocast + dynamic loss scaling) or `bf16` (autocast); weights, optimiser
    /// state and checkpoints stay f32, so a run may resume in another precision.
    pub precision: Precision,
    pub loss_scale: LossScaleConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 32,
            seed: 0,
            log_every: 25,
            sample_every: 500,
            checkpoint_every: 100,
            eval_every: 0,
            eval_n: 500,
            ema_decay: 0.99,
            precision: Precision::Fp32,
            loss_scale: LossScaleConfig::default(),
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.steps > 0 && self.batch_size > 0,
            "steps and batch_size must be positive"
        );
        ensure!(
            self.log_every > 0 && self.checkpoint_every > 0,
            "log_every and checkpoint_every must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "ema_decay must be in [0, 1)"
        );
        ensure!(
            self.eval_every == 0 || self.eval_n >= 10,
            "eval_n must be at least 10"
        );
        Ok(())
    }
}

/// Numbers one iteration reports for the metrics log (averaged over the log window).
pub type StepMetrics = BTreeMap<String, f64>;

/// A distillation method, driven by [`run`].
pub trait Method {
    const ROLE: Role;
    /// What the progress bar and messages call it.
    fn name(&self) -> &'static str;
    /// One training iteration (`step` is 0-based); every randomness derives from (seed, step).
    fn step(&mut self, step: u64) -> Result<StepMetrics>;
    /// The student's trainable variables (the EMA follows them).
    fn student_vars(&self) -> &[(String, Var)];
    /// How many times the student has been updated (drives the EMA warm-up).
    fn student_updates(&self) -> u64;
    /// Every trainable network and optimiser, for the training state.
    fn save_state(&self, tensors: &mut HashMap<String, Tensor>, meta: &mut HashMap<String, String>);
    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<()>;
    /// The student's sampler, stored in its checkpoint.
    fn spec(&self) -> GeneratorSpec;
    fn model_config(&self) -> ModelConfig;
}

/// Everything [`run`] needs besides the method.
pub struct RunSpec<'a> {
    pub cfg: &'a RunConfig,
    /// The method's full config as TOML (written to `config.toml` and into the training state).
    pub config_toml: String,
    /// The part of the config a resumed run must agree with (everything but cadence and totals).
    pub resume_key: String,
    pub teacher: &'a Teacher,
    pub resume: bool,
    pub show_progress: bool,
    /// Scores the student during training (`eval_every`), when the data suits the classifier.
    pub evaluator: Option<&'a crate::eval::Evaluator>,
    pub device: &'a Device,
}

/// Result of a finished distillation run.
#[derive(Debug)]
pub struct DistillOutcome {
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub seconds: f64,
    /// The last log window's averages.
    pub last: BTreeMap<String, f64>,
    pub student_updates: u64,
}

/// The student's inference weights: the EMA when enabled, else the raw weights.
fn student_weights(ema: &Option<Ema>, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    match ema {
        Some(e) => e.tensors(),
        None => super::teacher::vars_to_tensors(vars),
    }
}

fn save<M: Method>(m: &M, rs: &RunSpec, run: &RunDir, step: u64, ema: &Option<Ema>) -> Result<()> {
    let mut tensors = HashMap::new();
    let mut meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("config".to_string(), rs.config_toml.clone()),
        ("resume_key".to_string(), rs.resume_key.clone()),
        ("teacher_sha256".to_string(), rs.teacher.sha256.clone()),
    ]);
    m.save_state(&mut tensors, &mut meta);
    if let Some(e) = ema {
        tensors.extend(
            e.tensors()
                .into_iter()
                .map(|(k, v)| (format!("ema.{k}"), v)),
        );
    }
    let dir = run.checkpoint();
    checkpoint::write_atomic(
        &dir.join(TRAIN_STATE_FILE),
        &checkpoint::safetensors_bytes_with_meta(&tensors, Some(meta))?,
    )?;
    let cm = CheckpointMeta::new(M::ROLE, m.model_config(), m.spec(), step);
    checkpoint::save(&dir, &cm, &student_weights(ema, m.student_vars()))
}

/// Trains (or resumes) a distillation method in `run`: the loop every method shares.
pub fn run<M: Method>(m: &mut M, rs: &RunSpec, run: &RunDir) -> Result<DistillOutcome> {
    let cfg = rs.cfg;
    cfg.validate()?;
    let state_path = run.checkpoint().join(TRAIN_STATE_FILE);
    let mut ema = (cfg.ema_decay > 0.0)
        .then(|| Ema::new(m.student_vars(), cfg.ema_decay))
        .transpose()?;
    let mut start = 0;
    if rs.resume {
        let (tensors, meta) = checkpoint::load_tensors_with_meta(&state_path, rs.device)
            .with_context(|| {
                format!(
                    "--resume: no usable training state in {}",
                    run.checkpoint().display()
                )
            })?;
        if meta.get("resume_key") != Some(&rs.resume_key) {
            bail!(
                "--resume: the run in {} was started with a different configuration (only the step count and logging cadence may change); start a new run with another --out",
                run.root.display()
            );
        }
        if meta.get("teacher_sha256") != Some(&rs.teacher.sha256) {
            bail!(
                "--resume: the teacher {} is not the one this run started from (its weights changed)",
                rs.teacher.dir.display()
            );
        }
        start = meta
            .get("step")
            .context("training state lacks its step")?
            .parse()?;
        m.load_state(&tensors, &meta)?;
        if let Some(e) = &mut ema {
            let w: HashMap<String, Tensor> = tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("ema.").map(|n| (n.to_string(), v.clone())))
                .collect();
            e.load(&w)
                .context("training state lacks the student's EMA")?;
        }
    } else if state_path.exists() {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            run.root.display()
        );
    }
    checkpoint::write_atomic(&run.config(), rs.config_toml.as_bytes())?;
    let mut log = MetricsLog::open(&run.metrics(), rs.resume.then_some(start))?;
    let pb = progress_bar(cfg.steps, start, rs.show_progress, m.name());
    let t0 = Instant::now();
    let mut window: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let mut last = BTreeMap::new();
    let mut win_start = Instant::now();
    let mut win_steps = 0u64;
    let mut seen_updates = m.student_updates();
    for step in start..cfg.steps {
        let metrics = m.step(step).with_context(|| {
            format!(
                "{} iteration {step}; the last good checkpoint is kept in {}",
                m.name(),
                run.checkpoint().display()
            )
        })?;
        for (k, v) in &metrics {
            check_finite(k, *v, step, &run.checkpoint())?;
            let e = window.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        if let Some(e) = &mut ema {
            let u = m.student_updates();
            if u > seen_updates {
                e.update(m.student_vars(), u - 1)?;
                seen_updates = u;
            }
        }
        win_steps += 1;
        let done = step + 1;
        pb.set_position(done);
        let mut record: BTreeMap<String, f64> = BTreeMap::new();
        if done % cfg.log_every == 0 || done == cfg.steps {
            for (k, (s, n)) in std::mem::take(&mut window) {
                record.insert(k, s / n as f64);
            }
            record.insert(
                "it_per_s".into(),
                win_steps as f64 / win_start.elapsed().as_secs_f64(),
            );
            record.insert("student_updates".into(), m.student_updates() as f64);
            (win_start, win_steps) = (Instant::now(), 0);
            let msg: Vec<String> = record
                .iter()
                .filter(|(k, _)| k.starts_with("loss"))
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            pb.set_message(msg.join(" "));
        }
        let want_eval = cfg.eval_every > 0 && (done % cfg.eval_every == 0 || done == cfg.steps);
        if let (true, Some(ev)) = (want_eval, rs.evaluator) {
            let den = super::teacher::denoiser_from(
                &m.model_config(),
                student_weights(&ema, m.student_vars()),
                rs.device,
            )?;
            let r = eval_student(ev, &den, &m.spec(), cfg.eval_n, rs.device)?;
            for (k, v) in r.metrics() {
                record.insert(k.into(), v);
            }
        }
        if !record.is_empty() {
            record.insert("elapsed_s".into(), t0.elapsed().as_secs_f64());
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), done.into());
            for (k, v) in &record {
                obj.insert(k.clone(), serde_json::json!(v));
            }
            log.write(&serde_json::Value::Object(obj))?;
            last.extend(record);
        }
        if done % cfg.checkpoint_every == 0 || done == cfg.steps {
            save(m, rs, run, done, &ema)?;
        }
        if (cfg.sample_every > 0 && done % cfg.sample_every == 0) || done == cfg.steps {
            let den = super::teacher::denoiser_from(
                &m.model_config(),
                student_weights(&ema, m.student_vars()),
                rs.device,
            )?;
            let png = run.samples().join(format!("step_{done:06}.png"));
            crate::sample::class_grid(&den, &m.spec(), 10, cfg.seed, rs.device, &png)?;
        }
    }
    pb.finish();
    write_curves(run)?;
    Ok(DistillOutcome {
        checkpoint: run.checkpoint(),
        steps: cfg.steps,
        seconds: t0.elapsed().as_secs_f64(),
        last,
        student_updates: m.student_updates(),
    })
}

/// Scores `n` class-balanced samples of a student with fixed noise (seed 1, as `distill eval`).
pub fn eval_student(
    ev: &crate::eval::Evaluator,
    den: &Denoiser,
    spec: &GeneratorSpec,
    n: usize,
    device: &Device,
) -> Result<crate::eval::EvalReport> {
    let ncls = den.unet.cfg.num_classes;
    let labels: Vec<u32> = (0..n).map(|i| (i % ncls) as u32).collect();
    let inputs = crate::sample::seeded_noise(den, spec, n, 1, device)?;
    let images = crate::sample::generate(
        den,
        spec,
        &inputs,
        &Tensor::from_vec(labels.clone(), n, device)?,
        250,
        device,
    )?;
    ev.evaluate(&images, Some(&labels))
}

/// Draws `n` integers uniformly from `[lo, hi]` (inclusive).
pub fn uniform_ints<R: rand::Rng>(rng: &mut R, n: usize, lo: usize, hi: usize) -> Vec<usize> {
    (0..n).map(|_| rng.gen_range(lo..=hi)).collect()
}

/// Random class labels `[N]` in `0..num_classes`.
pub fn random_labels<R: rand::Rng>(
    rng: &mut R,
    n: usize,
    num_classes: usize,
    device: &Device,
) -> Result<Tensor> {
    let l: Vec<u32> = (0..n)
        .map(|_| rng.gen_range(0..num_classes as u32))
        .collect();
    Ok(Tensor::from_vec(l, n, device)?)
}

/// Picks row `n` of `xs[idx[n]]` for every sample: per-sample step selection out of a rollout.
pub fn gather_steps(xs: &[Tensor], idx: &[usize]) -> Result<Tensor> {
    let rows = idx
        .iter()
        .enumerate()
        .map(|(n, &k)| xs[k].narrow(0, n, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Host f64 scalar of a 0-d tensor.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `curves.png` (the losses, log scale) and, when evaluated, `fd.png` in the run folder.
pub fn write_curves(run: &RunDir) -> Result<()> {
    let all = crate::plot::read_metrics(&run.metrics(), &[])?;
    let title = run.metrics().display().to_string();
    let losses: Vec<_> = all
        .iter()
        .filter(|s| s.name.starts_with("loss"))
        .cloned()
        .collect();
    if !losses.is_empty() {
        crate::plot::plot_png(&run.root.join("curves.png"), &title, &losses, true)?;
    }
    let fd: Vec<_> = all.iter().filter(|s| s.name == "fd").cloned().collect();
    if !fd.is_empty() {
        crate::plot::plot_png(&run.root.join("fd.png"), &title, &fd, false)?;
    }
    let div: Vec<_> = all
        .iter()
        .filter(|s| crate::eval::diversity::METRIC_NAMES.contains(&s.name.as_str()))
        .cloned()
        .collect();
    if !div.is_empty() {
        crate::plot::plot_png(&run.root.join("diversity.png"), &title, &div, false)?;
    }
    Ok(())
}
