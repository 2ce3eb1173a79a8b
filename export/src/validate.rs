//! Parity of an exported model against candle on seeded inputs, in tract and/or ONNX Runtime.
//!
//! The reference is the same graph definition executed by [`graphs::CandleBackend`] on the CPU
//! (`graphs::generate` for a generator; `level_from_sigma` + `forward`, or
//! `level_from_timesteps` + `eps`, for a denoiser), fed the very same seeded inputs.

use crate::model::Precision;
use crate::runtime::{self, Inputs, OrtRunner, Runner, TensorData, TractRunner};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use graphs::{CandleBackend, Denoiser, GeneratorSpec, Parameterisation};
use ndarray::ArrayD;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
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
    pub max_abs_tol: f64,
    pub mean_abs_tol: Option<f64>,
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

#[derive(Default)]
struct Acc {
    diffs: Vec<f64>,
    dot: f64,
    nr: f64,
    no: f64,
    max_rel: f64,
    nonfinite: usize,
    reference_nonfinite: usize,
}

impl Acc {
    fn add(&mut self, reference: &[f32], out: &[f32]) {
        for (&r, &o) in reference.iter().zip(out) {
            let (r_bad, o_bad) = (!r.is_finite(), !o.is_finite());
            self.reference_nonfinite += r_bad as usize;
            self.nonfinite += o_bad as usize;
            if r_bad || o_bad {
                // Counted as an infinite error: max, mean and p99 all report it.
                self.diffs.push(f64::INFINITY);
                continue;
            }
            let d = (o as f64 - r as f64).abs();
            self.diffs.push(d);
            self.max_rel = nan_max(self.max_rel, d / (r.abs() as f64).max(1e-3));
            self.dot += r as f64 * o as f64;
            self.nr += (r as f64).powi(2);
            self.no += (o as f64).powi(2);
        }
    }
    fn finish(
        mut self,
        runtime: &str,
        output: &str,
        max_tol: f64,
        mean_tol: Option<f64>,
    ) -> Metrics {
        let n = self.diffs.len();
        let max_abs = self.diffs.iter().copied().fold(0.0, nan_max);
        let mean_abs = if n > 0 {
            self.diffs.iter().sum::<f64>() / n as f64
        } else {
            0.0
        };
        self.diffs.sort_by(|a, b| a.total_cmp(b));
        let p99_abs = if n > 0 {
            self.diffs[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1]
        } else {
            0.0
        };
        let bad = self.nonfinite + self.reference_nonfinite;
        let cosine = if bad > 0 {
            f64::NAN
        } else if self.nr > 0.0 && self.no > 0.0 {
            self.dot / (self.nr.sqrt() * self.no.sqrt())
        } else if self.nr == self.no {
            1.0
        } else {
            0.0
        };
        // Written so that a NaN statistic fails (every comparison with NaN is false).
        let passed =
            n > 0 && bad == 0 && max_abs <= max_tol && mean_tol.is_none_or(|t| mean_abs <= t);
        Metrics {
            runtime: runtime.into(),
            output: output.into(),
            elements: n,
            max_abs,
            mean_abs,
            p99_abs,
            max_rel: self.max_rel,
            cosine,
            nonfinite: self.nonfinite,
            reference_nonfinite: self.reference_nonfinite,
            max_abs_tol: max_tol,
            mean_abs_tol: mean_tol,
            passed,
            seconds: 0.0,
        }
    }
}

