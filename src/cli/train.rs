//! `distill train teacher|dmd2|tdm`: flags (clap derive; doc comments are `--help`) and their
//! resolution over a TOML config into the library's training jobs.

use anyhow::Result;
use clap::{Args, ValueEnum};
use distill::jobs::{read_config, Dmd2Job, TdmJob, TeacherJob};
use distill::train::distill::DistillCommon;
use distill::train::dmd2::Dmd2Config;
use distill::train::optim::LrSchedule;
use distill::train::tdm::{NoiseMode, TdmConfig};
use distill::train::teacher::TeacherConfig;
use graphs::losses::dmd2::FDivergence;
use graphs::losses::tdm::{Distance, Weighting};
use graphs::{BetaSchedule, Precision, UNetConfig};
use std::path::PathBuf;

macro_rules! set {
    ($dst:expr, $src:expr) => {
        if let Some(v) = $src.clone() {
            $dst = v;
        }
    };
}

/// Model size presets.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// 16-32-64 channels, one res block per level, attention at 8x8: the CPU default.
    Small,
    /// 32-64-128 channels, two res blocks per level, attention at 8x8 (3.94M params; the benchmark UNet).
    Bench,
    /// 8-16 channels at 16x16: for tests only.
    Tiny,
}

impl Preset {
    pub fn config(self) -> UNetConfig {
        match self {
            Preset::Small => UNetConfig::mnist_small(),
            Preset::Bench => UNetConfig::bench(),
            Preset::Tiny => UNetConfig::tiny(),
        }
    }
}

#[derive(Args, Debug, Default)]
pub struct TeacherArgs {
    /// Training data: a folder or file of MNIST IDX (raw or .gz), CIFAR-10 binary batches, or an
    /// image folder (class = sub-folder). Default: the embedded 10k MNIST digits.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder: checkpoint/, metrics.jsonl, samples/*.png, config.toml.
    #[arg(long, short, default_value = TeacherJob::DEFAULT_OUT)]
    pub out: PathBuf,
    /// TOML file with any TeacherConfig fields (see README); flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (same step count, same data order).
    #[arg(long)]
    pub resume: bool,
    /// Model size preset (the fields below override parts of it).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Base channel count of the UNet.
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// Channel multiplier per resolution level, comma-separated (e.g. 1,2,2).
    #[arg(long, value_delimiter = ',')]
    pub channel_mult: Option<Vec<usize>>,
    /// Residual blocks per resolution level.
    #[arg(long)]
    pub num_res_blocks: Option<usize>,
    /// Resolutions (pixels) that get self-attention, comma-separated (e.g. 8).
    #[arg(long, value_delimiter = ',')]
    pub attn_resolutions: Option<Vec<usize>>,
    /// Dropout inside res blocks.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Image side the data is padded/resized to (MNIST 28 -> 32 by zero padding).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Parameterisation: `edm` (Karras preconditioned denoiser), `vp` (DDPM, 1000 steps; see
    /// --prediction) or `flow` (rectified flow x_t = (1 - t) x0 + t eps, velocity target).
    #[arg(long, value_parser = ["edm", "vp", "flow"])]
    pub parameterisation: Option<String>,
    /// VP only: what the network predicts: `epsilon` (eps), `v` (v-prediction) or `sample` (x0).
    #[arg(long, value_enum)]
    pub prediction: Option<PredictionArg>,
    /// Flow only: the training draw of t: `logit-normal` (SD3's, mean 0, std 1) or `uniform`.
    #[arg(long, value_enum)]
    pub flow_t: Option<FlowTArg>,
    /// Flow only: timestep shift t -> shift t / (1 + (shift - 1) t) in training and sampling (1 = none).
    #[arg(long)]
    pub flow_shift: Option<f64>,
    /// VP beta schedule (beta 1e-4 .. 2e-2).
    #[arg(long, value_enum)]
    pub beta_schedule: Option<BetaScheduleArg>,
    /// Training iterations in total (a resumed run stops at the same total). (`--steps` is its
    /// deprecated name.)
    #[arg(long, alias = "steps")]
    pub train_steps: Option<u64>,
    /// Images per step: the global batch, over all ranks under `mpirun` (each of N ranks trains
    /// on batch/N of it; must be divisible by N).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (AdamW).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear learning-rate warm-up, in steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value (0 = off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights (the EMA is what sampling and distillation use).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Probability of training on the null label (enables classifier-free guidance).
    #[arg(long)]
    pub label_dropout: Option<f64>,
    /// Seed for initialisation, data order, noise and label dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write a metrics line every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Write a PNG sample grid every N steps and at the end (0 = never).
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Write the checkpoint every N steps (always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Heun steps of the checkpoint's default sampler (and of the sample grids).
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Classifier-free guidance scale of the checkpoint's default sampler (1 = off).
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Train on the first N images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Compute precision: fp32, fp16 (convs/matmuls in f16 with dynamic loss scaling) or bf16;
    /// master weights, optimiser state and checkpoints stay f32.
    #[arg(long, value_parser = super::precision_parser(&["fp32", "fp16", "bf16"]))]
    pub precision: Option<Precision>,
    /// Number of classes of the model (default: the config's, 10; a data set with a label at or
    /// above it is an error).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Under `mpirun`: shard the AdamW moments over the ranks (ZeRO-1: gradients
    /// reduce-scattered, each rank steps its shard, parameters all-gathered), so the optimiser
    /// state per rank falls as 1/N. Checkpoints keep the full moments (gathered to rank 0): a run
    /// resumes with or without it, on any number of ranks. TOML: `zero1 = true`.
    #[arg(long)]
    pub zero1: bool,
    /// With --resume: continue even though the config (besides train_steps, cadence and precision) or
    /// the data differ from the run's start.
    #[arg(long, requires = "resume")]
    pub allow_resume_change: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BetaScheduleArg {
    Linear,
    ScaledLinear,
}

/// `--prediction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    #[value(alias = "eps")]
    Epsilon,
    #[value(alias = "v-prediction")]
    V,
    #[value(alias = "x0")]
    Sample,
}

impl From<PredictionArg> for graphs::schedulers::Prediction {
    fn from(p: PredictionArg) -> Self {
        match p {
            PredictionArg::Epsilon => Self::Epsilon,
            PredictionArg::V => Self::VPrediction,
            PredictionArg::Sample => Self::Sample,
        }
    }
}

/// `--flow-t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowTArg {
    LogitNormal,
    Uniform,
}

