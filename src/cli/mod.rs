//! Command-line interface (clap derive; every doc comment below is `--help` text). Flags are
//! only converted into the library's jobs ([`distill::jobs`]); defaults are the jobs' own.

mod bench;
mod train;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use distill::jobs::{
    EvalJob, ExportJob, ExportWhat, PipelineJob, SampleJob, SamplerOverride, TrtBuild, ValidateJob,
};
use graphs::{Precision, SamplerKind};
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
    /// Device: `cpu`, or `cuda`/`cuda:N` in a binary built with `--features cuda`; a bare `cuda`
    /// under a launcher opens `cuda:LOCAL_RANK` (mpirun's OMPI_COMM_WORLD_LOCAL_RANK, torchrun's
    /// LOCAL_RANK): one GPU per rank.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Hide progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Load checkpoints whose model.safetensors does not match the sha256 recorded in their
    /// config.json (hand-edited weights); by default that is a "corrupted" error.
    #[arg(long, global = true)]
    pub no_verify: bool,
    /// Under `mpirun` (data-parallel training, one process per rank): the longest any rank waits
    /// in a collective (gradient all-reduce, broadcast) for the others, in seconds; a rank that
    /// died or hangs then stops the run with an error naming it. Raise it when rank 0's
    /// checkpoints, sample grids or evaluations take longer.
    #[arg(long, global = true, default_value_t = distill::parallel::DEFAULT_TIMEOUT_S,
          value_parser = positive_seconds)]
    pub collective_timeout: f64,
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
    Bench(bench::BenchArgs),
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
    #[arg(long = "sample-steps", visible_alias = "steps")]
    pub sample_steps: Option<usize>,
    /// Classifier-free guidance scale when INPUT is a checkpoint.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Images to generate when INPUT is a checkpoint (equal per class).
    #[arg(long, default_value_t = EvalJob::DEFAULT_N)]
    pub n: usize,
    /// Noise seed when INPUT is a checkpoint.
    #[arg(long, default_value_t = EvalJob::DEFAULT_SEED)]
    pub seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the evaluation classifier is cached (default: $DISTILL_CACHE or ~/.cache/distill).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ExportFormatArg {
    Onnx,
    Diffusers,
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportWhatArg {
    /// noise (+ fresh noise per re-noise step) + class_labels -> images: the deployable model.
    Generator,
    /// One network evaluation: x, sigma (EDM) or timestep (VP), class_labels -> denoised / eps.
    Denoiser,
}

impl From<ExportWhatArg> for ExportWhat {
    fn from(w: ExportWhatArg) -> Self {
        match w {
            ExportWhatArg::Generator => ExportWhat::Generator,
            ExportWhatArg::Denoiser => ExportWhat::Denoiser,
        }
    }
}

/// A precision flag that admits `choices` (spelled as [`Precision::name`]), so `--help` lists
/// only what the consumer supports while every consumer shares the one [`Precision`].
pub(crate) fn precision_parser(
    choices: &'static [&'static str],
) -> impl clap::builder::TypedValueParser<Value = Precision> {
    clap::builder::PossibleValuesParser::new(choices).map(|s| {
        s.parse::<Precision>()
            .expect("every choice is a precision name")
    })
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder to export (e.g. runs/pipeline/teacher/checkpoint).
    pub checkpoint: PathBuf,
    /// Output folder; the file is `<what>[_fp16].onnx`.
    #[arg(long, short, default_value = ExportJob::DEFAULT_OUT)]
    pub out: PathBuf,
    /// What to export.
    #[arg(long, value_enum, default_value = "generator")]
    pub what: ExportWhatArg,
    /// `onnx`, or `diffusers`: a model whose network is a diffusers UNet2DModel (a diffusers
    /// teacher or its students) written back into --out as a diffusers DDIMPipeline folder
    /// (unet/, scheduler/ whose set_timesteps gives the student's steps, model_index.json; a
    /// LoRA student: its merged weights), or `lora`: a student trained with --lora-rank as a
    /// diffusers LoRA file (`unet.`-prefixed PEFT keys, its config and scale in the header) at
    /// --out (a `.safetensors` path, or a folder receiving pytorch_lora_weights.safetensors).
    #[arg(long, value_enum, default_value = "onnx")]
    pub format: ExportFormatArg,
    /// Weight/compute precision of the exported graph: fp32, or fp16 (f16 weights and
    /// Conv/MatMul, with norms, softmax, sampler arithmetic and I/O in f32).
    #[arg(long, default_value = "fp32", value_parser = precision_parser(&["fp32", "fp16"]))]
    pub precision: Precision,
    /// Generator only: sampler to unroll (default: the checkpoint's own).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Generator only: sampling steps to unroll.
    #[arg(long = "sample-steps", visible_alias = "steps")]
    pub sample_steps: Option<usize>,
    /// Generator only: classifier-free guidance scale baked into the graph.
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Also build a TensorRT engine `<stem>.plan` (+ `<stem>.plan.json` sidecar) from the ONNX
    /// with trtexec, validated against the checkpoint before it is written. Needs TensorRT 10's
    /// trtexec (PATH, /usr/src/tensorrt/bin or DISTILL_TRTEXEC) and an NVIDIA GPU.
    #[arg(long)]
    pub trt: bool,
    /// --trt: smallest batch of the engine's optimisation profile (default 1).
    #[arg(long)]
    pub min_batch: Option<usize>,
    /// --trt: the batch TensorRT tunes its kernels for (default 8).
    #[arg(long)]
    pub opt_batch: Option<usize>,
    /// --trt: largest batch of the optimisation profile (default 16).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// --trt: engine precision (default fp16): fp16 lets TensorRT run any layer in f16
    /// (`trtexec --fp16`, validated at fp16 tolerances); fp32 is f32 without TF32 (`--noTF32`,
    /// for debugging parity, validated at fp32 tolerances).
    #[arg(long, value_parser = precision_parser(&["fp16", "fp32"]))]
    pub trt_precision: Option<Precision>,
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
    #[arg(long, default_value_t = ValidateJob::DEFAULT_CASES)]
    pub cases: usize,
    /// Batch sizes cycled over the cases.
    #[arg(long, value_delimiter = ',', default_values_t = ValidateJob::DEFAULT_BATCHES)]
    pub batches: Vec<usize>,
    /// Seed of the inputs.
    #[arg(long, default_value_t = ValidateJob::DEFAULT_SEED)]
    pub seed: u64,
    /// Tolerance on max abs error, taken as given (default: fp32 1e-4, fp16 2e-2; fp16 in tract
    /// 6e-2, whose f16 matrix products accumulate in f16; a default is raised to 4x the
    /// reference's own f32 round-off, measured by an f64 run, where that is larger, at most 100x).
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
    /// Number of cases (the first ones) on which the candle reference also runs in f64 to
    /// measure its own f32 round-off, which raises a default --atol where the graph amplifies
    /// round-off; 0 skips it (faster on big models; the default tolerances are then never raised).
    #[arg(long, default_value_t = 8)]
    pub roundoff_cases: usize,
    /// Write the results as JUnit XML here: one test per runtime x output (metrics in
    /// system-out, failure past tolerance), plus the lint.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// Folder for every stage (teacher/, dmd2_1step/, dmd2_4step/, tdm_4step/, export/,
    /// results.md, results.json).
    #[arg(long, short, default_value = PipelineJob::DEFAULT_OUT)]
    pub out: PathBuf,
    /// Training data (default: the embedded MNIST digits).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Teacher training steps (default: the teacher's default, 5000).
    #[arg(long)]
    pub teacher_steps: Option<u64>,
    /// Teacher parameterisation: `edm` (default), `vp` (see --prediction) or `flow` (rectified
    /// flow); the students are distilled from whichever it is.
    #[arg(long, value_parser = ["edm", "vp", "flow"])]
    pub parameterisation: Option<String>,
    /// VP teacher only: what the network predicts: `epsilon` (eps), `v` or `sample` (x0).
    #[arg(long, value_enum)]
    pub prediction: Option<train::PredictionArg>,
    /// DMD2 iterations per student (the student is updated every 5th).
    #[arg(long, default_value_t = PipelineJob::DEFAULT_DMD2_STEPS)]
    pub dmd2_steps: u64,
    /// TDM iterations (the student is updated every iteration).
    #[arg(long, default_value_t = PipelineJob::DEFAULT_TDM_STEPS)]
    pub tdm_steps: u64,
    /// Skip the 4-step DMD2 student.
    #[arg(long)]
    pub no_dmd2_4step: bool,
    /// Images per evaluation.
    #[arg(long, default_value_t = PipelineJob::DEFAULT_EVAL_N)]
    pub eval_n: usize,
    /// Skip the ONNX export and parity stage.
    #[arg(long)]
    pub no_export: bool,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Train the diffusion teacher (EDM or VP) on real data.
    Teacher(train::TeacherArgs),
    /// Distil a teacher into a 1-4 step student with DMD2 (distribution matching + GAN).
    Dmd2(train::Dmd2Args),
    /// Distil a teacher into a few-step student with TDM (trajectory distribution matching).
    Tdm(train::TdmArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SamplerArg {
    Heun,
    Euler,
    Ddim,
    /// The checkpoint's own few-step sampler (students).
    Student,
}

impl From<SamplerArg> for SamplerKind {
    fn from(s: SamplerArg) -> Self {
        match s {
            SamplerArg::Heun => SamplerKind::Heun,
            SamplerArg::Euler => SamplerKind::Euler,
            SamplerArg::Ddim => SamplerKind::Ddim,
            SamplerArg::Student => SamplerKind::Student,
        }
    }
}

/// The sampler flags as an override of a checkpoint's own sampler.
fn sampler_override(
    sampler: Option<SamplerArg>,
    sample_steps: Option<usize>,
    cfg_scale: Option<f64>,
) -> SamplerOverride {
    SamplerOverride {
        sampler: sampler.map(Into::into),
        sample_steps,
        cfg_scale,
    }
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint folder (e.g. runs/teacher/checkpoint).
    pub checkpoint: PathBuf,
    /// Output PNG grid; the raw samples go beside it as .safetensors.
    #[arg(long, short, default_value = SampleJob::DEFAULT_OUT)]
    pub out: PathBuf,
    /// Sampler (default: the checkpoint's own: Heun for EDM teachers, DDIM for VP, student for students).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Sampling steps (Heun with N steps costs 2N-1 NFE; a student can use fewer than its trained
    /// steps: every (N/k)-th of its sigmas).
    #[arg(long = "sample-steps", visible_alias = "steps")]
    pub sample_steps: Option<usize>,
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
    #[arg(long, default_value_t = SampleJob::DEFAULT_PER_CLASS)]
    pub per_class: usize,
    /// Use the noise in this safetensors file (`noise` [N,C,H,W], `noise_1`.. for fresh-noise students)
    /// instead of seeded noise; labels must then give N labels (or one per class cycling).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = SampleJob::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Prompts, one a line, for a text-to-image pipeline folder (StableDiffusionPipeline): one
    /// grid row per prompt (--per-class images each), guided against the empty prompt (default
    /// --cfg-scale 7.5, 25 steps); the prompts are listed in OUT.prompts.txt.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

impl SampleArgs {
    fn job(&self) -> SampleJob {
        SampleJob {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            sampler: sampler_override(self.sampler, self.sample_steps, self.cfg_scale),
            seed: self.seed,
            labels: self.labels.clone(),
            per_class: self.per_class,
            noise: self.noise.clone(),
            batch_size: self.batch_size,
            prompts: self.prompts.clone(),
        }
    }
}

impl EvalArgs {
    fn job(&self, show_progress: bool) -> EvalJob {
        EvalJob {
            input: self.input.clone(),
            sampler: sampler_override(self.sampler, self.sample_steps, self.cfg_scale),
            n: self.n,
            seed: self.seed,
            json: self.json.clone(),
            cache_dir: self.cache_dir.clone(),
            show_progress,
        }
    }
}

impl ExportArgs {
    /// `--format diffusers` writes weights and a scheduler, no graph: the graph flags do not apply.
    fn check_diffusers_flags(&self) -> Result<()> {
        anyhow::ensure!(
            !self.graph_flags(),
            "--format diffusers writes the network's weights and a scheduler config: --what, \
             --precision, --sampler, --sample-steps, --cfg-scale and --trt apply to ONNX exports"
        );
        Ok(())
    }

    /// Whether a flag of the ONNX graph export was given.
    fn graph_flags(&self) -> bool {
        self.what != ExportWhatArg::Generator
            || self.trt
            || self.sampler.is_some()
            || self.sample_steps.is_some()
            || self.cfg_scale.is_some()
            || !matches!(self.precision, Precision::Fp32)
    }

    fn job(&self) -> ExportJob {
        let d = TrtBuild::default();
        ExportJob {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            what: self.what.into(),
            precision: self.precision,
            sampler: sampler_override(self.sampler, self.sample_steps, self.cfg_scale),
            trt: self.trt.then(|| TrtBuild {
                min_batch: self.min_batch.unwrap_or(d.min_batch),
                opt_batch: self.opt_batch.unwrap_or(d.opt_batch),
                max_batch: self.max_batch.unwrap_or(d.max_batch),
                precision: self.trt_precision.unwrap_or(d.precision),
            }),
        }
    }
}

impl ValidateArgs {
    fn job(&self) -> ValidateJob {
        ValidateJob {
            model: self.model.clone(),
            reference: self.reference.clone(),
            runtimes: self.runtimes.clone(),
            cases: self.cases,
            batches: self.batches.clone(),
            seed: self.seed,
            atol: self.atol,
            mean_atol: self.mean_atol,
            json: self.json.clone(),
            trt: self.trt.clone(),
            allow_missing: self.allow_missing,
            lint: self.lint,
            roundoff_cases: self.roundoff_cases,
            junit: self.junit.clone(),
        }
    }
}

/// The CUDA ordinal `--device` names (`cuda` alone: the launcher's local rank), `None` for the
/// CPU; an unknown name is left for [`device`] to refuse.
pub fn gpu_ordinal(name: &str) -> Result<Option<usize>> {
    match name {
        s if s == "cuda" || s.starts_with("cuda:") => Ok(Some(
            s.strip_prefix("cuda:")
                .map(|o| o.parse())
                .transpose()
                .context("--device cuda:N needs a number")?
                .unwrap_or_else(distill::parallel::local_rank),
        )),
        _ => Ok(None),
    }
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            // One process per GPU: a bare `cuda` is the launcher's local rank's device.
            let ord = gpu_ordinal(s)?.expect("a cuda device name");
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

fn cmd_pipeline(a: &PipelineArgs, dev: &Device, quiet: bool) -> Result<()> {
    let o = PipelineJob {
        out: a.out.clone(),
        data: a.data.clone(),
        teacher_steps: a.teacher_steps,
        parameterisation: a.parameterisation.clone(),
        prediction: a.prediction.map(Into::into),
        dmd2_steps: a.dmd2_steps,
        tdm_steps: a.tdm_steps,
        dmd2_four_step: !a.no_dmd2_4step,
        eval_n: a.eval_n,
        export: !a.no_export,
        quiet,
    };
    let r = distill::jobs::pipeline::run(&o, dev)?;
    println!("{}", distill::jobs::pipeline::markdown(&r));
    distill::jobs::pipeline::check_parity(&r, &o.out)
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
    let series = distill::plot::read_metrics(&file, &a.keys)?;
    distill::plot::plot_png(&out, &file.display().to_string(), &series, a.log_y)?;
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

/// Parses the command line and runs the job it names.
fn positive_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

pub fn run(cli: &Cli) -> Result<()> {
    let world = distill::parallel::world();
    if world.world_size() > 1 && !matches!(cli.command, Command::Train(_)) {
        bail!(
            "started on {} ranks ({}), but only `distill train teacher|dmd2|tdm` run data-parallel; run this command in one process",
            world.world_size(),
            world.engine()
        );
    }
    distill::checks::set_verify_weights(!cli.no_verify);
    let dev = device(&cli.device)?;
    let show = show_progress(cli.quiet);
    match &cli.command {
        Command::Train(TrainCommand::Teacher(a)) => a.job(show)?.run(&dev).map(|_| ()),
        Command::Train(TrainCommand::Dmd2(a)) => a.job(show)?.run(&dev).map(|_| ()),
        Command::Train(TrainCommand::Tdm(a)) => a.job(show)?.run(&dev).map(|_| ()),
        Command::Sample(a) => a.job().run(&dev),
        Command::Eval(a) => a.job(show).run(&dev).map(|_| ()),
        Command::Export(a) if a.format == ExportFormatArg::Diffusers => {
            a.check_diffusers_flags()?;
            distill::diffusers_io::export_folder(&a.checkpoint, &a.out).map(|_| ())
        }
        Command::Export(a) if a.format == ExportFormatArg::Lora => {
            anyhow::ensure!(
                !a.graph_flags(),
                "--format lora writes the student's LoRA adapter file: --what, --precision, \
                 --sampler, --sample-steps, --cfg-scale and --trt apply to ONNX exports"
            );
            distill::lora_io::export_lora(&a.checkpoint, &a.out).map(|_| ())
        }
        Command::Export(a) => a.job().run().map(|_| ()),
        Command::Bench(a) => bench::run(a, &dev, cli.threads),
        Command::Validate(a) => a.job().run().map(|_| ()),
        Command::Pipeline(a) => cmd_pipeline(a, &dev, cli.quiet),
        Command::Plot(a) => cmd_plot(a),
    }
}
