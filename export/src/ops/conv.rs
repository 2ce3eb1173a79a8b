//! `conv2d` -> ONNX `Conv` (weight `[out, in, k, k]`, optional bias `[out]`).

use super::f32_input;
use crate::builder::{attr_int, attr_ints, Dim, ElemType, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};
use graphs::Param;

pub fn conv2d(
    b: &OnnxBackend,
    x: &str,
    w: &Param,
    bias: Option<&Param>,
    stride: usize,
    pad: usize,
) -> Result<String> {
    let xi = f32_input(b, "Conv", x)?;
    ensure!(
        xi.rank() == 4,
        "Conv {}: input {x} has rank {}",
        w.name,
        xi.rank()
    );
    let wd = w.dims();
    ensure!(
        wd.len() == 4,
        "Conv {}: weight must be 4-D, got {wd:?}",
        w.name
    );
    let (cout, kh, kw) = (wd[0], wd[2], wd[3]);
    let elem = b.weight_elem();
    let wn = b.param_init(
        w,
        &w.name,
        &wd.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        elem,
        false,
    )?;
    let mut inputs = vec![b.cast(x, elem)?, wn];
    if let Some(p) = bias {
        ensure!(
            p.dims() == [cout],
            "Conv {}: bias {} has shape {:?}",
            w.name,
            p.name,
            p.dims()
        );
        inputs.push(b.param_init(p, &p.name, &[cout as i64], elem, false)?);
    }
    let out = |d: Dim, k: usize| match d {
        Dim::Fixed(n) => Dim::Fixed((n + 2 * pad - k) / stride + 1),
        _ => Dim::Unknown,
    };
    let dims = vec![
        xi.dims[0],
        Dim::Fixed(cout),
        out(xi.dims[2], kh),
        out(xi.dims[3], kw),
    ];
    let (s, p) = (stride as i64, pad as i64);
    let attrs = vec![
        attr_ints("kernel_shape", &[kh as i64, kw as i64]),
        attr_ints("strides", &[s, s]),
        attr_ints("pads", &[p, p, p, p]),
        attr_ints("dilations", &[1, 1]),
        attr_int("group", 1),
    ];
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let y = b.node("Conv", &refs, attrs, ValueInfo::new(elem, dims))?;
    b.cast(&y, ElemType::F32)
}
