//! [`TrtRunner`]: runs a `.plan` through `trtexec --loadEngine` on raw input files and reads
//! `--exportOutput`, so parity is measured on the very file a C++ application deserializes.
//! One trtexec process per call (engine deserialization included): slow-ish, but exact.

use super::sidecar::{self, Sidecar};
use super::trtexec::{self, BatchProfile, TensorDesc};
use super::{io, Toolchain, TrtError};
use crate::runtime::{Inputs, Outputs, Runner};
use anyhow::{anyhow, Context, Result};
use graphs::Precision;
use ndarray::ArrayD;
use std::path::{Path, PathBuf};

pub struct TrtRunner {
    trtexec: PathBuf,
    plan: PathBuf,
    inputs: Vec<TensorDesc>,
    outputs: Vec<TensorDesc>,
    profile: BatchProfile,
    precision: Precision,
    scratch: tempfile::TempDir,
    /// Keeps a temporary engine alive as long as the runner.
    pub(crate) _engine_dir: Option<tempfile::TempDir>,
}

impl TrtRunner {
    /// A runner over `plan` described by `sc` (its sidecar), with a located toolchain.
    pub fn new(tc: &Toolchain, plan: &Path, sc: &Sidecar) -> Result<Self, TrtError> {
        if sc.gpu.compute_capability != tc.gpu.compute_capability {
            return Err(TrtError::GpuMismatch {
                plan: sc.gpu.compute_capability.clone(),
                plan_gpu: sc.gpu.name.clone(),
                here: tc.gpu.compute_capability.clone(),
                gpu: tc.gpu.name.clone(),
            });
        }
        Ok(Self {
            trtexec: tc.trtexec.clone(),
            plan: plan.to_path_buf(),
            inputs: sc.inputs.clone(),
            outputs: sc.outputs.clone(),
            profile: sc.profile()?,
            precision: sc.precision,
            scratch: tempfile::tempdir()
                .map_err(|e| TrtError::Io(format!("creating a scratch folder: {e}")))?,
            _engine_dir: None,
        })
    }

    /// A `.plan` with its `.plan.json` sidecar; locates trtexec and the GPU.
    pub fn from_plan(plan: &Path) -> Result<Self, TrtError> {
        let sc = Sidecar::read(&sidecar::path_for(plan))?;
        let tc = Toolchain::locate()?;
        Self::new(&tc, plan, &sc)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn plan(&self) -> &Path {
        &self.plan
    }

    /// The inputs in engine order, checked against the plan's shapes and profile.
    fn ordered(&self, inputs: &Inputs) -> Result<Vec<(String, crate::runtime::TensorData)>> {
        let mut batch = None;
        let mut out = Vec::new();
        for d in &self.inputs {
            let t = crate::runtime::find_input(inputs, &d.name)?;
            let s = t.shape();
            let b = *s
                .first()
                .with_context(|| format!("input {} is a scalar", d.name))?;
            anyhow::ensure!(
                s == d.at_batch(b).as_slice(),
                "input {}: shape {s:?} does not match the plan's {:?}",
                d.name,
                d.shape
            );
            anyhow::ensure!(
                batch.is_none_or(|x| x == b),
                "inputs disagree on the batch size"
            );
            batch = Some(b);
            out.push((d.name.clone(), t.clone()));
        }
        let b = batch.context("the plan has no inputs")?;
        if !self.profile.contains(b) {
            return Err(TrtError::BatchOutsideProfile {
                batch: b,
                min: self.profile.min_batch,
                max: self.profile.max_batch,
            }
            .into());
        }
        Ok(out)
    }
}

impl Runner for TrtRunner {
    fn name(&self) -> &'static str {
        "tensorrt"
    }

