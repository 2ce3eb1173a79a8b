//! The preconditioned denoiser D(x, sigma, label) -> x0 around the UNet (guidance: `guidance.rs`).

use crate::backend::{Backend, Kind};
use crate::schedule::Parameterisation;
use crate::unet::{UNet, UNetConfig};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// What a checkpoint's `config.json` holds about the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub unet: UNetConfig,
    pub parameterisation: Parameterisation,
}

/// Per-sample noise level: `sigma` `[N]` and the network's conditioning `c_noise` `[N]`.
#[derive(Clone, Debug)]
pub struct NoiseLevel<T> {
    pub sigma: T,
    pub c_noise: T,
}

#[derive(Clone, Debug)]
pub struct Denoiser {
    pub unet: UNet,
    pub param: Parameterisation,
}

impl Denoiser {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> anyhow::Result<Self> {
        Ok(Self {
            unet: UNet::new(vb, &cfg.unet)?,
            param: cfg.parameterisation.clone(),
        })
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            unet: self.unet.cfg.clone(),
            parameterisation: self.param.clone(),
        }
    }

    /// A batch-wide constant noise level, computed on the host.
    pub fn level_const<B: Backend>(
        &self,
        b: &B,
        like: &B::T,
        sigma: f64,
    ) -> anyhow::Result<NoiseLevel<B::T>> {
        Ok(NoiseLevel {
            sigma: b.full_batch(like, sigma, Kind::F32)?,
            c_noise: b.full_batch(like, self.param.c_noise(sigma), Kind::F32)?,
        })
    }

    /// Noise level from a per-sample sigma tensor, computed in the graph (EDM only: a VP model's
    /// timestep is a table lookup, so VP callers build [`NoiseLevel`] from timesteps).
    pub fn level_from_sigma<B: Backend>(
        &self,
        b: &B,
        sigma: &B::T,
    ) -> anyhow::Result<NoiseLevel<B::T>> {
        match &self.param {
            Parameterisation::Edm(_) => Ok(NoiseLevel {
                sigma: sigma.clone(),
                c_noise: b.affine(&b.log(sigma)?, 0.25, 0.0)?,
            }),
            Parameterisation::Vp(_) => anyhow::bail!(
                "a VP model is conditioned on timesteps; build the noise level from them"
            ),
        }
    }

    /// Noise level from integer VP timesteps `[N]` (a lookup in the schedule's sigma table).
    pub fn level_from_timesteps<B: Backend>(
        &self,
        b: &B,
        t: &B::T,
    ) -> anyhow::Result<NoiseLevel<B::T>> {
        match &self.param {
            Parameterisation::Vp(v) => {
                let table: Vec<f32> = v.sigmas().into_iter().map(|s| s as f32).collect();
                Ok(NoiseLevel {
                    sigma: b.gather_const(&table, t)?,
                    c_noise: b.to_f32(t)?,
                })
            }
            Parameterisation::Edm(_) => {
                anyhow::bail!("an EDM model is conditioned on sigma, not timesteps")
            }
        }
    }

    /// D(x, sigma, label): the denoised estimate of x0 from `x = x0 + sigma * eps`.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        let s2 = b.mul(&s, &s)?;
        match &self.param {
            Parameterisation::Edm(e) => {
                let sd = e.sigma_data;
                let denom = b.sqrt(&b.affine(&s2, 1.0, sd * sd)?)?; // sqrt(sigma^2 + sd^2)
                let one = b.constant(&[1.0], &[1])?;
                let c_in = b.div(&one, &denom)?;
                let c_skip = b.div(
                    &b.constant(&[(sd * sd) as f32], &[1])?,
                    &b.mul(&denom, &denom)?,
                )?;
                let c_out = b.div(&b.affine(&s, sd, 0.0)?, &denom)?;
                let f = self
                    .unet
                    .forward(b, &b.mul(x, &c_in)?, &level.c_noise, labels)?;
                b.add(&b.mul(x, &c_skip)?, &b.mul(&f, &c_out)?)
            }
            Parameterisation::Vp(_) => {
                let eps = self.eps(b, x, level, labels)?;
                b.sub(x, &b.mul(&eps, &s)?)
            }
        }
    }

    /// Epsilon prediction. VP: the network's own output at `x_t = x / sqrt(1 + sigma^2)`;
    /// EDM: derived from D as (x - D) / sigma.
    pub fn eps<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        match &self.param {
            Parameterisation::Vp(_) => {
                let c_in = b.div(
                    &b.constant(&[1.0], &[1])?,
                    &b.sqrt(&b.affine(&b.mul(&s, &s)?, 1.0, 1.0)?)?,
                )?;
                self.unet
                    .forward(b, &b.mul(x, &c_in)?, &level.c_noise, labels)
            }
            Parameterisation::Edm(_) => {
                let d = self.forward(b, x, level, labels)?;
                b.div(&b.sub(x, &d)?, &s)
            }
        }
    }

    /// The UNet's bottleneck features at the preconditioned input, `[N, C_mid, r, r]` (what DMD2's
    /// GAN head classifies).
    pub fn bottleneck<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        let s2 = b.mul(&s, &s)?;
        let add = match &self.param {
            Parameterisation::Edm(e) => e.sigma_data * e.sigma_data,
            Parameterisation::Vp(_) => 1.0,
        };
        let c_in = b.div(
            &b.constant(&[1.0], &[1])?,
            &b.sqrt(&b.affine(&s2, 1.0, add)?)?,
        )?;
        self.unet
            .bottleneck(b, &b.mul(x, &c_in)?, &level.c_noise, labels)
    }
}
