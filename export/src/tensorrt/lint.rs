//! TensorRT compatibility lint of an ONNX model, run by every export (see
//! [`crate::export_generator`]) and by `distill validate --lint`.
//!
//! What is checked, so a model that passes is one TensorRT 10's ONNX parser takes as is:
//! * the model imports exactly the default domain at opset [`crate::OPSET`], and every node is in
//!   the default domain;
//! * every node's op is in [`ops_table::OPS`] and meets that entry's constraints;
//! * graph inputs and outputs are f32, f16 or int32 (TensorRT's int64 support is a cast-down);
//! * int64 tensors are shape-like only: constants, `Shape`/`Size` outputs and arithmetic on them,
//!   consumed as Reshape/Slice/Resize/ConstantOfShape/... parameters (never data computed from
//!   the inputs, e.g. Gather indices cast from floats); no f64/string/complex tensors at all;
//! * no dynamic dims except the named `batch` (dim 0 of inputs and outputs; value_info too).
//!
//! Each violation names the node (name and op) or the graph input/output concerned.

use super::ops_table::{self, Check};
use crate::proto::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value as DimValue,
    type_proto::Value as TypeValue, ModelProto, NodeProto, ValueInfoProto,
};
use std::collections::{HashMap, HashSet};

/// One problem found by [`lint`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// `node <name> (<op>)`, `graph input <name>`, `graph output <name>`, `value <name>` or `model`.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The lint found violations (exit code 4 in the CLI).
#[derive(Debug, thiserror::Error)]
#[error("{model} is not TensorRT-compatible ({} problem{}):\n  {}", .violations.len(), if .violations.len() == 1 { "" } else { "s" }, .violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct LintFailed {
    pub model: String,
    pub violations: Vec<Violation>,
}

/// Lints `model`; `Err` lists every violation. `what` names the model in the error.
pub fn check(model: &ModelProto, what: &str) -> Result<(), LintFailed> {
    let violations = lint(model);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(LintFailed {
            model: what.to_string(),
            violations,
        })
    }
}

fn node_loc(n: &NodeProto) -> String {
    let name = if n.name.is_empty() {
        n.output.first().map(String::as_str).unwrap_or("?")
    } else {
        &n.name
    };
    format!("node {name} ({})", n.op_type)
}

fn dtype_name(t: i32) -> String {
    DataType::try_from(t)
        .map(|d| format!("{d:?}").to_lowercase())
        .unwrap_or_else(|_| format!("type {t}"))
}

const F32: i32 = DataType::Float as i32;
const F16: i32 = DataType::Float16 as i32;
const I32: i32 = DataType::Int32 as i32;
const I64: i32 = DataType::Int64 as i32;

/// Element types TensorRT has (int64 only as shape-like, checked separately).
fn trt_has(t: i32) -> bool {
    [
        DataType::Float,
        DataType::Float16,
        DataType::Bfloat16,
        DataType::Int32,
        DataType::Int64,
        DataType::Int8,
        DataType::Uint8,
        DataType::Bool,
    ]
    .iter()
    .any(|d| *d as i32 == t)
}

fn vi_type(vi: &ValueInfoProto) -> Option<(i32, Option<Vec<Option<DimValue>>>)> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        TypeValue::TensorType(t) => Some((
            t.elem_type,
            t.shape
                .as_ref()
                .map(|s| s.dim.iter().map(|d| d.value.clone()).collect()),
        )),
        _ => None,
    }
}

/// Ops whose int64 output is shape-like when all their int64 inputs are.
const SHAPE_ARITH: &[&str] = &[
    "Slice",
    "Concat",
    "Gather",
    "Squeeze",
    "Unsqueeze",
    "Reshape",
    "Identity",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "ReduceProd",
    "Expand",
    "Where",
];

/// (op, input index) slots where a shape-like int64 tensor is a parameter, not data.
fn is_shape_slot(op: &str, index: usize) -> bool {
    matches!(
        (op, index),
        ("Reshape", 1)
            | ("Slice", 1..=4)
            | ("ConstantOfShape", 0)
            | ("Expand", 1)
            | ("Tile", 1)
            | ("Resize", 3)
            | ("Squeeze", 1)
            | ("Unsqueeze", 1)
            | ("Pad", 1)
            | ("TopK", 1)
            | ("OneHot", 1)
            | ("Range", 0..=2)
            | ("Gather", 1)
            | ("CumSum", 1)
            | ("Split", 1)
            | ("ReduceSum", 1)
            | ("NonMaxSuppression", 2)
    )
}

