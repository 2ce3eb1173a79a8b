//! `linear` (`x @ w^T + b` on the last axis) -> `Gemm(transB=1)` for 2-D inputs (the weight
//! initializer keeps PyTorch's `[out, in]` layout), else `MatMul` with a transposed weight
//! initializer (`<key>.transposed`) followed by `Add`. In fp16 the 2-D Gemm has no C input (bias
//! added by a separate `Add`), see below.

use super::f32_input;
use crate::builder::{attr_int, broadcast, Dim, ElemType, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};
use graphs::Param;

pub fn linear(b: &OnnxBackend, x: &str, w: &Param, bias: Option<&Param>) -> Result<String> {
    let xi = f32_input(b, "linear", x)?;
    let wd = w.dims();
    ensure!(
        wd.len() == 2,
        "linear {}: weight must be 2-D, got {wd:?}",
        w.name
    );
    let (dout, din) = (wd[0], wd[1]);
    ensure!(xi.rank() >= 1, "linear {}: scalar input", w.name);
    let last = *xi.dims.last().unwrap();
    ensure!(
        last == Dim::Fixed(din) || last == Dim::Unknown,
        "linear {}: input {x} {:?} does not end in {din}",
        w.name,
        xi.dims
    );
    let elem = b.weight_elem();
    let xin = b.cast(x, elem)?;
    let mut dims = xi.dims.clone();
    *dims.last_mut().unwrap() = Dim::Fixed(dout);
    let bias_init = match bias {
        Some(p) => {
            ensure!(
                p.dims() == [dout],
                "linear {}: bias {} has shape {:?}",
                w.name,
                p.name,
                p.dims()
            );
            Some(b.param_init(p, &p.name, &[dout as i64], elem, false)?)
        }
        None => None,
    };
    let y = if xi.rank() == 2 && elem == ElemType::F32 {
        let wn = b.param_init(w, &w.name, &[dout as i64, din as i64], elem, false)?;
        let mut inputs = vec![xin.as_str(), wn.as_str()];
        if let Some(bn) = &bias_init {
            inputs.push(bn);
        }
        b.node(
            "Gemm",
            &inputs,
            vec![attr_int("transB", 1)],
            ValueInfo::new(elem, dims),
        )?
    } else if xi.rank() == 2 {
        // f16: Gemm without C, then Add. tract 0.23.9 fails on an f16 Gemm with a C input (it
        // scales C by an f32 beta constant: "tensor is F16, accessed as F32").
        let wn = b.param_init(w, &w.name, &[dout as i64, din as i64], elem, false)?;
        let y = b.node(
            "Gemm",
            &[&xin, &wn],
            vec![attr_int("transB", 1)],
            ValueInfo::new(elem, dims.clone()),
        )?;
        match &bias_init {
            Some(bn) => b.node("Add", &[&y, bn], vec![], ValueInfo::new(elem, dims))?,
            None => y,
        }
    } else {
        let wn = b.param_init(
            w,
            &format!("{}.transposed", w.name),
            &[din as i64, dout as i64],
            elem,
            true,
        )?;
        let y = b.node(
            "MatMul",
            &[&xin, &wn],
            vec![],
            ValueInfo::new(elem, dims.clone()),
        )?;
        match &bias_init {
            Some(bn) => b.node(
                "Add",
                &[&y, bn],
                vec![],
                ValueInfo::new(elem, broadcast(&dims, &[Dim::Fixed(dout)])?),
            )?,
            None => y,
        }
    };
    b.cast(&y, ElemType::F32)
}
