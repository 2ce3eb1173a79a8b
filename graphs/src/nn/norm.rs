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

/// PyTorch's `nn.LayerNorm` over the last axis (keys `weight`, `bias`; none when
/// `elementwise_affine=False`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64, affine: bool) -> candle_core::Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(param(&vb, dim, "weight", candle_nn::Init::Const(1.0))?),
                Some(param(&vb, dim, "bias", candle_nn::Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.layer_norm(x, self.eps, self.weight.as_ref(), self.bias.as_ref())
    }
}
