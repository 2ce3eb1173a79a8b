//! `<stem>.plan.json`: everything an application (or `distill validate`) needs to use a `.plan`
//! without the ONNX file: I/O names, shapes (-1 = batch) and dtypes, the batch profile, the
//! sampler parameters from the ONNX metadata, the TensorRT version and GPU the plan was built
//! for (plans are specific to both), the ONNX's sha256 and the tolerances the plan passed.

use super::gpu::GpuInfo;
use super::trtexec::{BatchProfile, TensorDesc};
use super::TrtError;
use crate::proto::ModelProto;
use graphs::Precision;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "distill-tensorrt-plan/1";

/// The sidecar of `plan`: `<plan>.json` (`generator.plan` -> `generator.plan.json`).
pub fn path_for(plan: &Path) -> PathBuf {
    PathBuf::from(format!("{}.json", plan.display()))
}

/// Sampler/model parameters copied from the ONNX metadata (typed where the consumer needs them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// "generator" or "denoiser".
    pub kind: String,
    pub method: Option<String>,
    pub channels: Option<usize>,
    pub resolution: Option<usize>,
    pub num_classes: Option<usize>,
    pub null_class_id: Option<usize>,
    pub sampler: Option<String>,
    pub steps: Option<usize>,
    pub sigmas: Option<Vec<f64>>,
    pub nfe: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub fresh_noise_inputs: Option<usize>,
    /// The full `graphs::GeneratorSpec` (generators only), as `distill validate` reads it.
    pub generator_spec: Option<serde_json::Value>,
    pub parameterisation: Option<serde_json::Value>,
    pub pixel_range: Option<String>,
    /// Precision of the ONNX the plan was built from.
    pub onnx_precision: Option<String>,
}

impl ModelInfo {
    /// From the typed record of a distill export.
    pub fn from_record(r: &crate::OnnxMetadata) -> Self {
        let spec = r.generator();
        Self {
            kind: r.kind_name().into(),
            method: Some(r.method.clone()),
            channels: Some(r.channels),
            resolution: Some(r.resolution),
            num_classes: Some(r.num_classes),
            null_class_id: r.null_class_id,
            sampler: spec.and_then(|s| {
                serde_json::to_value(s.sampler)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
            }),
            steps: spec.map(|s| s.steps),
            sigmas: spec.map(|_| r.step_sigmas.clone()),
            nfe: spec.map(|s| s.nfe()),
            cfg_scale: spec.map(|s| s.cfg_scale),
            fresh_noise_inputs: spec.map(|s| s.num_fresh_noise()),
            generator_spec: spec.and_then(|s| serde_json::to_value(s).ok()),
            parameterisation: serde_json::to_value(&r.parameterisation).ok(),
            pixel_range: Some("[-1, 1]".into()),
            onnx_precision: Some(r.precision.name().into()),
        }
    }

    /// From `metadata_props`: the typed record when the model is a distill export, else
    /// whatever entries are there.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Self {
        let props: Vec<(String, String)> =
            meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Ok(r) = crate::OnnxMetadata::from_props(&props, "model") {
            return Self::from_record(&r);
        }
        Self::lenient(meta)
    }

    fn lenient(meta: &BTreeMap<String, String>) -> Self {
        let num = |k: &str| meta.get(k).and_then(|v| v.parse().ok());
        fn json<T: serde::de::DeserializeOwned>(
            meta: &BTreeMap<String, String>,
            k: &str,
        ) -> Option<T> {
            meta.get(k).and_then(|v| serde_json::from_str(v).ok())
        }
        Self {
            kind: meta.get("kind").cloned().unwrap_or_default(),
            method: meta.get("method").cloned(),
            channels: num("channels"),
            resolution: num("resolution"),
            num_classes: num("num_classes"),
            null_class_id: num("null_class_id"),
            sampler: meta.get("sampler").cloned(),
            steps: num("steps"),
            sigmas: json(meta, "sigmas"),
            nfe: num("nfe"),
            cfg_scale: meta.get("cfg_scale").and_then(|v| v.parse().ok()),
            fresh_noise_inputs: num("fresh_noise_inputs"),
            generator_spec: json(meta, "generator_spec"),
            parameterisation: json(meta, "parameterisation"),
            pixel_range: meta.get("pixel_range").cloned(),
            onnx_precision: meta.get("precision").cloned(),
        }
    }
}

/// The TensorRT that built the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuilderInfo {
    pub version: Option<String>,
    pub trtexec: String,
    /// The exact trtexec arguments.
    pub args: Vec<String>,
}

