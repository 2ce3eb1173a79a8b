//! Noise schedules and preconditioning, in closed form (host-side f64).
//!
//! Everything is expressed in sigma-space (the "variance exploding" view of EDM): a noisy sample is
//! `x = x0 + sigma * eps`. A VP/DDPM model at timestep `t` sees `x_t = sqrt(alpha_bar_t) * x`,
//! with `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`, so one sampler serves both.

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
    /// VP/DDPM with an epsilon-predicting network on discrete timesteps.
    Vp(VpSchedule),
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
}

impl Default for VpSchedule {
    fn default() -> Self {
        Self {
            num_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 2e-2,
            beta_schedule: BetaSchedule::Linear,
        }
    }
}

impl VpSchedule {
    pub fn betas(&self) -> Vec<f64> {
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
        }
    }
    /// Largest sigma the model is trained on (where sampling from pure noise starts).
    pub fn sigma_max(&self) -> f64 {
        match self {
            Self::Edm(e) => e.sigma_max,
            Self::Vp(v) => *v.sigmas().last().expect("non-empty schedule"),
        }
    }
    /// The network's noise conditioning for a sigma: ln(sigma)/4 (EDM) or the timestep (VP).
    pub fn c_noise(&self, sigma: f64) -> f64 {
        match self {
            Self::Edm(e) => e.c_noise(sigma),
            Self::Vp(v) => v.t_from_sigma(sigma),
        }
    }
}

/// The discrete grid of noise levels that distillation draws its timesteps from: 1000 bins,
/// index 0 the least noisy. EDM: the Karras grid from `sigma_min` to `sigma_max` (as in DMD2's EDM
/// code); VP: the DDPM schedule's own timesteps. A "timestep" in the distillation configs is an
/// index into this grid, for both parameterisations.
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
