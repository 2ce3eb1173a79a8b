//! diffusers schedulers from `scheduler_config.json`: `DDPMScheduler`, `DDIMScheduler`,
//! `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler` and
//! `FlowMatchEulerDiscreteScheduler`, each `set_timesteps` + `step` as diffusers computes them.
//!
//! Tables (betas, alphas_cumprod, timesteps, sigmas) are computed the way torch/numpy do, so they
//! equal diffusers' bit for bit; a `step` is written against [`Backend`] with host scalars
//! (diffusers' f32 scalars), so a sampling loop runs on candle or lowers to ONNX.
//! Steps are addressed by index into `timesteps` (diffusers looks the timestep up by value: the
//! same for the distinct timesteps every supported spacing gives).

pub mod betas;
pub mod ddim;
pub mod ddpm;
pub mod dpm;
pub mod euler;
pub mod flow;

pub use betas::{BetaConfig, BetaSchedule, Prediction, Spacing};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm::DpmMultistep;
pub use euler::Euler;
pub use flow::FlowMatchEuler;

use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Context, Result};

/// `a * x + c * y`.
pub(crate) fn lin<B: Backend>(b: &B, x: &B::T, a: f64, y: &B::T, c: f64) -> Result<B::T> {
    b.add(&b.affine(x, a, 0.0)?, &b.affine(y, c, 0.0)?)
}

pub(crate) fn clip<B: Backend>(b: &B, x: B::T, range: Option<f64>) -> Result<B::T> {
    match range {
        Some(r) => b.clamp(&x, -r, r),
        None => Ok(x),
    }
}

/// x0 from a DDPM-family model output at `alpha_cumprod = a_t` (f32 scalars as diffusers).
pub(crate) fn x0_from<B: Backend>(
    b: &B,
    p: Prediction,
    model_output: &B::T,
    sample: &B::T,
    a_t: f32,
) -> Result<B::T> {
    let (sa, sb) = (a_t.sqrt() as f64, (1.0 - a_t).sqrt() as f64);
    match p {
        Prediction::Epsilon => b.affine(&lin(b, sample, 1.0, model_output, -sb)?, 1.0 / sa, 0.0),
        Prediction::Sample => Ok(model_output.clone()),
        Prediction::VPrediction => lin(b, sample, sa, model_output, -sb),
    }
}

/// What a multistep scheduler remembers between steps (DPM-Solver's previous model outputs).
#[derive(Clone, Debug)]
pub struct StepState<T> {
    pub outputs: Vec<T>,
    pub lower_order_nums: usize,
}

impl<T> Default for StepState<T> {
    fn default() -> Self {
        Self {
            outputs: Vec::new(),
            lower_order_nums: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Scheduler {
    Ddpm(Ddpm),
    Ddim(Ddim),
    Euler(Euler),
    DpmMultistep(DpmMultistep),
    FlowMatchEuler(FlowMatchEuler),
}

impl Scheduler {
    /// Parses a `scheduler_config.json` object (its `_class_name` picks the scheduler). Absent
    /// keys take diffusers' defaults; unsupported values and unknown keys are errors naming them.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut r = Reader::new(v, "scheduler_config.json")?;
        let class = r
            .map
            .get("_class_name")
            .and_then(|c| c.as_str())
            .context("scheduler_config.json: no _class_name")?;
        let s = match class {
            "DDPMScheduler" => Self::Ddpm(Ddpm::read(&mut r)?),
            "DDIMScheduler" => Self::Ddim(Ddim::read(&mut r)?),
            "EulerDiscreteScheduler" => Self::Euler(Euler::read(&mut r)?),
            "DPMSolverMultistepScheduler" => Self::DpmMultistep(DpmMultistep::read(&mut r)?),
            "FlowMatchEulerDiscreteScheduler" => {
                Self::FlowMatchEuler(FlowMatchEuler::read(&mut r)?)
            }
            c => bail!(
                "scheduler_config.json: unsupported _class_name = {c} (supported: DDPMScheduler, \
                 DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, \
                 FlowMatchEulerDiscreteScheduler)"
            ),
        };
        r.finish(class)?;
        Ok(s)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            crate::json::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Ddpm(_) => "DDPMScheduler",
            Self::Ddim(_) => "DDIMScheduler",
            Self::Euler(_) => "EulerDiscreteScheduler",
            Self::DpmMultistep(_) => "DPMSolverMultistepScheduler",
            Self::FlowMatchEuler(_) => "FlowMatchEulerDiscreteScheduler",
        }
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        match self {
            Self::Ddpm(s) => s.set_timesteps(n),
            Self::Ddim(s) => s.set_timesteps(n),
            Self::Euler(s) => s.set_timesteps(n),
            Self::DpmMultistep(s) => s.set_timesteps(n),
            Self::FlowMatchEuler(s) => s.set_timesteps(n),
        }
    }

    /// The model's timestep input at each step (diffusers' `scheduler.timesteps`, as f32).
    pub fn timesteps(&self) -> Vec<f32> {
        match self {
            Self::Ddpm(s) => s.timesteps.iter().map(|&t| t as f32).collect(),
            Self::Ddim(s) => s.timesteps.iter().map(|&t| t as f32).collect(),
            Self::Euler(s) => s.timesteps.clone(),
            Self::DpmMultistep(s) => s.timesteps.iter().map(|&t| t as f32).collect(),
            Self::FlowMatchEuler(s) => s.timesteps.clone(),
        }
    }

    /// `scheduler.sigmas` where the scheduler has them (steps + 1 values).
    pub fn sigmas(&self) -> Option<&[f32]> {
        match self {
            Self::Euler(s) => Some(&s.sigmas),
            Self::DpmMultistep(s) => Some(&s.sigmas),
            Self::FlowMatchEuler(s) => Some(&s.sigmas),
            Self::Ddpm(_) | Self::Ddim(_) => None,
        }
    }

    /// `init_noise_sigma`: the scale of the initial Gaussian sample.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Self::Euler(s) => s.init_noise_sigma(),
            _ => 1.0,
        }
    }

    /// `scale_model_input`: what the model sees at step `i`.
    pub fn scale_model_input<B: Backend>(&self, b: &B, x: &B::T, i: usize) -> Result<B::T> {
        match self {
            Self::Euler(s) => s.scale_model_input(b, x, i),
            _ => Ok(x.clone()),
        }
    }

    /// Whether `step(i, ..)` draws noise (then pass it as `noise`).
    pub fn needs_noise(&self, i: usize) -> bool {
        match self {
            Self::Ddpm(s) => s.needs_noise(i),
            Self::Ddim(s) => s.needs_noise(i),
            Self::FlowMatchEuler(s) => s.needs_noise(i),
            Self::Euler(_) | Self::DpmMultistep(_) => false,
        }
    }

    /// One step from `sample` at step `i` to the next sample.
    pub fn step<B: Backend>(
        &self,
        b: &B,
        state: &mut StepState<B::T>,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
        noise: Option<&B::T>,
    ) -> Result<B::T> {
        let n = self.timesteps().len();
        if i >= n {
            bail!(
                "{}: step {i} of {n} (set_timesteps first)",
                self.class_name()
            );
        }
        match self {
            Self::Ddpm(s) => s.step(b, i, model_output, sample, noise),
            Self::Ddim(s) => s.step(b, i, model_output, sample, noise),
            Self::Euler(s) => s.step(b, i, model_output, sample),
            Self::DpmMultistep(s) => s.step(b, state, i, model_output, sample),
            Self::FlowMatchEuler(s) => s.step(b, i, model_output, sample, noise),
        }
    }
}
