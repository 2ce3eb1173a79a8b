//! TensorRT engines under validation: building a plan with trtexec, validating it against candle,
//! and only then writing `<stem>.plan` + `<stem>.plan.json`; the runner `validate` uses for a
//! plan or an ONNX (building a temporary engine when it has none).

use super::{Candidate, Target, ValidateOptions, ValidateReport};
use crate::tensorrt::sidecar::{self, Sidecar, ValidationInfo};
use crate::tensorrt::{self, build_plan, BatchProfile, Toolchain, TrtRunner};
use crate::validate;
use anyhow::{Context, Result};
use graphs::Denoiser;
use graphs::Precision;
use std::path::{Path, PathBuf};

/// How to build and check an engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub profile: BatchProfile,
    pub precision: Precision,
    /// Seeded cases of the post-build validation (batches: [`validation_batches`]).
    pub cases: usize,
    pub seed: u64,
    /// Tolerance overrides (default: fp16 max abs 2e-2, mean abs 2e-3; fp32 max abs 1e-4).
    pub max_abs_tol: Option<f64>,
    pub mean_abs_tol: Option<f64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            profile: BatchProfile {
                min_batch: 1,
                opt_batch: 8,
                max_batch: 16,
            },
            precision: Precision::Fp16,
            cases: 12,
            seed: 0,
            max_abs_tol: None,
            mean_abs_tol: None,
        }
    }
}

/// What [`build_validated`] did.
#[derive(Debug)]
pub struct EngineOutcome {
    pub plan: PathBuf,
    pub sidecar_path: PathBuf,
    pub sidecar: Sidecar,
    pub report: ValidateReport,
    /// False when validation failed: then neither file was written.
    pub written: bool,
}

/// The batch sizes the post-build check runs: the profile's min, opt and max, and an odd size
/// in between (odd sizes catch layouts that only work for even batches).
pub fn validation_batches(p: &BatchProfile) -> Vec<usize> {
    let mid = ((p.min_batch + p.max_batch) / 2) | 1;
    let mut b = vec![p.min_batch, p.opt_batch, p.max_batch];
    if (p.min_batch..=p.max_batch).contains(&mid) {
        b.push(mid);
    }
    b.sort();
    b.dedup();
    b
}

/// Builds `plan` from `onnx`, validates it against `den` (the checkpoint the ONNX came from)
/// right away, and writes the plan and its sidecar only when it passed. Build to a temporary
/// name first, so a failed build or check never leaves a plan behind.
pub fn build_validated(
    tc: &Toolchain,
    onnx: &Path,
    plan: &Path,
    den: &Denoiser,
    target: Target,
    opts: &EngineOptions,
) -> Result<EngineOutcome> {
    let dir = plan
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = plan
        .file_name()
        .with_context(|| format!("{} has no file name", plan.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> Result<EngineOutcome> {
        let mut sc = build_plan(tc, onnx, &tmp, opts.profile, opts.precision)?;
        sc.plan = name.clone();
        let runner = TrtRunner::new(tc, &tmp, &sc)?;
        let vopts = ValidateOptions {
            cases: opts.cases,
            batches: validation_batches(&opts.profile),
            seed: opts.seed,
            max_abs_tol: opts.max_abs_tol,
            mean_abs_tol: opts.mean_abs_tol,
            ..Default::default()
        };
        let precision = opts.precision;
        let (max_abs_tol, mean_abs_tol) = validate::tolerances(precision, &vopts);
        let out_name = sc
            .outputs
            .first()
            .map(|o| o.name.clone())
            .context("the model has no output")?;
        let report = validate::compare(
            &plan.display().to_string(),
            precision,
            std::slice::from_ref(&out_name),
            den,
            target,
            vec![Candidate {
                name: "tensorrt",
                runner: Box::new(runner),
                max_abs_tol,
                mean_abs_tol,
            }],
            &vopts,
        )?;
        let m = &report.metrics[0];
        sc.validation = Some(ValidationInfo {
            passed: report.passed(),
            max_abs_tol,
            mean_abs_tol,
            max_abs: m.max_abs,
            mean_abs: m.mean_abs,
            cases: report.cases,
            batches: report.batches.clone(),
            seed: report.seed,
        });
        let sidecar_path = sidecar::path_for(plan);
        let written = report.passed();
        if written {
            std::fs::rename(&tmp, plan)
                .with_context(|| format!("renaming {} to {}", tmp.display(), plan.display()))?;
            crate::write::atomic_write(&sidecar_path, sc.to_json().as_bytes())?;
        }
        Ok(EngineOutcome {
            plan: plan.to_path_buf(),
            sidecar_path,
            sidecar: sc,
            report,
            written,
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// The TensorRT runner `validate` uses for `model_path` (see [`crate::validate()`]), and a
/// description of the engine it runs.
pub fn runner_for_validation(
    model_path: &Path,
    is_plan: bool,
    opts: &ValidateOptions,
) -> Result<(TrtRunner, String)> {
    let tc = Toolchain::locate()?;
    let plan_runner = |plan: &Path| -> Result<(TrtRunner, String)> {
        let sc = Sidecar::read(&sidecar::path_for(plan))?;
        Ok((TrtRunner::new(&tc, plan, &sc)?, plan.display().to_string()))
    };
    if is_plan {
        return plan_runner(model_path);
    }
    let onnx = match &opts.trt_engine {
        Some(p) if tensorrt::is_plan(p) => return plan_runner(p),
        Some(p) => p.clone(),
        None => {
            let sibling = model_path.with_extension("plan");
            let current = tensorrt::sha256_file(model_path)?;
            if let Ok(sc) = Sidecar::read(&sidecar::path_for(&sibling)) {
                if sibling.exists() && sc.onnx_sha256 == current {
                    return plan_runner(&sibling);
                }
            }
            model_path.to_path_buf()
        }
    };
    // A temporary engine over exactly the batches to validate.
    let lo = *opts.batches.iter().min().context("no batches")?;
    let hi = *opts.batches.iter().max().context("no batches")?;
    let profile = BatchProfile::new(lo, hi, hi)?;
    let dir = tempfile::tempdir().context("creating a folder for the temporary engine")?;
    let plan = dir.path().join("engine.plan");
    let sc = tensorrt::build_plan(&tc, &onnx, &plan, profile, Precision::Fp16)?;
    let mut r = TrtRunner::new(&tc, &plan, &sc)?;
    r._engine_dir = Some(dir);
    Ok((
        r,
        format!("temporary fp16 engine built from {}", onnx.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_covers_the_profile_edges() {
        let p = |a, b, c| BatchProfile::new(a, b, c).unwrap();
        assert_eq!(validation_batches(&p(1, 8, 16)), vec![1, 8, 9, 16]);
        assert_eq!(validation_batches(&p(1, 1, 1)), vec![1]);
        assert_eq!(validation_batches(&p(2, 4, 8)), vec![2, 4, 5, 8]);
        assert_eq!(validation_batches(&p(4, 4, 4)), vec![4]);
    }

    #[test]
    fn default_profile_is_valid() {
        let d = EngineOptions::default().profile;
        BatchProfile::new(d.min_batch, d.opt_batch, d.max_batch).unwrap();
    }
}
