use super::{param, uniform_fan_in};
use crate::backend::{Backend, Param};
use candle_nn::VarBuilder;

/// Fully connected layer on the last axis.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Param,
}

impl Linear {
    pub fn new(vb: VarBuilder, din: usize, dout: usize) -> candle_core::Result<Self> {
        let init = uniform_fan_in(din);
        Ok(Self {
            weight: param(&vb, (dout, din), "weight", init)?,
            bias: param(&vb, dout, "bias", init)?,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.linear(x, &self.weight, Some(&self.bias))
    }
}
