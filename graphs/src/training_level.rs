//! What a network is conditioned on in its training loss, per parameterisation: EDM a sigma, VP
//! an integer timestep. Trainers draw and build it through these methods, so no caller outside
//! `graphs` branches on [`Parameterisation`].

use crate::sampler::SamplerKind;
use crate::schedule::{FlowSchedule, FlowTimeDist, NoiseGrid, Parameterisation};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;

/// The per-sample noise condition [`crate::losses::teacher_loss`] takes.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainingLevel {
    /// EDM: sigmas `[N]` f32.
    Sigma(Vec<f32>),
    /// VP: timesteps `[N]` u32.
    Timestep(Vec<u32>),
    /// Flow: `s` `[N]` f32 in (0, 1).
    FlowTime(Vec<f32>),
}

impl TrainingLevel {
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Sigma(s) => Tensor::from_vec(s.clone(), s.len(), device),
            Self::Timestep(t) => Tensor::from_vec(t.clone(), t.len(), device),
            Self::FlowTime(s) => Tensor::from_vec(s.clone(), s.len(), device),
        }
    }

    /// The levels of `parts` one after the other (per-sample draws joined into a batch); `None`
    /// when empty or when the parts are of different kinds.
    pub fn concat(parts: Vec<TrainingLevel>) -> Option<TrainingLevel> {
        let mut it = parts.into_iter();
        let mut acc = it.next()?;
        for p in it {
            match (&mut acc, p) {
                (Self::Sigma(a), Self::Sigma(b)) => a.extend(b),
                (Self::Timestep(a), Self::Timestep(b)) => a.extend(b),
                (Self::FlowTime(a), Self::FlowTime(b)) => a.extend(b),
                _ => return None,
            }
        }
        Some(acc)
    }
}

impl Parameterisation {
    /// The teacher loss's noise draw for `n` samples: EDM `ln(sigma) ~ N(p_mean, p_std^2)`, VP
    /// uniform timesteps.
    pub fn draw_training_level<R: Rng>(&self, rng: &mut R, n: usize) -> TrainingLevel {
        match self {
            Self::Edm(e) => TrainingLevel::Sigma(
                (0..n)
                    .map(|_| {
                        (e.p_mean + e.p_std * rng.sample::<f64, _>(StandardNormal)).exp() as f32
                    })
                    .collect(),
            ),
            Self::Vp(v) => TrainingLevel::Timestep(
                (0..n)
                    .map(|_| rng.gen_range(0..v.num_timesteps as u32))
                    .collect(),
            ),
            Self::Flow(f) => TrainingLevel::FlowTime(
                (0..n)
                    .map(|_| {
                        let s = match f.t_dist {
                            FlowTimeDist::Uniform => rng.gen::<f64>(),
                            FlowTimeDist::LogitNormal { mean, std } => {
                                let z = mean + std * rng.sample::<f64, _>(StandardNormal);
                                1.0 / (1.0 + (-z).exp())
                            }
                        };
                        f.shifted(s) as f32
                    })
                    .collect(),
            ),
        }
    }

    /// The training-loss condition at timesteps `ts` of `grid`: EDM the grid's sigmas, VP the
    /// timesteps themselves.
    pub fn grid_training_level(&self, grid: &NoiseGrid, ts: &[usize]) -> TrainingLevel {
        match self {
            Self::Edm(_) => {
                TrainingLevel::Sigma(ts.iter().map(|&t| grid.sigma(t) as f32).collect())
            }
            Self::Vp(_) => TrainingLevel::Timestep(ts.iter().map(|&t| t as u32).collect()),
            Self::Flow(_) => TrainingLevel::FlowTime(
                ts.iter()
                    .map(|&t| FlowSchedule::s(grid.sigma(t)) as f32)
                    .collect(),
            ),
        }
    }

    /// The sampler a teacher of this parameterisation is sampled with by default: Heun (EDM) or
    /// DDIM (VP).
    pub fn default_sampler(&self) -> SamplerKind {
        match self {
            Self::Edm(_) => SamplerKind::Heun,
            Self::Vp(_) => SamplerKind::Ddim,
            Self::Flow(_) => SamplerKind::Euler,
        }
    }
}
