//! The discrete noise schedule every diffusers DDPM-family scheduler builds in `__init__`, and the
//! numpy timestep spacings of `set_timesteps`. Computed the way torch and numpy compute them
//! (f32 `linspace` with its FMA, f32 `1 - beta`, `cumprod` accumulated in f64 and stored in f32;
//! numpy's f64 `linspace`/`arange`/`interp`), so the tables match diffusers bit for bit.

use crate::json::Reader;
use anyhow::{bail, Result};

/// `beta_schedule` (or `trained_betas`).
#[derive(Clone, Debug, PartialEq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
    Trained(Vec<f64>),
}

/// The keys that define the betas.
#[derive(Clone, Debug, PartialEq)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub schedule: BetaSchedule,
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let trained = r.f64_list("trained_betas")?;
        let name = r.choice(
            "beta_schedule",
            &["linear", "scaled_linear", "squaredcos_cap_v2"],
        )?;
        let cfg = Self {
            num_train_timesteps: r.usize_or("num_train_timesteps", 1000)?,
            beta_start: r.f64_or("beta_start", 0.0001)?,
            beta_end: r.f64_or("beta_end", 0.02)?,
            schedule: match (trained, name) {
                (Some(t), _) => BetaSchedule::Trained(t),
                (None, "linear") => BetaSchedule::Linear,
                (None, "scaled_linear") => BetaSchedule::ScaledLinear,
                (None, _) => BetaSchedule::SquaredCosCapV2,
            },
            rescale_betas_zero_snr: r.bool_or("rescale_betas_zero_snr", false)?,
        };
        if cfg.num_train_timesteps < 2 {
            bail!("{}: num_train_timesteps must be at least 2", r.file);
        }
        if let BetaSchedule::Trained(t) = &cfg.schedule {
            if t.len() != cfg.num_train_timesteps {
                bail!(
                    "{}: trained_betas has {} entries for num_train_timesteps = {}",
                    r.file,
                    t.len(),
                    cfg.num_train_timesteps
                );
            }
        }
        Ok(cfg)
    }

    /// `self.betas` (f32).
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let b = match &self.schedule {
            BetaSchedule::Linear => torch_linspace(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|x| x * x)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let f = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - f(t2) / f(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            BetaSchedule::Trained(t) => t.iter().map(|&x| x as f32).collect(),
        };
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&b)
        } else {
            b
        }
    }

    /// `self.alphas_cumprod` (f32).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        cumprod(&self.betas().iter().map(|b| 1.0 - b).collect::<Vec<f32>>())
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: f32 step, each value one FMA from the nearer
/// end (torch's symmetric kernel).
pub fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - i - 1) as f32, e)
            }
        })
        .collect()
}

/// `torch.cumprod` of f32 values: accumulated in f64, each prefix stored as f32.
pub fn cumprod(a: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    a.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in torch's f32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let acp = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    let mut s: Vec<f32> = acp.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let k = s0 / (s0 - st);
    for x in &mut s {
        *x -= st;
        *x *= k;
    }
    let bar: Vec<f32> = s.iter().map(|x| x * x).collect();
    let mut out = vec![1.0 - bar[0]];
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `np.linspace(start, stop, n)` (f64): `i * step + start`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for a float step: `ceil((stop - start) / step)` values
/// `start + i * delta`, `delta = (start + step) - start`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` within range (numpy's slope form).
pub fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub fn read(r: &mut Reader, default: &'static str) -> Result<Self> {
        let ok: &[&'static str] = match default {
            "leading" => &["leading", "linspace", "trailing"],
            _ => &["linspace", "leading", "trailing"],
        };
        Ok(match r.choice("timestep_spacing", ok)? {
            "linspace" => Self::Linspace,
            "leading" => Self::Leading,
            _ => Self::Trailing,
        })
    }
}

/// The integer timesteps of DDPM / DDIM `set_timesteps` (descending).
pub fn int_timesteps(spacing: Spacing, t: usize, n: usize, steps_offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let r = t / n;
            (0..n)
                .rev()
                .map(|i| (i * r) as i64 + steps_offset)
                .collect()
        }
        Spacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `prediction_type` (also what a VP checkpoint of ours records: `epsilon` unless set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    #[default]
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn read(r: &mut Reader) -> Result<Self> {
        Ok(
            match r.choice("prediction_type", &["epsilon", "v_prediction", "sample"])? {
                "epsilon" => Self::Epsilon,
                "v_prediction" => Self::VPrediction,
                _ => Self::Sample,
            },
        )
    }
}
