//! `validate` as a CI parity gate: an optional TensorRT lint first, then parity in every runtime
//! against the candle reference, a JSON report and JUnit XML. A past-tolerance result is
//! [`Failure::ValidationFailed`] (exit 3), a lint violation [`Failure::LintFailed`] (exit 4).

use super::Failure;
use crate::checkpoint;
use anyhow::{Context, Result};
use candle_core::Device;
use export::tensorrt::{self, Violation};
use std::path::{Path, PathBuf};

/// `distill validate`.
#[derive(Clone, Debug)]
pub struct ValidateJob {
    /// The exported .onnx, or a .plan with its .plan.json.
    pub model: PathBuf,
    /// The checkpoint it was exported from (the candle reference).
    pub reference: PathBuf,
    /// Runtimes to compare (tract, ort, trt); `None`: tract,ort for an .onnx, trt for a .plan.
    pub runtimes: Option<Vec<String>>,
    /// Number of seeded input sets.
    pub cases: usize,
    /// Batch sizes cycled over the cases.
    pub batches: Vec<usize>,
    pub seed: u64,
    /// Tolerance on max abs error (`None`: by precision and runtime).
    pub atol: Option<f64>,
    /// Tolerance on mean abs error (`None`: by precision).
    pub mean_atol: Option<f64>,
    /// Write the report as JSON here.
    pub json: Option<PathBuf>,
    /// Also run TensorRT on this engine (.plan) or on a temporary engine from this .onnx.
    pub trt: Option<PathBuf>,
    /// Report a runtime that is not installed as unavailable instead of failing.
    pub allow_missing: bool,
    /// Run the TensorRT compatibility lint first.
    pub lint: bool,
    /// Cases on which the reference also runs in f64 to measure its f32 round-off (0: never,
    /// and the default tolerances are never raised).
    pub roundoff_cases: usize,
    /// Write JUnit XML here.
    pub junit: Option<PathBuf>,
}

impl ValidateJob {
    pub const DEFAULT_CASES: usize = 32;
    pub const DEFAULT_BATCHES: [usize; 4] = [1, 7, 4, 2];
    pub const DEFAULT_SEED: u64 = 0;

    /// Validating `model` against `reference` with every setting at its default.
    pub fn new(model: &Path, reference: &Path) -> Self {
        Self {
            model: model.to_path_buf(),
            reference: reference.to_path_buf(),
            ..Default::default()
        }
    }
}

impl Default for ValidateJob {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            reference: PathBuf::new(),
            runtimes: None,
            cases: Self::DEFAULT_CASES,
            batches: Self::DEFAULT_BATCHES.to_vec(),
            seed: Self::DEFAULT_SEED,
            atol: None,
            mean_atol: None,
            json: None,
            trt: None,
            allow_missing: false,
            roundoff_cases: export::ValidateOptions::default().roundoff_cases,
            lint: false,
            junit: None,
        }
    }
}

impl ValidateJob {
    /// The runtimes to run: `runtimes`, default `tract,ort` for an `.onnx` and `trt` for a
    /// `.plan`, plus `trt` when `trt` names an engine.
    pub fn runtime_names(&self) -> Vec<String> {
        let mut names = self.runtimes.clone().unwrap_or_else(|| {
            if tensorrt::is_plan(&self.model) {
                vec!["trt".into()]
            } else {
                vec!["tract".into(), "ort".into()]
            }
        });
        let has_trt = names
            .iter()
            .any(|r| matches!(r.to_ascii_lowercase().as_str(), "trt" | "tensorrt"));
        if self.trt.is_some() && !has_trt {
            names.push("trt".into());
        }
        names
    }

    /// Parity of the model against its checkpoint, without lint, files or verdict.
    pub fn report(&self) -> Result<export::ValidateReport> {
        for (name, t) in [("--atol", self.atol), ("--mean-atol", self.mean_atol)] {
            if let Some(t) = t {
                crate::checks::in_range(name, t, 0.0, 1e3)?;
            }
        }
        let runtimes = self
            .runtime_names()
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<export::RuntimeKind>>>()?;
        let opts = export::ValidateOptions {
            cases: self.cases,
            batches: self.batches.clone(),
            seed: self.seed,
            runtimes,
            precision: None,
            max_abs_tol: self.atol,
            mean_abs_tol: self.mean_atol,
            trt_engine: self.trt.clone(),
            allow_missing: self.allow_missing,
            roundoff_cases: self.roundoff_cases,
        };
        with_reference(&self.model, &self.reference, |den, target| {
            export::validate(&self.model, den, target, &opts)
        })
    }

    fn write_junit(
        &self,
        lint: Option<&[Violation]>,
        report: Option<&export::ValidateReport>,
        error: Option<&str>,
    ) -> Result<()> {
        if let Some(p) = &self.junit {
            let xml =
                export::junit::to_junit(&self.model.display().to_string(), lint, report, error);
            checkpoint::write_atomic(p, xml.as_bytes())
                .with_context(|| format!("writing JUnit XML to {}", p.display()))?;
            println!("junit: {}", p.display());
        }
        Ok(())
    }

