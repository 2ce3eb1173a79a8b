//! `layer_norm` -> `LayerNormalization(axis=-1)` (opset 17), scale 1 / bias 0 initialisers where
//! the module has no affine. f32 in every precision.
//!
//! `group_norm` -> `Reshape([0, G, -1])` -> `InstanceNormalization` (scale 1, bias 0, size G)
//! -> `Reshape(Shape(x))` -> `Mul(gamma [C,1,1])` -> `Add(beta [C,1,1])`.
//!
//! Opset 17 has no GroupNormalization (opset 18's is deprecated and rejected by onnx 1.23's
//! checker), and InstanceNormalization over `[N, G, C/G*H*W]` is exactly a GroupNorm without
//! affine: mean and biased variance per (sample, group), `(x - mean) / sqrt(var + eps)`. Stays
//! f32 in every precision.

use super::f32_input;
use crate::builder::{attr_float, Dim, ElemType, OnnxBackend, ValueInfo};
use crate::ops::{elementwise::binary, shape::reshape};
use anyhow::{ensure, Result};
use graphs::Param;

pub fn group_norm(
    b: &OnnxBackend,
    x: &str,
    groups: usize,
    eps: f64,
    gamma: &Param,
    beta: &Param,
) -> Result<String> {
    let xi = f32_input(b, "GroupNorm", x)?;
    ensure!(
        xi.rank() == 4,
        "GroupNorm {}: input {x} has rank {}",
        gamma.name,
        xi.rank()
    );
    let c = gamma.dims().first().copied().unwrap_or(0);
    ensure!(
        xi.dims[1] == Dim::Fixed(c),
        "GroupNorm {}: input {x} {:?} does not have {c} channels",
        gamma.name,
        xi.dims
    );
    ensure!(
        c % groups == 0,
        "GroupNorm {}: {c} channels in {groups} groups",
        gamma.name
    );
    let grouped = reshape(b, x, &[0, groups as i64, -1])?;
    let scale = b.const_f32(&vec![1.0; groups], &[groups])?;
    let shift = b.const_f32(&vec![0.0; groups], &[groups])?;
    let gi = b.info(&grouped)?;
    let normed = b.node(
        "InstanceNormalization",
        &[&grouped, &scale, &shift],
        vec![attr_float("epsilon", eps as f32)],
        gi,
    )?;
    let shape = b.node(
        "Shape",
        &[x],
        vec![],
        ValueInfo::new(ElemType::I64, vec![Dim::Fixed(4)]),
    )?;
    let back = b.node("Reshape", &[&normed, &shape], vec![], xi.clone())?;
    let g = b.param_init(gamma, &gamma.name, &[c as i64, 1, 1], ElemType::F32, false)?;
    let bt = b.param_init(beta, &beta.name, &[c as i64, 1, 1], ElemType::F32, false)?;
    let y = binary(b, "Mul", &back, &g)?;
    binary(b, "Add", &y, &bt)
}

pub fn layer_norm(
    b: &OnnxBackend,
    x: &str,
    eps: f64,
    gamma: Option<&Param>,
    beta: Option<&Param>,
) -> Result<String> {
    let xi = f32_input(b, "LayerNorm", x)?;
    let d = match xi.dims.last() {
        Some(Dim::Fixed(d)) => *d,
        other => anyhow::bail!("LayerNorm: last axis of {x} is {other:?}, expected a fixed size"),
    };
    let affine = |p: Option<&Param>, fill: f32| -> Result<String> {
        match p {
            Some(p) => {
                ensure!(
                    p.dims() == [d],
                    "LayerNorm {}: affine {:?} for last axis {d} of {x}",
                    p.name,
                    p.dims()
                );
                b.param_init(p, &p.name, &[d as i64], ElemType::F32, false)
            }
            None => b.const_f32(&vec![fill; d], &[d]),
        }
    };
    let g = affine(gamma, 1.0)?;
    let bt = affine(beta, 0.0)?;
    b.node(
        "LayerNormalization",
        &[x, &g, &bt],
        vec![
            crate::builder::attr_int("axis", -1),
            attr_float("epsilon", eps as f32),
        ],
        xi,
    )
}
