//! The preconditioned denoiser D(x, sigma, label) -> x0 around the UNet (guidance: `guidance.rs`).

use crate::backend::{Backend, Kind};
use crate::cond::NetCond;
use crate::network::{Network, NetworkConfig};
use crate::schedule::Parameterisation;
use crate::schedulers::Prediction;
use crate::unet::UNetConfig;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// What a checkpoint's `config.json` holds about the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `"unet": {...}` (ours) or `"diffusers_unet2d": {...}` (diffusers' config.json).
    #[serde(flatten)]
    pub network: NetworkConfig,
    pub parameterisation: Parameterisation,
}

impl ModelConfig {
    /// Our UNet of `cfg`.
    pub fn ours(unet: UNetConfig, parameterisation: Parameterisation) -> Self {
        Self {
            network: NetworkConfig::Unet(unet),
            parameterisation,
        }
    }
    /// Our UNet's config; `None` for a diffusers network.
    pub fn unet_config(&self) -> Option<&UNetConfig> {
        match &self.network {
            NetworkConfig::Unet(u) => Some(u),
            NetworkConfig::DiffusersUnet2d(_) | NetworkConfig::DiffusersUnet2dCondition(_) => None,
        }
    }
    pub fn channels(&self) -> usize {
        self.network.channels()
    }
    pub fn resolution(&self) -> usize {
        self.network.resolution()
    }
    pub fn num_classes(&self) -> usize {
        self.network.num_classes()
    }
}

/// Per-sample noise level: `sigma` `[N]` and the network's conditioning `c_noise` `[N]`.
#[derive(Clone, Debug)]
pub struct NoiseLevel<T> {
    pub sigma: T,
    pub c_noise: T,
}

#[derive(Clone, Debug)]
pub struct Denoiser {
    pub net: Network,
    pub param: Parameterisation,
}

impl Denoiser {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> anyhow::Result<Self> {
        Ok(Self {
            net: Network::new(vb, &cfg.network)?,
            param: cfg.parameterisation.clone(),
        })
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            network: self.net.config(),
            parameterisation: self.param.clone(),
        }
    }

    /// Classes the labels range over (see [`NetworkConfig::num_classes`]).
    pub fn num_classes(&self) -> usize {
        self.net.config().num_classes()
    }
    /// The null class of classifier-free guidance; `None` when the network has none.
    pub fn null_class(&self) -> Option<usize> {
        self.net.config().null_class()
    }
    /// `(channels, side)` of the images.
    pub fn image_shape(&self) -> (usize, usize) {
        let c = self.net.config();
        (c.channels(), c.resolution())
    }

    /// `c_in` as a per-sample tensor `[N, 1, 1, 1]` from `s` `[N, 1, 1, 1]`: what scales `x` into
    /// the network's input.
    fn c_in<B: Backend>(&self, b: &B, s: &B::T) -> anyhow::Result<B::T> {
        let one = b.constant(&[1.0], &[1])?;
        match &self.param {
            Parameterisation::Edm(e) => {
                let sd2 = e.sigma_data * e.sigma_data;
                b.div(&one, &b.sqrt(&b.affine(&b.mul(s, s)?, 1.0, sd2)?)?)
            }
            Parameterisation::Vp(_) => b.div(&one, &b.sqrt(&b.affine(&b.mul(s, s)?, 1.0, 1.0)?)?),
            Parameterisation::Flow(_) => b.div(&one, &b.affine(s, 1.0, 1.0)?),
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
            // c_noise = s T, s = sigma / (1 + sigma)
            Parameterisation::Flow(f) => Ok(NoiseLevel {
                sigma: sigma.clone(),
                c_noise: b.affine(
                    &b.div(sigma, &b.affine(sigma, 1.0, 1.0)?)?,
                    f.num_timesteps as f64,
                    0.0,
                )?,
            }),
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
            Parameterisation::Edm(_) | Parameterisation::Flow(_) => {
                anyhow::bail!(
                    "an {} model is conditioned on sigma, not timesteps",
                    self.param.name()
                )
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
        self.forward_with(b, x, level, NetCond::Labels(labels))
    }

    /// [`Self::forward`] under either condition (labels or prompt embeddings).
    pub fn forward_with<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: NetCond<'_, B::T>,
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
                    .net
                    .forward_with(b, &b.mul(x, &c_in)?, &level.c_noise, labels)?;
                b.add(&b.mul(x, &c_skip)?, &b.mul(&f, &c_out)?)
            }
            Parameterisation::Vp(v) => match v.prediction {
                Prediction::Epsilon => {
                    let eps = self.eps_with(b, x, level, labels)?;
                    b.sub(x, &b.mul(&eps, &s)?)
                }
                Prediction::Sample => self.raw_with(b, x, level, labels),
                // x0 = alpha x_t - sigma_t v with alpha = c_in, sigma_t = sigma c_in, x_t = c_in x.
                Prediction::VPrediction => {
                    let c_in = self.c_in(b, &s)?;
                    let out = self.raw_with(b, x, level, labels)?;
                    b.sub(
                        &b.mul(x, &b.mul(&c_in, &c_in)?)?,
                        &b.mul(&out, &b.mul(&s, &c_in)?)?,
                    )
                }
            },
            // x0 = x_t - s v, x_t = x / (1 + sigma), s = sigma / (1 + sigma).
            Parameterisation::Flow(_) => {
                let inv = self.c_in(b, &s)?;
                let out = self.raw_with(b, x, level, labels)?;
                b.sub(&b.mul(x, &inv)?, &b.mul(&out, &b.mul(&s, &inv)?)?)
            }
        }
    }

    /// The network's own output (eps, v, x0, velocity or EDM's `F`) at `x` scaled by `c_in`.
    pub fn raw<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        self.raw_with(b, x, level, NetCond::Labels(labels))
    }

    /// [`Self::raw`] under either condition.
    pub fn raw_with<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: NetCond<'_, B::T>,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        self.net
            .forward_with(b, &b.mul(x, &self.c_in(b, &s)?)?, &level.c_noise, labels)
    }

    /// Epsilon prediction. eps-VP: the network's own output at `x_t = x / sqrt(1 + sigma^2)`;
    /// otherwise derived from D as (x - D) / sigma.
    pub fn eps<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        self.eps_with(b, x, level, NetCond::Labels(labels))
    }

    /// [`Self::eps`] under either condition.
    pub fn eps_with<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        labels: NetCond<'_, B::T>,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        match &self.param {
            Parameterisation::Vp(v) if v.prediction == Prediction::Epsilon => {
                let c_in = b.div(
                    &b.constant(&[1.0], &[1])?,
                    &b.sqrt(&b.affine(&b.mul(&s, &s)?, 1.0, 1.0)?)?,
                )?;
                self.net
                    .forward_with(b, &b.mul(x, &c_in)?, &level.c_noise, labels)
            }
            _ => {
                let d = self.forward_with(b, x, level, labels)?;
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
        self.bottleneck_with(b, x, level, NetCond::Labels(labels))
    }

    /// [`Self::bottleneck`] under either condition (labels or prompt embeddings).
    pub fn bottleneck_with<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &NoiseLevel<B::T>,
        cond: NetCond<'_, B::T>,
    ) -> anyhow::Result<B::T> {
        let s = b.reshape(&level.sigma, &[-1, 1, 1, 1])?;
        let c_in = self.c_in(b, &s)?;
        self.net
            .bottleneck_with(b, &b.mul(x, &c_in)?, &level.c_noise, cond)
    }
}
