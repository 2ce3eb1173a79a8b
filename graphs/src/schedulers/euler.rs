//! `EulerDiscreteScheduler` (deterministic: diffusers' `s_churn` = 0 default).

use super::betas::{np_arange, np_interp_index, np_linspace, BetaConfig, Prediction, Spacing};
use super::lin;
use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct Euler {
    pub betas: BetaConfig,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: i64,
    /// `final_sigmas_type: sigma_min` (else zero).
    pub final_sigma_min: bool,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// `timesteps.len() + 1` values, the last the final sigma.
    pub sigmas: Vec<f32>,
}

/// `((1 - acp) / acp) ** 0.5` in f32.
pub fn train_sigmas(acp: &[f32]) -> Vec<f32> {
    acp.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// The sampling sigmas at (possibly fractional) training timesteps, interpolated in the training
/// sigmas (`np.interp(timesteps, arange, sigmas)`), then the final one: the smallest training
/// sigma when `final_sigma_min` (`final_sigmas_type = "sigma_min"`), else 0.
pub fn sigmas_at(
    acp: &[f32],
    timesteps: impl Iterator<Item = f64>,
    final_sigma_min: bool,
) -> Vec<f32> {
    let full = train_sigmas(acp);
    let mut s: Vec<f32> = timesteps
        .map(|x| np_interp_index(x, &full) as f32)
        .collect();
    s.push(if final_sigma_min { full[0] } else { 0.0 });
    s
}

impl Euler {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let betas = BetaConfig::read(r)?;
        let prediction = Prediction::read(r)?;
        r.choice("interpolation_type", &["linear"])?;
        for k in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            r.require(k, &false.into())?;
        }
        // Only read by the Karras / exponential / beta sigma conversions, refused above.
        r.f64_opt("sigma_min")?;
        r.f64_opt("sigma_max")?;
        r.choice("timestep_type", &["discrete"])?;
        let spacing = Spacing::read(r, "linspace")?;
        let steps_offset = r.i64_or("steps_offset", 0)?;
        let final_sigma_min = r.choice("final_sigmas_type", &["zero", "sigma_min"])? == "sigma_min";
        let mut acp = betas.alphas_cumprod();
        if betas.rescale_betas_zero_snr {
            // diffusers: avoid an infinite sigma at the zero-SNR end.
            *acp.last_mut().expect("timesteps") = 2f32.powi(-24);
        }
        Ok(Self {
            betas,
            prediction,
            spacing,
            steps_offset,
            final_sigma_min,
            alphas_cumprod: acp,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.betas.num_train_timesteps;
        if n == 0 {
            bail!("EulerDiscreteScheduler: 0 inference steps");
        }
        self.timesteps = match self.spacing {
            Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|x| x as f32)
                .collect(),
            Spacing::Leading => {
                let r = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * r) as f32 + self.steps_offset as f32)
                    .collect()
            }
            Spacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as f32 - 1.0)
                .collect(),
        };
        let ts = self.timesteps.iter().map(|&x| x as f64);
        self.sigmas = sigmas_at(&self.alphas_cumprod, ts, self.final_sigma_min);
        Ok(())
    }

    pub fn init_noise_sigma(&self) -> f64 {
        let m = self.sigmas.iter().copied().fold(f32::MIN, f32::max);
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => m as f64,
            Spacing::Leading => (m * m + 1.0).sqrt() as f64,
        }
    }

    pub fn scale_model_input<B: Backend>(&self, b: &B, x: &B::T, i: usize) -> Result<B::T> {
        let s = self.sigmas[i];
        b.affine(x, 1.0 / (s * s + 1.0).sqrt() as f64, 0.0)
    }

    pub fn step<B: Backend>(
        &self,
        b: &B,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
    ) -> Result<B::T> {
        let s = self.sigmas[i];
        let x0 = match self.prediction {
            Prediction::Epsilon => lin(b, sample, 1.0, model_output, -(s as f64))?,
            Prediction::Sample => model_output.clone(),
            Prediction::VPrediction => {
                let k = s * s + 1.0;
                lin(
                    b,
                    model_output,
                    (-s / k.sqrt()) as f64,
                    sample,
                    (1.0 / k) as f64,
                )?
            }
        };
        let dt = self.sigmas[i + 1] - s;
        // sample + (sample - x0) / sigma * dt
        let d = b.affine(&b.sub(sample, &x0)?, 1.0 / s as f64, 0.0)?;
        lin(b, sample, 1.0, &d, dt as f64)
    }
}
