//! Samplers, written against [`Backend`] so the exporter can unroll them into one ONNX graph.
//! All work in sigma-space on `x = x0 + sigma * eps` (see [`crate::schedule`]).

use crate::backend::Backend;
use crate::cond::Cond;
use crate::denoiser::Denoiser;
use crate::schedule::Parameterisation;
use crate::schedulers::Prediction;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// EDM's deterministic 2nd-order Heun (Karras Algorithm 1): `2 * steps - 1` NFE.
    Heun,
    /// 1st-order Euler (the probability-flow ODE): `steps` NFE.
    Euler,
    /// Deterministic DDIM on a VP model's timesteps (= Euler in sigma-space): `steps` NFE.
    Ddim,
    /// A distilled student's own few-step sampler: denoise, then re-noise to the next sigma.
    Student,
}

impl SamplerKind {
    /// Network evaluations (of the guided denoiser) for `steps` sampling steps.
    pub fn nfe(self, steps: usize) -> usize {
        match self {
            Self::Heun => 2 * steps - 1,
            Self::Euler | Self::Ddim | Self::Student => steps,
        }
    }
}

/// The sigma grid a sampler walks (descending, without the final 0).
pub fn sampling_sigmas(param: &Parameterisation, steps: usize) -> Vec<f64> {
    match param {
        Parameterisation::Edm(e) => e.karras_sigmas(steps),
        Parameterisation::Vp(v) => {
            let s = v.sigmas();
            v.ddim_timesteps(steps).into_iter().map(|t| s[t]).collect()
        }
        Parameterisation::Flow(f) => f.sampling_sigmas(steps),
    }
}

/// Scale that turns unit Gaussian noise into the starting sample at `sigma0`: the total standard
/// deviation of `x0 + sigma0 * eps` in sigma-space (VP: `x_T ~ N(0, I)` scaled by `1/sqrt(alpha_bar)`).
pub fn initial_scale(param: &Parameterisation, sigma0: f64) -> f64 {
    match param {
        Parameterisation::Edm(_) => sigma0,
        Parameterisation::Vp(_) => (1.0 + sigma0 * sigma0).sqrt(),
        // x = x_t / (1 - s) with x_t ~ N(0, I) at s -> 1.
        Parameterisation::Flow(_) => 1.0 + sigma0,
    }
}

/// How a multi-step student moves from one step's x0 estimate to the next step's input.
pub enum Renoise<T> {
    /// `x_next = x0 + sigma_next * (x - x0) / sigma` (DDIM along the student's own steps; TDM).
    Deterministic,
    /// `x_next = x0 + sigma_next * noise_i` with fresh unit noise per step (DMD2 backward simulation).
    Fresh(Vec<T>),
}

/// ODE sampler (Heun, Euler or DDIM) from unit noise `z`. Returns images (unclamped x0) and the NFE.
pub fn sample_ode<B: Backend>(
    b: &B,
    den: &Denoiser,
    kind: SamplerKind,
    z: &B::T,
    labels: &B::T,
    steps: usize,
    cfg_scale: f64,
) -> anyhow::Result<(B::T, usize)> {
    sample_ode_cond(
        b,
        den,
        kind,
        z,
        &Cond::Labels(labels.clone()),
        steps,
        cfg_scale,
    )
}

/// [`sample_ode`] under either condition (labels, or prompt embeddings with the empty prompt's
/// for guidance), on the sampler's own grid of `steps` sigmas, ending at sigma 0.
pub fn sample_ode_cond<B: Backend>(
    b: &B,
    den: &Denoiser,
    kind: SamplerKind,
    z: &B::T,
    cond: &Cond<B::T>,
    steps: usize,
    cfg_scale: f64,
) -> anyhow::Result<(B::T, usize)> {
    anyhow::ensure!(steps >= 1, "a sampler needs at least one step");
    let sigmas = sampling_sigmas(&den.param, steps);
    sample_ode_grid(b, den, kind, z, cond, &sigmas, 0.0, cfg_scale)
}

