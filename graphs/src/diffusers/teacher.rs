//! A diffusers model as a sigma-space denoiser `D(x, sigma, label) -> x0`, the form every
//! distillation loss here is written in (`x = x0 + sigma * eps`). The conversion from the
//! model's own space and prediction (eps / v / x0 for the DDPM family, velocity for rectified
//! flow) happens here, in one place.

use super::load::{load_unet, DiffusersFolder};
use super::unet2d::UNet2DModel;
use crate::backend::Backend;
use crate::schedulers::euler::train_sigmas;
use crate::schedulers::{Prediction, Scheduler};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

/// How a model's noise level and output relate to sigma-space.
#[derive(Clone, Debug)]
pub enum NoiseSpace {
    /// DDPM family: `x_t = x / sqrt(1 + sigma^2)`, timesteps `0..T` with the training sigmas.
    Vp {
        prediction: Prediction,
        /// `sqrt((1 - acp) / acp)` per training timestep, as the scheduler computes it.
        sigmas: Vec<f32>,
    },
    /// Rectified flow: `x_t = (1 - s) x0 + s eps` with `s = sigma / (1 + sigma)`, timestep
    /// `s * T`, the model predicts the velocity `eps - x0`.
    Flow { num_train_timesteps: usize },
}

#[derive(Clone, Debug)]
pub struct DiffusersTeacher {
    pub unet: UNet2DModel,
    pub space: NoiseSpace,
    /// Image side (H = W).
    pub side: usize,
}

impl NoiseSpace {
    /// From a scheduler config: the betas (DDPM family) or the flow scheduler.
    pub fn from_scheduler(s: &Scheduler) -> Self {
        let vp = |acp: &[f32], prediction| NoiseSpace::Vp {
            prediction,
            sigmas: train_sigmas(acp),
        };
        match s {
            Scheduler::Ddpm(d) => vp(&d.alphas_cumprod, d.prediction),
            Scheduler::Ddim(d) => vp(&d.alphas_cumprod, d.prediction),
            Scheduler::Euler(d) => vp(&d.alphas_cumprod, d.prediction),
            Scheduler::DpmMultistep(d) => vp(&d.alphas_cumprod, d.prediction),
            Scheduler::FlowMatchEuler(f) => NoiseSpace::Flow {
                num_train_timesteps: f.num_train_timesteps,
            },
        }
    }
}

