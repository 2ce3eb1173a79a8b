//! Classifier-free guidance, written once: `uncond + scale * (cond - uncond)` in x0-space, used
//! by the samplers (and so the exported generators), DMD2's real score and TDM's target.

use crate::backend::{Backend, Kind};
use crate::candle_backend::CandleBackend;
use crate::cond::{Cond, NetCond};
use crate::denoiser::{Denoiser, NoiseLevel};
use candle_core::Tensor;

/// The conditional and (when `scale != 1`) the unconditional x0 of one guided evaluation.
pub struct CondUncond<T> {
    pub cond: T,
    pub uncond: Option<T>,
}

impl<T: Clone> CondUncond<T> {
    /// The guided x0 at `scale` (the conditional one when there is no unconditional call).
    pub fn guided<B: Backend<T = T>>(&self, b: &B, scale: f64) -> anyhow::Result<T> {
        match &self.uncond {
            Some(u) if scale != 1.0 => combine(b, &self.cond, u, scale),
            _ => Ok(self.cond.clone()),
        }
    }
}

/// `uncond + scale * (cond - uncond)`.
pub fn combine<B: Backend>(b: &B, cond: &B::T, uncond: &B::T, scale: f64) -> anyhow::Result<B::T> {
    b.add(uncond, &b.affine(&b.sub(cond, uncond)?, scale, 0.0)?)
}

/// Guidance on any output affine in the denoiser's `D` at a fixed `x` (`D` itself, or the raw
/// network output the ODE samplers step on): `f(labels)` and, when `scale != 1`, `f(null)` for
/// the null class, as two calls (what every backend, ONNX included, runs), [`combine`]d.
pub fn guided_by<B: Backend>(
    b: &B,
    den: &Denoiser,
    labels: &B::T,
    scale: f64,
    f: impl Fn(&B::T) -> anyhow::Result<B::T>,
) -> anyhow::Result<B::T> {
    let cond = f(labels)?;
    if scale == 1.0 {
        return Ok(cond);
    }
    let null = b.full_batch(labels, null_class(den)? as f64, Kind::Label)?;
    let uncond = f(&null)?;
    combine(b, &cond, &uncond, scale)
}

/// [`guided_by`] under either condition: labels contrast with the null class, a text condition
/// with its `uncond` prompt embeddings (the empty prompt's; an error naming them when absent and
/// `scale != 1`), each as its own call, [`combine`]d.
pub fn guided_by_cond<B: Backend>(
    b: &B,
    den: &Denoiser,
    cond: &Cond<B::T>,
    scale: f64,
    f: impl Fn(NetCond<'_, B::T>) -> anyhow::Result<B::T>,
) -> anyhow::Result<B::T> {
    match cond {
        Cond::Labels(labels) => guided_by(b, den, labels, scale, |l| f(NetCond::Labels(l))),
        Cond::Text { cond, uncond } => {
            let c = f(NetCond::Text(cond))?;
            if scale == 1.0 {
                return Ok(c);
            }
            let u = uncond.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "classifier-free guidance at scale {scale} needs the empty prompt's \
                     embeddings (uncond) next to the prompt embeddings"
                )
            })?;
            let u = f(NetCond::Text(u))?;
            combine(b, &c, &u, scale)
        }
    }
}

/// The conditional and (when `scale != 1`) the unconditional x0 in one batched network call
/// (candle: one pass over a doubled batch is faster than two; the numbers equal two calls'
/// within f32 round-off of the batched kernels).
pub fn cond_uncond_batched(
    b: &CandleBackend,
    den: &Denoiser,
    x: &Tensor,
    level: &NoiseLevel<Tensor>,
    labels: &Tensor,
    scale: f64,
) -> anyhow::Result<CondUncond<Tensor>> {
    if scale == 1.0 {
        return Ok(CondUncond {
            cond: den.forward(b, x, level, labels)?,
            uncond: None,
        });
    }
    let n = x.dim(0)?;
    let null = Tensor::full(null_class(den)? as u32, n, x.device())?;
    let both = NoiseLevel {
        sigma: Tensor::cat(&[&level.sigma, &level.sigma], 0)?,
        c_noise: Tensor::cat(&[&level.c_noise, &level.c_noise], 0)?,
    };
    let out = den.forward(
        b,
        &Tensor::cat(&[x, x], 0)?,
        &both,
        &Tensor::cat(&[labels, &null], 0)?,
    )?;
    Ok(CondUncond {
        cond: out.narrow(0, 0, n)?,
        uncond: Some(out.narrow(0, n, n)?),
    })
}

/// The null class, or an error saying why guidance is impossible (diffusers models have none).
fn null_class(den: &Denoiser) -> anyhow::Result<usize> {
    den.null_class().ok_or_else(|| {
        anyhow::anyhow!(
            "classifier-free guidance needs a null class and this network has none (a diffusers \
             model): use a guidance scale of 1"
        )
    })
}
