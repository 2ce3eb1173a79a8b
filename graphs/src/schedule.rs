//! Noise schedules and preconditioning, in closed form (host-side f64).
//!
//! Everything is expressed in sigma-space (the "variance exploding" view of EDM): a noisy sample is
//! `x = x0 + sigma * eps`. A VP/DDPM model at timestep `t` sees `x_t = sqrt(alpha_bar_t) * x`,
//! with `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`; a rectified-flow model at time `s`
//! sees `x_t = (1 - s) x0 + s eps = x / (1 + sigma)` with `sigma = s / (1 - s)`. So one sampler
//! serves all three.

use crate::schedulers::Prediction;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `beta_t` linear from `beta_start` to `beta_end` (DDPM).
    Linear,
    /// `sqrt(beta_t)` linear (Stable Diffusion's "scaled_linear").
    ScaledLinear,
}

/// How the network's output becomes a denoised image; stored with the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Parameterisation {
    /// EDM (Karras et al. 2022) preconditioned denoiser D(x, sigma) -> x0.
    Edm(EdmSchedule),
    /// VP/DDPM on discrete timesteps, the network predicting eps, v or x0 (`prediction`).
    Vp(VpSchedule),
    /// Rectified flow: `x_t = (1 - s) x0 + s eps`, the network predicts the velocity `eps - x0`
    /// at timestep `s * T`. In sigma-space `s = sigma / (1 + sigma)`, `x = x_t / (1 - s)`.
    Flow(FlowSchedule),
}

