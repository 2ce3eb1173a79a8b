//! `full_batch` -> `Shape(like)` -> `Slice[0:1]` -> `ConstantOfShape(value)`: a `[batch]`
//! tensor (f32, or int32 for labels) whose length follows the runtime batch. The `[batch]` shape
//! tensor is computed once per `like` value.

use crate::builder::{attr_tensor, encode, Dim, ElemType, OnnxBackend, ValueInfo};
use crate::proto::TensorProto;
use anyhow::{ensure, Result};
use graphs::Kind;

fn batch_shape(b: &OnnxBackend, like: &str) -> Result<String> {
    if let Some(s) = b.g.borrow().batch_shape_cache.get(like) {
        return Ok(s.clone());
    }
    let li = b.info(like)?;
    let shape = b.node(
        "Shape",
        &[like],
        vec![],
        ValueInfo::new(ElemType::I64, vec![Dim::Fixed(li.rank())]),
    )?;
    let zero = b.const_i64(&[0], &[1])?;
    let one = b.const_i64(&[1], &[1])?;
    let s = b.node(
        "Slice",
        &[&shape, &zero, &one, &zero],
        vec![],
        ValueInfo::new(ElemType::I64, vec![Dim::Fixed(1)]),
    )?;
    b.g.borrow_mut()
        .batch_shape_cache
        .insert(like.to_string(), s.clone());
    Ok(s)
}

pub fn full_batch(b: &OnnxBackend, like: &str, value: f64, kind: Kind) -> Result<String> {
    let li = b.info(like)?;
    ensure!(li.rank() >= 1, "full_batch: {like} is a scalar");
    let shape = batch_shape(b, like)?;
    let (elem, raw) = match kind {
        Kind::F32 => (ElemType::F32, encode(&[value as f32], ElemType::F32)),
        Kind::Label => (ElemType::I32, (value as i32).to_le_bytes().to_vec()),
    };
    let t = TensorProto {
        dims: vec![1],
        data_type: elem.onnx(),
        raw_data: raw,
        ..Default::default()
    };
    b.node(
        "ConstantOfShape",
        &[&shape],
        vec![attr_tensor("value", t)],
        ValueInfo::new(elem, vec![li.dims[0]]),
    )
}
