//! Parity of an exported model against candle on seeded inputs, in tract, ONNX Runtime and
//! TensorRT.
//!
//! The reference is the same graph definition executed by [`graphs::CandleBackend`] on the CPU
//! (`graphs::generate` for a generator, [`graphs::Denoiser::io_forward`] for a denoiser), fed the
//! very same seeded inputs ([`cases`]); [`metrics`] accumulates the differences; [`engine`] builds
//! TensorRT engines that are validated before they are written.

mod cases;
pub mod engine;
mod metrics;

use cases::{make_case, Case};
pub use engine::{
    build_validated, runner_for_validation, validation_batches, EngineOptions, EngineOutcome,
};
use metrics::{nan_max, Acc};

use crate::runtime::{self, Inputs, OrtRunner, Runner, TractRunner};
use anyhow::{bail, ensure, Context, Result};
use graphs::Precision;
use graphs::{Denoiser, GeneratorSpec};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A runtime to validate in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Tract,
    #[serde(rename = "onnxruntime")]
    OnnxRuntime,
    /// A TensorRT engine run by trtexec (see [`crate::tensorrt`]).
    #[serde(rename = "tensorrt")]
    TensorRt,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tract => "tract",
            Self::OnnxRuntime => "onnxruntime",
            Self::TensorRt => "tensorrt",
        }
    }
    fn load(self, path: &Path) -> Result<Box<dyn Runner>> {
        Ok(match self {
            Self::Tract => Box::new(TractRunner::from_path(path)?),
            Self::OnnxRuntime => Box::new(OrtRunner::from_path(path)?),
            Self::TensorRt => Box::new(crate::tensorrt::TrtRunner::from_plan(path)?),
        })
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tract" => Ok(Self::Tract),
            "ort" | "onnxruntime" | "onnx-runtime" => Ok(Self::OnnxRuntime),
            "trt" | "tensorrt" => Ok(Self::TensorRt),
            _ => bail!("unknown runtime {s:?} (expected tract, ort or trt)"),
        }
    }
}

/// What the model file is.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// An [`crate::export_generator`] model of this spec.
    Generator(&'a GeneratorSpec),
    /// An [`crate::export_denoiser`] model.
    Denoiser,
    /// An [`crate::export_text_to_image`] model (`noise` + `prompt_embeds` -> images); the
    /// cases' prompt embeddings are the text encoder's for token ids drawn from the seed.
    TextToImage {
        t2i: &'a graphs::diffusers::TextToImage,
        sampler: graphs::SamplerKind,
        steps: usize,
        cfg_scale: f64,
    },
    /// An [`crate::export_text_to_image_student`] model: the student's steps at these `sigmas`
    /// (no guidance: it is distilled in), then the pipeline's VAE; cases as for `TextToImage`.
    TextStudent {
        t2i: &'a graphs::diffusers::TextToImage,
        sigmas: &'a [f64],
    },
    /// An [`crate::export_unet2d_condition`] model of this pipeline's UNet (diffusers' signature:
    /// `sample`, `timestep`, `encoder_hidden_states` [+ `text_embeds`, `time_ids`] ->
    /// `out_sample`), inputs drawn from the seed.
    TextUnet(&'a graphs::diffusers::TextToImage),
    /// An [`crate::export_prompt_encoder`] model of this pipeline (`input_ids` ->
    /// `last_hidden_state`; SDXL: + `input_ids_2` -> `prompt_embeds`, `pooled_prompt_embeds`),
    /// ids drawn from the seed.
    TextEncoder(&'a graphs::diffusers::TextToImage),
}

impl Target<'_> {
    /// Whether the reference has an f64 twin for the round-off measurement (the text-to-image
    /// targets do not: their tolerances are the defaults).
    fn has_f64_twin(&self) -> bool {
        matches!(self, Self::Generator(_) | Self::Denoiser)
    }
}

#[derive(Clone, Debug)]
pub struct ValidateOptions {
    /// Number of seeded input sets (default 32).
    pub cases: usize,
    /// Batch sizes, cycled over the cases (default `[1, 7, 4, 2]`).
    pub batches: Vec<usize>,
    pub seed: u64,
    /// Runtimes to run; leaving one out is the explicit way to skip it (default: both).
    pub runtimes: Vec<RuntimeKind>,
    /// Precision the tolerances are for; `None` reads the model's `precision` metadata.
    pub precision: Option<Precision>,
    /// Tolerance on the max absolute error (default fp32 1e-4, fp16 2e-2; fp16 in tract 6e-2).
    pub max_abs_tol: Option<f64>,
    /// Tolerance on the mean absolute error (default fp32 none, fp16 2e-3).
    pub mean_abs_tol: Option<f64>,
    /// Engine for the TensorRT runtime: a `.plan`, or an `.onnx` to build a temporary one from
    /// (default: see [`validate()`]).
    pub trt_engine: Option<std::path::PathBuf>,
    /// Report a runtime that is not installed here as unavailable instead of failing.
    pub allow_missing: bool,
    /// Cases (the first ones) on which the reference also runs in f64 to measure its f32
    /// round-off, which raises the default max-abs tolerance where the graph amplifies round-off
    /// ([`roundoff_tolerance`]); 0 skips it. Default 8: candle's f64 path (stock ops) costs ~8x
    /// the f32 reference per case.
    pub roundoff_cases: usize,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self {
            cases: 32,
            batches: vec![1, 7, 4, 2],
            seed: 0,
            runtimes: vec![RuntimeKind::Tract, RuntimeKind::OnnxRuntime],
            precision: None,
            max_abs_tol: None,
            mean_abs_tol: None,
            trt_engine: None,
            allow_missing: false,
            roundoff_cases: 8,
        }
    }
}

