//! ONNX Runtime runner through `ort` (feature `load-dynamic`): `libonnxruntime` is loaded at run
//! time from `ORT_DYLIB_PATH`, else from the project's `.venv` (the `onnxruntime` wheel that
//! `scripts/setup.sh` installs ships only the versioned `libonnxruntime.so.<version>`).

use super::{find_input, io_specs, Inputs, IoSpec, Outputs, Runner, TensorData};
use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const NOT_FOUND: &str = "ONNX Runtime not found: run scripts/setup.sh (installs the onnxruntime wheel into .venv) or set ORT_DYLIB_PATH";

fn venv_candidates() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    // The workspace this crate was built in (export/..), then the current directory and its parents.
    if let Some(ws) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        roots.push(ws.to_path_buf());
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    let mut found = Vec::new();
    for root in roots {
        let lib = root.join(".venv").join("lib");
        let Ok(pys) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pys: Vec<_> = pys
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys {
            let capi = py.join("site-packages").join("onnxruntime").join("capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut libs: Vec<_> = files
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            found.extend(libs);
        }
    }
    found
}

/// Where `libonnxruntime` is: `ORT_DYLIB_PATH`, else `.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`.
pub fn find_onnxruntime() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ORT_DYLIB_PATH={} is not a file. {NOT_FOUND}", p.display());
    }
    venv_candidates()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!(NOT_FOUND))
}

fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    ENV.get_or_init(|| {
        let lib = find_onnxruntime().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&lib)
            .map_err(|e| format!("loading ONNX Runtime from {}: {e}", lib.display()))?;
        builder
            .with_name("distill")
            .build()
            .map_err(|e| format!("creating the ONNX Runtime environment: {e}"))
    })
    .as_ref()
    .map_err(|e| anyhow!("{e}"))
}

pub struct OrtRunner {
    session: Session,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl OrtRunner {
    /// Loads a model file (external data is resolved relative to it).
    pub fn from_path(path: &Path) -> Result<Self> {
        let model = super::load_model(path)?;
        let (inputs, outputs) = io_specs(&model)?;
        let env = environment()?;
        let mut builder =
            Session::builder(env).map_err(|e| anyhow!("ort: session builder: {e}"))?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| anyhow!("ort: loading {}: {e}", path.display()))?;
        Ok(Self {
            session,
            inputs,
            outputs,
        })
    }

    /// Loads a model file with the session options a user deploying it would set: graph
    /// optimisation level `All` and `intra_threads` threads inside each op (the bench's timings).
    pub fn from_path_tuned(path: &Path, intra_threads: usize) -> Result<Self> {
        use ort::session::builder::GraphOptimizationLevel;
        let model = super::load_model(path)?;
        let (inputs, outputs) = io_specs(&model)?;
        let env = environment()?;
        let session = Session::builder(env)
            .map_err(|e| anyhow!("ort: session builder: {e}"))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| anyhow!("ort: optimisation level: {e}"))?
            .with_intra_threads(intra_threads)
            .map_err(|e| anyhow!("ort: intra-op threads: {e}"))?
            .commit_from_file(path)
            .map_err(|e| anyhow!("ort: loading {}: {e}", path.display()))?;
        Ok(Self {
            session,
            inputs,
            outputs,
        })
    }

    /// Loads serialized model bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        use prost::Message;
        let model = crate::proto::ModelProto::decode(bytes)?;
        let (inputs, outputs) = io_specs(&model)?;
        let env = environment()?;
        let mut builder =
            Session::builder(env).map_err(|e| anyhow!("ort: session builder: {e}"))?;
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| anyhow!("ort: loading the model: {e}"))?;
        Ok(Self {
            session,
            inputs,
            outputs,
        })
    }
}

impl Runner for OrtRunner {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn run(&mut self, inputs: &Inputs) -> Result<Outputs> {
        let mut values: Vec<(String, ort::session::SessionInputValue<'static>)> = Vec::new();
        for spec in &self.inputs {
            let t = find_input(inputs, &spec.name)?;
            super::tract::check_shape(spec, t.shape())?;
            let v: ort::session::SessionInputValue<'static> = match t {
                TensorData::F32(a) => ort::value::Tensor::from_array(a.clone())
                    .map_err(|e| anyhow!("ort: input {}: {e}", spec.name))?
                    .into(),
                TensorData::I32(a) => ort::value::Tensor::from_array(a.clone())
                    .map_err(|e| anyhow!("ort: input {}: {e}", spec.name))?
                    .into(),
            };
            values.push((spec.name.clone(), v));
        }
        let outs = self
            .session
            .run(values)
            .map_err(|e| anyhow!("ort: run: {e}"))?;
        let mut res = Vec::new();
        for spec in &self.outputs {
            let v = outs
                .get(&spec.name)
                .with_context(|| format!("ort: no output {}", spec.name))?;
            let a = v
                .try_extract_array::<f32>()
                .map_err(|e| anyhow!("ort: output {}: {e}", spec.name))?;
            res.push((spec.name.clone(), a.to_owned()));
        }
        Ok(res)
    }
}
