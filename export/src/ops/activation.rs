//! `silu` -> `Sigmoid` then `Mul` (no fused op needed by any runtime); `sigmoid` -> `Sigmoid`;
//! `gelu` -> `0.5 x (1 + Erf(x / sqrt 2))` (opset 17 has no Gelu: it arrived in opset 20);
//! `softmax_last` -> `Softmax(axis=-1)` (opset 13+ semantics: normalises that single axis).

use super::f32_input;
use crate::builder::{attr_int, OnnxBackend};
use anyhow::Result;

pub fn silu(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "SiLU", x)?;
    let s = b.node("Sigmoid", &[x], vec![], xi.clone())?;
    b.node("Mul", &[x, &s], vec![], xi)
}

pub fn sigmoid(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "Sigmoid", x)?;
    b.node("Sigmoid", &[x], vec![], xi)
}

pub fn gelu(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "Gelu", x)?;
    let inv_sqrt2 = b.const_f32(&[std::f32::consts::FRAC_1_SQRT_2], &[])?;
    let half = b.const_f32(&[0.5], &[])?;
    let one = b.const_f32(&[1.0], &[])?;
    let scaled = b.node("Mul", &[x, &inv_sqrt2], vec![], xi.clone())?;
    let erf = b.node("Erf", &[&scaled], vec![], xi.clone())?;
    let shifted = b.node("Add", &[&erf, &one], vec![], xi.clone())?;
    let hx = b.node("Mul", &[x, &half], vec![], xi.clone())?;
    b.node("Mul", &[&hx, &shifted], vec![], xi)
}

pub fn softmax_last(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "Softmax", x)?;
    b.node("Softmax", &[x], vec![attr_int("axis", -1)], xi)
}