impl TeacherArgs {
    /// Defaults <- TOML file <- flags.
    pub fn resolve(&self) -> Result<TeacherConfig> {
        let mut c: TeacherConfig = read_config(self.config.as_deref())?;
        if let Some(p) = self.preset {
            c.model = p.config();
        }
        let m = &mut c.model;
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src.clone() {
                    $dst = v;
                }
            };
        }
        set!(m.base_channels, self.base_channels);
        set!(m.channel_mult, self.channel_mult);
        set!(m.num_res_blocks, self.num_res_blocks);
        set!(m.attn_resolutions, self.attn_resolutions);
        set!(m.dropout, self.dropout);
        set!(m.resolution, self.resolution);
        set!(m.num_classes, self.num_classes);
        set!(c.parameterisation, self.parameterisation);
        if let Some(b) = self.beta_schedule {
            c.beta_schedule = match b {
                BetaScheduleArg::Linear => BetaSchedule::Linear,
                BetaScheduleArg::ScaledLinear => BetaSchedule::ScaledLinear,
            };
        }
        if let Some(p) = self.prediction {
            c.prediction = p.into();
        }
        if let Some(t) = self.flow_t {
            c.flow.t_dist = match t {
                FlowTArg::LogitNormal => graphs::FlowTimeDist::LogitNormal {
                    mean: 0.0,
                    std: 1.0,
                },
                FlowTArg::Uniform => graphs::FlowTimeDist::Uniform,
            };
        }
        set!(c.flow.shift, self.flow_shift);
        set!(c.train_steps, self.train_steps);
        set!(c.batch_size, self.batch_size);
        set!(c.optim.lr, self.lr);
        set!(c.optim.warmup_steps, self.warmup);
        set!(c.optim.weight_decay, self.weight_decay);
        set!(c.optim.grad_clip, self.grad_clip);
        set!(c.ema_decay, self.ema_decay);
        set!(c.label_dropout, self.label_dropout);
        set!(c.seed, self.seed);
        set!(c.log_every, self.log_every);
        set!(c.sample_every, self.sample_every);
        set!(c.checkpoint_every, self.checkpoint_every);
        set!(c.sample_steps, self.sample_steps);
        set!(c.cfg_scale, self.cfg_scale);
        if let Some(p) = self.precision {
            c.precision = p;
        }
        c.zero1 |= self.zero1;
        Ok(c)
    }
}

