//! [`OnnxBackend`]: the ONNX lowering of [`graphs::Backend`]. Each method hands over to the op's
//! emission in `src/ops/<op>.rs`; the graph they append to is in `builder.rs`.

use crate::builder::{ElemType, OnnxBackend};
use crate::ops;
use anyhow::{bail, Result};
use graphs::{Backend, Kind, Param};

impl Backend for OnnxBackend {
    type T = String;

    fn conv2d(
        &self,
        x: &String,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
    ) -> Result<String> {
        ops::conv::conv2d(self, x, w, b, stride, pad)
    }
    fn linear(&self, x: &String, w: &Param, b: Option<&Param>) -> Result<String> {
        ops::linear::linear(self, x, w, b)
    }
    fn group_norm(
        &self,
        x: &String,
        groups: usize,
        eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> Result<String> {
        ops::norm::group_norm(self, x, groups, eps, gamma, beta)
    }
    fn layer_norm(
        &self,
        x: &String,
        eps: f64,
        gamma: Option<&Param>,
        beta: Option<&Param>,
    ) -> Result<String> {
        ops::norm::layer_norm(self, x, eps, gamma, beta)
    }
    fn silu(&self, x: &String) -> Result<String> {
        ops::activation::silu(self, x)
    }
    fn sigmoid(&self, x: &String) -> Result<String> {
        ops::activation::sigmoid(self, x)
    }
    fn gelu(&self, x: &String) -> Result<String> {
        ops::activation::gelu(self, x)
    }
    fn add(&self, a: &String, b: &String) -> Result<String> {
        ops::elementwise::binary(self, "Add", a, b)
    }
    fn sub(&self, a: &String, b: &String) -> Result<String> {
        ops::elementwise::binary(self, "Sub", a, b)
    }
    fn mul(&self, a: &String, b: &String) -> Result<String> {
        ops::elementwise::binary(self, "Mul", a, b)
    }
    fn div(&self, a: &String, b: &String) -> Result<String> {
        ops::elementwise::binary(self, "Div", a, b)
    }
    fn affine(&self, x: &String, mul: f64, add: f64) -> Result<String> {
        ops::elementwise::affine(self, x, mul, add)
    }
    fn exp(&self, x: &String) -> Result<String> {
        ops::elementwise::unary(self, "Exp", x)
    }
    fn log(&self, x: &String) -> Result<String> {
        ops::elementwise::unary(self, "Log", x)
    }
    fn sqrt(&self, x: &String) -> Result<String> {
        ops::elementwise::unary(self, "Sqrt", x)
    }
    fn sin(&self, x: &String) -> Result<String> {
        ops::elementwise::unary(self, "Sin", x)
    }
    fn cos(&self, x: &String) -> Result<String> {
        ops::elementwise::unary(self, "Cos", x)
    }
    fn clamp(&self, x: &String, lo: f64, hi: f64) -> Result<String> {
        ops::elementwise::clip(self, x, lo, hi)
    }
    fn matmul(&self, a: &String, b: &String) -> Result<String> {
        ops::matmul::matmul(self, a, b)
    }
    fn softmax_last(&self, x: &String) -> Result<String> {
        ops::activation::softmax_last(self, x)
    }
    fn reshape(&self, x: &String, shape: &[i64]) -> Result<String> {
        ops::shape::reshape(self, x, shape)
    }
    fn permute(&self, x: &String, perm: &[usize]) -> Result<String> {
        ops::shape::transpose(self, x, perm)
    }
    fn narrow(&self, x: &String, axis: usize, start: usize, len: usize) -> Result<String> {
        ops::shape::narrow(self, x, axis, start, len)
    }
    fn upsample_nearest2x(&self, x: &String) -> Result<String> {
        ops::resize::upsample_nearest2x(self, x)
    }
    fn concat(&self, xs: &[&String], axis: usize) -> Result<String> {
        ops::shape::concat(self, xs, axis)
    }
    fn embedding(&self, ids: &String, table: &Param) -> Result<String> {
        ops::gather::embedding(self, ids, table)
    }
    fn param_value(&self, p: &Param) -> Result<String> {
        ops::param::param_value(self, p)
    }
    fn gather_const(&self, table: &[f32], ids: &String) -> Result<String> {
        ops::gather::gather_const(self, table, ids)
    }
    fn to_f32(&self, ids: &String) -> Result<String> {
        self.cast(ids, ElemType::F32)
    }
    fn constant(&self, values: &[f32], shape: &[usize]) -> Result<String> {
        if values.len() != shape.iter().product::<usize>() {
            bail!("constant: {} values for shape {shape:?}", values.len());
        }
        self.const_f32(values, shape)
    }
    fn full_batch(&self, like: &String, value: f64, kind: Kind) -> Result<String> {
        ops::constant::full_batch(self, like, value, kind)
    }
    fn dropout(&self, x: &String, _p: f64) -> Result<String> {
        // Exported graphs are for inference: dropout is the identity (no node).
        Ok(x.clone())
    }
}
