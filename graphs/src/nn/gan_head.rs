use super::{Conv2d, GroupNorm};
use crate::backend::Backend;
use candle_nn::VarBuilder;

/// DMD2's GAN classifier on the fake score's bottleneck features: strided 4x4 convs + GroupNorm +
/// SiLU halve the side down to 4, a conv with kernel = side reduces to 1x1, GroupNorm + SiLU, and a
/// 1x1 conv gives one realism logit per image. (DMD2's ImageNet head is exactly this for 8x8.)
#[derive(Clone, Debug)]
pub struct GanHead {
    pub blocks: Vec<(Conv2d, GroupNorm)>,
    pub out: Conv2d,
}

impl GanHead {
    /// `channels` x `side` x `side` input features; `groups` for the GroupNorms.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        side: usize,
        groups: usize,
    ) -> candle_core::Result<Self> {
        if side == 0 {
            candle_core::bail!("GAN head: bottleneck side must be positive");
        }
        let mut blocks = Vec::new();
        let mut r = side;
        while r > 4 {
            if !r.is_multiple_of(2) {
                candle_core::bail!("GAN head: bottleneck side {side} does not halve down to 4");
            }
            let vbi = vb.pp(blocks.len().to_string());
            blocks.push((
                Conv2d::new(vbi.pp("conv"), channels, channels, 4, 2, 1)?,
                GroupNorm::new(vbi.pp("norm"), groups, channels)?,
            ));
            r /= 2;
        }
        let vbi = vb.pp(blocks.len().to_string());
        blocks.push((
            Conv2d::new(vbi.pp("conv"), channels, channels, r, r, 0)?,
            GroupNorm::new(vbi.pp("norm"), groups, channels)?,
        ));
        Ok(Self {
            blocks,
            out: Conv2d::new(vb.pp("out"), channels, 1, 1, 1, 0)?,
        })
    }

    /// Features `[N, C, side, side]` -> logits `[N]`.
    pub fn forward<B: Backend>(&self, b: &B, feats: &B::T) -> anyhow::Result<B::T> {
        let mut h = feats.clone();
        for (conv, norm) in &self.blocks {
            h = norm.forward_silu(b, &conv.forward(b, &h)?)?;
        }
        b.reshape(&self.out.forward(b, &h)?, &[-1])
    }
}
