//! `distill validate` as a CI parity gate: optional TensorRT lint first, then parity in every
//! runtime, a JSON report and JUnit XML. Exit codes: 0 pass, 1 error, 2 usage, 3 past tolerance,
//! 4 lint failure (see [`crate::cli::exit_code`]).

use crate::cli::{ValidateArgs, ValidationFailed};
use anyhow::{Context, Result};
use export::tensorrt::{self, Violation};
use std::path::{Path, PathBuf};

/// The runtimes to run: `--runtimes`, default `tract,ort` for an `.onnx` and `trt` for a
/// `.plan`, plus `trt` when `--trt` names an engine.
pub fn runtime_names(a: &ValidateArgs) -> Vec<String> {
    let mut names = a.runtimes.clone().unwrap_or_else(|| {
        if tensorrt::is_plan(&a.model) {
            vec!["trt".into()]
        } else {
            vec!["tract".into(), "ort".into()]
        }
    });
    let has_trt = names
        .iter()
        .any(|r| matches!(r.to_ascii_lowercase().as_str(), "trt" | "tensorrt"));
    if a.trt.is_some() && !has_trt {
        names.push("trt".into());
    }
    names
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

fn write_junit(
    a: &ValidateArgs,
    lint: Option<&[Violation]>,
    report: Option<&export::ValidateReport>,
    error: Option<&str>,
) -> Result<()> {
    if let Some(p) = &a.junit {
        let xml = export::junit::to_junit(&a.model.display().to_string(), lint, report, error);
        crate::checkpoint::write_atomic(p, xml.as_bytes())
            .with_context(|| format!("writing JUnit XML to {}", p.display()))?;
        println!("junit: {}", p.display());
    }
    Ok(())
}

/// `distill validate`.
pub fn run(a: &ValidateArgs) -> Result<()> {
    let violations = if a.lint {
        match lint(&a.model) {
            Ok(v) => Some(v),
            Err(e) => {
                write_junit(a, None, None, Some(&format!("{e:#}")))?;
                return Err(e);
            }
        }
    } else {
        None
    };
    if let Some(v) = &violations {
        if v.is_empty() {
            println!("lint: {} is TensorRT-compatible", a.model.display());
        } else {
            write_junit(a, Some(v), None, None)?;
            return Err(tensorrt::LintFailed {
                model: a.model.display().to_string(),
                violations: v.clone(),
            }
            .into());
        }
    }
    let report = match crate::cli::validate_model(a) {
        Ok(r) => r,
        Err(e) => {
            write_junit(a, violations.as_deref(), None, Some(&format!("{e:#}")))?;
            return Err(e);
        }
    };
    println!("{report}");
    if let Some(p) = &a.json {
        crate::checkpoint::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("report: {}", p.display());
    }
    write_junit(a, violations.as_deref(), Some(&report), None)?;
    if !report.passed() {
        return Err(ValidationFailed(format!(
            "{} is past tolerance in at least one runtime (max abs error {:.3e})",
            a.model.display(),
            report.max_abs()
        ))
        .into());
    }
    println!("PASS");
    Ok(())
}