/// Comparison of one output of one runtime with candle, over all cases.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub runtime: String,
    pub output: String,
    pub elements: usize,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub p99_abs: f64,
    /// Max of `|out - ref| / max(|ref|, 1e-3)`.
    pub max_rel: f64,
    pub cosine: f64,
    /// NaN/Inf values in the runtime's output.
    pub nonfinite: usize,
    /// NaN/Inf values in the candle reference (any fails the comparison: a gate must not pass
    /// garbage that both sides agree on).
    #[serde(default)]
    pub reference_nonfinite: usize,
    /// The max-abs tolerance applied: the default raised by the reference's round-off, or the
    /// user's `--atol`.
    pub max_abs_tol: f64,
    pub mean_abs_tol: Option<f64>,
    /// `max |f32 reference - f64 reference|` over the cases (absent without the f64 reference).
    #[serde(default)]
    pub reference_roundoff: Option<f64>,
    pub passed: bool,
    /// Time spent in this runtime over all cases.
    #[serde(default)]
    pub seconds: f64,
}

/// A requested runtime that is not installed here (only with `allow_missing`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unavailable {
    pub runtime: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidateReport {
    pub model: String,
    pub precision: Precision,
    pub cases: usize,
    pub batches: Vec<usize>,
    pub seed: u64,
    /// Cases the reference round-off was measured on (0: not measured).
    #[serde(default)]
    pub roundoff_cases: usize,
    pub metrics: Vec<Metrics>,
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
    /// The engine the TensorRT runtime ran (a file, or "temporary engine built from ...").
    #[serde(default)]
    pub trt_engine: Option<String>,
}

impl ValidateReport {
    /// Every runtime/output within tolerance (and at least one comparison made).
    pub fn passed(&self) -> bool {
        !self.metrics.is_empty() && self.metrics.iter().all(|m| m.passed)
    }
    pub fn max_abs(&self) -> f64 {
        self.metrics.iter().map(|m| m.max_abs).fold(0.0, nan_max)
    }
}