    /// The gate: lint (if asked), parity, report files, and the verdict as an error
    /// ([`Failure`]) when it fails.
    pub fn run(&self) -> Result<export::ValidateReport> {
        let violations = if self.lint {
            match lint(&self.model) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.write_junit(None, None, Some(&format!("{e:#}")))?;
                    return Err(e);
                }
            }
        } else {
            None
        };
        if let Some(v) = &violations {
            if v.is_empty() {
                println!("lint: {} is TensorRT-compatible", self.model.display());
            } else {
                self.write_junit(Some(v), None, None)?;
                return Err(Failure::LintFailed(tensorrt::LintFailed {
                    model: self.model.display().to_string(),
                    violations: v.clone(),
                })
                .into());
            }
        }
        let report = match self.report() {
            Ok(r) => r,
            Err(e) => {
                self.write_junit(violations.as_deref(), None, Some(&format!("{e:#}")))?;
                return Err(e);
            }
        };
        println!("{report}");
        if let Some(p) = &self.json {
            checkpoint::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
            println!("report: {}", p.display());
        }
        self.write_junit(violations.as_deref(), Some(&report), None)?;
        if !report.passed() {
            return Err(Failure::ValidationFailed(format!(
                "{} is past tolerance in at least one runtime (max abs error {:.3e})",
                self.model.display(),
                report.max_abs()
            ))
            .into());
        }
        println!("PASS");
        Ok(report)
    }
}

/// Runs `f` on the candle reference of the exported `model` (an .onnx, or a .plan whose sidecar
/// names its ONNX): `reference` is what it was exported from — a checkpoint or teacher (a
/// generator or a bare denoiser, by the model's metadata), a text-to-image pipeline folder or a
/// text-to-image student checkpoint (its generator, its `text_encoder` or its bare UNet, by the
/// metadata's `kind`).
pub fn with_reference<R>(
    model: &Path,
    reference: &Path,
    f: impl FnOnce(&graphs::Denoiser, export::Target) -> Result<R>,
) -> Result<R> {
    let dev = Device::Cpu;
    let student = crate::text_student::pipeline_ref(reference)?;
    if !graphs::diffusers::is_text_to_image(reference) && student.is_none() {
        let (den, _) = crate::teacher_source::load(reference, &dev)?;
        let meta = export::OnnxMetadata::from_file(model)?;
        let target = match meta.generator() {
            Some(s) => export::Target::Generator(s),
            None => export::Target::Denoiser,
        };
        return f(&den, target);
    }
    let onnx = onnx_of(model)?;
    let meta: std::collections::HashMap<String, String> =
        export::metadata(&export::runtime::load_model(&onnx)?)
            .into_iter()
            .collect();
    let get = |k: &str| {
        meta.get(k)
            .with_context(|| format!("{}: no {k:?} in its ONNX metadata", onnx.display()))
    };
    let kind = get("kind")?.as_str();
    let (t2i, sigmas) = match &student {
        Some(r) => {
            let (t2i, spec) = crate::text_student::load(reference, r, &dev)?;
            (t2i, Some(spec.sigmas))
        }
        None => (graphs::diffusers::TextToImage::load(reference, &dev)?, None),
    };
    let target = match kind {
        "text_to_image_generator" => match (get("sampler")?.as_str(), &sigmas) {
            ("student", Some(sigmas)) => {
                let steps: usize = get("steps")?.parse().context("metadata steps")?;
                anyhow::ensure!(
                    steps == sigmas.len(),
                    "{}: a {steps}-step student generator, but the checkpoint {} samples in {} \
                     steps: it was exported from another checkpoint",
                    onnx.display(),
                    reference.display(),
                    sigmas.len()
                );
                export::Target::TextStudent { t2i: &t2i, sigmas }
            }
            ("student", None) => anyhow::bail!(
                "{} is a distilled student's generator and {} is a pipeline (a teacher): pass \
                 the student checkpoint it was exported from as --reference",
                onnx.display(),
                reference.display()
            ),
            (_, Some(_)) => anyhow::bail!(
                "{} is a teacher's generator (a pipeline's sampler) and {} is a student \
                 checkpoint: pass the pipeline folder it was exported from as --reference",
                onnx.display(),
                reference.display()
            ),
            (name, None) => export::Target::TextToImage {
                t2i: &t2i,
                sampler: match name {
                    "ddim" => graphs::SamplerKind::Ddim,
                    "euler" => graphs::SamplerKind::Euler,
                    "heun" => graphs::SamplerKind::Heun,
                    other => anyhow::bail!("{}: sampler {other:?}", onnx.display()),
                },
                steps: get("steps")?.parse().context("metadata steps")?,
                cfg_scale: get("cfg_scale")?.parse().context("metadata cfg_scale")?,
            },
        },
        "clip_text_encoder" => export::Target::TextEncoder(&t2i),
        "diffusers_unet2d_condition" => export::Target::TextUnet(&t2i),
        other => anyhow::bail!(
            "{}: kind {other:?} is not an export of a text-to-image pipeline or student \
             (text_to_image_generator, clip_text_encoder or diffusers_unet2d_condition)",
            onnx.display()
        ),
    };
    f(&t2i.den, target)
}

/// The ONNX to lint: the model itself, or the ONNX a `.plan` was built from (its sidecar names it,
/// relative to the plan).
fn onnx_of(model: &Path) -> Result<PathBuf> {
    if !tensorrt::is_plan(model) {
        return Ok(model.to_path_buf());
    }
    let sc = tensorrt::Sidecar::read(&tensorrt::sidecar::path_for(model))?;
    let p = model.parent().unwrap_or(Path::new(".")).join(&sc.onnx);
    anyhow::ensure!(
        p.is_file(),
        "--lint on {}: its ONNX {} is not there (lint the .onnx directly)",
        model.display(),
        p.display()
    );
    Ok(p)
}

fn lint(model: &Path) -> Result<Vec<Violation>> {
    let onnx = onnx_of(model)?;
    Ok(tensorrt::lint(&export::runtime::load_model(&onnx)?))
}