struct Graph<'a> {
    types: HashMap<&'a str, i32>,
    ranks: HashMap<&'a str, usize>,
    consts: HashSet<&'a str>,
}

impl<'a> Graph<'a> {
    fn is_const(&self, v: &str) -> bool {
        self.consts.contains(v)
    }
}

/// Element type of a `Constant` node's value.
fn constant_type(n: &NodeProto) -> Option<(i32, usize)> {
    let a = n.attribute.first()?;
    match a.name.as_str() {
        "value" => a.t.as_ref().map(|t| (t.data_type, t.dims.len())),
        "value_float" => Some((F32, 0)),
        "value_floats" => Some((F32, 1)),
        "value_int" => Some((I64, 0)),
        "value_ints" => Some((I64, 1)),
        _ => None,
    }
}

fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n crate::proto::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// Element type of a node output where value_info does not say (simple forward inference).
fn infer_type(n: &NodeProto, types: &HashMap<&str, i32>) -> Option<i32> {
    let first = || n.input.first().and_then(|i| types.get(i.as_str()).copied());
    match n.op_type.as_str() {
        "Constant" => constant_type(n).map(|c| c.0),
        "Cast" => attr(n, "to").map(|a| a.i as i32),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => Some(I64),
        "ConstantOfShape" => Some(
            attr(n, "value")
                .and_then(|a| a.t.as_ref())
                .map(|t| t.data_type)
                .unwrap_or(F32),
        ),
        "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "Not" | "And" | "Or"
        | "Xor" | "IsNaN" | "IsInf" => Some(DataType::Bool as i32),
        "Where" => n.input.get(1).and_then(|i| types.get(i.as_str()).copied()),
        "Gather" | "GatherElements" | "GatherND" => first(),
        _ => first(),
    }
}