impl DiffusersTeacher {
    /// A diffusers model or pipeline folder; the scheduler config is required (it defines the
    /// noise space the model was trained in).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let folder = DiffusersFolder::resolve(dir)?;
        let sched = folder.scheduler_config.with_context(|| {
            format!(
                "{}: no scheduler_config.json (in the folder or its pipeline's scheduler/): \
                 the noise schedule the model was trained with is needed",
                dir.display()
            )
        })?;
        let scheduler = Scheduler::from_file(&sched)?;
        let (unet, _) = load_unet(dir, device)?;
        let side = unet.cfg.sample_size.with_context(|| {
            format!("{}: config.json has no sample_size", folder.unet.display())
        })?;
        if unet.cfg.in_channels != unet.cfg.out_channels {
            bail!(
                "{}: in_channels {} != out_channels {}: not a pixel-space denoiser",
                folder.unet.display(),
                unet.cfg.in_channels,
                unet.cfg.out_channels
            );
        }
        Ok(Self {
            unet,
            space: NoiseSpace::from_scheduler(&scheduler),
            side,
        })
    }

    /// Smallest and largest sigma the model was trained on (flow: up to `s = (T - 1) / T`).
    pub fn sigma_range(&self) -> (f64, f64) {
        match &self.space {
            NoiseSpace::Vp { sigmas, .. } => (sigmas[0] as f64, sigmas[sigmas.len() - 1] as f64),
            NoiseSpace::Flow {
                num_train_timesteps,
            } => {
                // s in [1/T, 1): sigma = s / (1 - s); s = 1 is pure noise (infinite sigma).
                let t = *num_train_timesteps as f64;
                let s_max = (t - 1.0) / t;
                ((1.0 / t) / (1.0 - 1.0 / t), s_max / (1.0 - s_max))
            }
        }
    }

    /// The model's timestep input for a sigma-space `sigma`: diffusers' `_sigma_to_t` (linear
    /// interpolation of the timestep in log-sigma) for the DDPM family, `s * T` for flow.
    pub fn timestep(&self, sigma: f64) -> f64 {
        match &self.space {
            NoiseSpace::Vp { sigmas, .. } => {
                let ls = sigma.max(1e-10).ln();
                let logs: Vec<f64> = sigmas.iter().map(|s| (*s as f64).ln()).collect();
                let n = logs.len();
                let low = logs
                    .iter()
                    .rposition(|l| ls - l >= 0.0)
                    .unwrap_or(0)
                    .min(n - 2);
                let (lo, hi) = (logs[low], logs[low + 1]);
                let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
                (1.0 - w) * low as f64 + w * (low + 1) as f64
            }
            NoiseSpace::Flow {
                num_train_timesteps,
            } => {
                let s = if sigma.is_infinite() {
                    1.0
                } else {
                    sigma / (1.0 + sigma)
                };
                s * *num_train_timesteps as f64
            }
        }
    }

    /// `D(x, sigma)`: `x` `[N, C, H, W]` in sigma-space, `sigma` and `timestep` `[N]` (the model's
    /// timestep for each sigma, see [`Self::timestep`]), labels as [`UNet2DModel::forward`].
    pub fn x0<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        sigma: &B::T,
        timestep: &B::T,
        labels: Option<&B::T>,
    ) -> Result<B::T> {
        let s = b.reshape(sigma, &[-1, 1, 1, 1])?;
        let one = b.constant(&[1.0], &[1])?;
        match &self.space {
            NoiseSpace::Vp { prediction, .. } => {
                let c_in = b.div(&one, &b.sqrt(&b.affine(&b.mul(&s, &s)?, 1.0, 1.0)?)?)?;
                let out = self
                    .unet
                    .forward(b, &b.mul(x, &c_in)?, self.side, timestep, labels)?;
                match prediction {
                    Prediction::Epsilon => b.sub(x, &b.mul(&out, &s)?),
                    Prediction::Sample => Ok(out),
                    // x0 = alpha x_t - sigma_t v, alpha = c_in, sigma_t = sigma c_in, x_t = c_in x.
                    Prediction::VPrediction => b.sub(
                        &b.mul(x, &b.mul(&c_in, &c_in)?)?,
                        &b.mul(&out, &b.mul(&s, &c_in)?)?,
                    ),
                }
            }
            NoiseSpace::Flow { .. } => {
                let inv = b.div(&one, &b.affine(&s, 1.0, 1.0)?)?; // 1 - s_flow = 1 / (1 + sigma)
                let x_t = b.mul(x, &inv)?;
                let out = self.unet.forward(b, &x_t, self.side, timestep, labels)?;
                // x0 = x_t - s v, s = sigma / (1 + sigma)
                b.sub(&x_t, &b.mul(&out, &b.mul(&s, &inv)?)?)
            }
        }
    }
}

