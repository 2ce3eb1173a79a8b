//! Command-line interface (clap derive; every doc comment below is `--help` text).

use crate::checkpoint;
use crate::train::teacher::{self, TeacherConfig};
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use graphs::{BetaSchedule, GeneratorSpec, SamplerKind, UNetConfig};
use std::path::{Path, PathBuf};

/// Distil a diffusion model into a fast 1-4 step generator, export it and prove the export matches.
///
/// Pipeline: `distill train teacher` -> `distill train dmd2|tdm` -> `distill export` ->
/// `distill validate`. With no data argument, training uses the 10,000 MNIST digits embedded in
/// the binary.
#[derive(Parser, Debug)]
#[command(name = "distill", version, propagate_version = true)]
pub struct Cli {
    /// Worker threads for CPU kernels (default: all cores; same as RAYON_NUM_THREADS).
    #[arg(long, global = true, env = "DISTILL_THREADS")]
    pub threads: Option<usize>,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a binary built with `--features cuda`.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Hide progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Load checkpoints whose model.safetensors does not match the sha256 recorded in their
    /// config.json (hand-edited weights); by default that is a "corrupted" error.
    #[arg(long, global = true)]
    pub no_verify: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model: the diffusion teacher, or a few-step student distilled from it.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Generate images from a checkpoint; writes a PNG grid and a safetensors sample file.
    Sample(SampleArgs),
    /// Score samples in a small MNIST classifier's feature space: Frechet distance, class accuracy,
    /// precision / recall / density / coverage (k-NN, k = 3) and per-class recall.
    Eval(EvalArgs),
    /// Export a checkpoint to ONNX: the whole sampler unrolled into one graph (default), or the
    /// bare denoiser.
    Export(ExportArgs),
    /// Run an exported ONNX model in tract and ONNX Runtime against the candle reference on seeded
    /// inputs; print max/mean/p99 abs error, max rel error and cosine per runtime and output, and
    /// exit with code 3 if any is past tolerance.
    Validate(ValidateArgs),
    /// Time a teacher training step and a forward pass in candle and, when torch is installed
    /// (scripts/setup-bench.sh), the identical UNet in PyTorch in the same run; prints ratios.
    Bench(BenchArgs),
    /// Draw training curves from a run's metrics.jsonl as a PNG line chart.
    Plot(PlotArgs),
    /// The main job: teacher -> DMD2 and TDM students -> quality per NFE -> ONNX export -> parity,
    /// on the embedded digits by default (finished stages are skipped, interrupted ones resumed).
    Pipeline(PipelineArgs),
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A metrics.jsonl file, or a run folder holding one.
    pub metrics: PathBuf,
    /// Keys to draw, comma-separated (default: every logged quantity but step, time and learning rates).
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<String>,
    /// Output PNG (default: curves.png beside the metrics file).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Logarithmic y axis.
    #[arg(long)]
    pub log_y: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A sample file from `distill sample` (`images` [N,1,32,32], optional `labels`), or a
    /// checkpoint folder to sample from (with the sampler flags below).
    pub input: PathBuf,
    /// Sampler when INPUT is a checkpoint (default: the checkpoint's own).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Sampling steps when INPUT is a checkpoint.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale when INPUT is a checkpoint.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Images to generate when INPUT is a checkpoint (equal per class).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Noise seed when INPUT is a checkpoint.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the evaluation classifier is cached (default: $DISTILL_CACHE or ~/.cache/distill).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ExportWhat {
    /// noise (+ fresh noise per re-noise step) + class_labels -> images: the deployable model.
    Generator,
    /// One network evaluation: x, sigma (EDM) or timestep (VP), class_labels -> denoised / eps.
    Denoiser,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum PrecisionArg {
    Fp32,
    /// f16 weights and Conv/MatMul, with norms, softmax, sampler arithmetic and I/O in f32.
    Fp16,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder to export (e.g. runs/pipeline/teacher/checkpoint).
    pub checkpoint: PathBuf,
    /// Write ONNX (the default and, for now, the only format; TensorRT engines come from this file).
    #[arg(long, default_value_t = true)]
    pub onnx: bool,
    /// Output folder; the file is `<what>[_fp16].onnx`.
    #[arg(long, short, default_value = "export")]
    pub out: PathBuf,
    /// What to export.
    #[arg(long, value_enum, default_value = "generator")]
    pub what: ExportWhat,
    /// Weight/compute precision of the exported graph.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: PrecisionArg,
    /// Generator only: sampler to unroll (default: the checkpoint's own).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Generator only: sampling steps to unroll.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Generator only: classifier-free guidance scale baked into the graph.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Also build a TensorRT engine `<stem>.plan` (+ `<stem>.plan.json` sidecar) from the ONNX
    /// with trtexec, validated against the checkpoint before it is written. Needs TensorRT 10's
    /// trtexec (PATH, /usr/src/tensorrt/bin or DISTILL_TRTEXEC) and an NVIDIA GPU.
    #[arg(long)]
    pub trt: bool,
    /// --trt: smallest batch of the engine's optimisation profile.
    #[arg(long, default_value_t = 1)]
    pub min_batch: usize,
    /// --trt: the batch TensorRT tunes its kernels for.
    #[arg(long, default_value_t = 8)]
    pub opt_batch: usize,
    /// --trt: largest batch of the optimisation profile.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// --trt: engine precision.
    #[arg(long, value_enum, default_value = "fp16")]
    pub trt_precision: crate::engine::TrtPrecisionArg,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The exported .onnx file, or a .plan (with its .plan.json) from `distill export --trt`.
    pub model: PathBuf,
    /// The checkpoint it was exported from (the candle reference).
    #[arg(long)]
    pub reference: PathBuf,
    /// Runtimes to compare, comma-separated (tract, ort, trt); default tract,ort for an .onnx and
    /// trt for a .plan. Leaving one out is how to skip it.
    #[arg(long, value_delimiter = ',')]
    pub runtimes: Option<Vec<String>>,
    /// Number of seeded input sets.
    #[arg(long, default_value_t = 32)]
    pub cases: usize,
    /// Batch sizes cycled over the cases.
    #[arg(long, value_delimiter = ',', default_value = "1,7,4,2")]
    pub batches: Vec<usize>,
    /// Seed of the inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tolerance on max abs error (default: fp32 1e-4, fp16 2e-2; fp16 in tract 6e-2, whose f16
    /// matrix products accumulate in f16).
    #[arg(long)]
    pub atol: Option<f64>,
    /// Tolerance on mean abs error (default: fp32 none, fp16 2e-3).
    #[arg(long)]
    pub mean_atol: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run the TensorRT runtime (trtexec) on this engine: a .plan written by `distill export
    /// --trt`, or an .onnx to build a temporary fp16 engine from.
    #[arg(long, value_name = "PLAN_OR_ONNX")]
    pub trt: Option<PathBuf>,
    /// Report a requested runtime that is not installed here (ONNX Runtime's library, trtexec, an
    /// NVIDIA GPU) as unavailable, a skipped JUnit test, instead of failing (at least one must run).
    #[arg(long)]
    pub allow_missing: bool,
    /// Run the TensorRT compatibility lint first; a violation exits with code 4.
    #[arg(long)]
    pub lint: bool,
    /// Write the results as JUnit XML here: one test per runtime x output (metrics in
    /// system-out, failure past tolerance), plus the lint.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

impl ExportArgs {
    /// The flags' defaults for an ONNX generator export of `checkpoint` into `out`.
    pub fn generator(checkpoint: &Path, out: &Path, precision: PrecisionArg) -> Self {
        Self {
            checkpoint: checkpoint.to_path_buf(),
            onnx: true,
            out: out.to_path_buf(),
            what: ExportWhat::Generator,
            precision,
            sampler: None,
            steps: None,
            cfg_scale: None,
            trt: false,
            min_batch: 1,
            opt_batch: 8,
            max_batch: 16,
            trt_precision: crate::engine::TrtPrecisionArg::Fp16,
        }
    }
}

impl ValidateArgs {
    /// The flags' defaults for validating `model` against `reference` in tract and ONNX Runtime.
    pub fn new(model: &Path, reference: &Path) -> Self {
        Self {
            model: model.to_path_buf(),
            reference: reference.to_path_buf(),
            runtimes: None,
            cases: 32,
            batches: vec![1, 7, 4, 2],
            seed: 0,
            atol: None,
            mean_atol: None,
            json: None,
            trt: None,
            allow_missing: false,
            lint: false,
            junit: None,
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// UNet config: `bench` (32-64-128, two res blocks per level), `mnist_small` (the default teacher) or `tiny`.
    #[arg(long, default_value = "bench")]
    pub config: String,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// PyTorch comparison: `auto` (when torch is found), `require`, or `off`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "require", "off"])]
    pub torch: String,
    /// Skip the per-op table (conv, GroupNorm+SiLU, res block, attention, AdamW: stock candle vs
    /// the fast kernels vs PyTorch).
    #[arg(long)]
    pub no_ops: bool,
    /// Also time the whole forward and step on candle's stock ops (slow).
    #[arg(long)]
    pub stock: bool,
    /// Python interpreter with torch (default: $DISTILL_TORCH_PYTHON, then .venv-bench/bin/python).
    #[arg(long)]
    pub torch_python: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// Folder for every stage (teacher/, dmd2_1step/, dmd2_4step/, tdm_4step/, export/,
    /// results.md, results.json).
    #[arg(long, short, default_value = "runs/pipeline")]
    pub out: PathBuf,
    /// Training data (default: the embedded MNIST digits).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Teacher training steps (default: the teacher's default, 5000).
    #[arg(long)]
    pub teacher_steps: Option<u64>,
    /// DMD2 iterations per student (the student is updated every 5th).
    #[arg(long, default_value_t = 1500)]
    pub dmd2_steps: u64,
    /// TDM iterations (the student is updated every iteration).
    #[arg(long, default_value_t = 600)]
    pub tdm_steps: u64,
    /// Skip the 4-step DMD2 student.
    #[arg(long)]
    pub no_dmd2_4step: bool,
    /// Images per evaluation.
    #[arg(long, default_value_t = 1000)]
    pub eval_n: usize,
    /// Skip the ONNX export and parity stage.
    #[arg(long)]
    pub no_export: bool,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Train the diffusion teacher (EDM or VP) on real data.
    Teacher(TeacherArgs),
    /// Distil a teacher into a 1-4 step student with DMD2 (distribution matching + GAN).
    Dmd2(crate::cli_distill::Dmd2Args),
    /// Distil a teacher into a few-step student with TDM (trajectory distribution matching).
    Tdm(crate::cli_distill::TdmArgs),
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
    #[arg(long, short, default_value = "runs/teacher")]
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
    /// Parameterisation: `edm` (Karras preconditioned denoiser) or `vp` (DDPM eps-prediction, 1000 steps).
    #[arg(long, value_parser = ["edm", "vp"])]
    pub parameterisation: Option<String>,
    /// VP beta schedule (beta 1e-4 .. 2e-2).
    #[arg(long, value_enum)]
    pub beta_schedule: Option<BetaScheduleArg>,
    /// Optimiser steps in total (a resumed run stops at the same total).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step.
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
    /// Write a PNG sample grid every N steps (0 = only at the end... and never if 0 steps).
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
    #[arg(long, value_enum)]
    pub precision: Option<TrainPrecisionArg>,
    /// Number of classes of the model (default: the config's, 10; a data set with a label at or
    /// above it is an error).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// With --resume: continue even though the config (besides steps, cadence and precision) or
    /// the data differ from the run's start.
    #[arg(long, requires = "resume")]
    pub allow_resume_change: bool,
}

/// Training compute precision.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TrainPrecisionArg {
    Fp32,
    Fp16,
    Bf16,
}

impl From<TrainPrecisionArg> for crate::train::optim::Precision {
    fn from(p: TrainPrecisionArg) -> Self {
        match p {
            TrainPrecisionArg::Fp32 => Self::Fp32,
            TrainPrecisionArg::Fp16 => Self::Fp16,
            TrainPrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BetaScheduleArg {
    Linear,
    ScaledLinear,
}

impl TeacherArgs {
    /// Defaults <- TOML file <- flags.
    pub fn resolve(&self) -> Result<TeacherConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => TeacherConfig::default(),
        };
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
        set!(c.steps, self.steps);
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
            c.precision = p.into();
        }
        crate::checks::teacher(&c)?;
        Ok(c)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SamplerArg {
    Heun,
    Euler,
    Ddim,
    /// The checkpoint's own few-step sampler (students).
    Student,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint folder (e.g. runs/teacher/checkpoint).
    pub checkpoint: PathBuf,
    /// Output PNG grid; the raw samples go beside it as .safetensors.
    #[arg(long, short, default_value = "samples.png")]
    pub out: PathBuf,
    /// Sampler (default: the checkpoint's own: Heun for EDM teachers, DDIM for VP, student for students).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Sampling steps (Heun with N steps costs 2N-1 NFE; a student can use fewer than its trained
    /// steps: every (N/k)-th of its sigmas).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Seed of the noise (not with --noise, which gives the noise itself).
    #[arg(long, default_value_t = 0, conflicts_with = "noise")]
    pub seed: u64,
    /// Class labels to draw, comma-separated; default: every class.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<u32>>,
    /// Images per label.
    #[arg(long, default_value_t = 10)]
    pub per_class: usize,
    /// Use the noise in this safetensors file (`noise` [N,C,H,W], `noise_1`.. for fresh-noise students)
    /// instead of seeded noise; labels must then give N labels (or one per class cycling).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
}

/// Generator spec from a checkpoint's default, overridden by sampler flags.
pub fn spec_from_flags(
    meta: &checkpoint::CheckpointMeta,
    sampler: Option<SamplerArg>,
    steps: Option<usize>,
    cfg: Option<f64>,
) -> Result<GeneratorSpec> {
    if let Some(n) = steps {
        crate::checks::size("--steps", n as u64, 1, 1000)?;
    }
    if let Some(c) = cfg {
        crate::checks::cfg_scale("--cfg-scale", c)?;
    }
    let mut spec = meta.generator.clone();
    if let Some(s) = sampler {
        spec.sampler = match s {
            SamplerArg::Heun => SamplerKind::Heun,
            SamplerArg::Euler => SamplerKind::Euler,
            SamplerArg::Ddim => SamplerKind::Ddim,
            SamplerArg::Student => SamplerKind::Student,
        };
        if spec.sampler == SamplerKind::Student && meta.generator.sampler != SamplerKind::Student {
            bail!(
                "this checkpoint is a {}: it has no student sampler",
                meta.role.name()
            );
        }
    }
    if let Some(n) = steps {
        if spec.sampler == SamplerKind::Student {
            spec = spec.student_substeps(n)?;
        } else {
            spec.steps = n;
        }
    }
    if let Some(c) = cfg {
        spec.cfg_scale = c;
    }
    Ok(spec)
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ord: usize = s
                .strip_prefix("cuda:")
                .map(|o| o.parse())
                .transpose()
                .context("--device cuda:N needs a number")?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA; build it with scripts/build-cuda.sh (cargo build --release --features cuda)");
            }
            Ok(Device::new_cuda(ord).with_context(|| format!("opening CUDA device {ord}"))?)
        }
        other => bail!("unknown --device {other:?} (expected cpu, cuda or cuda:N)"),
    }
}

fn show_progress(quiet: bool) -> bool {
    use std::io::IsTerminal;
    !quiet && std::io::stderr().is_terminal()
}

/// Loads the training data (default: embedded MNIST) and brings it to the model's resolution.
pub fn load_data(
    path: Option<&Path>,
    resolution: usize,
    limit: Option<usize>,
) -> Result<crate::data::Dataset> {
    if limit == Some(0) {
        bail!("--limit 0 leaves no images to train on (use --limit 1 or more)");
    }
    let d = crate::data::load_at_resolution(path, Some(resolution))?;
    let d = if let Some(n) = limit { d.subset(n) } else { d };
    Ok(d.to_resolution(resolution)?)
}

pub fn cmd_teacher(a: &TeacherArgs, dev: &Device, quiet: bool) -> Result<()> {
    let mut cfg = a.resolve()?;
    let data = load_data(a.data.as_deref(), cfg.model.resolution, a.limit)?;
    crate::checks::labels_fit(&data, cfg.model.num_classes)?;
    cfg.model.channels = data.channels;
    cfg.model.num_classes = data.num_classes;
    let run = RunDir::new(&a.out)?;
    let (toml_cfg, state) = (toml::to_string(&cfg)?, teacher::TRAIN_STATE_FILE);
    let allow = a.allow_resume_change;
    crate::checks::resume(&run, state, &toml_cfg, Some(&data), a.resume, allow)?;
    eprintln!(
        "teacher: {} images ({}x{}x{}, {} classes) from {}; {} params; {} steps at batch {} -> {}",
        data.len(),
        data.channels,
        data.height,
        data.width,
        data.num_classes,
        data.source,
        {
            let (_, den, _) = teacher::init_trainable(&cfg.model_config()?, cfg.seed, dev)?;
            graphs::params::count(&den)
        },
        cfg.steps,
        cfg.batch_size,
        run.root.display()
    );
    let out = teacher::train(&cfg, &data, &run, a.resume, show_progress(quiet), dev)?;
    eprintln!(
        "teacher: done, {} steps in {:.0}s, final loss {:.4}; checkpoint {}; samples {}",
        out.steps,
        out.seconds,
        out.final_loss,
        out.checkpoint.display(),
        run.samples().display()
    );
    Ok(())
}

fn cmd_sample(a: &SampleArgs, dev: &Device) -> Result<()> {
    crate::checks::size("--per-class", a.per_class as u64, 1, 1_000_000)?;
    crate::checks::size("--batch-size", a.batch_size as u64, 1, 65_536)?;
    let (den, meta) = checkpoint::load(&a.checkpoint, dev)?;
    let spec = spec_from_flags(&meta, a.sampler, a.steps, a.cfg_scale)?;
    let ncls = den.unet.cfg.num_classes;
    if let Some(bad) = a.labels.iter().flatten().find(|&&l| l as usize >= ncls) {
        bail!(
            "--labels: label {bad} is out of range (the model has {ncls} classes: 0..{})",
            ncls - 1
        );
    }
    let (inputs, labels) = match &a.noise {
        Some(p) => {
            let inputs = crate::sample::load_noise(p, &den, &spec, dev)?;
            let n = inputs.noise.dim(0)?;
            let labels: Vec<u32> = match &a.labels {
                Some(l) if l.len() == n => l.clone(),
                Some(l) if !l.is_empty() => (0..n).map(|i| l[i % l.len()]).collect(),
                _ => (0..n).map(|i| (i % ncls) as u32).collect(),
            };
            (inputs, labels)
        }
        None => {
            let labels: Vec<u32> = match &a.labels {
                Some(l) => l
                    .iter()
                    .flat_map(|&k| std::iter::repeat_n(k, a.per_class))
                    .collect(),
                None => crate::sample::class_labels(ncls, a.per_class),
            };
            (
                crate::sample::seeded_noise(&den, &spec, labels.len(), a.seed, dev)?,
                labels,
            )
        }
    };
    let n = labels.len();
    let lt = Tensor::from_vec(labels, n, dev)?;
    let t0 = std::time::Instant::now();
    let images = crate::sample::generate(&den, &spec, &inputs, &lt, a.batch_size, dev)?;
    let secs = t0.elapsed().as_secs_f64();
    crate::grid::tensor_grid_png(&a.out, &images, a.per_class.max(1))?;
    let raw = a.out.with_extension("safetensors");
    crate::sample::save_samples(&raw, &images, &lt)?;
    println!(
        "{n} images with {:?} ({} steps, {} NFE, cfg {}) in {secs:.2}s ({:.1} ms/image): {} and {}",
        spec.sampler,
        spec.steps,
        spec.nfe(),
        spec.cfg_scale,
        1000.0 * secs / n as f64,
        a.out.display(),
        raw.display()
    );
    Ok(())
}

fn evaluator(cache: Option<&Path>, dev: &Device, quiet: bool) -> Result<crate::eval::Evaluator> {
    let dir = cache
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::eval::classifier::default_cache_dir);
    crate::eval::Evaluator::new(&dir, dev, show_progress(quiet))
}

/// Generates `n` class-balanced images from a checkpoint and scores them.
pub fn eval_checkpoint(
    ev: &crate::eval::Evaluator,
    ckpt: &Path,
    spec_flags: (Option<SamplerArg>, Option<usize>, Option<f64>),
    n: usize,
    seed: u64,
    dev: &Device,
) -> Result<(crate::eval::EvalReport, GeneratorSpec, f64)> {
    let (den, meta) = checkpoint::load(ckpt, dev)?;
    let spec = spec_from_flags(&meta, spec_flags.0, spec_flags.1, spec_flags.2)?;
    let ncls = den.unet.cfg.num_classes;
    let labels: Vec<u32> = (0..n).map(|i| (i % ncls) as u32).collect();
    let inputs = crate::sample::seeded_noise(&den, &spec, n, seed, dev)?;
    let t0 = std::time::Instant::now();
    let images = crate::sample::generate(
        &den,
        &spec,
        &inputs,
        &Tensor::from_vec(labels.clone(), n, dev)?,
        250,
        dev,
    )?;
    let ms_per_image = 1000.0 * t0.elapsed().as_secs_f64() / n as f64;
    Ok((ev.evaluate(&images, Some(&labels))?, spec, ms_per_image))
}

fn cmd_eval(a: &EvalArgs, dev: &Device, quiet: bool) -> Result<()> {
    if !a.input.is_dir() && (a.sampler.is_some() || a.steps.is_some() || a.cfg_scale.is_some()) {
        bail!(
            "--sampler, --steps and --cfg-scale apply to a checkpoint folder; {} is a sample file",
            a.input.display()
        );
    }
    // Reject what the classifier cannot score before training (or loading) it.
    let samples = if a.input.is_dir() {
        crate::checks::size("--n", a.n as u64, 2, 10_000_000)?;
        let u = checkpoint::load_meta(&a.input)?.model.unet;
        let like = Tensor::zeros(
            (1, u.channels, u.resolution, u.resolution),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        crate::eval::classifier::check_image_shape(&like)
            .with_context(|| format!("{} cannot be evaluated", a.input.display()))?;
        None
    } else {
        let (images, labels) = crate::sample::load_samples(&a.input, dev)?;
        crate::eval::classifier::check_image_shape(&images)
            .with_context(|| format!("{} cannot be evaluated", a.input.display()))?;
        Some((images, labels))
    };
    let ev = evaluator(a.cache_dir.as_deref(), dev, quiet)?;
    let report = if let Some((images, labels)) = samples {
        ev.evaluate(&images, labels.as_deref())?
    } else {
        let (r, spec, ms) = eval_checkpoint(
            &ev,
            &a.input,
            (a.sampler, a.steps, a.cfg_scale),
            a.n,
            a.seed,
            dev,
        )?;
        println!(
            "{} on {} images: {:?}, {} steps, {} NFE, cfg {} ({ms:.1} ms/image)",
            a.input.display(),
            a.n,
            spec.sampler,
            spec.steps,
            spec.nfe(),
            spec.cfg_scale
        );
        r
    };
    println!("{report}");
    if let Some(p) = &a.json {
        checkpoint::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// Exports a checkpoint; returns the written file.
pub fn export_checkpoint(a: &ExportArgs) -> Result<PathBuf> {
    if !a.onnx {
        bail!("nothing to export: --onnx is the only format so far");
    }
    if crate::diffusers_io::is_diffusers(&a.checkpoint) {
        let (den, fp16) = (
            a.what == ExportWhat::Denoiser,
            a.precision == PrecisionArg::Fp16,
        );
        return crate::diffusers_io::export_unet(&a.checkpoint, &a.out, den, fp16, a.trt);
    }
    let dev = Device::Cpu;
    let (den, meta) = checkpoint::load(&a.checkpoint, &dev)?;
    let precision = match a.precision {
        PrecisionArg::Fp32 => export::Precision::Fp32,
        PrecisionArg::Fp16 => export::Precision::Fp16,
    };
    let opts = export::ExportOptions {
        precision,
        method: meta.role.name().into(),
        weights_sha256: Some(sha256_file(&a.checkpoint.join(checkpoint::WEIGHTS_FILE))?),
        extra_metadata: vec![("checkpoint_step".into(), meta.step.to_string())],
    };
    let (model, stem) = match a.what {
        ExportWhat::Generator => {
            let spec = spec_from_flags(&meta, a.sampler, a.steps, a.cfg_scale)?;
            (export::export_generator(&den, &spec, &opts)?, "generator")
        }
        ExportWhat::Denoiser => (export::export_denoiser(&den, &opts)?, "denoiser"),
    };
    let suffix = if precision == export::Precision::Fp16 {
        "_fp16"
    } else {
        ""
    };
    let path = a.out.join(format!("{stem}{suffix}.onnx"));
    export::write_model(&model, &path)?;
    Ok(path)
}

fn cmd_export(a: &ExportArgs) -> Result<()> {
    // Fail fast: find trtexec and the GPU before spending time on the export.
    let toolchain = if a.trt {
        Some(export::tensorrt::Toolchain::locate()?)
    } else {
        None
    };
    let path = export_checkpoint(a)?;
    let model = export::runtime::load_model(&path)?;
    let g = model
        .graph
        .as_ref()
        .context("exported model has no graph")?;
    println!(
        "wrote {} ({} nodes, {} initializers, opset {}, IR {})",
        path.display(),
        g.node.len(),
        g.initializer.len(),
        export::OPSET,
        export::IR_VERSION
    );
    for m in export::metadata(&model) {
        println!("  {} = {}", m.0, m.1);
    }
    if !crate::diffusers_io::is_diffusers(&a.checkpoint) {
        println!(
            "next: distill validate {} --reference {}",
            path.display(),
            a.checkpoint.display()
        );
    }
    if let Some(tc) = toolchain {
        crate::engine::build_engine(a, &path, &tc)?;
    }
    Ok(())
}

/// Validates an exported model against its checkpoint.
pub fn validate_model(a: &ValidateArgs) -> Result<export::ValidateReport> {
    let dev = Device::Cpu;
    let (den, _) = checkpoint::load(&a.reference, &dev)?;
    let meta: std::collections::HashMap<String, String> = export::tensorrt::metadata_of(&a.model)?
        .into_iter()
        .collect();
    let spec: GeneratorSpec;
    let target = match meta.get("kind").map(String::as_str) {
        Some("generator") => {
            let text = meta
                .get("generator_spec")
                .context("generator model lacks `generator_spec` metadata")?;
            spec = serde_json::from_str(text)
                .context("parsing the model's generator_spec metadata")?;
            export::Target::Generator(&spec)
        }
        Some("denoiser") => export::Target::Denoiser,
        other => bail!(
            "{}: metadata `kind` is {other:?}; was it exported by distill?",
            a.model.display()
        ),
    };
    for (name, t) in [("--atol", a.atol), ("--mean-atol", a.mean_atol)] {
        if let Some(t) = t {
            crate::checks::in_range(name, t, 0.0, 1e3)?;
        }
    }
    let runtimes = crate::gate::runtime_names(a)
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<export::RuntimeKind>>>()?;
    let opts = export::ValidateOptions {
        cases: a.cases,
        batches: a.batches.clone(),
        seed: a.seed,
        runtimes,
        precision: None,
        max_abs_tol: a.atol,
        mean_abs_tol: a.mean_atol,
        trt_engine: a.trt.clone(),
        allow_missing: a.allow_missing,
    };
    export::validate(&a.model, &den, target, &opts)
}

fn cmd_validate(a: &ValidateArgs) -> Result<()> {
    crate::gate::run(a)
}

fn cmd_bench(a: &BenchArgs, threads: Option<usize>) -> Result<()> {
    let mut o = crate::bench::BenchOptions::for_config(&a.config)?;
    o.batch = a.batch;
    o.warmup = a.warmup;
    o.iters = a.iters;
    o.threads = threads;
    o.torch = match a.torch.as_str() {
        "require" => crate::bench::TorchMode::Require,
        "off" => crate::bench::TorchMode::Off,
        _ => crate::bench::TorchMode::Auto,
    };
    o.torch_python = a.torch_python.clone();
    o.json_out = a.json.clone();
    o.ops = !a.no_ops;
    o.stock = a.stock;
    println!("{}", crate::bench::run(&o)?);
    Ok(())
}

fn cmd_pipeline(a: &PipelineArgs, dev: &Device, quiet: bool) -> Result<()> {
    let o = crate::pipeline::PipelineOptions {
        out: a.out.clone(),
        data: a.data.clone(),
        teacher_steps: a.teacher_steps,
        dmd2_steps: a.dmd2_steps,
        tdm_steps: a.tdm_steps,
        dmd2_four_step: !a.no_dmd2_4step,
        eval_n: a.eval_n,
        export: !a.no_export,
        quiet,
    };
    let r = crate::pipeline::run(&o, dev)?;
    println!("{}", crate::pipeline::markdown(&r));
    Ok(())
}

fn cmd_plot(a: &PlotArgs) -> Result<()> {
    let file = if a.metrics.is_dir() {
        a.metrics.join("metrics.jsonl")
    } else {
        a.metrics.clone()
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| file.parent().unwrap_or(Path::new(".")).join("curves.png"));
    let series = crate::plot::read_metrics(&file, &a.keys)?;
    crate::plot::plot_png(&out, &file.display().to_string(), &series, a.log_y)?;
    println!(
        "{}: {} ({} points)",
        out.display(),
        series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        series.iter().map(|s| s.points.len()).sum::<usize>()
    );
    Ok(())
}

/// Exit codes: 0 success, 1 error, 2 usage (clap), 3 validation failed past tolerance,
/// 4 the TensorRT compatibility lint failed.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<ValidationFailed>().is_some() {
        3
    } else if e.downcast_ref::<export::tensorrt::LintFailed>().is_some() {
        4
    } else {
        1
    }
}

/// Returned when a parity check ran and failed, so the process exits with code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ValidationFailed(pub String);

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    crate::checks::set_verify_weights(!cli.no_verify);
    graphs::tune_allocator();
    graphs::tune_threads(cli.threads);
    let dev = device(&cli.device)?;
    match &cli.command {
        Command::Train(TrainCommand::Teacher(a)) => cmd_teacher(a, &dev, cli.quiet),
        Command::Train(TrainCommand::Dmd2(a)) => {
            crate::cli_distill::cmd_dmd2(a, &dev, show_progress(cli.quiet), cli.quiet).map(|_| ())
        }
        Command::Train(TrainCommand::Tdm(a)) => {
            crate::cli_distill::cmd_tdm(a, &dev, show_progress(cli.quiet), cli.quiet).map(|_| ())
        }
        Command::Sample(a) => cmd_sample(a, &dev),
        Command::Eval(a) => cmd_eval(a, &dev, cli.quiet),
        Command::Export(a) => cmd_export(a),
        Command::Bench(a) if dev.is_cuda() => {
            let o = crate::bench_gpu::GpuBenchOptions {
                config: a.config.clone(),
                batch: a.batch,
                warmup: a.warmup,
                iters: a.iters,
                torch_python: a.torch_python.clone(),
                torch: a.torch != "off",
            };
            let r = crate::bench_gpu::run(&o, &dev)?;
            println!("{r}");
            if let Some(p) = &a.json {
                checkpoint::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
            }
            Ok(())
        }
        Command::Bench(a) => cmd_bench(a, cli.threads),
        Command::Validate(a) => cmd_validate(a),
        Command::Pipeline(a) => cmd_pipeline(a, &dev, cli.quiet),
        Command::Plot(a) => cmd_plot(a),
    }
}
