//! `distill train dmd2` and `distill train tdm`: flags (clap derive; doc comments are `--help`),
//! their resolution over a TOML config, and the commands.

use crate::train::distill::{self, RunConfig, RunSpec, Teacher};
use crate::train::dmd2::{Dmd2, Dmd2Config};
use crate::train::optim::LrSchedule;
use crate::train::tdm::{NoiseMode, Tdm, TdmConfig};
use crate::train::RunDir;
use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use graphs::losses::tdm::{Distance, Weighting};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

macro_rules! set {
    ($dst:expr, $src:expr) => {
        if let Some(v) = $src.clone() {
            $dst = v;
        }
    };
}

/// Flags every distillation trainer shares.
#[derive(Args, Debug, Default, Clone)]
pub struct DistillRunArgs {
    /// The teacher checkpoint folder (from `distill train teacher`).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Run folder: checkpoint/, metrics.jsonl, samples/*.png, config.toml.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// TOML file with any config fields (see README); flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (same data order and noise).
    #[arg(long)]
    pub resume: bool,
    /// The student's steps as timesteps of the 1000-bin noise grid, descending, comma-separated
    /// (e.g. 999 for one step at sigma_max, 999,749,499,249 for four).
    #[arg(long, value_delimiter = ',')]
    pub timesteps: Option<Vec<usize>>,
    /// Training iterations in total (a resumed run stops at the same total).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per iteration.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed for labels, noise, timesteps and data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peak learning rate of the student.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate of the fake score (and DMD2's GAN head).
    #[arg(long)]
    pub fake_lr: Option<f64>,
    /// Linear learning-rate warm-up, in updates (both optimisers).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Clip each network's global gradient norm to this value (0 = off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// EMA decay of the student's weights, over its updates (0 = off: the checkpoint holds the
    /// raw weights).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Write a metrics line every N iterations.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Write a PNG grid of the student every N iterations (and at the end).
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Write the checkpoint every N iterations (always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Score the student (Frechet distance, class accuracy, precision, recall, density, coverage)
    /// every N iterations into the metrics (0 = off; MNIST-shaped data only).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Images per in-training evaluation.
    #[arg(long)]
    pub eval_n: Option<usize>,
    /// Compute precision: fp32, fp16 (convs/matmuls in f16 with dynamic loss scaling) or bf16;
    /// master weights, optimiser state and checkpoints stay f32.
    #[arg(long, value_enum)]
    pub precision: Option<crate::cli::TrainPrecisionArg>,
    /// With --resume: continue even though the config (besides steps, cadence and precision) or
    /// the data differ from the run's start.
    #[arg(long, requires = "resume")]
    pub allow_resume_change: bool,
}

impl DistillRunArgs {
    fn apply(&self, teacher: &mut PathBuf, run: &mut RunConfig, timesteps: &mut Vec<usize>) {
        set!(*teacher, self.teacher);
        set!(*timesteps, self.timesteps);
        set!(run.steps, self.steps);
        set!(run.batch_size, self.batch_size);
        set!(run.seed, self.seed);
        set!(run.ema_decay, self.ema_decay);
        set!(run.log_every, self.log_every);
        set!(run.sample_every, self.sample_every);
        set!(run.checkpoint_every, self.checkpoint_every);
        set!(run.eval_every, self.eval_every);
        set!(run.eval_n, self.eval_n);
        if let Some(p) = self.precision {
            run.precision = p.into();
        }
    }
}

fn read_config<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
        None => Ok(T::default()),
    }
}