/// The parameterisation a diffusers scheduler config describes, in our sigma-space terms: the
/// DDPM family as VP with the scheduler's own beta table and prediction type, the flow scheduler
/// as rectified flow with its shift. A zero-terminal-SNR schedule is refused (its last sigma is
/// infinite, so no sampler can start from it here).
pub fn parameterisation(s: &Scheduler) -> Result<crate::Parameterisation> {
    use crate::schedule::{BetaSchedule, FlowSchedule, Parameterisation, VpSchedule};
    let vp = |b: &crate::schedulers::BetaConfig, prediction| {
        if b.rescale_betas_zero_snr {
            bail!(
                "{}: rescale_betas_zero_snr = true gives an infinite terminal sigma; not supported \
                 as a teacher's schedule",
                s.class_name()
            );
        }
        Ok(Parameterisation::Vp(VpSchedule {
            num_timesteps: b.num_train_timesteps,
            beta_start: b.beta_start,
            beta_end: b.beta_end,
            beta_schedule: BetaSchedule::Linear,
            prediction,
            trained_betas: Some(b.betas().into_iter().map(f64::from).collect()),
        }))
    };
    match s {
        Scheduler::Ddpm(d) => vp(&d.betas, d.prediction),
        Scheduler::Ddim(d) => vp(&d.betas, d.prediction),
        Scheduler::Euler(d) => vp(&d.betas, d.prediction),
        Scheduler::DpmMultistep(d) => vp(&d.betas, d.prediction),
        Scheduler::FlowMatchEuler(f) => Ok(Parameterisation::Flow(FlowSchedule {
            num_timesteps: f.num_train_timesteps,
            shift: f.shift,
            ..Default::default()
        })),
    }
}

/// Our sampler for a diffusers scheduler: DDIM -> `ddim`, DDPM -> `ddim` (its deterministic
/// ODE counterpart), Euler and FlowMatchEuler -> `euler`, DPM-Solver++ 2M -> `heun` (our
/// second-order ODE solver). `--sampler` overrides it.
pub fn sampler_for(s: &Scheduler) -> crate::SamplerKind {
    use crate::SamplerKind;
    match s {
        Scheduler::Ddpm(_) | Scheduler::Ddim(_) => SamplerKind::Ddim,
        Scheduler::Euler(_) | Scheduler::FlowMatchEuler(_) => SamplerKind::Euler,
        Scheduler::DpmMultistep(_) => SamplerKind::Heun,
    }
}

/// A `DDIMScheduler` config (`scheduler_config.json`) under which diffusers' own sampling loop
/// runs the sampler of `spec` on a VP model: `timestep_spacing = "trailing"` (so
/// `set_timesteps(k)` gives `T-1, T-1-T/k, ...`, DMD2's and TDM's 999, 749, 499, 249 at k = 4),
/// the model's beta table as `trained_betas`, its `prediction_type`, `set_alpha_to_one` (the
/// last step returns x0) and `eta = 0` (deterministic re-noising: TDM's, and any 1-step
/// student's). A student whose steps are not those timesteps, or that re-noises with fresh noise
/// between several steps (DMD2's multi-step sampler: diffusers has no such scheduler), is
/// refused with the reason. Returns the config and the number of steps to sample with.
pub fn ddim_scheduler_for(
    param: &crate::Parameterisation,
    spec: &crate::GeneratorSpec,
) -> Result<(serde_json::Value, usize)> {
    use crate::schedulers::betas::{int_timesteps, Spacing};
    use crate::{Parameterisation, SamplerKind};
    let v = match param {
        Parameterisation::Vp(v) => v,
        other => bail!(
            "--format diffusers writes DDPM-family (vp) models with a DDIMScheduler; this model \
             is {}: its steps are not what a diffusers scheduler's set_timesteps gives, so \
             diffusers would not run its sampler. Export ONNX instead (distill export CKPT)",
            other.name()
        ),
    };
    let t = v.num_timesteps;
    let steps = if spec.sampler == SamplerKind::Student {
        let k = spec.sigmas.len();
        if spec.fresh_noise && k > 1 {
            bail!(
                "a {k}-step student that re-noises with fresh noise between steps (DMD2's \
                 multi-step sampler) has no diffusers scheduler; export a 1-step DMD2 or a TDM \
                 student with --format diffusers, or this one as ONNX"
            );
        }
        let sig = v.sigmas();
        let want: Vec<f64> = int_timesteps(Spacing::Trailing, t, k, 0)
            .into_iter()
            .map(|i| sig[i as usize])
            .collect();
        let same = want
            .iter()
            .zip(&spec.sigmas)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0));
        if !same {
            bail!(
                "the student's step sigmas {:?} are not the sigmas of DDIM's trailing timesteps \
                 {:?} for {k} steps (what diffusers' set_timesteps({k}) gives): distil with \
                 --timesteps {} to export it with --format diffusers",
                spec.sigmas,
                want,
                int_timesteps(Spacing::Trailing, t, k, 0)
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        k
    } else {
        spec.steps
    };
    let prediction = match v.prediction {
        Prediction::Epsilon => "epsilon",
        Prediction::VPrediction => "v_prediction",
        Prediction::Sample => "sample",
    };
    let cfg = serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": super::save::DIFFUSERS_VERSION,
        "num_train_timesteps": t,
        "beta_start": v.beta_start,
        "beta_end": v.beta_end,
        "beta_schedule": "linear",
        "trained_betas": v.betas(),
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": true,
        "steps_offset": 0,
        "prediction_type": prediction,
        "thresholding": false,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": false,
    });
    Ok((cfg, steps))
}

