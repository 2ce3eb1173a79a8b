use super::{Conv2d, GroupNorm};
use crate::backend::Backend;
use candle_nn::VarBuilder;

/// Single-head spatial self-attention with a residual connection.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj: Conv2d,
    pub channels: usize,
}

impl SelfAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels)?,
            q: Conv2d::new(vb.pp("q"), channels, channels, 1, 1, 0)?,
            k: Conv2d::new(vb.pp("k"), channels, channels, 1, 1, 0)?,
            v: Conv2d::new(vb.pp("v"), channels, channels, 1, 1, 0)?,
            proj: Conv2d::new(vb.pp("proj"), channels, channels, 1, 1, 0)?,
            channels,
        })
    }

    /// `x`: `[N, C, H, W]`, with `h`, `w` the spatial size (static in every lowering).
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> anyhow::Result<B::T> {
        let c = self.channels as i64;
        let xn = self.norm.forward(b, x)?;
        let flat = |t: B::T| b.reshape(&t, &[0, c, -1]);
        let q = flat(self.q.forward(b, &xn)?)?; // [N, C, HW]
        let k = flat(self.k.forward(b, &xn)?)?;
        let v = flat(self.v.forward(b, &xn)?)?;
        let out = b.attention(&q, &k, &v, 1.0 / (self.channels as f64).sqrt())?; // [N, C, HW]
        let out = b.reshape(&out, &[0, c, h as i64, w as i64])?;
        self.proj.forward_residual(b, &out, |_| Ok(x.clone()))
    }
}