/// The ODE sampler on a given descending grid `sigmas` (e.g. a diffusers scheduler's
/// `set_timesteps` mapped to sigmas, see `graphs::diffusers::teacher::scheduler_grid`), stepping
/// from the last one to `final_sigma` (0: the last step returns `D`; a DDIM scheduler with
/// `set_alpha_to_one = false` ends at its `alphas_cumprod[0]`'s sigma instead). Returns the sample
/// in sigma-space at `final_sigma` (unclamped) and the NFE.
#[allow(clippy::too_many_arguments)]
pub fn sample_ode_grid<B: Backend>(
    b: &B,
    den: &Denoiser,
    kind: SamplerKind,
    z: &B::T,
    cond: &Cond<B::T>,
    sigmas: &[f64],
    final_sigma: f64,
    cfg_scale: f64,
) -> anyhow::Result<(B::T, usize)> {
    anyhow::ensure!(!sigmas.is_empty(), "a sampler needs at least one step");
    let steps = sigmas.len();
    match (kind, &den.param) {
        (SamplerKind::Ddim, Parameterisation::Edm(_)) => {
            anyhow::bail!("DDIM is for VP models; use heun or euler on an EDM model")
        }
        (SamplerKind::Student, _) => {
            anyhow::bail!("the student sampler is run with sample_student")
        }
        _ => {}
    }
    let mut x = b.affine(z, initial_scale(&den.param, sigmas[0]), 0.0)?;
    let mut nfe = 0;
    // The ODE is stepped on the slope `(x - D) / sigma` written in the network's own output
    // (`sigma / (sigma^2 + sd^2) * x - sd / sqrt(sigma^2 + sd^2) * F` for EDM, `eps` for VP), never
    // as `x - D`: near sigma_min `D` is `x` to 5 digits, and Heun's correction multiplies
    // `(x - D) / sigma_min` by `h / 2` (~2e4 times sigma_min at 2 steps), so a last-bit
    // difference in `D` between candle and an ONNX runtime became a 1e-3 error. Every scalar
    // coefficient is folded in f64 on the host and applied as one multiply, on both sides.
    for i in 0..steps {
        let (s, next) = (sigmas[i], sigmas.get(i + 1).copied().unwrap_or(final_sigma));
        let f = guided_output(b, den, &x, z, s, cond, cfg_scale)?;
        nfe += 1;
        if next == 0.0 {
            x = denoised(b, den, &x, &f, s)?;
            continue;
        }
        let h = next - s;
        let d1 = slope(b, den, &x, &f, s)?;
        let x_euler = b.add(&x, &b.affine(&d1, h, 0.0)?)?;
        // Heun's correction needs a second evaluation at `next`; not on the final partial step
        // to a nonzero `final_sigma` (that step is DDIM's last, first order).
        if kind == SamplerKind::Heun && i + 1 < steps {
            let f2 = guided_output(b, den, &x_euler, z, next, cond, cfg_scale)?;
            nfe += 1;
            let d2 = slope(b, den, &x_euler, &f2, next)?;
            x = b.add(&x, &b.affine(&b.add(&d1, &d2)?, 0.5 * h, 0.0)?)?;
        } else {
            x = x_euler;
        }
    }
    Ok((x, nfe))
}

/// The network's raw output at a host-constant `sigma` (EDM: `F` of `D = c_skip x + c_out F`;
/// VP: `eps`), with classifier-free guidance applied to it: `D` is affine in it with the same
/// `x`, so guiding the output is guiding `D` (see [`crate::guidance::guided_by`]).
fn guided_output<B: Backend>(
    b: &B,
    den: &Denoiser,
    x: &B::T,
    like: &B::T,
    sigma: f64,
    cond: &Cond<B::T>,
    cfg_scale: f64,
) -> anyhow::Result<B::T> {
    let level = den.level_const(b, like, sigma)?;
    let c_in = match &den.param {
        Parameterisation::Edm(e) => e.c_in(sigma),
        Parameterisation::Vp(_) => 1.0 / (1.0 + sigma * sigma).sqrt(),
        Parameterisation::Flow(_) => 1.0 / (1.0 + sigma),
    };
    let x_in = b.affine(x, c_in, 0.0)?;
    crate::guidance::guided_by_cond(b, den, cond, cfg_scale, |c| {
        den.net.forward_with(b, &x_in, &level.c_noise, c)
    })
}

/// `(x - D) / sigma` from the raw output, without forming `x - D`.
fn slope<B: Backend>(
    b: &B,
    den: &Denoiser,
    x: &B::T,
    out: &B::T,
    sigma: f64,
) -> anyhow::Result<B::T> {
    match &den.param {
        Parameterisation::Edm(e) => {
            let sd2 = e.sigma_data * e.sigma_data;
            let a = sigma / (sigma * sigma + sd2);
            let c = e.sigma_data / (sigma * sigma + sd2).sqrt();
            b.sub(&b.affine(x, a, 0.0)?, &b.affine(out, c, 0.0)?)
        }
        Parameterisation::Vp(v) => match v.prediction {
            Prediction::Epsilon => Ok(out.clone()),
            Prediction::Sample => b.sub(
                &b.affine(x, 1.0 / sigma, 0.0)?,
                &b.affine(out, 1.0 / sigma, 0.0)?,
            ),
            // eps = sigma_t x_t + alpha v = sigma alpha^2 x + alpha v
            Prediction::VPrediction => {
                let a2 = 1.0 / (1.0 + sigma * sigma);
                b.add(
                    &b.affine(x, sigma * a2, 0.0)?,
                    &b.affine(out, a2.sqrt(), 0.0)?,
                )
            }
        },
        // eps = (x + v) / (1 + sigma)
        Parameterisation::Flow(_) => {
            let k = 1.0 / (1.0 + sigma);
            b.add(&b.affine(x, k, 0.0)?, &b.affine(out, k, 0.0)?)
        }
    }
}

