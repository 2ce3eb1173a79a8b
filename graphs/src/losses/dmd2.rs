//! DMD2's distribution-matching loss (Yin et al. 2024, `compute_distribution_matching_loss` of the
//! official EDM code).
//!
//! For generated images `x`, a noisy `x_t = x + sigma_t * eps` at a timestep in
//! `[min_step, max_step]`, and the real (teacher) and fake score's x0 estimates at `x_t`:
//! `p_real = x - x0_real`, `p_fake = x - x0_fake`,
//! `grad = (p_real - p_fake) / mean_{C,H,W}(|p_real|)` per sample, NaN/inf zeroed, and
//! `loss = 0.5 * mean((x - stopgrad(x - grad))^2)`, whose gradient w.r.t. `x` is `grad / numel`.

use super::nan_to_num;
use anyhow::Result;
use candle_core::{Tensor, D};

/// The loss and, for the metrics, the mean per-sample normaliser `mean |p_real|`.
pub struct DmLoss {
    pub loss: Tensor,
    pub normaliser: f64,
    /// `grad` (detached), `[N, C, H, W]`.
    pub grad: Tensor,
}

/// `x`: the generator's output (with gradient); `real_x0`, `fake_x0`: the two scores' x0 estimates
/// at the noisy `x` (computed without gradient; detached here anyway).
pub fn dm_loss(x: &Tensor, real_x0: &Tensor, fake_x0: &Tensor) -> Result<DmLoss> {
    let xd = x.detach();
    let p_real = (&xd - real_x0.detach())?;
    let p_fake = (&xd - fake_x0.detach())?;
    let norm = p_real.abs()?.flatten_from(1)?.mean_keepdim(D::Minus1)?; // [N, 1]
    let n = x.dim(0)?;
    let norm4 = norm.reshape((n, 1, 1, 1))?;
    let grad = nan_to_num(&(p_real - p_fake)?.broadcast_div(&norm4)?)?;
    let target = (&xd - &grad)?.detach();
    let loss = ((x - target)?.sqr()?.mean_all()? * 0.5)?;
    let normaliser = norm
        .mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    Ok(DmLoss {
        loss,
        normaliser,
        grad,
    })
}
