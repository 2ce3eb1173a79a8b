//! The ONNX graph under construction: element types, dims, value infos, and [`OnnxBackend`]'s
//! own methods (inputs, nodes, initializers, constants, the finished model).
//!
//! Values are named by `String`s. Every method appends nodes (and initializers, and constants) to
//! a graph held behind a `RefCell`, tracking each value's element type and shape (with the batch
//! as the symbolic dim `batch`) so the model carries value_info for every intermediate. The
//! `graphs::Backend` implementation is in `backend.rs`, each op's emission in `src/ops/<op>.rs`
//! (both build on this module; it depends on neither).

use crate::proto::{
    self, tensor_proto::DataType, AttributeProto, NodeProto, TensorProto, ValueInfoProto,
};
use anyhow::{bail, Context, Result};
use graphs::Param;
use graphs::Precision;
use std::cell::RefCell;
use std::collections::HashMap;

/// ONNX opset of the default domain every exported model imports.
pub const OPSET: i64 = 17;
/// ONNX IR version of every exported model (IR 8 = ONNX 1.10+, read by every current runtime).
pub const IR_VERSION: i64 = 8;

/// Element types the exporter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    I32,
    I64,
}

impl ElemType {
    /// The ONNX type of a [`graphs::Kind`] (labels and timesteps are int32).
    pub fn of(kind: graphs::Kind) -> Self {
        match kind {
            graphs::Kind::F32 => Self::F32,
            graphs::Kind::Label => Self::I32,
        }
    }
    pub fn onnx(self) -> i32 {
        (match self {
            Self::F32 => DataType::Float,
            Self::F16 => DataType::Float16,
            Self::I32 => DataType::Int32,
            Self::I64 => DataType::Int64,
        }) as i32
    }
    pub fn from_onnx(t: i32) -> Result<Self> {
        Ok(
            match DataType::try_from(t)
                .map_err(|_| anyhow::anyhow!("unknown ONNX data type {t}"))?
            {
                DataType::Float => Self::F32,
                DataType::Float16 => Self::F16,
                DataType::Int32 => Self::I32,
                DataType::Int64 => Self::I64,
                other => bail!("unsupported ONNX data type {other:?}"),
            },
        )
    }
    pub fn is_int(self) -> bool {
        matches!(self, Self::I32 | Self::I64)
    }
}

/// One dimension of a tracked shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// The dynamic batch dimension (`dim_param: "batch"`).
    Batch,
    /// Not tracked (never produced by the networks of `graphs`; value_info is then omitted).
    Unknown,
}

/// Element type and shape of a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueInfo {
    pub elem: ElemType,
    pub dims: Vec<Dim>,
}

