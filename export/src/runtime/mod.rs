//! Runs exported models: [`tract`] (pure Rust, always available) and [`onnxruntime`] (ONNX Runtime
//! through `ort` with `load-dynamic`: the shared library is found at run time).
//!
//! Both take named f32/int32 inputs and return the model's outputs, named, as f32 arrays.

pub mod guard;
pub mod onnxruntime;
pub mod tract;

use crate::builder::{Dim, ElemType};
use crate::proto::ModelProto;
use anyhow::{Context, Result};
use ndarray::ArrayD;
use prost::Message;

pub use self::onnxruntime::{find_onnxruntime, OrtRunner};
pub use self::tract::TractRunner;

/// An input tensor.
#[derive(Clone, Debug)]
pub enum TensorData {
    F32(ArrayD<f32>),
    I32(ArrayD<i32>),
}

impl TensorData {
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(a) => a.shape(),
            Self::I32(a) => a.shape(),
        }
    }
}

/// Named inputs, and named outputs.
pub type Inputs = [(String, TensorData)];
pub type Outputs = Vec<(String, ArrayD<f32>)>;

/// A loaded model that can be run.
pub trait Runner {
    fn name(&self) -> &'static str;
    /// Runs on the given inputs (every graph input, by name) and returns all outputs in graph order.
    fn run(&mut self, inputs: &Inputs) -> Result<Outputs>;
}

/// Name, element type and dims of a graph input or output.
#[derive(Clone, Debug)]
pub struct IoSpec {
    pub name: String,
    pub elem: ElemType,
    pub dims: Vec<Dim>,
}

/// Inputs and outputs of a model, as written in its graph.
pub fn io_specs(model: &ModelProto) -> Result<(Vec<IoSpec>, Vec<IoSpec>)> {
    use crate::proto::{tensor_shape_proto::dimension::Value as D, type_proto::Value as V};
    let g = model.graph.as_ref().context("model has no graph")?;
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    let conv = |vi: &crate::proto::ValueInfoProto| -> Result<IoSpec> {
        let Some(V::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            anyhow::bail!("{} is not a tensor", vi.name)
        };
        let dims = t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(D::DimValue(n)) => Dim::Fixed(*n as usize),
                        Some(D::DimParam(p)) if p == "batch" => Dim::Batch,
                        _ => Dim::Unknown,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(IoSpec {
            name: vi.name.clone(),
            elem: ElemType::from_onnx(t.elem_type)?,
            dims,
        })
    };
    let ins = g
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(conv)
        .collect::<Result<_>>()?;
    let outs = g.output.iter().map(conv).collect::<Result<_>>()?;
    Ok((ins, outs))
}

/// Decodes a model file (initializers in external data stay external).
pub fn load_model(path: &std::path::Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("decoding {} as an ONNX model", path.display()))
}

pub(crate) fn find_input<'a>(inputs: &'a Inputs, name: &str) -> Result<&'a TensorData> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .with_context(|| format!("missing input {name}"))
}
