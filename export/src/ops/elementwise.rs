//! Element-wise ops: binary `Add`/`Sub`/`Mul`/`Div` (numpy broadcasting), unary
//! `Exp`/`Log`/`Sqrt`/`Sin`/`Cos`, `affine` as `Mul`/`Add` by f32 scalar constants (candle's
//! affine also computes in f32), and `clamp` as `Clip` with constant min/max inputs.

use super::f32_input;
use crate::builder::{broadcast, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};

pub fn binary(b: &OnnxBackend, op: &str, a: &str, c: &str) -> Result<String> {
    let ai = b.info(a)?;
    let ci = b.info(c)?;
    ensure!(
        ai.elem == ci.elem,
        "{op}: {a} is {:?} but {c} is {:?}",
        ai.elem,
        ci.elem
    );
    let dims = broadcast(&ai.dims, &ci.dims)?;
    b.node(op, &[a, c], vec![], ValueInfo::new(ai.elem, dims))
}

pub fn unary(b: &OnnxBackend, op: &str, x: &str) -> Result<String> {
    let xi = f32_input(b, op, x)?;
    b.node(op, &[x], vec![], xi)
}

pub fn affine(b: &OnnxBackend, x: &str, mul: f64, add: f64) -> Result<String> {
    f32_input(b, "affine", x)?;
    let mut y = x.to_string();
    if mul != 1.0 {
        let m = b.const_f32(&[mul as f32], &[])?;
        y = binary(b, "Mul", &y, &m)?;
    }
    if add != 0.0 {
        let a = b.const_f32(&[add as f32], &[])?;
        y = binary(b, "Add", &y, &a)?;
    }
    Ok(y)
}

pub fn clip(b: &OnnxBackend, x: &str, lo: f64, hi: f64) -> Result<String> {
    let xi = f32_input(b, "Clip", x)?;
    let lo = b.const_f32(&[lo as f32], &[])?;
    let hi = b.const_f32(&[hi as f32], &[])?;
    b.node("Clip", &[x, &lo, &hi], vec![], xi)
}