/// `D` from the raw output.
fn denoised<B: Backend>(
    b: &B,
    den: &Denoiser,
    x: &B::T,
    out: &B::T,
    sigma: f64,
) -> anyhow::Result<B::T> {
    match &den.param {
        Parameterisation::Edm(e) => b.add(
            &b.affine(x, e.c_skip(sigma), 0.0)?,
            &b.affine(out, e.c_out(sigma), 0.0)?,
        ),
        Parameterisation::Vp(v) => match v.prediction {
            Prediction::Epsilon => b.sub(x, &b.affine(out, sigma, 0.0)?),
            Prediction::Sample => Ok(out.clone()),
            Prediction::VPrediction => {
                let a2 = 1.0 / (1.0 + sigma * sigma);
                b.sub(
                    &b.affine(x, a2, 0.0)?,
                    &b.affine(out, sigma * a2.sqrt(), 0.0)?,
                )
            }
        },
        Parameterisation::Flow(_) => {
            let k = 1.0 / (1.0 + sigma);
            b.sub(&b.affine(x, k, 0.0)?, &b.affine(out, sigma * k, 0.0)?)
        }
    }
}

/// A distilled student's few-step sampler over its own `sigmas` (descending). The output is the
/// last step's x0 estimate clamped to [-1, 1]. Exported as-is as the deployable generator.
pub fn sample_student<B: Backend>(
    b: &B,
    den: &Denoiser,
    z: &B::T,
    labels: &B::T,
    sigmas: &[f64],
    renoise: &Renoise<B::T>,
) -> anyhow::Result<B::T> {
    let mut last = None;
    student_rollout(
        b,
        den,
        z,
        labels,
        sigmas,
        renoise,
        sigmas.len(),
        |_, _, x0| {
            last = Some(x0.clone());
            Ok(())
        },
    )?;
    b.clamp(&last.expect("a student has at least one step"), -1.0, 1.0)
}

/// The student's first `steps` steps from unit noise `z` over its `sigmas`: at step `k` the input
/// `x_k` (`x_0` the scaled noise) is denoised to `x0_k`, and `observe(k, x_k, x0_k)` sees both
/// (the trajectory TDM and DMD2's backward simulation train on). Returns the next step's input
/// when the rollout stops before the last step, else `None`.
#[allow(clippy::too_many_arguments)]
pub fn student_rollout<B: Backend>(
    b: &B,
    den: &Denoiser,
    z: &B::T,
    labels: &B::T,
    sigmas: &[f64],
    renoise: &Renoise<B::T>,
    steps: usize,
    observe: impl FnMut(usize, &B::T, &B::T) -> anyhow::Result<()>,
) -> anyhow::Result<Option<B::T>> {
    student_rollout_with(
        b,
        den,
        z,
        crate::cond::NetCond::Labels(labels),
        sigmas,
        renoise,
        steps,
        observe,
    )
}

/// A student's output: its deterministic rollout over all its `sigmas` (re-noised with its own
/// predicted noise, as DDIM with eta 0), the last step's x0 (not clamped: latents are not in
/// [-1, 1]). What sampling, exporting and validating a text student share.
pub fn student_x0<B: Backend>(
    b: &B,
    den: &Denoiser,
    z: &B::T,
    cond: crate::cond::NetCond<'_, B::T>,
    sigmas: &[f64],
) -> anyhow::Result<B::T> {
    let mut last = None;
    student_rollout_with(
        b,
        den,
        z,
        cond,
        sigmas,
        &Renoise::Deterministic,
        sigmas.len(),
        |_, _, x0| {
            last = Some(x0.clone());
            Ok(())
        },
    )?;
    last.ok_or_else(|| anyhow::anyhow!("a student has at least one step"))
}