impl std::fmt::Display for ValidateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "parity of {} ({}) vs candle: {} cases, batches {:?}, seed {}",
            self.model, self.precision, self.cases, self.batches, self.seed
        )?;
        writeln!(
            f,
            "{:<12} {:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>18}  result",
            "runtime",
            "output",
            "elements",
            "max_abs",
            "mean_abs",
            "p99_abs",
            "max_rel",
            "cosine",
            "nan",
            "tol (max/mean)"
        )?;
        for m in &self.metrics {
            let tol = match m.mean_abs_tol {
                Some(t) => format!("{:.1e}/{:.1e}", m.max_abs_tol, t),
                None => format!("{:.1e}/-", m.max_abs_tol),
            };
            writeln!(
                f,
                "{:<12} {:<10} {:>9} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.7} {:>6} {:>18}  {}",
                m.runtime,
                m.output,
                m.elements,
                m.max_abs,
                m.mean_abs,
                m.p99_abs,
                m.max_rel,
                m.cosine,
                if m.reference_nonfinite > 0 {
                    format!("{}+{}ref", m.nonfinite, m.reference_nonfinite)
                } else {
                    m.nonfinite.to_string()
                },
                tol,
                if m.passed { "PASS" } else { "FAIL" }
            )?;
        }
        if let Some(r) = self.metrics.first().and_then(|m| m.reference_roundoff) {
            writeln!(
                f,
                "reference f32 round-off (max |f32 - f64| of candle on the first {} cases): {r:.3e}; a default max-abs tolerance is max(default, {ROUNDOFF_FACTOR} x that), at most {ROUNDOFF_CAP}x the default",
                self.roundoff_cases.min(self.cases)
            )?;
        }
        for u in &self.unavailable {
            writeln!(f, "{:<12} unavailable: {}", u.runtime, u.reason)?;
        }
        if let Some(e) = &self.trt_engine {
            writeln!(f, "tensorrt engine: {e}")?;
        }
        write!(
            f,
            "overall: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// A runtime ready to compare: its runner and its tolerances.
pub struct Candidate {
    pub name: &'static str,
    pub runner: Box<dyn Runner>,
    pub max_abs_tol: f64,
    pub mean_abs_tol: Option<f64>,
}

/// How many times our own f32 reference's round-off a runtime may differ from it (see
/// [`roundoff_tolerance`]).
pub const ROUNDOFF_FACTOR: f64 = 4.0;
/// The most a default max-abs tolerance is ever raised by round-off: 100x. A graph that amplifies
/// f32 round-off beyond that fails the gate (with the round-off in the report) instead of passing
/// anything.
pub const ROUNDOFF_CAP: f64 = 100.0;

/// The default max-abs tolerance `base`, raised where the graph itself amplifies f32 round-off:
/// `max(base, ROUNDOFF_FACTOR * roundoff)`, at most `ROUNDOFF_CAP * base`. `roundoff` is
/// `max |f32 reference - f64 reference|` over the cases: two correct f32 implementations of a
/// graph that turns an ulp into 1e-4 (e.g. a 2-step Heun sampler, whose correction at sigma_min
/// multiplies the network's round-off by ~40) differ by a few times that, so a fixed 1e-4 would
/// fail correct exports. Measured on Heun / Euler / DDIM generators at 1-6 steps: a runtime's max
/// abs error is at most 2.1x the round-off (tests/sampler_parity.rs), hence the factor 4. An
/// explicit `--atol` is taken as given.
pub fn roundoff_tolerance(base: f64, roundoff: Option<f64>) -> f64 {
    match roundoff {
        Some(r) if r.is_finite() => base.max(ROUNDOFF_FACTOR * r).min(ROUNDOFF_CAP * base),
        _ => base,
    }
}

/// Default tolerances for a precision (fp32: max abs 1e-4; fp16: max abs 2e-2, mean abs 2e-3),
/// overridden by `opts`.
pub fn tolerances(precision: Precision, opts: &ValidateOptions) -> (f64, Option<f64>) {
    tolerances_for(precision, None, opts)
}

/// [`tolerances`] for one runtime. tract runs fp16 matrix products with f16 accumulators on
/// x86 (`generic_f16_4x4<f16>` in tract-linalg 0.23), so a reduction over 9 x 128 terms is
/// rounded at every add: its default max-abs bound on fp16 models is 6e-2 (measured 2.9e-2 on
/// the pipeline's 1-step student, where ONNX Runtime's f32 accumulation gives 1.1e-3); the mean
/// bound, which catches a wrong export, stays 2e-3.
pub fn tolerances_for(
    precision: Precision,
    runtime: Option<RuntimeKind>,
    opts: &ValidateOptions,
) -> (f64, Option<f64>) {
    let (default_max, default_mean) = match (precision, runtime) {
        (Precision::Fp32, _) => (1e-4, None),
        (Precision::Fp16, Some(RuntimeKind::Tract)) => (6e-2, Some(2e-3)),
        (Precision::Fp16, _) => (2e-2, Some(2e-3)),
        // No bf16 graph is exported (`OnnxBackend::new` refuses it); a hand-written one gets
        // tolerances for its 8-bit mantissa.
        (Precision::Bf16, _) => (1e-1, Some(1e-2)),
    };
    (
        opts.max_abs_tol.unwrap_or(default_max),
        opts.mean_abs_tol.or(default_mean),
    )
}

fn metadata_precision(model: &crate::proto::ModelProto) -> Result<Precision> {
    match crate::metadata(model)
        .into_iter()
        .find(|(k, _)| k == "precision")
    {
        Some((_, v)) => v.parse(),
        None => Ok(Precision::Fp32),
    }
}

/// Whether a runtime-loading error means "this runtime is not installed here" (what
/// `allow_missing` turns into an `unavailable` entry) rather than a broken model.
fn is_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::tensorrt::TrtError>(),
            Some(
                crate::tensorrt::TrtError::TrtexecMissing
                    | crate::tensorrt::TrtError::TrtexecEnvInvalid(_)
                    | crate::tensorrt::TrtError::NoGpu(_)
            )
        ) || c.to_string().contains(runtime::onnxruntime::NOT_FOUND)
    })
}

