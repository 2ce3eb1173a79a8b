//! `silu` -> `Sigmoid` then `Mul` (no fused op needed by any runtime); `softmax_last` ->
//! `Softmax(axis=-1)` (opset 13+ semantics: normalises that single axis).

use super::f32_input;
use crate::builder::{attr_int, OnnxBackend};
use anyhow::Result;

pub fn silu(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "SiLU", x)?;
    let s = b.node("Sigmoid", &[x], vec![], xi.clone())?;
    b.node("Mul", &[x, &s], vec![], xi)
}

pub fn softmax_last(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "Softmax", x)?;
    b.node("Softmax", &[x], vec![attr_int("axis", -1)], xi)
}