/// `max` that propagates NaN (`f64::max` drops it, which let an all-NaN comparison report 0).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// One seeded case: ONNX inputs and the candle reference output.
fn make_case(
    den: &Denoiser,
    target: Target,
    batch: usize,
    rng: &mut StdRng,
) -> Result<(Vec<(String, TensorData)>, Vec<f32>)> {
    let (c, r) = den.image_shape();
    let num_classes = den.num_classes();
    let shape = [batch, c, r, r];
    let n = batch * c * r * r;
    let dev = Device::Cpu;
    let cb = CandleBackend::new(&dev);
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.gen_range(0..num_classes as u32))
        .collect();
    let labels_t = Tensor::from_vec(labels.clone(), batch, &dev)?;
    let labels_in = TensorData::I32(ArrayD::from_shape_vec(
        vec![batch],
        labels.iter().map(|&l| l as i32).collect(),
    )?);
    let img = |v: &Vec<f32>| -> Result<(Tensor, TensorData)> {
        Ok((
            Tensor::from_vec(v.clone(), &shape, &dev)?,
            TensorData::F32(ArrayD::from_shape_vec(shape.to_vec(), v.clone())?),
        ))
    };
    let (inputs, out) = match target {
        Target::Generator(spec) => {
            let (z, z_in) = img(&normal(rng, n))?;
            let mut inputs = vec![
                ("noise".to_string(), z_in),
                ("class_labels".to_string(), labels_in),
            ];
            let mut fresh = Vec::new();
            for i in 1..=spec.num_fresh_noise() {
                let (t, t_in) = img(&normal(rng, n))?;
                fresh.push(t);
                inputs.push((format!("noise_{i}"), t_in));
            }
            let y = graphs::generate(&cb, den, spec, &z, &labels_t, &fresh)?;
            (inputs, y)
        }
        Target::Denoiser => match &den.param {
            p @ (Parameterisation::Edm(_) | Parameterisation::Flow(_)) => {
                let (lo, hi) = match p {
                    Parameterisation::Edm(e) => (e.sigma_min.ln(), e.sigma_max.ln()),
                    _ => {
                        let g = graphs::NoiseGrid::new(p);
                        (g.sigma(0).ln(), g.sigma(g.len() - 1).ln())
                    }
                };
                let sigma: Vec<f32> = (0..batch)
                    .map(|_| rng.gen_range(lo..hi).exp() as f32)
                    .collect();
                let eps = normal(rng, n);
                let x0 = normal(rng, n);
                let per = n / batch;
                let x: Vec<f32> = (0..n)
                    .map(|i| 0.5 * x0[i] + sigma[i / per] * eps[i])
                    .collect();
                let (xt, x_in) = img(&x)?;
                let st = Tensor::from_vec(sigma.clone(), batch, &dev)?;
                let level = den.level_from_sigma(&cb, &st)?;
                let y = den.forward(&cb, &xt, &level, &labels_t)?;
                let inputs = vec![
                    ("x".to_string(), x_in),
                    (
                        "sigma".to_string(),
                        TensorData::F32(ArrayD::from_shape_vec(vec![batch], sigma)?),
                    ),
                    ("class_labels".to_string(), labels_in),
                ];
                (inputs, y)
            }
            Parameterisation::Vp(v) => {
                let sig = v.sigmas();
                let t: Vec<u32> = (0..batch)
                    .map(|_| rng.gen_range(0..v.num_timesteps as u32))
                    .collect();
                let eps = normal(rng, n);
                let x0 = normal(rng, n);
                let per = n / batch;
                let x: Vec<f32> = (0..n)
                    .map(|i| 0.5 * x0[i] + sig[t[i / per] as usize] as f32 * eps[i])
                    .collect();
                let (xt, x_in) = img(&x)?;
                let tt = Tensor::from_vec(t.clone(), batch, &dev)?;
                let level = den.level_from_timesteps(&cb, &tt)?;
                let y = den.eps(&cb, &xt, &level, &labels_t)?;
                let inputs = vec![
                    ("x".to_string(), x_in),
                    (
                        "timestep".to_string(),
                        TensorData::I32(ArrayD::from_shape_vec(
                            vec![batch],
                            t.iter().map(|&v| v as i32).collect(),
                        )?),
                    ),
                    ("class_labels".to_string(), labels_in),
                ];
                (inputs, y)
            }
        },
    };
    let out: Vec<f32> = out
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    ensure!(
        out.len() == n,
        "reference output has {} values, expected {n}",
        out.len()
    );
    Ok((inputs, out))
}