impl TeacherArgs {
    pub fn job(&self, show_progress: bool) -> Result<TeacherJob> {
        Ok(TeacherJob {
            config: self.resolve()?,
            data: self.data.clone(),
            limit: self.limit,
            out: self.out.clone(),
            resume: self.resume,
            allow_resume_change: self.allow_resume_change,
            show_progress,
        })
    }
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
    /// Training iterations in total (a resumed run stops at the same total). (`--steps` is its
    /// deprecated name.)
    #[arg(long, alias = "steps")]
    pub train_steps: Option<u64>,
    /// Images per iteration: the global batch, over all ranks under `mpirun` (each of N ranks
    /// trains on batch/N of it; must be divisible by N).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed for labels, noise, timesteps and data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Classifier-free guidance scale of the teacher (the real score) in the student's target;
    /// 1 = off (`--real-guidance-scale` is DMD2's deprecated name).
    #[arg(long, alias = "real-guidance-scale")]
    pub cfg_scale: Option<f64>,
    /// Guide the real score only at noise levels with sigma in (LO, HI], comma-separated (the
    /// conditional x0 elsewhere: guidance at high noise costs diversity, Kynkaanniemi et al.
    /// 2024). TOML: `cfg_interval = [LO, HI]`. Default: guided at every level.
    #[arg(long, value_name = "LO,HI", value_parser = parse_interval)]
    pub cfg_interval: Option<[f64; 2]>,
    /// Autoguidance (Karras et al. 2024): guide the real score against this weaker teacher
    /// checkpoint's conditional x0 (e.g. the teacher's config trained for fewer steps) instead of
    /// the unconditional one, at --cfg-scale and within --cfg-interval. TOML: `autoguidance`.
    #[arg(long, value_name = "CKPT")]
    pub autoguidance: Option<PathBuf>,
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
    /// Write a PNG grid of the student every N iterations and at the end (0 = never).
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
    #[arg(long, value_parser = super::precision_parser(&["fp32", "fp16", "bf16"]))]
    pub precision: Option<Precision>,
    /// Under `mpirun`: shard the AdamW moments over the ranks (ZeRO-1: gradients
    /// reduce-scattered, each rank steps its shard, parameters all-gathered), so the optimiser
    /// state per rank falls as 1/N. Checkpoints keep the full moments (gathered to rank 0): a run
    /// resumes with or without it, on any number of ranks. TOML: `zero1 = true`.
    #[arg(long)]
    pub zero1: bool,
    /// With --resume: continue even though the config (besides train_steps, cadence and precision) or
    /// the data differ from the run's start.
    #[arg(long, requires = "resume")]
    pub allow_resume_change: bool,
    /// Train LoRA adapters of this rank on the student and the fake score instead of every
    /// weight (0 = off: full fine-tuning). The base weights stay the teacher's, frozen and shared.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the adapters' update is scaled by alpha / rank (default: alpha = rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated module names to adapt, matched like PEFT's target_modules (a name or the
    /// end of a module path). Default: the attention projections, `to_q,to_k,to_v,to_out.0` for
    /// a diffusers UNet2DModel, `q,k,v,proj` for distill's UNet; e.g. add `conv1,conv2` for the
    /// res blocks' convolutions.
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
}

impl DistillRunArgs {
    /// Flags over the config read from `--config` (or the defaults).
    fn apply(&self, c: &mut DistillCommon) {
        set!(c.teacher, self.teacher);
        set!(c.timesteps, self.timesteps);
        set!(c.cfg_scale, self.cfg_scale);
        if self.cfg_interval.is_some() {
            c.cfg_interval = self.cfg_interval;
        }
        if self.autoguidance.is_some() {
            c.autoguidance = self.autoguidance.clone();
        }
        set!(c.student_optim.lr, self.lr);
        set!(c.fake_optim.lr, self.fake_lr);
        for o in c.optims() {
            set!(o.warmup_steps, self.warmup);
            set!(o.grad_clip, self.grad_clip);
        }
        let run = &mut c.run;
        set!(run.train_steps, self.train_steps);
        set!(run.batch_size, self.batch_size);
        set!(run.seed, self.seed);
        set!(run.ema_decay, self.ema_decay);
        set!(run.log_every, self.log_every);
        set!(run.sample_every, self.sample_every);
        set!(run.checkpoint_every, self.checkpoint_every);
        set!(run.eval_every, self.eval_every);
        set!(run.eval_n, self.eval_n);
        if let Some(p) = self.precision {
            run.precision = p;
        }
        run.zero1 |= self.zero1;
        set!(c.lora.rank, self.lora_rank);
        if self.lora_alpha.is_some() {
            c.lora.alpha = self.lora_alpha;
        }
        set!(c.lora.targets, self.lora_targets);
    }
}

