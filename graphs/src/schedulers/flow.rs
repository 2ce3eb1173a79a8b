//! `FlowMatchEulerDiscreteScheduler`: rectified flow `x_t = (1 - s) x0 + s eps`, the model
//! predicts the velocity `eps - x0`, a static `shift` (no dynamic shifting).

use super::betas::np_linspace;
use super::lin;
use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct FlowMatchEuler {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub shift_terminal: Option<f64>,
    pub stochastic_sampling: bool,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

impl FlowMatchEuler {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let t = r.usize_or("num_train_timesteps", 1000)?;
        let shift = r.f64_or("shift", 1.0)?;
        r.require("use_dynamic_shifting", &false.into())?;
        // Only read by dynamic shifting, refused above.
        for k in ["base_shift", "max_shift"] {
            r.f64_opt(k)?;
        }
        for k in ["base_image_seq_len", "max_image_seq_len"] {
            r.usize_opt(k)?;
        }
        r.choice("time_shift_type", &["exponential", "linear"])?;
        r.require("invert_sigmas", &false.into())?;
        for k in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            r.require(k, &false.into())?;
        }
        let shift_terminal = r.f64_opt("shift_terminal")?.filter(|v| *v != 0.0);
        let stochastic_sampling = r.bool_or("stochastic_sampling", false)?;
        if t == 0 {
            bail!("{}: num_train_timesteps must be positive", r.file);
        }
        // __init__'s table in f32: sigmas = shift s / (1 + (shift - 1) s), s = (1..=T) / T.
        let sh = |s: f32| (shift as f32) * s / (1.0 + (shift - 1.0) as f32 * s);
        // s = T / T = 1 exactly in f32.
        let sigma_max = sh(1.0) as f64;
        let sigma_min = sh(1.0 / t as f32) as f64;
        Ok(Self {
            num_train_timesteps: t,
            shift,
            shift_terminal,
            stochastic_sampling,
            sigma_min,
            sigma_max,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            bail!("FlowMatchEulerDiscreteScheduler: 0 inference steps");
        }
        let tt = self.num_train_timesteps as f64;
        let ts = np_linspace(self.sigma_max * tt, self.sigma_min * tt, n);
        let mut s: Vec<f64> = ts
            .iter()
            .map(|t| {
                let s = t / tt;
                self.shift * s / (1.0 + (self.shift - 1.0) * s)
            })
            .collect();
        if let Some(term) = self.shift_terminal {
            let k = (1.0 - s[n - 1]) / (1.0 - term);
            for x in &mut s {
                *x = 1.0 - (1.0 - *x) / k;
            }
        }
        let mut s: Vec<f32> = s.into_iter().map(|x| x as f32).collect();
        self.timesteps = s
            .iter()
            .map(|x| x * self.num_train_timesteps as f32)
            .collect();
        s.push(0.0);
        self.sigmas = s;
        Ok(())
    }

    pub fn needs_noise(&self, _i: usize) -> bool {
        self.stochastic_sampling
    }

    pub fn step<B: Backend>(
        &self,
        b: &B,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
        noise: Option<&B::T>,
    ) -> Result<B::T> {
        let (s, next) = (self.sigmas[i], self.sigmas[i + 1]);
        if self.stochastic_sampling {
            let Some(z) = noise else {
                bail!(
                    "FlowMatchEulerDiscreteScheduler: stochastic_sampling needs noise at step {i}"
                )
            };
            let x0 = lin(b, sample, 1.0, model_output, -(s as f64))?;
            return lin(b, &x0, (1.0 - next) as f64, z, next as f64);
        }
        lin(b, sample, 1.0, model_output, (next - s) as f64)
    }
}
