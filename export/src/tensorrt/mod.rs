//! TensorRT: fp16 engines (`.plan`) built from exported ONNX by `trtexec`, their JSON sidecar,
//! running them for parity, and the TensorRT compatibility lint every export passes.
//!
//! * [`trtexec`][]: locating trtexec, its build/run command lines, its log (version, PASSED).
//! * [`gpu`][]: the GPU from nvidia-smi (name, compute capability, driver, CUDA version).
//! * [`io`][]: raw input files for `--loadInputs`, parsing `--exportOutput`.
//! * [`sidecar`][]: `<stem>.plan.json`.
//! * [`runner`][]: [`TrtRunner`], a [`crate::runtime::Runner`] over a plan.
//! * [`build`][]: a plan built by trtexec (`crate::validate::engine` validates it before it is
//!   written).
//! * [`lint`] with its op table [`ops_table`].
//!
//! Where trtexec or a GPU is missing every entry point fails fast with a [`TrtError`] naming
//! what to install; nothing is written.

pub mod build;
pub mod gpu;
pub mod io;
pub mod lint;
pub mod ops_table;
pub mod runner;
pub mod sidecar;
pub mod trtexec;

pub use build::build_plan;
pub use gpu::GpuInfo;
pub use lint::{check as lint_check, lint, LintFailed, Violation};
pub use runner::TrtRunner;
pub use sidecar::Sidecar;
pub use trtexec::{BatchProfile, TensorDesc};

use std::path::{Path, PathBuf};

/// What can go wrong around TensorRT.
#[derive(Debug, thiserror::Error)]
pub enum TrtError {
    #[error("TensorRT's trtexec not found on PATH: install TensorRT 10 (Debian/Ubuntu: `apt install tensorrt`, which puts it in /usr/src/tensorrt/bin, found automatically; or the TensorRT tar/zip package's bin/ on PATH) or set DISTILL_TRTEXEC=/path/to/trtexec")]
    TrtexecMissing,
    #[error("DISTILL_TRTEXEC={0} is not an executable file: point it at TensorRT 10's trtexec (e.g. /usr/src/tensorrt/bin/trtexec) or unset it to search PATH")]
    TrtexecEnvInvalid(PathBuf),
    #[error("{0}")]
    NoGpu(String),
    #[error("trtexec failed ({status}) running:\n  {command}\nlast lines of its log:\n{log_tail}")]
    TrtexecFailed {
        command: String,
        status: String,
        log_tail: String,
    },
    #[error("optimisation profile: {0}")]
    BadProfile(String),
    #[error("batch {batch} is outside the plan's optimisation profile [{min}, {max}]: rebuild with `distill export --trt --min-batch/--max-batch` or validate with `--batches` inside it")]
    BatchOutsideProfile {
        batch: usize,
        min: usize,
        max: usize,
    },
    #[error("the plan was built for compute capability {plan} ({plan_gpu}) but this GPU ({gpu}) is {here}: TensorRT plans are specific to the GPU; rebuild it here with `distill export --trt`")]
    GpuMismatch {
        plan: String,
        plan_gpu: String,
        here: String,
        gpu: String,
    },
    #[error("trtexec --exportOutput: {0}")]
    OutputFormat(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Model(String),
}

/// trtexec and the GPU it will use: everything an engine build needs, found up front.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub trtexec: PathBuf,
    pub gpu: GpuInfo,
}

impl Toolchain {
    /// trtexec (`$DISTILL_TRTEXEC`, PATH, /usr/src/tensorrt/bin), then nvidia-smi on PATH and a
    /// query of device 0. The first thing missing is the error.
    pub fn locate() -> Result<Self, TrtError> {
        let trtexec = trtexec::locate_from_env()?;
        let smi = gpu::locate(std::env::var_os("PATH"))?;
        let gpu = gpu::query(&smi)?;
        Ok(Self { trtexec, gpu })
    }
}

/// A `.plan` path (TensorRT engine), judged by its extension (`.plan` or `.engine`).
pub fn is_plan(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "plan" || e == "engine")
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(p: &Path) -> Result<String, TrtError> {
    let bytes =
        std::fs::read(p).map_err(|e| TrtError::Io(format!("reading {}: {e}", p.display())))?;
    Ok(crate::sha256_hex(&bytes))
}

/// `metadata_props` of an `.onnx` file, or of the ONNX a `.plan` was built from (its sidecar).
pub fn metadata_of(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    if is_plan(path) {
        let sc = Sidecar::read(&sidecar::path_for(path))?;
        Ok(sc.metadata.into_iter().collect())
    } else {
        Ok(crate::metadata(&crate::runtime::load_model(path)?))
    }
}

impl crate::OnnxMetadata {
    /// The record of the ONNX a TensorRT plan was built from, as its sidecar copied it.
    pub fn from_sidecar(sc: &Sidecar, what: &str) -> anyhow::Result<Self> {
        let props: Vec<(String, String)> = sc
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::from_props(&props, what)
    }

    /// The record of an `.onnx` file, or of a `.plan` through its sidecar.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let what = path.display().to_string();
        if is_plan(path) {
            let sc = Sidecar::read(&sidecar::path_for(path))?;
            Self::from_sidecar(&sc, &what)
        } else {
            Self::from_model(&crate::runtime::load_model(path)?, &what)
        }
    }
}