/// How flow training draws `s` (before the shift).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowTimeDist {
    Uniform,
    /// `s = sigmoid(mean + std * n)` (SD3's logit-normal).
    LogitNormal {
        mean: f64,
        std: f64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowSchedule {
    /// `T`: the network's timestep is `s * T` (diffusers' `num_train_timesteps`).
    pub num_timesteps: usize,
    /// `s -> shift s / (1 + (shift - 1) s)` on training draws and sampling grids (1 = none).
    pub shift: f64,
    pub t_dist: FlowTimeDist,
}

impl Default for FlowSchedule {
    fn default() -> Self {
        Self {
            num_timesteps: 1000,
            shift: 1.0,
            t_dist: FlowTimeDist::LogitNormal {
                mean: 0.0,
                std: 1.0,
            },
        }
    }
}

impl FlowSchedule {
    pub fn shifted(&self, s: f64) -> f64 {
        self.shift * s / (1.0 + (self.shift - 1.0) * s)
    }
    /// Largest `s` of the grid (`T / (T + 1)`): `s = 1` is infinite sigma.
    pub fn s_max(&self) -> f64 {
        let t = self.num_timesteps as f64;
        t / (t + 1.0)
    }
    pub fn sigma(s: f64) -> f64 {
        s / (1.0 - s)
    }
    pub fn s(sigma: f64) -> f64 {
        if sigma.is_infinite() {
            1.0
        } else {
            sigma / (1.0 + sigma)
        }
    }
    /// The network's timestep for a sigma: `s * T`.
    pub fn timestep(&self, sigma: f64) -> f64 {
        Self::s(sigma) * self.num_timesteps as f64
    }
    /// `n` sampling sigmas, descending: `s` evenly spaced from `s_max` down (shifted), as
    /// diffusers' FlowMatchEuler spaces them, without the final 0.
    pub fn sampling_sigmas(&self, n: usize) -> Vec<f64> {
        let top = self.s_max();
        (0..n)
            .map(|i| Self::sigma(self.shifted(top * (1.0 - i as f64 / n as f64))))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdmSchedule {
    pub sigma_data: f64,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    /// Training sigma: ln(sigma) ~ N(p_mean, p_std^2).
    pub p_mean: f64,
    pub p_std: f64,
}

impl Default for EdmSchedule {
    fn default() -> Self {
        Self {
            sigma_data: 0.5,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
            p_mean: -1.2,
            p_std: 1.2,
        }
    }
}

impl EdmSchedule {
    pub fn c_skip(&self, sigma: f64) -> f64 {
        let sd2 = self.sigma_data * self.sigma_data;
        sd2 / (sigma * sigma + sd2)
    }
    pub fn c_out(&self, sigma: f64) -> f64 {
        sigma * self.sigma_data / (sigma * sigma + self.sigma_data * self.sigma_data).sqrt()
    }
    pub fn c_in(&self, sigma: f64) -> f64 {
        1.0 / (sigma * sigma + self.sigma_data * self.sigma_data).sqrt()
    }
    pub fn c_noise(&self, sigma: f64) -> f64 {
        sigma.ln() / 4.0
    }
    /// EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2.
    pub fn loss_weight(&self, sigma: f64) -> f64 {
        let sd = self.sigma_data;
        (sigma * sigma + sd * sd) / (sigma * sd).powi(2)
    }
    /// Karras et al. eq. 5: `n` sigmas from sigma_max down to sigma_min (no trailing zero).
    pub fn karras_sigmas(&self, n: usize) -> Vec<f64> {
        karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
    }
}

pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    if n == 1 {
        return vec![sigma_max];
    }
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    (0..n)
        .map(|i| (a + i as f64 / (n - 1) as f64 * (b - a)).powf(rho))
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VpSchedule {
    pub num_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// What the network predicts: eps (default), v or x0.
    #[serde(default, skip_serializing_if = "is_epsilon")]
    pub prediction: Prediction,
    /// An explicit beta table (a diffusers scheduler's: squaredcos, trained betas) that
    /// replaces `beta_start` / `beta_end` / `beta_schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
}

fn is_epsilon(p: &Prediction) -> bool {
    *p == Prediction::Epsilon
}

impl Default for VpSchedule {
    fn default() -> Self {
        Self {
            num_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 2e-2,
            beta_schedule: BetaSchedule::Linear,
            prediction: Prediction::Epsilon,
            trained_betas: None,
        }
    }
}

impl VpSchedule {
    pub fn betas(&self) -> Vec<f64> {
        if let Some(t) = &self.trained_betas {
            return t.clone();
        }
        let n = self.num_timesteps;
        let lin = |a: f64, b: f64, i: usize| {
            if n == 1 {
                a
            } else {
                a + (b - a) * i as f64 / (n - 1) as f64
            }
        };
        (0..n)
            .map(|i| match self.beta_schedule {
                BetaSchedule::Linear => lin(self.beta_start, self.beta_end, i),
                BetaSchedule::ScaledLinear => {
                    lin(self.beta_start.sqrt(), self.beta_end.sqrt(), i).powi(2)
                }
            })
            .collect()
    }
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut acc = 1.0;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }
    /// sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every timestep.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod()
            .into_iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }
    /// Continuous timestep for a sigma, by linear interpolation of ln(sigma) over the grid.
    pub fn t_from_sigma(&self, sigma: f64) -> f64 {
        let s: Vec<f64> = self.sigmas().into_iter().map(f64::ln).collect();
        let ls = sigma.ln();
        if ls <= s[0] {
            return 0.0;
        }
        for i in 1..s.len() {
            if ls <= s[i] {
                return (i - 1) as f64 + (ls - s[i - 1]) / (s[i] - s[i - 1]);
            }
        }
        (s.len() - 1) as f64
    }
    /// Evenly spaced DDIM timesteps, descending (`T-1`, ..., like diffusers' "leading" spacing + offset).
    pub fn ddim_timesteps(&self, n: usize) -> Vec<usize> {
        let t = self.num_timesteps;
        (0..n)
            .map(|i| ((t - 1) as f64 * (1.0 - i as f64 / n as f64)).round() as usize)
            .collect()
    }
}

impl Parameterisation {
    pub fn edm() -> Self {
        Self::Edm(EdmSchedule::default())
    }
    pub fn vp(beta_schedule: BetaSchedule) -> Self {
        Self::Vp(VpSchedule {
            beta_schedule,
            ..Default::default()
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Edm(_) => "edm",
            Self::Vp(_) => "vp",
            Self::Flow(_) => "flow",
        }
    }
    /// Largest sigma the model is trained on (where sampling from pure noise starts).
    pub fn sigma_max(&self) -> f64 {
        match self {
            Self::Edm(e) => e.sigma_max,
            Self::Vp(v) => *v.sigmas().last().expect("non-empty schedule"),
            Self::Flow(f) => FlowSchedule::sigma(f.s_max()),
        }
    }
    /// The network's noise conditioning for a sigma: ln(sigma)/4 (EDM) or the timestep (VP,
    /// flow).
    pub fn c_noise(&self, sigma: f64) -> f64 {
        match self {
            Self::Edm(e) => e.c_noise(sigma),
            Self::Vp(v) => v.t_from_sigma(sigma),
            Self::Flow(f) => f.timestep(sigma),
        }
    }
}

/// The discrete grid of noise levels that distillation draws its timesteps from: 1000 bins,
/// index 0 the least noisy. EDM: the Karras grid from `sigma_min` to `sigma_max` (as in DMD2's EDM
/// code); VP: the DDPM schedule's own timesteps; flow: `s = (t + 1) / (T + 1)` (so `t = 999` is
/// sigma 1000, not the infinite sigma of `s = 1`). A "timestep" in the distillation configs is an
/// index into this grid, for every parameterisation.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseGrid {
    /// Ascending sigmas, one per timestep.
    pub sigmas: Vec<f64>,
    param: Parameterisation,
}

/// Timesteps of the EDM grid (DMD2 uses 1000 Karras bins; VP uses its own schedule length).
pub const EDM_GRID_BINS: usize = 1000;

impl NoiseGrid {
    pub fn new(param: &Parameterisation) -> Self {
        let sigmas = match param {
            Parameterisation::Edm(e) => {
                let mut s = e.karras_sigmas(EDM_GRID_BINS);
                s.reverse();
                s
            }
            Parameterisation::Vp(v) => v.sigmas(),
            // s = (t + 1) / (T + 1): T bins short of s = 1 (infinite sigma).
            Parameterisation::Flow(f) => {
                let t = f.num_timesteps as f64;
                (0..f.num_timesteps)
                    .map(|i| FlowSchedule::sigma((i + 1) as f64 / (t + 1.0)))
                    .collect()
            }
        };
        Self {
            sigmas,
            param: param.clone(),
        }
    }
    /// Number of timesteps (`T`); valid timesteps are `0..T`.
    pub fn len(&self) -> usize {
        self.sigmas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.sigmas.is_empty()
    }
    pub fn sigma(&self, t: usize) -> f64 {
        self.sigmas[t]
    }
    /// The network's conditioning at timestep `t`: ln(sigma)/4 (EDM) or `t` itself (VP).
    pub fn c_noise(&self, t: usize) -> f64 {
        match &self.param {
            Parameterisation::Edm(e) => e.c_noise(self.sigmas[t]),
            Parameterisation::Vp(_) => t as f64,
            Parameterisation::Flow(f) => f.timestep(self.sigmas[t]),
        }
    }
    /// Signal-to-noise ratio `1 / sigma^2` (VP: `alpha_bar / (1 - alpha_bar)`, the same number).
    pub fn snr(&self, t: usize) -> f64 {
        1.0 / (self.sigmas[t] * self.sigmas[t])
    }
    /// Sigmas of a list of timesteps.
    pub fn sigmas_of(&self, ts: &[usize]) -> Vec<f64> {
        ts.iter().map(|&t| self.sigmas[t]).collect()
    }
}