/// All violations of `model` (empty: TensorRT-compatible as far as the lint can tell).
pub fn lint(model: &ModelProto) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut push = |location: String, message: String| out.push(Violation { location, message });

    // Opset imports: the default domain at exactly our opset, nothing else.
    let default: Vec<_> = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .collect();
    match default.as_slice() {
        [o] if o.version == crate::OPSET => {}
        [o] => push(
            "model".into(),
            format!(
                "imports default-domain opset {}, expected {} (the opset this lint's op table is for)",
                o.version,
                crate::OPSET
            ),
        ),
        [] => push(
            "model".into(),
            "does not import the default ONNX domain".into(),
        ),
        _ => push(
            "model".into(),
            "imports the default ONNX domain more than once".into(),
        ),
    }
    for o in &model.opset_import {
        if !(o.domain.is_empty() || o.domain == "ai.onnx") {
            push(
                "model".into(),
                format!(
                    "imports custom domain {:?} (TensorRT needs a plugin for every custom op)",
                    o.domain
                ),
            );
        }
    }
    let Some(g) = model.graph.as_ref() else {
        push("model".into(), "has no graph".into());
        return out;
    };

    // Types, ranks and constness of every value.
    let mut gr = Graph {
        types: HashMap::new(),
        ranks: HashMap::new(),
        consts: HashSet::new(),
    };
    for t in &g.initializer {
        gr.types.insert(&t.name, t.data_type);
        gr.ranks.insert(&t.name, t.dims.len());
        gr.consts.insert(&t.name);
    }
    for vi in g.input.iter().chain(&g.value_info).chain(&g.output) {
        if let Some((t, shape)) = vi_type(vi) {
            gr.types.insert(&vi.name, t);
            if let Some(s) = shape {
                gr.ranks.insert(&vi.name, s.len());
            }
        }
    }
    for n in &g.node {
        if n.op_type == "Constant" {
            if let (Some(o), Some((t, r))) = (n.output.first(), constant_type(n)) {
                gr.types.insert(o, t);
                gr.ranks.insert(o, r);
                gr.consts.insert(o);
            }
        }
        for o in &n.output {
            if !gr.types.contains_key(o.as_str()) {
                if let Some(t) = infer_type(n, &gr.types) {
                    gr.types.insert(o, t);
                }
            }
        }
    }

    // Graph inputs and outputs: types and dims.
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let io = g
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| ("graph input", i))
        .chain(g.output.iter().map(|o| ("graph output", o)));
    for (kind, vi) in io {
        let loc = format!("{kind} {}", vi.name);
        let Some((t, shape)) = vi_type(vi) else {
            push(loc, "is not a tensor".into());
            continue;
        };
        if ![F32, F16, I32].contains(&t) {
            push(
                loc.clone(),
                format!(
                    "is {}; graph inputs and outputs must be float32, float16 or int32{}",
                    dtype_name(t),
                    if t == I64 {
                        " (TensorRT prefers int32 indices: export labels/timesteps as int32)"
                    } else {
                        ""
                    }
                ),
            );
        }
        match shape {
            None => push(
                loc,
                "has no shape (rank and static dims must be known)".into(),
            ),
            Some(dims) => {
                for (i, d) in dims.iter().enumerate() {
                    match d {
                        Some(DimValue::DimValue(v)) if *v >= 0 => {}
                        Some(DimValue::DimParam(p)) if p == "batch" && i == 0 => {}
                        Some(DimValue::DimParam(p)) if p == "batch" => push(
                            loc.clone(),
                            format!("has the batch axis at dim {i}; it must be dim 0"),
                        ),
                        other => push(
                            loc.clone(),
                            format!(
                                "dim {i} is dynamic ({}); only dim 0 may be, named `batch`",
                                describe_dim(other)
                            ),
                        ),
                    }
                }
            }
        }
    }
    // value_info: no dynamic dims but `batch`.
    let producer: HashMap<&str, &NodeProto> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    for vi in &g.value_info {
        if let Some((_, Some(dims))) = vi_type(vi) {
            for (i, d) in dims.iter().enumerate() {
                let ok = match d {
                    Some(DimValue::DimValue(v)) => *v >= 0,
                    Some(DimValue::DimParam(p)) => p == "batch",
                    None => false,
                };
                if !ok {
                    let loc = match producer.get(vi.name.as_str()) {
                        Some(n) => format!("{} output {}", node_loc(n), vi.name),
                        None => format!("value {}", vi.name),
                    };
                    push(
                        loc,
                        format!(
                            "value_info dim {i} is dynamic ({}); only the `batch` axis may be",
                            describe_dim(d)
                        ),
                    );
                }
            }
        }
    }

    // Shape-like int64 values, in graph (topological) order.
    let mut shape_like: HashSet<&str> = gr
        .consts
        .iter()
        .copied()
        .filter(|v| gr.types.get(v) == Some(&I64))
        .collect();
    for n in &g.node {
        let int64_ins: Vec<&str> = n
            .input
            .iter()
            .map(String::as_str)
            .filter(|i| !i.is_empty() && gr.types.get(i) == Some(&I64))
            .collect();
        let from_shape = matches!(n.op_type.as_str(), "Shape" | "Size")
            || ((SHAPE_ARITH.contains(&n.op_type.as_str()) || n.op_type == "Cast")
                && !int64_ins.is_empty()
                && int64_ins.iter().all(|i| shape_like.contains(i)));
        for o in &n.output {
            if gr.types.get(o.as_str()) == Some(&I64) {
                if from_shape {
                    shape_like.insert(o);
                } else if n.op_type != "Constant" {
                    push(
                        format!("{} output {o}", node_loc(n)),
                        "is an int64 tensor computed from data; TensorRT casts int64 down to \
                         int32 and only shape tensors may be int64 (use int32)"
                            .into(),
                    );
                }
            }
        }
    }

    // Nodes.
    for n in &g.node {
        let loc = node_loc(n);
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            push(
                loc,
                format!(
                    "is in custom domain {:?}; TensorRT's parser only knows the default domain \
                     (a custom op needs a TensorRT plugin)",
                    n.domain
                ),
            );
            continue;
        }
        let Some(rule) = ops_table::rule(&n.op_type) else {
            push(
                loc,
                format!(
                    "op {} is not supported by TensorRT 10's ONNX parser at opset {}",
                    n.op_type,
                    crate::OPSET
                ),
            );
            continue;
        };
        for o in &n.output {
            if let Some(&t) = gr.types.get(o.as_str()) {
                if !trt_has(t) {
                    push(
                        loc.clone(),
                        format!(
                            "output {o} is {}, a type TensorRT does not have",
                            dtype_name(t)
                        ),
                    );
                }
            }
        }
        for (ix, i) in n.input.iter().enumerate() {
            let shape_op = matches!(n.op_type.as_str(), "Cast" | "Shape" | "Size")
                || SHAPE_ARITH.contains(&n.op_type.as_str());
            if !i.is_empty()
                && gr.types.get(i.as_str()) == Some(&I64)
                && !is_shape_slot(&n.op_type, ix)
                && !shape_op
            {
                push(
                    loc.clone(),
                    format!("input {ix} ({i}) is int64 data; only shape parameters may be int64"),
                );
            }
        }
        for c in rule.checks {
            if let Some(msg) = check_rule(n, c, &gr, &shape_like) {
                push(loc.clone(), msg);
            }
        }
    }
    out
}