/// `LO,HI`: two sigmas, `0 <= LO < HI`.
fn parse_interval(s: &str) -> std::result::Result<[f64; 2], String> {
    let v: Vec<&str> = s.split(',').collect();
    let bad = || format!("expected LO,HI (two sigmas with 0 <= LO < HI, e.g. 0.3,5), got {s:?}");
    let [lo, hi] = v.as_slice() else {
        return Err(bad());
    };
    let (lo, hi): (f64, f64) = (
        lo.trim().parse().map_err(|_| bad())?,
        hi.trim().parse().map_err(|_| bad())?,
    );
    if !(lo >= 0.0 && lo < hi) {
        return Err(bad());
    }
    Ok([lo, hi])
}

#[derive(Args, Debug, Default, Clone)]
pub struct Dmd2Args {
    #[command(flatten)]
    pub common: DistillRunArgs,
    /// Real images for the GAN head: MNIST IDX, CIFAR-10 binary or an image folder (default: the
    /// embedded MNIST digits); with --prompts, an image+caption folder (NAME.png + NAME.txt),
    /// encoded once by the pipeline's VAE and text encoder.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use the first N real images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// With a text-to-image pipeline folder as --teacher: its prompts, one a line (encoded once
    /// by the pipeline's text encoder; each sample draws one).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
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
    /// Class-conditional teachers: make the GAN head a projection discriminator (a learned class
    /// embedding dotted with its pooled features added to the logit), so it judges each image
    /// against its own class. Default: false.
    #[arg(long, value_name = "BOOL")]
    pub gan_projection: Option<bool>,
    /// Class-conditional teachers with a null class: give the GAN head a classifier learned on
    /// real images (AC-GAN) and push each generated image towards its own class with this weight
    /// of its cross-entropy. Default: 0 (no classifier).
    #[arg(long, value_name = "WEIGHT")]
    pub gan_classifier_weight: Option<f64>,
    /// Images reach the GAN head's classifier noised at a grid timestep below this. Default: 250.
    #[arg(long, value_name = "T")]
    pub gan_classifier_max_timestep: Option<usize>,
    /// The student's classifier loss only on the images the classifier assigns to another class;
    /// `false`: on every image (which also pulls correct ones towards their class's prototype).
    /// Default: true.
    #[arg(long, value_name = "BOOL")]
    pub gan_classifier_misclassified_only: Option<bool>,
    /// The f-divergence distribution matching descends (f-distill): reverse-kl (DMD's,
    /// mode-seeking), or forward-kl / jensen-shannon (mode-covering / between), whose per-sample
    /// weights come from the GAN head's density-ratio estimate (needs the GAN head). Default:
    /// reverse-kl.
    #[arg(long, value_enum, value_name = "DIVERGENCE")]
    pub f_divergence: Option<FDivergenceArg>,
    /// Multi-step students: match step k's images (and train the fake score on them) only at
    /// the noise levels of its own phase, from its timestep down to the next step's (Phased
    /// DMD); `false`: over the whole grid, as DMD2's backward simulation. Default: true.
    #[arg(long, value_name = "BOOL")]
    pub phased: Option<bool>,
}

