use super::{Conv2d, GroupNorm, Linear};
use crate::backend::Backend;
use candle_nn::VarBuilder;

/// Residual block: GN-SiLU-conv, plus the projected (noise + label) embedding, GN-SiLU-dropout-conv,
/// with a 1x1 conv on the skip path when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub skip: Option<Conv2d>,
    pub dropout: f64,
    pub cout: usize,
}

impl ResBlock {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        emb_dim: usize,
        groups: usize,
        dropout: f64,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            emb_proj: Linear::new(vb.pp("emb_proj"), emb_dim, cout)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            skip: if cin != cout {
                Some(Conv2d::new(vb.pp("skip"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            dropout,
            cout,
        })
    }

    /// `emb_silu` is SiLU(embedding), `[N, emb_dim]`, shared by all blocks.
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, emb_silu: &B::T) -> anyhow::Result<B::T> {
        let h = self
            .conv1
            .forward_shifted(b, &self.norm1.forward_silu(b, x)?, |b| {
                b.reshape(
                    &self.emb_proj.forward(b, emb_silu)?,
                    &[-1, self.cout as i64, 1, 1],
                )
            })?;
        let h = b.dropout(&self.norm2.forward_silu(b, &h)?, self.dropout)?;
        self.conv2.forward_residual(b, &h, |b| match &self.skip {
            Some(s) => s.forward(b, x),
            None => Ok(x.clone()),
        })
    }
}
