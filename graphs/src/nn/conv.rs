use super::{param, uniform_fan_in};
use crate::backend::{Backend, Param};
use candle_nn::VarBuilder;

/// Square-kernel 2-D convolution with bias.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Param,
    pub bias: Param,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        let init = uniform_fan_in(cin * k * k);
        let weight = param(&vb, (cout, cin, k, k), "weight", init)?;
        let bias = param(&vb, cout, "bias", init)?;
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.conv2d(x, &self.weight, Some(&self.bias), self.stride, self.pad)
    }

    /// `forward(x) + shift(b)`, `shift` broadcast from `[N, Cout, 1, 1]` (see
    /// [`Backend::conv2d_shifted`]).
    pub fn forward_shifted<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        shift: impl FnOnce(&B) -> anyhow::Result<B::T>,
    ) -> anyhow::Result<B::T> {
        b.conv2d_shifted(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.pad,
            shift,
        )
    }

    /// `residual(b) + forward(x)` (see [`Backend::conv2d_residual`]).
    pub fn forward_residual<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        residual: impl FnOnce(&B) -> anyhow::Result<B::T>,
    ) -> anyhow::Result<B::T> {
        b.conv2d_residual(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.pad,
            residual,
        )
    }
}
