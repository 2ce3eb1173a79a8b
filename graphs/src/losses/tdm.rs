//! Trajectory distribution matching (Luo et al., ICCV 2025; the official `train_tdm` code), in
//! sigma-space (`x = x0 + sigma * eps`; a VP model's `x_t = alpha_t * x` is the same point).
//!
//! Per sample, the student at its step `k` (sigma `s_k`) predicts `(x0, eps)`; the trajectory's
//! next point is the *noisy* `x_m = x0 + s_m * eps` (`s_m` the next step's sigma, ~0 after the last
//! step). It is diffused further to a matching level `s_t >= s_m` with fresh noise `n`:
//! `x_t = x_m + sqrt(s_t^2 - s_m^2) * n`, so `x_t = x0 + s_t * mixed` with the mixed noise
//! `mixed = (s_m * eps + sqrt(s_t^2 - s_m^2) * n) / s_t`. The teacher and the fake score denoise
//! `x_t`; the fake score learns the student's x0 there, and the student moves along
//! `x0_real - x0_fake` (plus the CFG direction), normalised per sample.

use super::{mean_per_sample, per_image};
use anyhow::{ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Sigmas `[N]` as a tensor like `like`'s device.
fn col(v: &[f64], like: &Tensor) -> Result<Tensor> {
    let f: Vec<f32> = v.iter().map(|&s| s as f32).collect();
    per_image(&Tensor::from_vec(f, v.len(), like.device())?)
}

/// The trajectory point `x_m = x0 + s_m * eps` (per-sample `s_m`).
pub fn trajectory_point(x0: &Tensor, eps: &Tensor, s_m: &[f64]) -> Result<Tensor> {
    Ok((x0 + eps.broadcast_mul(&col(s_m, x0)?)?)?)
}

/// Forward diffusion from `s_m` to `s_t >= s_m`: `x_t = x_m + sqrt(s_t^2 - s_m^2) * fresh`.
pub fn diffuse(x_m: &Tensor, fresh: &Tensor, s_m: &[f64], s_t: &[f64]) -> Result<Tensor> {
    let k = transition_std(s_m, s_t)?;
    Ok((x_m + fresh.broadcast_mul(&col(&k, x_m)?)?)?)
}

fn transition_std(s_m: &[f64], s_t: &[f64]) -> Result<Vec<f64>> {
    ensure!(s_m.len() == s_t.len(), "sigma lists differ in length");
    s_m.iter()
        .zip(s_t)
        .map(|(&m, &t)| {
            ensure!(
                t >= m,
                "matching sigma {t} is below the trajectory point's sigma {m}"
            );
            Ok((t * t - m * m).sqrt())
        })
        .collect()
}

/// The noise of `x_t` relative to the student's x0: `(s_m * eps + sqrt(s_t^2 - s_m^2) * fresh) / s_t`.
pub fn mixed_noise(eps: &Tensor, fresh: &Tensor, s_m: &[f64], s_t: &[f64]) -> Result<Tensor> {
    let k = transition_std(s_m, s_t)?;
    let a: Vec<f64> = s_m.iter().zip(s_t).map(|(m, t)| m / t).collect();
    let b: Vec<f64> = k.iter().zip(s_t).map(|(k, t)| k / t).collect();
    Ok((eps.broadcast_mul(&col(&a, eps)?)? + fresh.broadcast_mul(&col(&b, fresh)?)?)?)
}

/// Importance weight `[N]` of each sample: the ratio of the standard-Gaussian densities of the
/// mixed noise and the fresh noise, per dimension (geometric mean over C, H, W, as the official
/// code does): `exp(-mean(mixed^2)/2) / exp(-mean(fresh^2)/2)`. Exactly 1 when they are equal.
pub fn importance_weight(mixed: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let a = mean_per_sample(&mixed.sqr()?)?;
    let b = mean_per_sample(&fresh.sqr()?)?;
    Ok(((b - a)? * 0.5)?.exp()?)
}

/// How a per-sample loss is weighted by the matching level's SNR (`1 / s_t^2`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    Constant,
    Snr,
    /// `min(SNR, gamma)` (Min-SNR weighting; TDM's fake score uses gamma = 5).
    MinSnr,
}

impl Weighting {
    /// Weights `[N]` for the given SNRs.
    pub fn weights(self, snr: &[f64], gamma: f64) -> Vec<f64> {
        snr.iter()
            .map(|&s| match self {
                Self::Constant => 1.0,
                Self::Snr => s,
                Self::MinSnr => s.min(gamma),
            })
            .collect()
    }
}

/// The fake score's loss: `mean_n(w_n * mean_{C,H,W}((x0_fake - x0_student)^2))` where `w_n` is
/// the SNR weight times the importance weight. `x0_student` is detached.
pub fn fake_score_loss(fake_x0: &Tensor, student_x0: &Tensor, w: &Tensor) -> Result<Tensor> {
    let per = mean_per_sample(&(fake_x0 - student_x0.detach())?.sqr()?)?;
    Ok((per * w.detach())?.mean_all()?)
}

/// What the student loss measures the distance with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    Mse,
    /// Pseudo-Huber `sqrt(d^2 + c^2) - c`.
    Huber,
}

/// The student loss and its per-sample normaliser (for the metrics).
pub struct StudentLoss {
    pub loss: Tensor,
    pub normaliser: f64,
}

/// The student's loss on its x0 estimate (with gradient):
/// target `= stopgrad(x0 + (x0_real_cfg - x0_fake))` where `x0_real_cfg` is the teacher's guided
/// x0 ([`crate::guidance`]: `x0_real + (cfg - 1) * (x0_real - x0_real_uncond)`), distance MSE or
/// pseudo-Huber (`c`), divided per sample by `mean |x0 - x0_real_cfg|`, weighted per sample by
/// `w` `[N]`, averaged.
pub fn student_loss(
    x0: &Tensor,
    real_guided: &Tensor,
    fake_x0: &Tensor,
    distance: Distance,
    huber_c: f64,
    w: &Tensor,
) -> Result<StudentLoss> {
    let xd = x0.detach();
    let real_cfg = real_guided.detach();
    let target = ((&xd + (&real_cfg - fake_x0.detach())?)?).detach();
    let norm = mean_per_sample(&(&xd - &real_cfg)?.abs()?)?.detach(); // [N]
    let d2 = (x0 - &target)?.sqr()?;
    let dist = match distance {
        Distance::Mse => d2,
        Distance::Huber => ((d2 + huber_c * huber_c)?.sqrt()? - huber_c)?,
    };
    let per = (mean_per_sample(&dist)? / &norm)?;
    let loss = (per * w.detach())?.mean_all()?;
    let normaliser = norm
        .mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    Ok(StudentLoss { loss, normaliser })
}
