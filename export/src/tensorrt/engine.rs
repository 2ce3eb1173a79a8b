//! Building a plan with trtexec, validating it against candle, and only then writing
//! `<stem>.plan` + `<stem>.plan.json`.

use super::sidecar::{self, BuilderInfo, Sidecar, ValidationInfo};
use super::trtexec::{self, BatchProfile};
use super::{Toolchain, TrtError, TrtRunner};
use crate::validate::{self, Candidate, Target, ValidateOptions, ValidateReport};
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

/// Runs trtexec to build `plan` from `onnx` and returns its sidecar (not yet validated, not
/// written). The ONNX is linted first: a model TensorRT cannot parse fails here, not in trtexec.
pub fn build_plan(
    tc: &Toolchain,
    onnx: &Path,
    plan: &Path,
    profile: BatchProfile,
    precision: Precision,
) -> Result<Sidecar> {
    precision.require("a TensorRT engine", &[Precision::Fp16, Precision::Fp32])?;
    let model = crate::runtime::load_model(onnx)?;
    super::lint::check(&model, &onnx.display().to_string())?;
    let (inputs, _) = sidecar::tensor_descs(&model)?;
    let args = trtexec::build_args(onnx, plan, &inputs, &profile, precision);
    let log = trtexec::run(&tc.trtexec, &args)?;
    if !plan.is_file() {
        return Err(TrtError::Io(format!(
            "trtexec reported success but wrote no {}",
            plan.display()
        ))
        .into());
    }
    Ok(Sidecar::new(
        plan,
        onnx,
        super::sha256_file(onnx)?,
        &model,
        precision,
        profile,
        BuilderInfo {
            version: trtexec::parse_version(&log),
            trtexec: tc.trtexec.display().to_string(),
            args,
        },
        tc.gpu.clone(),
    )?)
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
            &out_name,
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