/// A runtime ready to compare: its runner and its tolerances.
pub struct Candidate {
    pub name: &'static str,
    pub runner: Box<dyn Runner>,
    pub max_abs_tol: f64,
    pub mean_abs_tol: Option<f64>,
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
    let (precision, out_name) = if is_plan {
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
        (p, sc.outputs[0].name.clone())
    } else {
        let model = runtime::load_model(model_path)?;
        let label = model_path.display().to_string();
        runtime::guard::check_budget(&model, &label, runtime::guard::default_budget())?;
        let p = match opts.precision {
            Some(p) => p,
            None => metadata_precision(&model)?,
        };
        let (_, outs) = runtime::io_specs(&model)?;
        ensure!(
            outs.len() == 1,
            "validate: expected one output, the model has {}",
            outs.len()
        );
        (p, outs[0].name.clone())
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
                    let (runner, engine) =
                        crate::tensorrt::runner_for_validation(model_path, is_plan, opts)?;
                    // The engine's own precision decides (an fp16 engine of an fp32 ONNX gets
                    // fp16 tolerances).
                    let p = if runner.precision() == crate::tensorrt::TrtPrecision::Fp16 {
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
        &out_name,
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
    out_name: &str,
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
    let mut accs: Vec<Acc> = candidates.iter().map(|_| Acc::default()).collect();
    let mut seconds = vec![0.0f64; candidates.len()];
    let mut batches = Vec::new();
    for case in 0..opts.cases {
        let batch = opts.batches[case % opts.batches.len()];
        batches.push(batch);
        let mut rng =
            StdRng::seed_from_u64(opts.seed.wrapping_mul(1_000_003).wrapping_add(case as u64));
        let (inputs, reference) = make_case(den, target, batch, &mut rng)
            .with_context(|| format!("case {case}: candle reference"))?;
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
            let (_, y) = out
                .iter()
                .find(|(n, _)| n == out_name)
                .with_context(|| format!("{} returned no {out_name}", c.name))?;
            ensure!(
                y.len() == reference.len(),
                "{}: output {out_name} has shape {:?}, expected {} values",
                c.name,
                y.shape(),
                reference.len()
            );
            let y: Vec<f32> = y.iter().copied().collect();
            acc.add(&reference, &y);
        }
    }
    let metrics = candidates
        .iter()
        .zip(accs)
        .zip(seconds)
        .map(|((c, acc), secs)| {
            let mut m = acc.finish(c.name, out_name, c.max_abs_tol, c.mean_abs_tol);
            m.seconds = secs;
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
        metrics,
        unavailable: Vec::new(),
        trt_engine: None,
    })
}

#[cfg(test)]
mod tests {
    use super::Acc;

    fn metrics(reference: &[f32], out: &[f32]) -> super::Metrics {
        let mut a = Acc::default();
        a.add(reference, out);
        a.finish("t", "images", 1e-4, Some(1e-3))
    }

    #[test]
    fn an_all_nan_reference_fails_and_is_counted() {
        let m = metrics(&[f32::NAN; 4], &[0.0; 4]);
        assert!(!m.passed);
        assert_eq!((m.reference_nonfinite, m.nonfinite), (4, 0));
        assert!(m.max_abs.is_infinite() && m.cosine.is_nan());
    }

    #[test]
    fn nan_on_both_sides_fails() {
        let m = metrics(&[1.0, f32::NAN], &[1.0, f32::NAN]);
        assert!(!m.passed);
        assert_eq!((m.reference_nonfinite, m.nonfinite), (1, 1));
    }

    #[test]
    fn inf_in_the_output_fails() {
        let m = metrics(&[1.0, 2.0], &[1.0, f32::INFINITY]);
        assert!(!m.passed);
        assert_eq!(m.nonfinite, 1);
    }

    #[test]
    fn finite_agreement_passes() {
        let m = metrics(&[1.0, -2.0, 0.5], &[1.0, -2.0, 0.50001]);
        assert!(m.passed, "{m:?}");
        assert_eq!(m.reference_nonfinite + m.nonfinite, 0);
        assert!((m.cosine - 1.0).abs() < 1e-9);
    }

    #[test]
    fn nan_max_propagates() {
        assert!(super::nan_max(0.0, f64::NAN).is_nan());
        assert!(super::nan_max(f64::NAN, 1.0).is_nan());
        assert_eq!(super::nan_max(1.0, 2.0), 2.0);
    }
}
