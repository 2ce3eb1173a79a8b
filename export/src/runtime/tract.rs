//! tract-onnx runner: the model is loaded, given concrete input facts for the batch at hand, then
//! optimised; one plan is kept per batch size.

use super::{find_input, io_specs, Inputs, IoSpec, Outputs, Runner, TensorData};
use crate::builder::{Dim, ElemType};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::*;

enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

pub struct TractRunner {
    source: Source,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    plans: HashMap<Vec<Vec<usize>>, Arc<TypedRunnableModel>>,
}

impl TractRunner {
    /// From a model file (external data is resolved relative to it).
    pub fn from_path(path: &Path) -> Result<Self> {
        let model = super::load_model(path)?;
        let (inputs, outputs) = io_specs(&model)?;
        Ok(Self {
            source: Source::Path(path.to_path_buf()),
            inputs,
            outputs,
            plans: HashMap::new(),
        })
    }

    /// From serialized model bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        use prost::Message;
        let model = crate::proto::ModelProto::decode(bytes.as_slice())?;
        let (inputs, outputs) = io_specs(&model)?;
        Ok(Self {
            source: Source::Bytes(bytes),
            inputs,
            outputs,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, shapes: Vec<Vec<usize>>) -> Result<Arc<TypedRunnableModel>> {
        if let Some(p) = self.plans.get(&shapes) {
            return Ok(p.clone());
        }
        // The graph's symbolic `batch` (in outputs and value_info) would not unify with the
        // concrete input facts set below: let tract infer every shape from the inputs instead.
        let onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        let mut model = match &self.source {
            Source::Path(p) => onnx.model_for_path(p),
            Source::Bytes(b) => onnx.model_for_read(&mut b.as_slice()),
        }
        .with_context(|| "tract: loading the model".to_string())?;
        for (ix, (spec, shape)) in self.inputs.iter().zip(&shapes).enumerate() {
            let dt = match spec.elem {
                ElemType::F32 => f32::datum_type(),
                ElemType::I32 => i32::datum_type(),
                ElemType::I64 => i64::datum_type(),
                ElemType::F16 => bail!("tract runner: f16 input {} is not supported", spec.name),
            };
            model
                .set_input_fact(ix, InferenceFact::dt_shape(dt, shape.clone()))
                .map_err(|e| anyhow!("tract: input fact {}: {e:?}", spec.name))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .with_context(|| format!("tract: optimising the model for input shapes {shapes:?}"))?;
        self.plans.insert(shapes, plan.clone());
        Ok(plan)
    }
}

impl Runner for TractRunner {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn run(&mut self, inputs: &Inputs) -> Result<Outputs> {
        let mut shapes = Vec::new();
        let mut values: TVec<TValue> = tvec![];
        for spec in &self.inputs {
            let t = find_input(inputs, &spec.name)?;
            check_shape(spec, t.shape())?;
            shapes.push(t.shape().to_vec());
            let tensor: Tensor = match (spec.elem, t) {
                (ElemType::F32, TensorData::F32(a)) => a.clone().into(),
                (ElemType::I32, TensorData::I32(a)) => a.clone().into(),
                (e, _) => bail!("input {}: the model wants {e:?}", spec.name),
            };
            values.push(tensor.into_tvalue());
        }
        let plan = self.plan(shapes)?;
        let outs = plan.run(values).with_context(|| "tract: run".to_string())?;
        self.outputs
            .iter()
            .zip(outs.iter())
            .map(|(spec, v)| {
                let a = v
                    .to_plain_array_view::<f32>()
                    .map_err(|e| anyhow!("tract: output {}: {e:?}", spec.name))?;
                Ok((spec.name.clone(), a.to_owned()))
            })
            .collect::<Result<Outputs>>()
            .context("tract: reading outputs")
    }
}

pub(crate) fn check_shape(spec: &IoSpec, shape: &[usize]) -> Result<()> {
    let ok = spec.dims.is_empty()
        || (spec.dims.len() == shape.len()
            && spec
                .dims
                .iter()
                .zip(shape)
                .all(|(d, &s)| !matches!(d, Dim::Fixed(n) if *n != s)));
    anyhow::ensure!(
        ok,
        "input {}: shape {shape:?} does not match {:?}",
        spec.name,
        spec.dims
    );
    Ok(())
}