/// The sigma grid diffusers' scheduler walks for `steps` inference steps, for our ODE samplers
/// ([`crate::sampler::sample_ode_grid`]): the descending sigmas of `set_timesteps(steps)` and the
/// sigma the last step ends at. DDIM (eta 0) and DDPM (as its deterministic DDIM counterpart):
/// the VP sigma of each timestep, ending at 0 with `set_alpha_to_one` (DDPM: always) or at
/// `alphas_cumprod[0]`'s sigma without it, as diffusers' last DDIM step does; Euler and the flow
/// scheduler: their own `sigmas`. A DDIM `eta` != 0 (stochastic) or DPM-Solver (its grid is
/// not its update rule) is refused by name.
pub fn scheduler_grid(s: &Scheduler, steps: usize) -> Result<(Vec<f64>, f64)> {
    let mut s = s.clone();
    s.set_timesteps(steps)?;
    let vp_sigma = |acp: &[f32], t: f32| -> f64 {
        let a = acp[t as usize] as f64;
        ((1.0 - a) / a).sqrt()
    };
    match &s {
        Scheduler::Ddim(d) => {
            if d.eta != 0.0 {
                bail!(
                    "DDIMScheduler eta = {}: stochastic; our ODE sampler follows eta = 0 only",
                    d.eta
                );
            }
            let g = s
                .timesteps()
                .iter()
                .map(|&t| vp_sigma(&d.alphas_cumprod, t))
                .collect();
            let last = if d.set_alpha_to_one {
                0.0
            } else {
                vp_sigma(&d.alphas_cumprod, 0.0)
            };
            Ok((g, last))
        }
        Scheduler::Ddpm(d) => Ok((
            s.timesteps()
                .iter()
                .map(|&t| vp_sigma(&d.alphas_cumprod, t))
                .collect(),
            0.0,
        )),
        Scheduler::Euler(_) | Scheduler::FlowMatchEuler(_) => {
            let sig = s.sigmas().expect("these schedulers have sigmas");
            let flow = matches!(s, Scheduler::FlowMatchEuler(_));
            // Flow: diffusers' sigma is s in [0, 1]; ours is s / (1 - s).
            let conv = |x: f32| -> f64 {
                let x = x as f64;
                if flow {
                    x / (1.0 - x)
                } else {
                    x
                }
            };
            let g: Vec<f64> = sig[..sig.len() - 1].iter().map(|&x| conv(x)).collect();
            Ok((g, conv(sig[sig.len() - 1])))
        }
        Scheduler::DpmMultistep(_) => bail!(
            "DPMSolverMultistepScheduler: its grid is not its update rule; sample on our own grid \
             (no scheduler grid)"
        ),
    }
}