/// [`student_rollout`] under either condition (labels or prompt embeddings).
#[allow(clippy::too_many_arguments)]
pub fn student_rollout_with<B: Backend>(
    b: &B,
    den: &Denoiser,
    z: &B::T,
    cond: crate::cond::NetCond<'_, B::T>,
    sigmas: &[f64],
    renoise: &Renoise<B::T>,
    steps: usize,
    mut observe: impl FnMut(usize, &B::T, &B::T) -> anyhow::Result<()>,
) -> anyhow::Result<Option<B::T>> {
    anyhow::ensure!(!sigmas.is_empty(), "a student needs at least one step");
    anyhow::ensure!(
        steps <= sigmas.len(),
        "rollout of {steps} steps over {} sigmas",
        sigmas.len()
    );
    if let Renoise::Fresh(n) = renoise {
        anyhow::ensure!(
            n.len() + 1 >= sigmas.len().min(steps + 1),
            "{} steps need {} fresh noise tensors, got {}",
            sigmas.len(),
            sigmas.len() - 1,
            n.len()
        );
    }
    let mut x = b.affine(z, initial_scale(&den.param, sigmas[0]), 0.0)?;
    for (i, &s) in sigmas.iter().enumerate().take(steps) {
        // (`NetCond` holds references; derive(Copy) would need `T: Copy`.)
        let c = match &cond {
            crate::cond::NetCond::Labels(l) => crate::cond::NetCond::Labels(*l),
            crate::cond::NetCond::Text(t) => crate::cond::NetCond::Text(*t),
        };
        let x0 = den.forward_with(b, &x, &den.level_const(b, z, s)?, c)?;
        observe(i, &x, &x0)?;
        let Some(&next) = sigmas.get(i + 1) else {
            return Ok(None);
        };
        x = match renoise {
            Renoise::Deterministic => {
                let eps = b.affine(&b.sub(&x, &x0)?, 1.0 / s, 0.0)?;
                b.add(&x0, &b.affine(&eps, next, 0.0)?)?
            }
            Renoise::Fresh(noise) => b.add(&x0, &b.affine(&noise[i], next, 0.0)?)?,
        };
    }
    Ok(Some(x))
}

/// Everything needed to turn unit noise + labels into images: what an exported generator
/// unrolls and what `distill sample` runs. Stored in student checkpoints and ONNX metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratorSpec {
    pub sampler: SamplerKind,
    /// Sampling steps (for `student`: the length of `sigmas`).
    pub steps: usize,
    /// The student's step sigmas, descending (empty for ODE samplers: they derive their grid).
    #[serde(default)]
    pub sigmas: Vec<f64>,
    /// Student only: re-noise with fresh noise between steps (DMD2) instead of deterministically (TDM).
    #[serde(default)]
    pub fresh_noise: bool,
    /// Classifier-free guidance scale for ODE samplers (1 = off; students have it distilled in).
    #[serde(default = "one")]
    pub cfg_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl GeneratorSpec {
    pub fn nfe(&self) -> usize {
        self.sampler.nfe(self.steps)
    }
    /// How many fresh unit-noise tensors (one per re-noise) the generator consumes besides `z`.
    pub fn num_fresh_noise(&self) -> usize {
        if self.sampler == SamplerKind::Student && self.fresh_noise {
            self.steps.saturating_sub(1)
        } else {
            0
        }
    }
    /// A student sampled with only `k` of its trained steps: every `steps / k`-th sigma, starting
    /// at the first (e.g. a 4-step student at 2 steps uses its 1st and 3rd sigma).
    pub fn student_substeps(&self, k: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.sampler == SamplerKind::Student,
            "not a student sampler"
        );
        let n = self.sigmas.len();
        anyhow::ensure!(
            (1..=n).contains(&k),
            "a student trained with {n} steps samples with 1..={n} of them, not {k}"
        );
        let sigmas: Vec<f64> = (0..k).map(|i| self.sigmas[i * n / k]).collect();
        Ok(Self {
            steps: k,
            sigmas,
            ..self.clone()
        })
    }

    /// The sigma of each network evaluation's step (ODE: the sampler grid; student: its sigmas).
    pub fn step_sigmas(&self, param: &Parameterisation) -> Vec<f64> {
        if self.sampler == SamplerKind::Student {
            self.sigmas.clone()
        } else {
            sampling_sigmas(param, self.steps)
        }
    }
}

/// Runs the generator described by `spec`: unit noise `z` `[N, C, H, W]`, labels `[N]`, and
/// `spec.num_fresh_noise()` extra unit-noise tensors -> images `[N, C, H, W]` clamped to [-1, 1].
pub fn generate<B: Backend>(
    b: &B,
    den: &Denoiser,
    spec: &GeneratorSpec,
    z: &B::T,
    labels: &B::T,
    fresh: &[B::T],
) -> anyhow::Result<B::T> {
    anyhow::ensure!(
        fresh.len() == spec.num_fresh_noise(),
        "generator needs {} fresh noise tensors, got {}",
        spec.num_fresh_noise(),
        fresh.len()
    );
    match spec.sampler {
        SamplerKind::Student => {
            let renoise = if spec.fresh_noise {
                Renoise::Fresh(fresh.to_vec())
            } else {
                Renoise::Deterministic
            };
            sample_student(b, den, z, labels, &spec.sigmas, &renoise)
        }
        kind => {
            let (x, _) = sample_ode(b, den, kind, z, labels, spec.steps, spec.cfg_scale)?;
            b.clamp(&x, -1.0, 1.0)
        }
    }
}
