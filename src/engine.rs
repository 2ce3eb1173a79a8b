//! `distill export --trt`: the TensorRT engine next to the exported ONNX, validated against the
//! checkpoint before `<stem>.plan` and `<stem>.plan.json` are written.

use crate::checkpoint;
use crate::cli::{ExportArgs, ValidationFailed};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use export::tensorrt::{BatchProfile, EngineOptions, EngineOutcome, Toolchain, TrtPrecision};
use graphs::GeneratorSpec;
use std::collections::HashMap;
use std::path::Path;

/// Engine precision flag.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TrtPrecisionArg {
    /// TensorRT may run any layer in f16 (`trtexec --fp16`); validated at fp16 tolerances.
    Fp16,
    /// f32 without TF32 (`--noTF32`), for debugging parity; validated at fp32 tolerances.
    Fp32,
}

/// What an exported model is, from its metadata: `Some(spec)` for a generator, `None` for a
/// denoiser.
pub fn spec_from_metadata(
    meta: &HashMap<String, String>,
    what: &Path,
) -> Result<Option<GeneratorSpec>> {
    match meta.get("kind").map(String::as_str) {
        Some("generator") => {
            let text = meta
                .get("generator_spec")
                .context("generator model lacks `generator_spec` metadata")?;
            Ok(Some(
                serde_json::from_str(text)
                    .context("parsing the model's generator_spec metadata")?,
            ))
        }
        Some("denoiser") => Ok(None),
        other => bail!(
            "{}: metadata `kind` is {other:?}; was it exported by distill?",
            what.display()
        ),
    }
}

/// Builds, validates and writes the engine for `onnx` (exported from `a.checkpoint`).
pub fn build_engine(a: &ExportArgs, onnx: &Path, tc: &Toolchain) -> Result<EngineOutcome> {
    let (den, _) = checkpoint::load(&a.checkpoint, &Device::Cpu)?;
    let meta: HashMap<String, String> = export::tensorrt::metadata_of(onnx)?.into_iter().collect();
    let spec = spec_from_metadata(&meta, onnx)?;
    let target = match &spec {
        Some(s) => export::Target::Generator(s),
        None => export::Target::Denoiser,
    };
    let opts = EngineOptions {
        profile: BatchProfile::new(a.min_batch, a.opt_batch, a.max_batch)?,
        precision: match a.trt_precision {
            TrtPrecisionArg::Fp16 => TrtPrecision::Fp16,
            TrtPrecisionArg::Fp32 => TrtPrecision::Fp32,
        },
        ..Default::default()
    };
    let plan = onnx.with_extension("plan");
    eprintln!(
        "tensorrt: building {} ({}, batch {}..{} opt {}) with {} on {} (compute capability {})",
        plan.display(),
        opts.precision.name(),
        opts.profile.min_batch,
        opts.profile.max_batch,
        opts.profile.opt_batch,
        tc.trtexec.display(),
        tc.gpu.name,
        tc.gpu.compute_capability
    );
    let out = export::tensorrt::build_validated(tc, onnx, &plan, &den, target, &opts)?;
    println!("{}", out.report);
    if !out.written {
        return Err(ValidationFailed(format!(
            "the TensorRT engine built from {} is past tolerance (max abs error {:.3e}); no plan written",
            onnx.display(),
            out.report.max_abs()
        ))
        .into());
    }
    println!(
        "wrote {} and {} (TensorRT {}, {})",
        out.plan.display(),
        out.sidecar_path.display(),
        out.sidecar.tensorrt.version.as_deref().unwrap_or("?"),
        out.sidecar.gpu.name
    );
    Ok(out)
}