#[derive(Args, Debug, Default, Clone)]
pub struct Dmd2Args {
    #[command(flatten)]
    pub common: DistillRunArgs,
    /// Real images for the GAN head: MNIST IDX, CIFAR-10 binary or an image folder (default: the
    /// embedded MNIST digits).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use the first N real images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Input sigma of the first (or only) step: the student maps `sigma * z` to an image
    /// (default: the first timestep's sigma, 80 for EDM).
    #[arg(long)]
    pub conditioning_sigma: Option<f64>,
    /// Update the student every N iterations; the fake score is updated every iteration (DMD2's
    /// two time-scale rule: 10 on small data, 5 on ImageNet).
    #[arg(long)]
    pub dfake_gen_update_ratio: Option<u64>,
    /// Lowest distribution-matching timestep, as a fraction of the grid.
    #[arg(long)]
    pub min_step: Option<f64>,
    /// Highest distribution-matching timestep, as a fraction of the grid.
    #[arg(long)]
    pub max_step: Option<f64>,
    /// Classifier-free guidance scale of the real score (the teacher); 1 = off.
    #[arg(long)]
    pub real_guidance_scale: Option<f64>,
    /// Train without the GAN head (distribution matching only).
    #[arg(long)]
    pub no_gan: bool,
    /// Weight of the student's GAN loss.
    #[arg(long)]
    pub gan_generator_weight: Option<f64>,
    /// Weight of the GAN head's (critic's) loss.
    #[arg(long)]
    pub gan_critic_weight: Option<f64>,
    /// Images reach the GAN head noised at a grid timestep below this (1 = clean).
    #[arg(long)]
    pub gan_max_timestep: Option<usize>,
}

