//! The typed record of an exported model's ONNX `metadata_props`: written by the exporter
//! ([`OnnxMetadata::to_props`]), read back by the CLI, the C API and the TensorRT sidecar
//! ([`OnnxMetadata::from_model`]; `from_sidecar` and `from_file`, which read plans, live in
//! `tensorrt`).

use crate::proto::ModelProto;
use anyhow::{bail, Context, Result};
use graphs::Precision;
use graphs::{Denoiser, GeneratorSpec, Parameterisation};
use std::collections::BTreeMap;

/// What an exported graph computes.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelKind {
    /// noise (+ fresh noise) + labels -> images, with the sampler it unrolls.
    Generator(GeneratorSpec),
    /// One network evaluation.
    Denoiser,
}

/// Every metadata entry the exporter writes, typed.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxMetadata {
    pub producer: String,
    pub kind: ModelKind,
    /// Training method: "teacher", "dmd2", "tdm", ...
    pub method: String,
    pub parameterisation: Parameterisation,
    pub resolution: usize,
    pub channels: usize,
    pub num_classes: usize,
    /// The null class of classifier-free guidance; `None` (written `none`) for a network
    /// without one (a diffusers model).
    pub null_class_id: Option<usize>,
    pub precision: Precision,
    /// Generators: the sigma of each network evaluation's step.
    pub step_sigmas: Vec<f64>,
    /// SHA-256 of the checkpoint's weights file, or of the initializers (see `weights_sha256_of`).
    pub weights_sha256: String,
    pub weights_sha256_of: String,
    /// Entries after the standard ones (e.g. `checkpoint_step`), in order.
    pub extra: Vec<(String, String)>,
}

const PIXEL_RANGE: &str = "[-1, 1]";
const LABEL_DTYPE: &str = "int32";

impl OnnxMetadata {
    /// The record of an export of `den` (`spec`: a generator), weights hash still empty.
    pub fn new(
        den: &Denoiser,
        spec: Option<&GeneratorSpec>,
        method: &str,
        precision: Precision,
    ) -> Self {
        let (channels, resolution) = den.image_shape();
        Self {
            producer: format!("distill {}", env!("CARGO_PKG_VERSION")),
            kind: match spec {
                Some(s) => ModelKind::Generator(s.clone()),
                None => ModelKind::Denoiser,
            },
            method: method.into(),
            parameterisation: den.param.clone(),
            resolution,
            channels,
            num_classes: den.num_classes(),
            null_class_id: den.null_class(),
            precision,
            step_sigmas: spec.map(|s| s.step_sigmas(&den.param)).unwrap_or_default(),
            weights_sha256: String::new(),
            weights_sha256_of: String::new(),
            extra: Vec::new(),
        }
    }

    /// The generator's sampler, `None` for a denoiser.
    pub fn generator(&self) -> Option<&GeneratorSpec> {
        match &self.kind {
            ModelKind::Generator(s) => Some(s),
            ModelKind::Denoiser => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ModelKind::Generator(_) => "generator",
            ModelKind::Denoiser => "denoiser",
        }
    }

