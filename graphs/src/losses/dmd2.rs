//! DMD2's distribution-matching loss (Yin et al. 2024, `compute_distribution_matching_loss` of the
//! official EDM code).
//!
//! For generated images `x`, a noisy `x_t = x + sigma_t * eps` at a timestep in
//! `[min_step, max_step]`, and the real (teacher) and fake score's x0 estimates at `x_t`:
//! `p_real = x - x0_real`, `p_fake = x - x0_fake`,
//! `grad = (p_real - p_fake) / mean_{C,H,W}(|p_real|)` per sample, NaN/inf zeroed, and
//! `loss = 0.5 * mean((x - stopgrad(x - grad))^2)`, whose gradient w.r.t. `x` is `grad / numel`.
//!
//! [`FDivergence`] generalises the reverse KL this descends to other f-divergences (f-distill,
//! Xu et al. 2025): each sample's `grad` is weighted by `h(r) = f''(r) r^2` of the density ratio
//! `r = p_teacher / p_student` at its noisy `x_t`, normalised to mean 1 over the batch.

use super::nan_to_num;
use anyhow::Result;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Which f-divergence distribution matching descends (f-distill's weighting `h(r)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    /// `h = 1`: DMD's (mode-seeking) reverse KL, no density ratio needed.
    #[default]
    ReverseKl,
    /// `h = r`: mode-covering; samples where the teacher's density exceeds the student's weigh
    /// more.
    ForwardKl,
    /// `h = r / (1 + r)`: between the two (f-distill's best on ImageNet-64).
    JensenShannon,
}

impl FDivergence {
    /// The config / CLI spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReverseKl => "reverse_kl",
            Self::ForwardKl => "forward_kl",
            Self::JensenShannon => "jensen_shannon",
        }
    }

    /// Whether `h` depends on the density ratio (and so needs a discriminator).
    pub fn needs_ratio(self) -> bool {
        self != Self::ReverseKl
    }

    /// Per-sample weights `h(r) / mean(h(r))` from the log density ratio `log r` (`[N]`: a
    /// logistic discriminator's logit, real = teacher; clamped to +-`LOG_R_MAX` so one sample
    /// cannot take the whole batch's weight); `None` for the reverse KL.
    pub fn weights(self, log_r: &Tensor) -> Result<Option<Tensor>> {
        let l = log_r.detach().clamp(-LOG_R_MAX, LOG_R_MAX)?;
        let h = match self {
            Self::ReverseKl => return Ok(None),
            Self::ForwardKl => l.exp()?,
            Self::JensenShannon => candle_nn::ops::sigmoid(&l)?,
        };
        let mean = h.mean_all()?;
        Ok(Some(nan_to_num(&h.broadcast_div(&mean)?)?))
    }
}

/// Bound on `|log r|` before the weighting (e^5 ~ 148: a weight ratio beyond that between two
/// samples of a batch is the discriminator's noise, not information).
pub const LOG_R_MAX: f64 = 5.0;

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
    dm_loss_weighted(x, real_x0, fake_x0, None)
}

/// [`dm_loss`] with each sample's gradient scaled by `weights` (`[N]`, e.g.
/// [`FDivergence::weights`]); `None` is [`dm_loss`].
pub fn dm_loss_weighted(
    x: &Tensor,
    real_x0: &Tensor,
    fake_x0: &Tensor,
    weights: Option<&Tensor>,
) -> Result<DmLoss> {
    let xd = x.detach();
    let p_real = (&xd - real_x0.detach())?;
    let p_fake = (&xd - fake_x0.detach())?;
    let norm = p_real.abs()?.flatten_from(1)?.mean_keepdim(D::Minus1)?; // [N, 1]
    let n = x.dim(0)?;
    let norm4 = norm.reshape((n, 1, 1, 1))?;
    let mut grad = nan_to_num(&(p_real - p_fake)?.broadcast_div(&norm4)?)?;
    if let Some(w) = weights {
        grad = grad.broadcast_mul(&w.detach().reshape((n, 1, 1, 1))?)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn v(t: &Tensor) -> Vec<f32> {
        t.to_vec1().unwrap()
    }

    #[test]
    fn weights_are_h_of_the_ratio_normalised_to_mean_one() {
        let d = Device::Cpu;
        let log_r = Tensor::new(&[0.0f32, 2f32.ln(), -(2f32.ln())], &d).unwrap();
        assert!(FDivergence::ReverseKl.weights(&log_r).unwrap().is_none());
        // Forward KL: h = r = 1, 2, 0.5 -> mean 7/6.
        let w = v(&FDivergence::ForwardKl.weights(&log_r).unwrap().unwrap());
        for (a, b) in w.iter().zip([6.0 / 7.0, 12.0 / 7.0, 3.0 / 7.0]) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
        // JS: h = r / (1 + r) = 1/2, 2/3, 1/3 -> mean 1/2.
        let w = v(&FDivergence::JensenShannon.weights(&log_r).unwrap().unwrap());
        for (a, b) in w.iter().zip([1.0, 4.0 / 3.0, 2.0 / 3.0]) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
    }

    #[test]
    fn weights_clamp_the_log_ratio_and_survive_inf() {
        let d = Device::Cpu;
        let log_r = Tensor::new(&[f32::INFINITY, 0.0], &d).unwrap();
        let w = v(&FDivergence::ForwardKl.weights(&log_r).unwrap().unwrap());
        let e = (LOG_R_MAX as f32).exp();
        assert!((w[0] - 2.0 * e / (e + 1.0)).abs() < 1e-3, "{w:?}");
        assert!(w.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn weighted_loss_scales_each_samples_gradient() {
        let d = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::new(&[[[[1.0f32, 2.0]]], [[[3.0, 4.0]]]], &d).unwrap(),
        )
        .unwrap();
        let real = Tensor::new(&[[[[0.0f32, 1.0]]], [[[2.0, 2.0]]]], &d).unwrap();
        let fake = Tensor::new(&[[[[0.5f32, 1.5]]], [[[2.5, 3.0]]]], &d).unwrap();
        let grad_of = |w: Option<&Tensor>| -> Vec<f32> {
            let l = dm_loss_weighted(x.as_tensor(), &real, &fake, w).unwrap();
            let g = l.loss.backward().unwrap();
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let plain = grad_of(None);
        let w = Tensor::new(&[0.5f32, 1.5], &d).unwrap();
        let weighted = grad_of(Some(&w));
        for i in 0..4 {
            let s = if i < 2 { 0.5 } else { 1.5 };
            assert!(
                (weighted[i] - s * plain[i]).abs() < 1e-6,
                "{plain:?} {weighted:?}"
            );
        }
        assert!(plain.iter().any(|g| g.abs() > 1e-3));
    }
}