impl ValueInfo {
    pub fn new(elem: ElemType, dims: Vec<Dim>) -> Self {
        Self { elem, dims }
    }
    pub fn rank(&self) -> usize {
        self.dims.len()
    }
    /// The ONNX ValueInfoProto (shape omitted when a dim is unknown).
    pub fn to_proto(&self, name: &str) -> ValueInfoProto {
        let shape = if self.dims.contains(&Dim::Unknown) {
            None
        } else {
            Some(proto::TensorShapeProto {
                dim: self
                    .dims
                    .iter()
                    .map(|d| proto::tensor_shape_proto::Dimension {
                        value: Some(match d {
                            Dim::Fixed(n) => {
                                proto::tensor_shape_proto::dimension::Value::DimValue(*n as i64)
                            }
                            _ => proto::tensor_shape_proto::dimension::Value::DimParam(
                                "batch".into(),
                            ),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            })
        };
        ValueInfoProto {
            name: name.to_string(),
            r#type: Some(proto::TypeProto {
                value: Some(proto::type_proto::Value::TensorType(
                    proto::type_proto::Tensor {
                        elem_type: self.elem.onnx(),
                        shape,
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Default)]
pub(crate) struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    /// Initializer name -> (element type, dims), to deduplicate params used more than once.
    pub init_index: HashMap<String, (ElemType, Vec<i64>)>,
    /// Constant (type, dims, bytes) -> value name, so repeated scalars are emitted once.
    pub const_cache: HashMap<(ElemType, Vec<i64>, Vec<u8>), String>,
    /// `like` value -> its `[batch]` shape tensor (for `full_batch`).
    pub batch_shape_cache: HashMap<String, String>,
    pub values: HashMap<String, ValueInfo>,
    pub inputs: Vec<String>,
    pub counter: usize,
}

/// Lowers [`graphs::Backend`] calls to ONNX nodes. `T = String` is a value name.
pub struct OnnxBackend {
    pub(crate) g: RefCell<Graph>,
    /// The graph's precision (its metadata) and, unless [`Self::upcast`] overrides it for a part,
    /// the precision its conv/linear weights are stored and run in.
    pub(crate) precision: Precision,
    upcast: std::cell::Cell<bool>,
}

impl OnnxBackend {
    /// Precisions an exported graph can have (ONNX Runtime and TensorRT run no bf16 graphs we
    /// could validate).
    pub const PRECISIONS: [Precision; 2] = [Precision::Fp32, Precision::Fp16];

    pub fn new(precision: Precision) -> Result<Self> {
        Ok(Self {
            g: RefCell::new(Graph::default()),
            precision: precision.require("ONNX export", &Self::PRECISIONS)?,
            upcast: std::cell::Cell::new(false),
        })
    }

    /// Lowers `f` with fp32 weights and arithmetic inside an fp16 graph (the VAE of a
    /// `force_upcast` pipeline, as diffusers runs it: its activations overflow fp16).
    pub fn upcast<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = self.upcast.replace(true);
        let r = f();
        self.upcast.set(was);
        r
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Element type of conv/linear weights (and their Conv/Gemm/MatMul).
    pub fn weight_elem(&self) -> ElemType {
        match self.precision {
            Precision::Fp16 if !self.upcast.get() => ElemType::F16,
            Precision::Fp16 => ElemType::F32,
            // `new` admits only fp32 and fp16.
            Precision::Fp32 | Precision::Bf16 => ElemType::F32,
        }
    }

    /// Declares a graph input. Use [`Dim::Batch`] for the dynamic batch.
    pub fn input(&self, name: &str, elem: ElemType, dims: &[Dim]) -> Result<String> {
        let mut g = self.g.borrow_mut();
        if g.values.contains_key(name) {
            bail!("value {name} already exists");
        }
        g.values
            .insert(name.to_string(), ValueInfo::new(elem, dims.to_vec()));
        g.inputs.push(name.to_string());
        Ok(name.to_string())
    }

    /// Type and shape of a value.
    pub fn info(&self, v: &str) -> Result<ValueInfo> {
        self.g
            .borrow()
            .values
            .get(v)
            .cloned()
            .with_context(|| format!("unknown ONNX value {v}"))
    }

    /// A fresh unique name with the given prefix.
    pub(crate) fn fresh(&self, prefix: &str) -> String {
        let mut g = self.g.borrow_mut();
        g.counter += 1;
        format!("{prefix}_{}", g.counter)
    }

    /// Appends a node with one output, records the output's type/shape, returns its name.
    pub(crate) fn node(
        &self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        out: ValueInfo,
    ) -> Result<String> {
        {
            let g = self.g.borrow();
            for i in inputs {
                if !i.is_empty() && !g.values.contains_key(*i) {
                    bail!("{op}: unknown input value {i}");
                }
            }
        }
        let name = self.fresh(op);
        let node = NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: format!("{name}_node"),
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        };
        let mut g = self.g.borrow_mut();
        g.nodes.push(node);
        g.values.insert(name.clone(), out);
        Ok(name)
    }

    /// Adds (once per name) an initializer; errors when the name is reused with another layout.
    pub(crate) fn initializer(
        &self,
        name: &str,
        elem: ElemType,
        dims: &[i64],
        raw: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<String> {
        let mut g = self.g.borrow_mut();
        if let Some((e, d)) = g.init_index.get(name) {
            if *e != elem || d != dims {
                bail!("initializer {name} used as {elem:?}{dims:?} after {e:?}{d:?}");
            }
            return Ok(name.to_string());
        }
        let raw = raw()?;
        g.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.to_vec(),
            data_type: elem.onnx(),
            raw_data: raw,
            ..Default::default()
        });
        g.init_index.insert(name.to_string(), (elem, dims.to_vec()));
        let dims_t = dims.iter().map(|&d| Dim::Fixed(d as usize)).collect();
        g.values
            .insert(name.to_string(), ValueInfo::new(elem, dims_t));
        Ok(name.to_string())
    }

    /// A parameter as an initializer named by its safetensors key, stored with `dims`
    /// (same element count as the param), in f32 or f16. `transpose2d` stores `W^T` of a 2-D param.
    pub(crate) fn param_init(
        &self,
        p: &Param,
        name: &str,
        dims: &[i64],
        elem: ElemType,
        transpose2d: bool,
    ) -> Result<String> {
        let n: i64 = dims.iter().product();
        if n as usize != p.t.elem_count() {
            bail!(
                "param {}: {:?} cannot be stored as {dims:?}",
                p.name,
                p.dims()
            );
        }
        self.initializer(name, elem, dims, || {
            let t = p.t.to_dtype(candle_core::DType::F32)?;
            let t = if transpose2d { t.t()?.contiguous()? } else { t };
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok(encode(&v, elem))
        })
    }

    /// A constant tensor (a `Constant` node; deduplicated).
    pub(crate) fn const_tensor(
        &self,
        elem: ElemType,
        dims: &[usize],
        raw: Vec<u8>,
    ) -> Result<String> {
        let d64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let key = (elem, d64.clone(), raw.clone());
        if let Some(v) = self.g.borrow().const_cache.get(&key) {
            return Ok(v.clone());
        }
        let t = TensorProto {
            dims: d64,
            data_type: elem.onnx(),
            raw_data: raw,
            ..Default::default()
        };
        let out = self.node(
            "Constant",
            &[],
            vec![attr_tensor("value", t)],
            ValueInfo::new(elem, dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        )?;
        self.g.borrow_mut().const_cache.insert(key, out.clone());
        Ok(out)
    }

    pub(crate) fn const_f32(&self, values: &[f32], dims: &[usize]) -> Result<String> {
        self.const_tensor(ElemType::F32, dims, encode(values, ElemType::F32))
    }

    pub(crate) fn const_i64(&self, values: &[i64], dims: &[usize]) -> Result<String> {
        self.const_tensor(
            ElemType::I64,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// `Cast` to `to` (no node when `v` already has that type).
    pub(crate) fn cast(&self, v: &str, to: ElemType) -> Result<String> {
        let info = self.info(v)?;
        if info.elem == to {
            return Ok(v.to_string());
        }
        self.node(
            "Cast",
            &[v],
            vec![attr_int("to", to.onnx() as i64)],
            ValueInfo::new(to, info.dims),
        )
    }

    /// Graph parts for [`crate::model`]: nodes, initializers, inputs' and values' infos.
    pub(crate) fn take(self) -> Graph {
        self.g.into_inner()
    }
}

/// Little-endian bytes of `v` as f32 or f16.
pub(crate) fn encode(v: &[f32], elem: ElemType) -> Vec<u8> {
    match elem {
        ElemType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: proto::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}
pub(crate) fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: proto::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}
pub(crate) fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: proto::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}
pub(crate) fn attr_str(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: proto::attribute_proto::AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}
pub(crate) fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: proto::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

/// Numpy broadcasting of two tracked shapes.
pub(crate) fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let n = a.len().max(b.len());
    let get = |s: &[Dim], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            Dim::Fixed(1)
        }
    };
    (0..n)
        .map(|i| {
            Ok(match (get(a, i), get(b, i)) {
                (Dim::Fixed(1), d) | (d, Dim::Fixed(1)) => d,
                (x, y) if x == y => x,
                (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
                (x, y) => bail!("cannot broadcast {a:?} with {b:?} ({x:?} vs {y:?})"),
            })
        })
        .collect()
}