/// Runs the model at `model_path` in each selected runtime on `opts.cases` seeded input sets and
/// compares its (single) output with candle's.
///
/// `model_path` is an `.onnx` file, or a `.plan` (with its `.plan.json` sidecar) for the
/// TensorRT runtime alone. For an `.onnx` the TensorRT runtime runs `opts.trt_engine` (a `.plan`,
/// or an `.onnx` to build a temporary engine from), else the `<model>.plan` beside it when its
/// sidecar records this ONNX's sha256, else a temporary engine built from the model.
///
/// A runtime that cannot be loaded (e.g. a missing ONNX Runtime or trtexec) is an error, never a
/// silent skip; with `opts.allow_missing` a *missing* runtime is listed in
/// [`ValidateReport::unavailable`] with the reason instead (at least one runtime must run).
pub fn validate(
    model_path: &Path,
    den: &Denoiser,
    target: Target,
    opts: &ValidateOptions,
) -> Result<ValidateReport> {
    ensure!(opts.cases > 0, "validate: zero cases");
    ensure!(
        !opts.batches.is_empty() && opts.batches.iter().all(|&b| b > 0),
        "validate: batches must be positive"
    );
    ensure!(!opts.runtimes.is_empty(), "validate: no runtime selected");
    let is_plan = crate::tensorrt::is_plan(model_path);
    let (precision, out_names) = if is_plan {
        let sc = crate::tensorrt::Sidecar::read(&crate::tensorrt::sidecar::path_for(model_path))?;
        let p = match opts.precision {
            Some(p) => p,
            None => sc.precision.name().parse()?,
        };
        ensure!(
            sc.outputs.len() == 1,
            "validate: expected one output, the plan has {}",
            sc.outputs.len()
        );
        (p, vec![sc.outputs[0].name.clone()])
    } else {
        let model = runtime::load_model(model_path)?;
        let label = model_path.display().to_string();
        runtime::guard::check_budget(&model, &label, runtime::guard::default_budget())?;
        let p = match opts.precision {
            Some(p) => p,
            None => metadata_precision(&model)?,
        };
        let (_, outs) = runtime::io_specs(&model)?;
        // Several outputs (SDXL's text encoders: prompt and pooled embeddings) are compared as
        // one vector, concatenated in graph order (the reference lays them out the same way).
        ensure!(!outs.is_empty(), "validate: the model has no output");
        (p, outs.iter().map(|o| o.name.clone()).collect())
    };

    let mut candidates = Vec::new();
    let mut unavailable = Vec::new();
    let mut trt_engine = None;
    for rk in &opts.runtimes {
        let loaded: Result<Candidate> = (|| {
            if is_plan && *rk != RuntimeKind::TensorRt {
                bail!(
                    "{} runs ONNX files, not TensorRT plans: validate the .onnx the plan was built from (its sidecar names it)",
                    rk.name()
                );
            }
            Ok(match rk {
                RuntimeKind::Tract | RuntimeKind::OnnxRuntime => {
                    let (max_abs_tol, mean_abs_tol) = tolerances_for(precision, Some(*rk), opts);
                    Candidate {
                        name: rk.name(),
                        runner: runtime::guard::catch(rk.name(), "loading the model", || {
                            rk.load(model_path)
                        })?,
                        max_abs_tol,
                        mean_abs_tol,
                    }
                }
                RuntimeKind::TensorRt => {
                    let (runner, engine) = runner_for_validation(model_path, is_plan, opts)?;
                    // The engine's own precision decides (an fp16 engine of an fp32 ONNX gets
                    // fp16 tolerances).
                    let p = if runner.precision() == Precision::Fp16 {
                        Precision::Fp16
                    } else {
                        precision
                    };
                    let (max_abs_tol, mean_abs_tol) = tolerances(p, opts);
                    trt_engine = Some(engine);
                    Candidate {
                        name: rk.name(),
                        runner: Box::new(runner),
                        max_abs_tol,
                        mean_abs_tol,
                    }
                }
            })
        })();
        match loaded {
            Ok(c) => candidates.push(c),
            Err(e) if opts.allow_missing && is_missing(&e) => unavailable.push(Unavailable {
                runtime: rk.name().to_string(),
                reason: format!("{e:#}"),
            }),
            Err(e) => {
                return Err(e.context(format!("loading {} in {}", model_path.display(), rk.name())))
            }
        }
    }
    ensure!(
        !candidates.is_empty(),
        "no runtime could run {}: {}",
        model_path.display(),
        unavailable
            .iter()
            .map(|u| format!("{}: {}", u.runtime, u.reason))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut report = compare(
        &model_path.display().to_string(),
        precision,
        &out_names,
        den,
        target,
        candidates,
        opts,
    )?;
    report.unavailable = unavailable;
    report.trt_engine = trt_engine;
    Ok(report)
}

/// The comparison itself: every candidate on the same seeded cases against candle.
pub fn compare(
    label: &str,
    precision: Precision,
    out_names: &[String],
    den: &Denoiser,
    target: Target,
    mut candidates: Vec<Candidate>,
    opts: &ValidateOptions,
) -> Result<ValidateReport> {
    ensure!(opts.cases > 0, "validate: zero cases");
    ensure!(
        !opts.batches.is_empty() && opts.batches.iter().all(|&b| b > 0),
        "validate: batches must be positive"
    );
    // The f64 twin of the reference: how much f32 round-off alone moves this graph's output.
    let den64 = if opts.roundoff_cases > 0 && target.has_f64_twin() {
        Some(graphs::params::in_dtype(den, candle_core::DType::F64).context("f64 reference")?)
    } else {
        None
    };
    let mut roundoff: Option<f64> = None;
    let mut accs: Vec<Acc> = candidates.iter().map(|_| Acc::default()).collect();
    let mut seconds = vec![0.0f64; candidates.len()];
    let mut batches = Vec::new();
    for case in 0..opts.cases {
        let batch = opts.batches[case % opts.batches.len()];
        batches.push(batch);
        let mut rng =
            StdRng::seed_from_u64(opts.seed.wrapping_mul(1_000_003).wrapping_add(case as u64));
        let Case {
            inputs,
            reference,
            roundoff: r,
        } = make_case(
            den,
            den64.as_ref().filter(|_| case < opts.roundoff_cases),
            target,
            batch,
            &mut rng,
        )
        .with_context(|| format!("case {case}: candle reference"))?;
        if let Some(r) = r {
            roundoff = Some(nan_max(roundoff.unwrap_or(0.0), r));
        }
        let inputs: &Inputs = &inputs;
        for ((c, acc), secs) in candidates
            .iter_mut()
            .zip(accs.iter_mut())
            .zip(seconds.iter_mut())
        {
            let t0 = std::time::Instant::now();
            let runner = &mut c.runner;
            let out = runtime::guard::catch(c.name, "running the model", || runner.run(inputs))
                .with_context(|| format!("case {case} (batch {batch}) in {}", c.name))?;
            *secs += t0.elapsed().as_secs_f64();
            let mut y: Vec<f32> = Vec::with_capacity(reference.len());
            for out_name in out_names {
                let (_, t) = out
                    .iter()
                    .find(|(n, _)| n == out_name)
                    .with_context(|| format!("{} returned no {out_name}", c.name))?;
                y.extend(t.iter().copied());
            }
            ensure!(
                y.len() == reference.len(),
                "{}: outputs {} have {} values, expected {}",
                c.name,
                out_names.join(", "),
                y.len(),
                reference.len()
            );
            acc.add(&reference, &y);
        }
    }
    let out_name = out_names.join("+");
    let out_name = out_name.as_str();
    let metrics = candidates
        .iter()
        .zip(accs)
        .zip(seconds)
        .map(|((c, acc), secs)| {
            let tol = if opts.max_abs_tol.is_some() {
                c.max_abs_tol
            } else {
                roundoff_tolerance(c.max_abs_tol, roundoff)
            };
            let mut m = acc.finish(c.name, out_name, tol, c.mean_abs_tol);
            m.seconds = secs;
            m.reference_roundoff = roundoff;
            m
        })
        .collect();
    let mut uniq = batches.clone();
    uniq.sort();
    uniq.dedup();
    Ok(ValidateReport {
        model: label.to_string(),
        precision,
        cases: opts.cases,
        batches: uniq,
        seed: opts.seed,
        roundoff_cases: if den64.is_some() {
            opts.roundoff_cases.min(opts.cases)
        } else {
            0
        },
        metrics,
        unavailable: Vec::new(),
        trt_engine: None,
    })
}

#[cfg(test)]
mod roundoff_tests {
    use super::{roundoff_tolerance, ROUNDOFF_CAP, ROUNDOFF_FACTOR};

    #[test]
    fn raised_only_above_the_default_and_never_past_the_cap() {
        assert_eq!(roundoff_tolerance(1e-4, None), 1e-4);
        assert_eq!(roundoff_tolerance(1e-4, Some(1e-6)), 1e-4);
        assert_eq!(roundoff_tolerance(1e-4, Some(1e-4)), ROUNDOFF_FACTOR * 1e-4);
        assert_eq!(roundoff_tolerance(1e-4, Some(1.0)), ROUNDOFF_CAP * 1e-4);
        assert_eq!(roundoff_tolerance(1e-4, Some(f64::NAN)), 1e-4);
        assert_eq!(roundoff_tolerance(1e-4, Some(f64::INFINITY)), 1e-4);
    }
}