impl Dmd2Args {
    pub fn resolve(&self) -> Result<Dmd2Config> {
        let mut c: Dmd2Config = read_config(self.common.config.as_deref())?;
        self.common.apply(&mut c.common);
        if self.conditioning_sigma.is_some() {
            c.conditioning_sigma = self.conditioning_sigma;
        }
        set!(c.dfake_gen_update_ratio, self.dfake_gen_update_ratio);
        set!(c.min_step, self.min_step);
        set!(c.max_step, self.max_step);
        if self.no_gan {
            c.gan = false;
        }
        set!(c.gan_generator_weight, self.gan_generator_weight);
        set!(c.gan_critic_weight, self.gan_critic_weight);
        set!(c.gan_max_timestep, self.gan_max_timestep);
        set!(c.gan_projection, self.gan_projection);
        set!(c.gan_classifier_weight, self.gan_classifier_weight);
        set!(
            c.gan_classifier_max_timestep,
            self.gan_classifier_max_timestep
        );
        set!(
            c.gan_classifier_misclassified_only,
            self.gan_classifier_misclassified_only
        );
        if let Some(f) = self.f_divergence {
            c.f_divergence = f.into();
        }
        set!(c.phased, self.phased);
        Ok(c)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FDivergenceArg {
    ReverseKl,
    ForwardKl,
    JensenShannon,
}

impl From<FDivergenceArg> for FDivergence {
    fn from(f: FDivergenceArg) -> Self {
        match f {
            FDivergenceArg::ReverseKl => FDivergence::ReverseKl,
            FDivergenceArg::ForwardKl => FDivergence::ForwardKl,
            FDivergenceArg::JensenShannon => FDivergence::JensenShannon,
        }
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
    /// With a text-to-image pipeline folder as --teacher: its prompts, one a line (encoded once
    /// by the pipeline's text encoder; each sample draws one).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

impl TdmArgs {
    pub fn resolve(&self) -> Result<TdmConfig> {
        let mut c: TdmConfig = read_config(self.common.config.as_deref())?;
        self.common.apply(&mut c.common);
        if let (Some(f), None) = (self.common.fake_lr, self.common.lr) {
            // The published recipe: the student learns 5x slower than the fake score.
            c.common.student_optim.lr = f / 5.0;
        }
        for o in c.common.optims() {
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
        Ok(c)
    }
}

impl Dmd2Args {
    pub fn job(&self, show_progress: bool) -> Result<Dmd2Job> {
        Ok(Dmd2Job {
            config: self.resolve()?,
            data: self.data.clone(),
            limit: self.limit,
            prompts: self.prompts.clone(),
            out: self
                .common
                .out
                .clone()
                .unwrap_or_else(|| Dmd2Job::DEFAULT_OUT.into()),
            resume: self.common.resume,
            allow_resume_change: self.common.allow_resume_change,
            show_progress,
        })
    }
}

impl TdmArgs {
    pub fn job(&self, show_progress: bool) -> Result<TdmJob> {
        Ok(TdmJob {
            config: self.resolve()?,
            prompts: self.prompts.clone(),
            out: self
                .common
                .out
                .clone()
                .unwrap_or_else(|| TdmJob::DEFAULT_OUT.into()),
            resume: self.common.resume,
            allow_resume_change: self.common.allow_resume_change,
            show_progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command, TrainCommand};
    use clap::Parser;

    fn dmd2(args: &[&str]) -> Result<super::Dmd2Args, clap::Error> {
        let argv = ["distill", "train", "dmd2"].iter().chain(args).copied();
        match Cli::try_parse_from(argv)?.command {
            Command::Train(TrainCommand::Dmd2(a)) => Ok(a),
            _ => unreachable!("parsed as train dmd2"),
        }
    }

    #[test]
    fn cfg_interval_and_phased_reach_the_config() {
        let c = dmd2(&["--cfg-interval", "0.3,5", "--phased", "false"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.common.cfg_interval, Some([0.3, 5.0]));
        assert!(!c.phased);
        let c = dmd2(&["--autoguidance", "runs/weak/checkpoint"])
            .unwrap()
            .resolve()
            .unwrap();
        let weak = std::path::Path::new("runs/weak/checkpoint");
        assert_eq!(c.common.autoguidance.as_deref(), Some(weak));
        let t = toml::to_string(&c).unwrap();
        assert!(t.contains("autoguidance = \"runs/weak/checkpoint\""), "{t}");
        let c = dmd2(&[]).unwrap().resolve().unwrap();
        assert_eq!(c.common.cfg_interval, None);
        assert!(c.common.autoguidance.is_none());
        assert!(!toml::to_string(&c).unwrap().contains("autoguidance"));
        assert!(c.phased);
        for bad in ["0.3", "5,0.3", "a,b", "0.3,5,7", "-1,2"] {
            let e = dmd2(&[&format!("--cfg-interval={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected LO,HI"), "{bad}: {e}");
        }
    }

    #[test]
    fn f_divergence_reaches_the_config_in_its_toml_spelling() {
        use graphs::losses::dmd2::FDivergence;
        let c = dmd2(&[]).unwrap().resolve().unwrap();
        assert_eq!(c.f_divergence, FDivergence::ReverseKl);
        let c = dmd2(&["--f-divergence", "jensen-shannon"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.f_divergence, FDivergence::JensenShannon);
        let t = toml::to_string(&c).unwrap();
        assert!(t.contains("f_divergence = \"jensen_shannon\""), "{t}");
        let back: super::Dmd2Config = toml::from_str(&t).unwrap();
        assert_eq!(back.f_divergence, FDivergence::JensenShannon);
        let e = dmd2(&["--f-divergence", "hellinger"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("forward-kl"), "{e}");
    }
}
