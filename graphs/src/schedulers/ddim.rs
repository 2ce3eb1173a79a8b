//! `DDIMScheduler` (`eta` is a call parameter in diffusers; here a field, default 0).

use super::betas::{int_timesteps, BetaConfig, Prediction, Spacing};
use super::{clip, lin};
use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct Ddim {
    pub betas: BetaConfig,
    pub prediction: Prediction,
    pub clip: Option<f64>,
    pub set_alpha_to_one: bool,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub eta: f64,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<i64>,
}

impl Ddim {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let betas = BetaConfig::read(r)?;
        let clip_on = r.bool_or("clip_sample", true)?;
        let range = r.f64_or("clip_sample_range", 1.0)?;
        r.require("thresholding", &false.into())?;
        r.f64_opt("dynamic_thresholding_ratio")?;
        r.f64_opt("sample_max_value")?;
        Ok(Self {
            prediction: Prediction::read(r)?,
            clip: clip_on.then_some(range),
            set_alpha_to_one: r.bool_or("set_alpha_to_one", true)?,
            spacing: Spacing::read(r, "leading")?,
            steps_offset: r.i64_or("steps_offset", 0)?,
            eta: 0.0,
            alphas_cumprod: betas.alphas_cumprod(),
            betas,
            timesteps: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.betas.num_train_timesteps;
        if n == 0 || n > t {
            bail!("DDIMScheduler: {n} inference steps for {t} training timesteps");
        }
        self.timesteps = int_timesteps(self.spacing, t, n, self.steps_offset);
        Ok(())
    }

    fn final_alpha(&self) -> f32 {
        if self.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
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
        // diffusers: the previous timestep is t - T / n whatever the spacing.
        let prev = t - (self.betas.num_train_timesteps / self.timesteps.len()) as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha()
        };
        let beta_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt() as f64, beta_t.sqrt() as f64);
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (
                b.affine(&lin(b, sample, 1.0, model_output, -sb)?, 1.0 / sa, 0.0)?,
                model_output.clone(),
            ),
            Prediction::Sample => (
                model_output.clone(),
                b.affine(&lin(b, sample, 1.0, model_output, -sa)?, 1.0 / sb, 0.0)?,
            ),
            Prediction::VPrediction => (
                lin(b, sample, sa, model_output, -sb)?,
                lin(b, model_output, sa, sample, sb)?,
            ),
        };
        let x0 = clip(b, x0, self.clip)?;
        let var = (1.0 - a_prev) / beta_t * (1.0 - a_t / a_prev);
        let std = (self.eta as f32) * var.sqrt();
        let dir = (1.0 - a_prev - std * std).sqrt();
        let out = lin(b, &x0, a_prev.sqrt() as f64, &eps, dir as f64)?;
        if self.eta > 0.0 {
            let Some(z) = noise else {
                bail!("DDIMScheduler: eta > 0 needs noise at step {i}")
            };
            return b.add(&out, &b.affine(z, std as f64, 0.0)?);
        }
        Ok(out)
    }

    pub fn needs_noise(&self, _i: usize) -> bool {
        self.eta > 0.0
    }
}
