//! `DDPMScheduler` (ancestral sampling, `variance_type` fixed_small / fixed_small_log /
//! fixed_large).

use super::betas::{int_timesteps, BetaConfig, Prediction, Spacing};
use super::{clip, lin, x0_from};
use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variance {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

#[derive(Clone, Debug)]
pub struct Ddpm {
    pub betas: BetaConfig,
    pub prediction: Prediction,
    pub variance: Variance,
    /// `clip_sample` with `clip_sample_range`.
    pub clip: Option<f64>,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<i64>,
}

impl Ddpm {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let betas = BetaConfig::read(r)?;
        let variance = match r.choice(
            "variance_type",
            &["fixed_small", "fixed_small_log", "fixed_large"],
        )? {
            "fixed_small" => Variance::FixedSmall,
            "fixed_small_log" => Variance::FixedSmallLog,
            _ => Variance::FixedLarge,
        };
        let clip_on = r.bool_or("clip_sample", true)?;
        let range = r.f64_or("clip_sample_range", 1.0)?;
        r.require("thresholding", &false.into())?;
        // Only read by thresholding, which is refused above.
        r.f64_opt("dynamic_thresholding_ratio")?;
        r.f64_opt("sample_max_value")?;
        let s = Self {
            prediction: Prediction::read(r)?,
            variance,
            clip: clip_on.then_some(range),
            spacing: Spacing::read(r, "leading")?,
            steps_offset: r.i64_or("steps_offset", 0)?,
            alphas_cumprod: betas.alphas_cumprod(),
            betas,
            timesteps: Vec::new(),
        };
        Ok(s)
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.betas.num_train_timesteps;
        if n == 0 || n > t {
            bail!("DDPMScheduler: {n} inference steps for {t} training timesteps");
        }
        self.timesteps = int_timesteps(self.spacing, t, n, self.steps_offset);
        Ok(())
    }

    pub fn step<B: Backend>(
        &self,
        b: &B,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
        noise: Option<&B::T>,
    ) -> Result<B::T> {
        let t = self.timesteps[i];
        let prev = self.timesteps.get(i + 1).copied().unwrap_or(-1);
        let acp = |k: i64| self.alphas_cumprod[k as usize];
        // f32 scalars, as diffusers computes them (0-dim f32 tensors).
        let a_t = acp(t);
        let a_prev = if prev >= 0 { acp(prev) } else { 1.0 };
        let (beta_t, beta_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let x0 = x0_from(b, self.prediction, model_output, sample, a_t)?;
        let x0 = clip(b, x0, self.clip)?;
        let c_x0 = a_prev.sqrt() * cur_beta / beta_t;
        let c_s = cur_alpha.sqrt() * beta_prev / beta_t;
        let mut out = lin(b, &x0, c_x0 as f64, sample, c_s as f64)?;
        if t > 0 {
            let Some(z) = noise else {
                bail!("DDPMScheduler: step {i} (timestep {t}) needs noise")
            };
            let var = (beta_prev / beta_t * cur_beta).max(1e-20);
            let std = match self.variance {
                Variance::FixedSmall => var.sqrt(),
                Variance::FixedSmallLog => (0.5 * var.ln()).exp(),
                Variance::FixedLarge => cur_beta.sqrt(),
            };
            out = b.add(&out, &b.affine(z, std as f64, 0.0)?)?;
        }
        Ok(out)
    }

    pub fn needs_noise(&self, i: usize) -> bool {
        self.timesteps[i] > 0
    }
}
