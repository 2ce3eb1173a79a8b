//! Training losses (candle only: they run with autograd and never get exported).

use crate::candle_backend::CandleBackend;
use crate::denoiser::Denoiser;
use crate::schedule::Parameterisation;
use anyhow::Result;
use candle_core::{Tensor, D};

/// Mean over all but the batch axis: `[N, ...]` -> `[N]`.
pub fn mean_per_sample(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(D::Minus1)?)
}

/// The teacher's denoising loss on clean images `x0` with per-sample `sigma` `[N]` (EDM) or
/// integer timesteps `t` `[N]` (VP) and unit noise `noise`.
///
/// EDM: `lambda(sigma) * |D(x0 + sigma n, sigma) - x0|^2`, `lambda = (sigma^2 + sd^2) / (sigma sd)^2`.
/// VP: `|eps(x_t, t) - n|^2` (the DDPM "simple" loss). Returns the batch mean (a scalar).
pub fn teacher_loss(
    b: &CandleBackend,
    den: &Denoiser,
    x0: &Tensor,
    labels: &Tensor,
    noise_cond: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    match &den.param {
        Parameterisation::Edm(e) => {
            let sigma = noise_cond;
            let level = den.level_from_sigma(b, sigma)?;
            let s = sigma.reshape((sigma.dim(0)?, 1, 1, 1))?;
            let x = (x0 + noise.broadcast_mul(&s)?)?;
            let d = den.forward(b, &x, &level, labels)?;
            let sd2 = e.sigma_data * e.sigma_data;
            let s2 = sigma.sqr()?;
            let weight = ((&s2 + sd2)? / (s2 * sd2)?)?;
            let per = mean_per_sample(&(d - x0)?.sqr()?)?;
            Ok((per * weight)?.mean_all()?)
        }
        Parameterisation::Vp(_) => {
            let level = den.level_from_timesteps(b, noise_cond)?;
            let n = x0.dim(0)?;
            let x = (x0 + noise.broadcast_mul(&level.sigma.reshape((n, 1, 1, 1))?)?)?;
            let eps = den.eps(b, &x, &level, labels)?;
            Ok((eps - noise)?.sqr()?.mean_all()?)
        }
    }
}