fn describe_dim(d: &Option<DimValue>) -> String {
    match d {
        Some(DimValue::DimParam(p)) => format!("`{p}`"),
        Some(DimValue::DimValue(v)) => format!("{v}"),
        None => "unnamed".into(),
    }
}

fn check_rule(n: &NodeProto, c: &Check, g: &Graph, shape_like: &HashSet<&str>) -> Option<String> {
    match *c {
        Check::StrAttr {
            name,
            default,
            allowed,
        } => {
            let v = attr(n, name)
                .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                .unwrap_or_else(|| default.to_string());
            (!allowed.contains(&v.as_str())).then(|| {
                format!("{name} = {v:?} is not supported by TensorRT (supported: {allowed:?})")
            })
        }
        Check::IntAttr {
            name,
            default,
            allowed,
        } => {
            let v = attr(n, name).map(|a| a.i).unwrap_or(default);
            (!allowed.contains(&v)).then(|| {
                format!("{name} = {v} is not supported by TensorRT (supported: {allowed:?})")
            })
        }
        Check::ConstInput { index, what } => {
            let i = n.input.get(index).filter(|i| !i.is_empty())?;
            (!g.is_const(i)).then(|| {
                format!(
                    "input {index} ({what}, `{i}`) must be an initializer or Constant for TensorRT"
                )
            })
        }
        Check::KernelDims { min, max } => {
            let k = attr(n, "kernel_shape").map(|a| a.ints.len()).or_else(|| {
                n.input
                    .get(1)
                    .and_then(|w| g.ranks.get(w.as_str()))
                    .map(|r| r.saturating_sub(2))
            })?;
            (k < min || k > max)
                .then(|| format!("has {k} spatial kernel dims; TensorRT supports {min} to {max}"))
        }
        Check::InputRank { index, min, max } => {
            let r = *g.ranks.get(n.input.get(index)?.as_str())?;
            (r < min || r > max)
                .then(|| format!("input {index} has rank {r}; TensorRT supports {min} to {max}"))
        }
        Check::GatherAxis => {
            let axis = attr(n, "axis").map(|a| a.i).unwrap_or(0);
            if let Some(&r) = n.input.first().and_then(|d| g.ranks.get(d.as_str())) {
                let r = r as i64;
                if axis < -r || axis >= r {
                    return Some(format!("axis {axis} is out of range for rank-{r} data"));
                }
            }
            let idx = n.input.get(1)?;
            match g.types.get(idx.as_str()) {
                Some(&I32) | None => None,
                Some(&I64) if shape_like.contains(idx.as_str()) => None,
                Some(&I64) => Some(format!(
                    "indices `{idx}` are int64 data; TensorRT wants int32 indices"
                )),
                Some(&t) => Some(format!("indices `{idx}` are {}", dtype_name(t))),
            }
        }
        Check::CastTo => {
            let to = attr(n, "to").map(|a| a.i as i32)?;
            (!trt_has(to))
                .then(|| format!("casts to {}, a type TensorRT does not have", dtype_name(to)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{attr_int, attr_str, Dim, ElemType, ValueInfo};
    use crate::proto::{GraphProto, OperatorSetIdProto, TensorProto};

    fn vi(name: &str, elem: ElemType, dims: &[Dim]) -> ValueInfoProto {
        ValueInfo::new(elem, dims.to_vec()).to_proto(name)
    }

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn model(
        nodes: Vec<NodeProto>,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
    ) -> ModelProto {
        ModelProto {
            ir_version: crate::IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: crate::OPSET,
            }],
            graph: Some(GraphProto {
                node: nodes,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn img() -> Vec<Dim> {
        vec![Dim::Batch, Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4)]
    }

    fn sigmoid_model() -> ModelProto {
        model(
            vec![node("s", "Sigmoid", &["x"], &["y"])],
            vec![vi("x", ElemType::F32, &img())],
            vec![vi("y", ElemType::F32, &img())],
        )
    }

    fn messages(m: &ModelProto) -> String {
        lint(m)
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn minimal_model_passes() {
        assert_eq!(lint(&sigmoid_model()), vec![]);
        assert!(check(&sigmoid_model(), "m").is_ok());
    }

    #[test]
    fn unsupported_op_and_custom_domain_are_named() {
        let mut m = sigmoid_model();
        let g = m.graph.as_mut().unwrap();
        g.node.push(node("uniq", "Unique", &["y"], &["u"]));
        let mut custom = node("my_op", "FancyNorm", &["y"], &["f"]);
        custom.domain = "com.example".into();
        g.node.push(custom);
        m.opset_import.push(OperatorSetIdProto {
            domain: "com.example".into(),
            version: 1,
        });
        let msg = messages(&m);
        assert!(
            msg.contains("node uniq (Unique): op Unique is not supported"),
            "{msg}"
        );
        assert!(
            msg.contains("node my_op (FancyNorm): is in custom domain \"com.example\""),
            "{msg}"
        );
        assert!(msg.contains("model: imports custom domain"), "{msg}");
        let err = check(&m, "bad.onnx").unwrap_err();
        assert_eq!(err.violations.len(), 3);
        assert!(err
            .to_string()
            .starts_with("bad.onnx is not TensorRT-compatible (3 problems)"));
    }

    #[test]
    fn wrong_opset_is_reported() {
        let mut m = sigmoid_model();
        m.opset_import[0].version = 13;
        assert!(messages(&m).contains("opset 13, expected 17"));
    }

    #[test]
    fn int64_input_and_second_dynamic_dim() {
        let m = model(
            vec![
                node("s", "Sigmoid", &["x"], &["y"]),
                node("id", "Identity", &["t"], &["t2"]),
            ],
            vec![
                vi("x", ElemType::F32, &img()),
                vi("t", ElemType::I64, &[Dim::Batch]),
            ],
            vec![
                vi("y", ElemType::F32, &img()),
                vi("t2", ElemType::F32, &[Dim::Batch]),
            ],
        );
        let mut m = m;
        // A second, unnamed dynamic dim on x.
        let g = m.graph.as_mut().unwrap();
        if let Some(TypeValue::TensorType(t)) = g.input[0].r#type.as_mut().unwrap().value.as_mut() {
            t.shape.as_mut().unwrap().dim[2].value = Some(DimValue::DimParam("height".into()));
        }
        let msg = messages(&m);
        assert!(msg.contains("graph input t: is int64"), "{msg}");
        assert!(
            msg.contains("graph input x: dim 2 is dynamic (`height`)"),
            "{msg}"
        );
    }

    #[test]
    fn nms_with_a_dynamic_box_count_is_named() {
        let m = model(
            vec![node(
                "nms",
                "NonMaxSuppression",
                &["boxes", "scores", "k"],
                &["sel"],
            )],
            vec![
                vi(
                    "boxes",
                    ElemType::F32,
                    &[Dim::Batch, Dim::Fixed(10), Dim::Fixed(4)],
                ),
                vi(
                    "scores",
                    ElemType::F32,
                    &[Dim::Batch, Dim::Fixed(1), Dim::Fixed(10)],
                ),
                vi("k", ElemType::I32, &[Dim::Fixed(1)]),
            ],
            vec![vi("sel", ElemType::I32, &[Dim::Fixed(3), Dim::Fixed(3)])],
        );
        let msg = messages(&m);
        assert!(
            msg.contains("node nms (NonMaxSuppression): input 2 (max_output_boxes_per_class, `k`) must be an initializer"),
            "{msg}"
        );
    }

    #[test]
    fn resize_modes_and_gather_indices() {
        let mut r = node("up", "Resize", &["x", "", "scales"], &["y"]);
        r.attribute = vec![
            attr_str("mode", "nearest"),
            attr_str("coordinate_transformation_mode", "tf_crop_and_resize"),
        ];
        let mut cast = node("c", "Cast", &["x"], &["xi"]);
        cast.attribute = vec![attr_int("to", I64 as i64)];
        let mut ga = node("g", "Gather", &["table", "xi"], &["e"]);
        ga.attribute = vec![attr_int("axis", 0)];
        let mut m = model(
            vec![r, cast, ga],
            vec![vi("x", ElemType::F32, &img())],
            vec![vi("y", ElemType::F32, &img())],
        );
        let g = m.graph.as_mut().unwrap();
        for (name, t, dims) in [("scales", F32, vec![4]), ("table", F32, vec![10, 3])] {
            g.initializer.push(TensorProto {
                name: name.into(),
                data_type: t,
                dims,
                ..Default::default()
            });
        }
        let msg = messages(&m);
        assert!(
            msg.contains("node up (Resize): coordinate_transformation_mode = \"tf_crop_and_resize\" is not supported"),
            "{msg}"
        );
        assert!(
            msg.contains("node c (Cast) output xi: is an int64 tensor computed from data"),
            "{msg}"
        );
        assert!(
            msg.contains("node g (Gather): indices `xi` are int64 data"),
            "{msg}"
        );
        // Defaults of an unset nearest_mode/exclude_outside are fine.
        assert!(
            !msg.contains("nearest_mode") && !msg.contains("exclude_outside"),
            "{msg}"
        );
    }

    #[test]
    fn shape_subgraph_int64_is_fine() {
        // Shape -> Slice(const) -> ConstantOfShape, Reshape by a constant: all int64 is shape-like.
        let mut m = model(
            vec![
                node("sh", "Shape", &["x"], &["s"]),
                node("sl", "Slice", &["s", "z", "o", "z"], &["b"]),
                node("cs", "ConstantOfShape", &["b"], &["ones"]),
                node("rs", "Reshape", &["x", "shape"], &["y"]),
            ],
            vec![vi("x", ElemType::F32, &img())],
            vec![vi("y", ElemType::F32, &[Dim::Batch, Dim::Fixed(16)])],
        );
        let g = m.graph.as_mut().unwrap();
        for (name, dims) in [("z", vec![1]), ("o", vec![1]), ("shape", vec![2])] {
            g.initializer.push(TensorProto {
                name: name.into(),
                data_type: I64,
                dims,
                ..Default::default()
            });
        }
        assert_eq!(lint(&m), vec![], "{}", messages(&m));
        // The same Slice with a non-constant `axes` is a violation.
        let g = m.graph.as_mut().unwrap();
        g.node[1].input[3] = "s".into();
        assert!(
            messages(&m).contains("node sl (Slice): input 3 (axes, `s`) must be an initializer")
        );
    }

    #[test]
    fn value_info_dynamic_dim_names_the_producer() {
        let mut m = sigmoid_model();
        let mut bad = vi("y", ElemType::F32, &img());
        if let Some(TypeValue::TensorType(t)) = bad.r#type.as_mut().unwrap().value.as_mut() {
            t.shape.as_mut().unwrap().dim[3].value = None;
        }
        m.graph.as_mut().unwrap().value_info.push(bad);
        let msg = messages(&m);
        assert!(
            msg.contains("node s (Sigmoid) output y: value_info dim 3 is dynamic (unnamed)"),
            "{msg}"
        );
    }

    #[test]
    fn conv_kernel_dims_and_instance_norm_constants() {
        let mut conv = node("c4d", "Conv", &["x", "w"], &["y"]);
        conv.attribute = vec![crate::builder::attr_ints("kernel_shape", &[3, 3, 3, 3])];
        let inorm = node("in", "InstanceNormalization", &["x", "x", "x"], &["z"]);
        let m = model(
            vec![conv, inorm],
            vec![vi("x", ElemType::F32, &img())],
            vec![vi("y", ElemType::F32, &img())],
        );
        let msg = messages(&m);
        assert!(
            msg.contains("node c4d (Conv): has 4 spatial kernel dims"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "node in (InstanceNormalization): input 1 (scale, `x`) must be an initializer"
            ),
            "{msg}"
        );
    }
}
