use super::param;
use crate::backend::{Backend, Param};
use candle_nn::VarBuilder;

/// Learned lookup table (the class-label embedding; its last row is the "null" class).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub table: Param,
}

impl Embedding {
    pub fn new(vb: VarBuilder, rows: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            table: param(
                &vb,
                (rows, dim),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, ids: &B::T) -> anyhow::Result<B::T> {
        b.embedding(ids, &self.table)
    }
}

/// Transformer-style sinusoidal embedding of a per-sample scalar (the noise level):
/// `[cos(x * f_i), sin(x * f_i)]` with `f_i = 10000^(-i / half)`.
#[derive(Clone, Debug)]
pub struct SinusoidalEmbedding {
    pub dim: usize,
    /// Multiplies the input first (EDM's c_noise is small, DDPM timesteps are large).
    pub scale: f64,
}

impl SinusoidalEmbedding {
    pub fn new(dim: usize, scale: f64) -> Self {
        Self { dim, scale }
    }

    pub fn freqs(&self) -> Vec<f32> {
        let half = self.dim / 2;
        (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
            .collect()
    }

    /// `x`: `[N]` -> `[N, dim]`.
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        let freqs = self.freqs();
        let x = b.reshape(&b.affine(x, self.scale, 0.0)?, &[-1, 1])?;
        let f = b.constant(&freqs, &[1, freqs.len()])?;
        let arg = b.mul(&x, &f)?;
        b.concat(&[&b.cos(&arg)?, &b.sin(&arg)?], 1)
    }
}
