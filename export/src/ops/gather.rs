//! `embedding` -> `Gather(table, ids, axis=0)` with the table as an f32 initializer;
//! `gather_const` -> `Gather` of a constant f32 table (ids cast to int32 unless already integer:
//! TensorRT wants int32 indices).
//! Label ids are int32 graph inputs (Gather takes int32 or int64 indices).

use crate::builder::{attr_int, ElemType, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};
use graphs::Param;

pub fn embedding(b: &OnnxBackend, ids: &str, table: &Param) -> Result<String> {
    let ii = b.info(ids)?;
    ensure!(
        ii.elem.is_int(),
        "embedding {}: ids {ids} are {:?}, expected int32/int64",
        table.name,
        ii.elem
    );
    let td = table.dims();
    ensure!(
        td.len() == 2,
        "embedding {}: table must be 2-D, got {td:?}",
        table.name
    );
    let t = b.param_init(
        table,
        &table.name,
        &[td[0] as i64, td[1] as i64],
        ElemType::F32,
        false,
    )?;
    let mut dims = ii.dims.clone();
    dims.push(crate::Dim::Fixed(td[1]));
    b.node(
        "Gather",
        &[&t, ids],
        vec![attr_int("axis", 0)],
        ValueInfo::new(ElemType::F32, dims),
    )
}

pub fn gather_const(b: &OnnxBackend, table: &[f32], ids: &str) -> Result<String> {
    let ii = b.info(ids)?;
    let ids = if ii.elem.is_int() {
        ids.to_string()
    } else {
        b.cast(ids, ElemType::I32)?
    };
    let t = b.const_f32(table, &[table.len()])?;
    b.node(
        "Gather",
        &[&t, &ids],
        vec![attr_int("axis", 0)],
        ValueInfo::new(ElemType::F32, ii.dims),
    )
}
