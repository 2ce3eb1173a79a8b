use super::param;
use crate::backend::{Backend, Param};
use candle_nn::VarBuilder;

/// GroupNorm with per-channel scale and shift, optionally followed by SiLU.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub gamma: Param,
    pub beta: Param,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize) -> candle_core::Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm: {channels} channels are not divisible into {groups} groups"
            );
        }
        Ok(Self {
            gamma: param(&vb, channels, "weight", candle_nn::Init::Const(1.0))?,
            beta: param(&vb, channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
            eps: 1e-5,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.group_norm(x, self.groups, self.eps, &self.gamma, &self.beta)
    }

    /// GroupNorm then SiLU, the pair every block of the UNet uses.
    pub fn forward_silu<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.group_norm_silu(x, self.groups, self.eps, &self.gamma, &self.beta)
    }
}
