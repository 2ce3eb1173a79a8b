//! Training losses (candle only: they run with autograd and never get exported).
//!
//! * this file: the teacher's denoising loss (EDM or VP), also the fake score's loss in DMD2;
//! * [`dmd2`]: the distribution-matching loss;
//! * [`gan`]: DMD2's GAN losses on the fake score's bottleneck;
//! * [`tdm`]: trajectory distribution matching (trajectory points, importance weights, the
//!   fake-score and student losses).

pub mod dmd2;
pub mod gan;
pub mod tdm;

use crate::candle_backend::CandleBackend;
use crate::cond::NetCond;
use crate::denoiser::Denoiser;
use crate::schedule::Parameterisation;
use crate::schedulers::Prediction;
use anyhow::Result;
use candle_core::{Tensor, D};

/// Mean over all but the batch axis: `[N, ...]` -> `[N]`.
pub fn mean_per_sample(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(D::Minus1)?)
}

/// The teacher's denoising loss on clean images `x0` with per-sample `sigma` `[N]` (EDM),
/// integer timesteps `t` `[N]` (VP) or flow times `s` `[N]` in (0, 1) (flow), and unit noise
/// `noise`.
///
/// EDM: `lambda(sigma) * |D(x0 + sigma n, sigma) - x0|^2`, `lambda = (sigma^2 + sd^2) / (sigma sd)^2`.
/// VP: `|out(x_t, t) - target|^2` with the target of the prediction (eps: `n`, the DDPM "simple"
/// loss; v: `alpha n - sigma_t x0`; sample: `x0`). Flow: `|v(x_t, s T) - (n - x0)|^2` at
/// `x_t = (1 - s) x0 + s n`. Returns the batch mean (a scalar).
pub fn teacher_loss(
    b: &CandleBackend,
    den: &Denoiser,
    x0: &Tensor,
    labels: &Tensor,
    noise_cond: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    teacher_loss_with(b, den, x0, NetCond::Labels(labels), noise_cond, noise)
}

/// [`teacher_loss`] under either condition (labels or prompt embeddings).
pub fn teacher_loss_with(
    b: &CandleBackend,
    den: &Denoiser,
    x0: &Tensor,
    labels: NetCond<'_, Tensor>,
    noise_cond: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    match &den.param {
        Parameterisation::Edm(e) => {
            let sigma = noise_cond;
            let level = den.level_from_sigma(b, sigma)?;
            let s = sigma.reshape((sigma.dim(0)?, 1, 1, 1))?;
            let x = (x0 + noise.broadcast_mul(&s)?)?;
            let d = den.forward_with(b, &x, &level, labels)?;
            let sd2 = e.sigma_data * e.sigma_data;
            let s2 = sigma.sqr()?;
            let weight = ((&s2 + sd2)? / (s2 * sd2)?)?;
            let per = mean_per_sample(&(d - x0)?.sqr()?)?;
            Ok((per * weight)?.mean_all()?)
        }
        Parameterisation::Vp(v) => {
            let level = den.level_from_timesteps(b, noise_cond)?;
            let n = x0.dim(0)?;
            let s = level.sigma.reshape((n, 1, 1, 1))?;
            let x = (x0 + noise.broadcast_mul(&s)?)?;
            let (out, target) = match v.prediction {
                Prediction::Epsilon => (den.eps_with(b, &x, &level, labels)?, noise.clone()),
                Prediction::Sample => (den.raw_with(b, &x, &level, labels)?, x0.clone()),
                Prediction::VPrediction => {
                    // alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha
                    let alpha = (s.sqr()? + 1.0)?.sqrt()?.recip()?;
                    let target =
                        (noise.broadcast_mul(&alpha)? - x0.broadcast_mul(&(&s * &alpha)?)?)?;
                    (den.raw_with(b, &x, &level, labels)?, target)
                }
            };
            Ok((out - target)?.sqr()?.mean_all()?)
        }
        Parameterisation::Flow(f) => {
            let n = x0.dim(0)?;
            let s = noise_cond.reshape((n, 1, 1, 1))?;
            let x_t = (x0 + (noise - x0)?.broadcast_mul(&s)?)?;
            let c_noise = (noise_cond * f.num_timesteps as f64)?;
            let v = den.net.forward_with(b, &x_t, &c_noise, labels)?;
            Ok((v - (noise - x0)?)?.sqr()?.mean_all()?)
        }
    }
}

/// Replaces NaN by 0 and +/-inf by the largest finite f32 of that sign (`torch.nan_to_num`).
pub fn nan_to_num(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = x
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    if v.iter().all(|f| f.is_finite()) {
        return Ok(x.clone());
    }
    let v: Vec<f32> = v
        .into_iter()
        .map(|f| {
            if f.is_nan() {
                0.0
            } else if f == f32::INFINITY {
                f32::MAX
            } else if f == f32::NEG_INFINITY {
                f32::MIN
            } else {
                f
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, x.dims(), x.device())?.to_dtype(x.dtype())?)
}

/// Per-sample `[N]` as `[N, 1, 1, 1]`, to scale images.
pub fn per_image(v: &Tensor) -> Result<Tensor> {
    Ok(v.reshape((v.dim(0)?, 1, 1, 1))?)
}