    fn run(&mut self, inputs: &Inputs) -> Result<Outputs> {
        let ordered = self.ordered(inputs)?;
        let files = io::write_inputs(self.scratch.path(), &ordered)?;
        let out_json = self.scratch.path().join("outputs.json");
        let _ = std::fs::remove_file(&out_json);
        let args = trtexec::infer_args(&self.plan, &files, &out_json);
        trtexec::run(&self.trtexec, &args)?;
        let text = std::fs::read_to_string(&out_json)
            .with_context(|| format!("trtexec wrote no {}", out_json.display()))?;
        let tensors = io::parse_export_output(&text)?;
        self.outputs
            .iter()
            .map(|d| {
                let t = tensors
                    .iter()
                    .find(|t| t.name == d.name)
                    .ok_or_else(|| anyhow!("trtexec exported no output {}", d.name))?;
                Ok((
                    d.name.clone(),
                    ArrayD::from_shape_vec(t.dims.clone(), t.values.clone())?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TensorData;
    use crate::tensorrt::GpuInfo;

    fn gpu(name: &str, cc: &str) -> GpuInfo {
        GpuInfo {
            name: name.into(),
            compute_capability: cc.into(),
            driver_version: "535.104.05".into(),
            cuda_version: None,
        }
    }

    fn sidecar(plan_gpu: GpuInfo) -> Sidecar {
        let mut sc: Sidecar = serde_json::from_value(serde_json::json!({
            "format": sidecar::FORMAT, "plan": "g.plan", "onnx": "g.onnx", "onnx_sha256": "00",
            "inputs": [{"name": "noise", "shape": [-1, 1, 2, 2], "dtype": "float32"},
                       {"name": "class_labels", "shape": [-1], "dtype": "int32"}],
            "outputs": [{"name": "images", "shape": [-1, 1, 2, 2], "dtype": "float32"}],
            "precision": "fp16", "profiles": [{"min_batch": 1, "opt_batch": 2, "max_batch": 4}],
            "model": {"kind": "generator", "method": null, "channels": 1, "resolution": 2,
                      "num_classes": 10, "null_class_id": 10, "sampler": null, "steps": null,
                      "sigmas": null, "nfe": null, "cfg_scale": null, "fresh_noise_inputs": 0,
                      "generator_spec": null, "parameterisation": null, "pixel_range": null,
                      "onnx_precision": "fp32"},
            "tensorrt": {"version": "10.3.0", "trtexec": "trtexec", "args": []},
            "gpu": {"name": "x", "compute_capability": "0.0", "driver_version": "0", "cuda_version": null},
            "validation": null, "metadata": {}, "created_by": "distill"
        }))
        .unwrap();
        sc.gpu = plan_gpu;
        sc
    }

    fn toolchain(dir: &Path, gpu: GpuInfo) -> Toolchain {
        Toolchain {
            trtexec: dir.join("trtexec"),
            gpu,
        }
    }

    fn inputs(batch: usize) -> Vec<(String, TensorData)> {
        vec![
            (
                "class_labels".into(),
                TensorData::I32(ArrayD::from_shape_vec(vec![batch], vec![3; batch]).unwrap()),
            ),
            (
                "noise".into(),
                TensorData::F32(
                    ArrayD::from_shape_vec(vec![batch, 1, 2, 2], vec![0.5; batch * 4]).unwrap(),
                ),
            ),
        ]
    }

    #[test]
    fn inputs_are_ordered_and_checked_against_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let a10 = gpu("NVIDIA A10", "8.6");
        let r = TrtRunner::new(
            &toolchain(dir.path(), a10.clone()),
            Path::new("g.plan"),
            &sidecar(a10),
        )
        .unwrap();
        assert_eq!(r.precision(), Precision::Fp16);
        let o = r.ordered(&inputs(2)).unwrap();
        assert_eq!(o[0].0, "noise");
        assert_eq!(o[1].0, "class_labels");
        let e = r.ordered(&inputs(5)).unwrap_err().to_string();
        assert!(
            e.contains("batch 5 is outside the plan's optimisation profile [1, 4]"),
            "{e}"
        );
        let mut bad = inputs(2);
        bad[1].1 =
            TensorData::F32(ArrayD::from_shape_vec(vec![2, 1, 3, 2], vec![0.0; 12]).unwrap());
        assert!(r
            .ordered(&bad)
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }

    #[test]
    fn a_plan_for_another_gpu_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = TrtRunner::new(
            &toolchain(dir.path(), gpu("NVIDIA A10", "8.6")),
            Path::new("g.plan"),
            &sidecar(gpu("NVIDIA H100 80GB HBM3", "9.0")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("compute capability 9.0") && e.contains("is 8.6"),
            "{e}"
        );
    }
}
