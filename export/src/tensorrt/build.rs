//! Building a plan with trtexec (not yet validated: see `crate::validate::engine`).

use super::sidecar::{self, BuilderInfo, Sidecar};
use super::trtexec::{self, BatchProfile};
use super::{Toolchain, TrtError};
use anyhow::Result;
use graphs::Precision;
use std::path::Path;

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