/// What the plan passed right after it was built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationInfo {
    pub passed: bool,
    pub max_abs_tol: f64,
    pub mean_abs_tol: Option<f64>,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub cases: usize,
    pub batches: Vec<usize>,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub format: String,
    /// File names, relative to the sidecar's folder.
    pub plan: String,
    pub onnx: String,
    pub onnx_sha256: String,
    pub inputs: Vec<TensorDesc>,
    pub outputs: Vec<TensorDesc>,
    pub precision: Precision,
    pub profiles: Vec<BatchProfile>,
    pub model: ModelInfo,
    pub tensorrt: BuilderInfo,
    pub gpu: GpuInfo,
    pub validation: Option<ValidationInfo>,
    /// Every ONNX `metadata_props` entry, verbatim.
    pub metadata: BTreeMap<String, String>,
    pub created_by: String,
}

/// Dtype names as in the sidecar (numpy's).
pub fn dtype_name(e: crate::ElemType) -> &'static str {
    match e {
        crate::ElemType::F32 => "float32",
        crate::ElemType::F16 => "float16",
        crate::ElemType::I32 => "int32",
        crate::ElemType::I64 => "int64",
    }
}

/// Inputs and outputs of an ONNX model as engine tensors (-1 for the batch).
pub fn tensor_descs(model: &ModelProto) -> Result<(Vec<TensorDesc>, Vec<TensorDesc>), TrtError> {
    let (ins, outs) =
        crate::runtime::io_specs(model).map_err(|e| TrtError::Model(format!("{e:#}")))?;
    let conv = |s: &crate::runtime::IoSpec| -> Result<TensorDesc, TrtError> {
        let shape = s
            .dims
            .iter()
            .map(|d| match d {
                crate::Dim::Fixed(n) => Ok(*n as i64),
                crate::Dim::Batch => Ok(-1),
                crate::Dim::Unknown => Err(TrtError::Model(format!(
                    "{} has a dynamic dim other than the batch",
                    s.name
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(TensorDesc {
            name: s.name.clone(),
            shape,
            dtype: dtype_name(s.elem).into(),
        })
    };
    Ok((
        ins.iter().map(conv).collect::<Result<_, _>>()?,
        outs.iter().map(conv).collect::<Result<_, _>>()?,
    ))
}

impl Sidecar {
    /// The sidecar for a plan built from `model` (read from `onnx_path`), before validation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plan: &Path,
        onnx_path: &Path,
        onnx_sha256: String,
        model: &ModelProto,
        precision: Precision,
        profile: BatchProfile,
        tensorrt: BuilderInfo,
        gpu: GpuInfo,
    ) -> Result<Self, TrtError> {
        let (inputs, outputs) = tensor_descs(model)?;
        let metadata: BTreeMap<String, String> = crate::metadata(model).into_iter().collect();
        let file = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        Ok(Self {
            format: FORMAT.into(),
            plan: file(plan),
            onnx: file(onnx_path),
            onnx_sha256,
            inputs,
            outputs,
            precision,
            profiles: vec![profile],
            model: ModelInfo::from_metadata(&metadata),
            tensorrt,
            gpu,
            validation: None,
            metadata,
            created_by: format!("distill {}", env!("CARGO_PKG_VERSION")),
        })
    }

    pub fn read(path: &Path) -> Result<Self, TrtError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TrtError::Io(format!(
                "reading {}: {e} (a .plan needs the .plan.json sidecar `distill export --trt` writes beside it)",
                path.display()
            ))
        })?;
        let s: Self = serde_json::from_str(&text)
            .map_err(|e| TrtError::Model(format!("parsing {}: {e}", path.display())))?;
        if s.format != FORMAT {
            return Err(TrtError::Model(format!(
                "{}: format {:?}, this distill reads {FORMAT:?}",
                path.display(),
                s.format
            )));
        }
        Ok(s)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("sidecar serialises")
    }

    /// The one batch profile (every plan distill builds has exactly one).
    pub fn profile(&self) -> Result<BatchProfile, TrtError> {
        self.profiles
            .first()
            .copied()
            .ok_or_else(|| TrtError::Model("the sidecar lists no optimisation profile".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> GpuInfo {
        GpuInfo {
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
            driver_version: "550.54.15".into(),
            cuda_version: Some("12.4".into()),
        }
    }

    /// A generator model's I/O and metadata, as the exporter writes them.
    pub(crate) fn generator_like_model() -> ModelProto {
        use crate::builder::{Dim, ElemType, ValueInfo};
        use crate::proto::{GraphProto, StringStringEntryProto};
        let img = vec![Dim::Batch, Dim::Fixed(1), Dim::Fixed(16), Dim::Fixed(16)];
        let spec = r#"{"sampler":"student","steps":2,"sigmas":[80.0,1.2],"fresh_noise":true,"cfg_scale":1.0}"#;
        ModelProto {
            graph: Some(GraphProto {
                input: vec![
                    ValueInfo::new(ElemType::F32, img.clone()).to_proto("noise"),
                    ValueInfo::new(ElemType::I32, vec![Dim::Batch]).to_proto("class_labels"),
                    ValueInfo::new(ElemType::F32, img.clone()).to_proto("noise_1"),
                ],
                output: vec![ValueInfo::new(ElemType::F32, img).to_proto("images")],
                ..Default::default()
            }),
            metadata_props: [
                ("kind", "generator"),
                ("method", "dmd2"),
                ("channels", "1"),
                ("resolution", "16"),
                ("num_classes", "10"),
                ("null_class_id", "10"),
                ("sampler", "student"),
                ("steps", "2"),
                ("sigmas", "[80.0,1.2]"),
                ("nfe", "2"),
                ("cfg_scale", "1"),
                ("fresh_noise_inputs", "1"),
                ("generator_spec", spec),
                ("parameterisation", r#"{"kind":"edm","sigma_data":0.5,"sigma_min":0.002,"sigma_max":80.0,"rho":7.0,"p_mean":-1.2,"p_std":1.2}"#),
                ("pixel_range", "[-1, 1]"),
                ("precision", "fp32"),
            ]
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn sidecar_json_has_everything_an_application_needs() {
        let model = generator_like_model();
        let mut s = Sidecar::new(
            Path::new("out/generator.plan"),
            Path::new("out/generator.onnx"),
            "ab".repeat(32),
            &model,
            Precision::Fp16,
            BatchProfile::new(1, 8, 32).unwrap(),
            BuilderInfo {
                version: Some("10.3.0".into()),
                trtexec: "/usr/src/tensorrt/bin/trtexec".into(),
                args: vec!["--fp16".into()],
            },
            gpu(),
        )
        .unwrap();
        s.validation = Some(ValidationInfo {
            passed: true,
            max_abs_tol: 2e-2,
            mean_abs_tol: Some(2e-3),
            max_abs: 3.1e-3,
            mean_abs: 2.0e-4,
            cases: 12,
            batches: vec![1, 8, 32],
            seed: 0,
        });
        assert_eq!(
            path_for(Path::new("out/generator.plan")),
            Path::new("out/generator.plan.json")
        );
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["format"], FORMAT);
        assert_eq!(v["plan"], "generator.plan");
        assert_eq!(v["onnx"], "generator.onnx");
        assert_eq!(v["onnx_sha256"], "ab".repeat(32));
        assert_eq!(v["precision"], "fp16");
        assert_eq!(
            v["inputs"],
            serde_json::json!([
                {"name": "noise", "shape": [-1, 1, 16, 16], "dtype": "float32"},
                {"name": "class_labels", "shape": [-1], "dtype": "int32"},
                {"name": "noise_1", "shape": [-1, 1, 16, 16], "dtype": "float32"}
            ])
        );
        assert_eq!(v["outputs"][0]["name"], "images");
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([-1, 1, 16, 16]));
        assert_eq!(
            v["profiles"],
            serde_json::json!([{"min_batch": 1, "opt_batch": 8, "max_batch": 32}])
        );
        assert_eq!(v["model"]["sampler"], "student");
        assert_eq!(v["model"]["sigmas"], serde_json::json!([80.0, 1.2]));
        assert_eq!(v["model"]["fresh_noise_inputs"], 1);
        assert_eq!(v["model"]["null_class_id"], 10);
        assert_eq!(v["model"]["generator_spec"]["fresh_noise"], true);
        assert_eq!(v["model"]["parameterisation"]["sigma_max"], 80.0);
        assert_eq!(v["tensorrt"]["version"], "10.3.0");
        assert_eq!(v["gpu"]["name"], "NVIDIA H100 80GB HBM3");
        assert_eq!(v["gpu"]["compute_capability"], "9.0");
        assert_eq!(v["gpu"]["driver_version"], "550.54.15");
        assert_eq!(v["gpu"]["cuda_version"], "12.4");
        assert_eq!(v["validation"]["max_abs_tol"], 2e-2);
        assert_eq!(v["validation"]["mean_abs_tol"], 2e-3);
        assert_eq!(v["validation"]["passed"], true);
        assert_eq!(v["metadata"]["method"], "dmd2");
        // Round trip through a file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.plan.json");
        std::fs::write(&p, s.to_json()).unwrap();
        assert_eq!(Sidecar::read(&p).unwrap(), s);
        assert_eq!(s.profile().unwrap().max_batch, 32);
    }

    #[test]
    fn a_missing_sidecar_says_where_it_comes_from() {
        let e = Sidecar::read(Path::new("/nope/g.plan.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("distill export --trt"), "{e}");
    }
}