    /// The `metadata_props` entries, in the order the exporter has always written them.
    pub fn to_props(&self) -> Result<Vec<(String, String)>> {
        let mut p: Vec<(String, String)> = vec![
            ("producer".into(), self.producer.clone()),
            ("kind".into(), self.kind_name().into()),
            ("method".into(), self.method.clone()),
            (
                "parameterisation".into(),
                serde_json::to_string(&self.parameterisation)?,
            ),
            ("resolution".into(), self.resolution.to_string()),
            ("channels".into(), self.channels.to_string()),
            ("num_classes".into(), self.num_classes.to_string()),
            (
                "null_class_id".into(),
                self.null_class_id
                    .map_or_else(|| "none".to_string(), |n| n.to_string()),
            ),
            ("pixel_range".into(), PIXEL_RANGE.into()),
            ("label_dtype".into(), LABEL_DTYPE.into()),
            ("precision".into(), self.precision.name().into()),
        ];
        if let ModelKind::Generator(spec) = &self.kind {
            // With classifier-free guidance each guided evaluation is two network calls.
            let calls = spec.nfe()
                * if spec.cfg_scale != 1.0 && spec.sampler != graphs::SamplerKind::Student {
                    2
                } else {
                    1
                };
            p.extend([
                (
                    "sampler".to_string(),
                    serde_json::to_value(spec.sampler)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
                ("steps".into(), spec.steps.to_string()),
                ("sigmas".into(), serde_json::to_string(&self.step_sigmas)?),
                ("nfe".into(), spec.nfe().to_string()),
                ("network_calls".into(), calls.to_string()),
                ("cfg_scale".into(), spec.cfg_scale.to_string()),
                (
                    "fresh_noise_inputs".into(),
                    spec.num_fresh_noise().to_string(),
                ),
                ("generator_spec".into(), serde_json::to_string(spec)?),
            ]);
        }
        p.push(("weights_sha256".into(), self.weights_sha256.clone()));
        p.push(("weights_sha256_of".into(), self.weights_sha256_of.clone()));
        p.extend(self.extra.iter().cloned());
        Ok(p)
    }

    /// Parses `metadata_props` entries; `what` names the model in errors.
    pub fn from_props(props: &[(String, String)], what: &str) -> Result<Self> {
        let m: BTreeMap<&str, &str> = props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let get = |k: &str| -> Result<&str> {
            m.get(k).copied().with_context(|| {
                format!("{what}: metadata lacks `{k}`; was it exported by distill?")
            })
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .with_context(|| format!("{what}: metadata `{k}` is not a number"))
        };
        let kind = match m.get("kind").copied() {
            Some("generator") => {
                ModelKind::Generator(serde_json::from_str(get("generator_spec")?).with_context(
                    || format!("{what}: parsing the model's generator_spec metadata"),
                )?)
            }
            Some("denoiser") => ModelKind::Denoiser,
            other => bail!("{what}: metadata `kind` is {other:?}; was it exported by distill?"),
        };
        let standard = [
            "producer",
            "kind",
            "method",
            "parameterisation",
            "resolution",
            "channels",
            "num_classes",
            "null_class_id",
            "pixel_range",
            "label_dtype",
            "precision",
            "sampler",
            "steps",
            "sigmas",
            "nfe",
            "network_calls",
            "cfg_scale",
            "fresh_noise_inputs",
            "generator_spec",
            "weights_sha256",
            "weights_sha256_of",
        ];
        Ok(Self {
            producer: get("producer")?.into(),
            step_sigmas: match &kind {
                ModelKind::Generator(_) => serde_json::from_str(get("sigmas")?)
                    .with_context(|| format!("{what}: metadata `sigmas`"))?,
                ModelKind::Denoiser => Vec::new(),
            },
            kind,
            method: get("method")?.into(),
            parameterisation: serde_json::from_str(get("parameterisation")?)
                .with_context(|| format!("{what}: metadata `parameterisation`"))?,
            resolution: num("resolution")?,
            channels: num("channels")?,
            num_classes: num("num_classes")?,
            null_class_id: match get("null_class_id")? {
                "none" => None,
                _ => Some(num("null_class_id")?),
            },
            precision: get("precision")?.parse()?,
            weights_sha256: get("weights_sha256")?.into(),
            weights_sha256_of: get("weights_sha256_of")?.into(),
            extra: props
                .iter()
                .filter(|(k, _)| !standard.contains(&k.as_str()))
                .cloned()
                .collect(),
        })
    }

    /// The record of a loaded ONNX model.
    pub fn from_model(model: &ModelProto, what: &str) -> Result<Self> {
        Self::from_props(&metadata(model), what)
    }
}

/// `metadata_props` of a model as a list of pairs.
pub fn metadata(model: &ModelProto) -> Vec<(String, String)> {
    model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}