impl Dmd2Args {
    pub fn resolve(&self) -> Result<Dmd2Config> {
        let mut c: Dmd2Config = read_config(self.common.config.as_deref())?;
        self.common
            .apply(&mut c.teacher, &mut c.run, &mut c.timesteps);
        let a = &self.common;
        set!(c.student_optim.lr, a.lr);
        set!(c.fake_optim.lr, a.fake_lr);
        for o in [&mut c.student_optim, &mut c.fake_optim] {
            set!(o.warmup_steps, a.warmup);
            set!(o.grad_clip, a.grad_clip);
        }
        if self.conditioning_sigma.is_some() {
            c.conditioning_sigma = self.conditioning_sigma;
        }
        set!(c.dfake_gen_update_ratio, self.dfake_gen_update_ratio);
        set!(c.min_step, self.min_step);
        set!(c.max_step, self.max_step);
        set!(c.real_guidance_scale, self.real_guidance_scale);
        if self.no_gan {
            c.gan = false;
        }
        set!(c.gan_generator_weight, self.gan_generator_weight);
        set!(c.gan_critic_weight, self.gan_critic_weight);
        set!(c.gan_max_timestep, self.gan_max_timestep);
        crate::checks::dmd2(&c)?;
        Ok(c)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum NoiseModeArg {
    Separate,
    ToT,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DistanceArg {
    Mse,
    Huber,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightingArg {
    Constant,
    Snr,
    MinSnr,
}

impl From<WeightingArg> for Weighting {
    fn from(w: WeightingArg) -> Self {
        match w {
            WeightingArg::Constant => Weighting::Constant,
            WeightingArg::Snr => Weighting::Snr,
            WeightingArg::MinSnr => Weighting::MinSnr,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Cosine,
}

#[derive(Args, Debug, Default, Clone)]
pub struct TdmArgs {
    #[command(flatten)]
    pub common: DistillRunArgs,
    /// Where the matching noise level is drawn: `separate` (between the step and the next one:
    /// intervals never overlap) or `to-t` (from the next step up to pure noise).
    #[arg(long, value_enum)]
    pub noise_mode: Option<NoiseModeArg>,
    /// With `--noise-mode to-t`: give the fake score one label table per student step.
    #[arg(long)]
    pub condition_on_step: bool,
    /// Draw the trajectory point's level between the next step and this one (a regulariser).
    #[arg(long)]
    pub random_mid: bool,
    /// Turn off the importance weight of the fake score's loss.
    #[arg(long)]
    pub no_importance_weight: bool,
    /// Classifier-free guidance scale of the teacher in the student's target (1 = off).
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Distance of the student loss.
    #[arg(long, value_enum)]
    pub distance: Option<DistanceArg>,
    /// Pseudo-Huber constant c.
    #[arg(long)]
    pub huber_c: Option<f64>,
    /// SNR weighting of the student loss.
    #[arg(long, value_enum)]
    pub student_weighting: Option<WeightingArg>,
    /// SNR weighting of the fake score's loss.
    #[arg(long, value_enum)]
    pub fake_weighting: Option<WeightingArg>,
    /// Gamma of Min-SNR weighting.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Lowest matching timestep.
    #[arg(long)]
    pub min_timestep: Option<usize>,
    /// Update the fake score every N iterations (the student: every iteration).
    #[arg(long)]
    pub update_fake_every: Option<u64>,
    /// Micro-batches of --batch-size whose gradients are averaged per update.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Adam beta1 of both optimisers (TDM: 0).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Adam beta2 of both optimisers (TDM: 0.95).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Learning-rate schedule after warm-up (cosine decays to 10% at the last step).
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
}

impl TdmArgs {
    pub fn resolve(&self) -> Result<TdmConfig> {
        let mut c: TdmConfig = read_config(self.common.config.as_deref())?;
        self.common
            .apply(&mut c.teacher, &mut c.run, &mut c.timesteps);
        let a = &self.common;
        if let Some(f) = a.fake_lr {
            c.fake_optim.lr = f;
            // The published recipe: the student learns 5x slower than the fake score.
            if a.lr.is_none() {
                c.student_optim.lr = f / 5.0;
            }
        }
        set!(c.student_optim.lr, a.lr);
        for o in [&mut c.student_optim, &mut c.fake_optim] {
            set!(o.warmup_steps, a.warmup);
            set!(o.grad_clip, a.grad_clip);
            set!(o.beta1, self.beta1);
            set!(o.beta2, self.beta2);
            if let Some(s) = self.schedule {
                o.schedule = match s {
                    ScheduleArg::Constant => LrSchedule::Constant,
                    ScheduleArg::Cosine => LrSchedule::Cosine,
                };
            }
        }
        if let Some(m) = self.noise_mode {
            c.noise_mode = match m {
                NoiseModeArg::Separate => NoiseMode::Separate,
                NoiseModeArg::ToT => NoiseMode::ToT,
            };
        }
        if self.condition_on_step {
            c.condition_on_step = true;
        }
        if self.random_mid {
            c.random_mid = true;
        }
        if self.no_importance_weight {
            c.importance_weight = false;
        }
        set!(c.cfg_scale, self.cfg_scale);
        if let Some(d) = self.distance {
            c.distance = match d {
                DistanceArg::Mse => Distance::Mse,
                DistanceArg::Huber => Distance::Huber,
            };
        }
        set!(c.huber_c, self.huber_c);
        if let Some(w) = self.student_weighting {
            c.student_weighting = w.into();
        }
        if let Some(w) = self.fake_weighting {
            c.fake_weighting = w.into();
        }
        set!(c.min_snr_gamma, self.min_snr_gamma);
        set!(c.min_timestep, self.min_timestep);
        set!(c.update_fake_every, self.update_fake_every);
        set!(c.grad_accum, self.grad_accum);
        crate::checks::tdm(&c)?;
        Ok(c)
    }
}

/// The evaluator for in-training scores, when asked for and the data is MNIST-shaped.
fn maybe_evaluator(
    eval_every: u64,
    teacher: &Teacher,
    dev: &Device,
    quiet: bool,
) -> Result<Option<crate::eval::Evaluator>> {
    let u = &teacher.meta.model.unet;
    if eval_every == 0 {
        return Ok(None);
    }
    if (u.channels, u.resolution, u.num_classes) != (1, 32, 10) {
        eprintln!(
            "note: --eval-every ignored: the evaluation classifier scores 1x32x32 digits with 10 classes, the teacher makes {}x{}x{} with {} classes",
            u.channels, u.resolution, u.resolution, u.num_classes
        );
        return Ok(None);
    }
    let dir = crate::eval::classifier::default_cache_dir();
    Ok(Some(crate::eval::Evaluator::new(&dir, dev, !quiet)?))
}

fn report(what: &str, out: &distill::DistillOutcome, run: &RunDir) {
    let last: Vec<String> = out
        .last
        .iter()
        .filter(|(k, _)| {
            k.starts_with("loss")
                || *k == "fd"
                || *k == "class_accuracy"
                || crate::eval::diversity::METRIC_NAMES.contains(&k.as_str())
        })
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    eprintln!(
        "{what}: done, {} iterations ({} student updates) in {:.0}s; {}; checkpoint {}; samples {}; metrics {}",
        out.steps,
        out.student_updates,
        out.seconds,
        last.join(", "),
        out.checkpoint.display(),
        run.samples().display(),
        run.metrics().display()
    );
}

/// Runs `distill train dmd2`; returns the checkpoint folder.
pub fn cmd_dmd2(a: &Dmd2Args, dev: &Device, show_progress: bool, quiet: bool) -> Result<PathBuf> {
    let cfg = a.resolve()?;
    let teacher = Teacher::load(&cfg.teacher, dev)?;
    let u = &teacher.meta.model.unet;
    let data = crate::cli::load_data(a.data.as_deref(), u.resolution, a.limit)?;
    let run = RunDir::new(a.common.out.as_deref().unwrap_or(Path::new("runs/dmd2")))?;
    let toml_cfg = toml::to_string(&cfg)?;
    let state = distill::TRAIN_STATE_FILE;
    let allow = a.common.allow_resume_change;
    crate::checks::resume(&run, state, &toml_cfg, Some(&data), a.common.resume, allow)?;
    let mut m = Dmd2::new(cfg.clone(), &teacher, &data, dev)?;
    let ev = maybe_evaluator(cfg.run.eval_every, &teacher, dev, quiet)?;
    eprintln!(
        "dmd2: {}-step student (sigmas {:?}) from {}; {} iterations at batch {}, student updated every {}; GAN {}; -> {}",
        cfg.timesteps.len(),
        cfg.sigmas(&graphs::NoiseGrid::new(&teacher.meta.model.parameterisation))
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>(),
        teacher.dir.display(),
        cfg.run.steps,
        cfg.run.batch_size,
        cfg.dfake_gen_update_ratio,
        if cfg.gan { "on" } else { "off" },
        run.root.display()
    );
    let rs = RunSpec {
        cfg: &cfg.run,
        config_toml: toml::to_string(&cfg)?,
        resume_key: cfg.resume_key()?,
        teacher: &teacher,
        resume: a.common.resume,
        show_progress,
        evaluator: ev.as_ref(),
        device: dev,
    };
    let out = distill::run(&mut m, &rs, &run)?;
    report("dmd2", &out, &run);
    Ok(out.checkpoint)
}

/// Runs `distill train tdm`; returns the checkpoint folder.
pub fn cmd_tdm(a: &TdmArgs, dev: &Device, show_progress: bool, quiet: bool) -> Result<PathBuf> {
    let cfg = a.resolve()?;
    let teacher = Teacher::load(&cfg.teacher, dev)?;
    let run = RunDir::new(a.common.out.as_deref().unwrap_or(Path::new("runs/tdm")))?;
    let mut m = Tdm::new(cfg.clone(), &teacher, dev)?;
    let toml_cfg = toml::to_string(&m.cfg)?;
    let state = distill::TRAIN_STATE_FILE;
    let allow = a.common.allow_resume_change;
    crate::checks::resume(&run, state, &toml_cfg, None, a.common.resume, allow)?;
    let ev = maybe_evaluator(cfg.run.eval_every, &teacher, dev, quiet)?;
    eprintln!(
        "tdm: {}-step student (timesteps {:?}) from {}; {} iterations at batch {} x {}; noise mode {:?} -> {}",
        cfg.timesteps.len(),
        cfg.timesteps,
        teacher.dir.display(),
        cfg.run.steps,
        cfg.run.batch_size,
        cfg.grad_accum,
        m.cfg.noise_mode,
        run.root.display()
    );
    let run_cfg = m.cfg.run.clone();
    let rs = RunSpec {
        cfg: &run_cfg,
        config_toml: toml::to_string(&m.cfg)?,
        resume_key: m.cfg.resume_key()?,
        teacher: &teacher,
        resume: a.common.resume,
        show_progress,
        evaluator: ev.as_ref(),
        device: dev,
    };
    let out = distill::run(&mut m, &rs, &run)?;
    report("tdm", &out, &run);
    Ok(out.checkpoint)
}
