//! The bare denoiser as an exported graph calls it (`distill export --what denoiser`): its inputs
//! and output per parameterisation, defined once for the exporter and for the validation that
//! checks the export, so nothing outside `graphs` branches on [`Parameterisation`].

use crate::backend::{Backend, Kind};
use crate::denoiser::Denoiser;
use crate::schedule::Parameterisation;
use crate::training_level::TrainingLevel;
use rand::Rng;

/// The noise-level input and the output of the bare denoiser (besides `x` and `class_labels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenoiserIo {
    /// Name of the per-sample level input `[batch]`: `sigma` (EDM, flow) or `timestep` (VP).
    pub level: &'static str,
    /// Its kind: [`Kind::F32`] for sigmas, [`Kind::Label`] (integer: u32 in candle, int32 in
    /// ONNX) for timesteps.
    pub level_kind: Kind,
    /// Name of the output: `denoised` (the x0 estimate, EDM and flow) or `eps` (the noise prediction for
    /// `x = x0 + sigma_t * eps` in sigma-space, VP).
    pub output: &'static str,
}

impl Parameterisation {
    pub fn denoiser_io(&self) -> DenoiserIo {
        match self {
            Self::Edm(_) | Self::Flow(_) => DenoiserIo {
                level: "sigma",
                level_kind: Kind::F32,
                output: "denoised",
            },
            Self::Vp(_) => DenoiserIo {
                level: "timestep",
                level_kind: Kind::Label,
                output: "eps",
            },
        }
    }

    /// A seeded level input for `n` samples over the whole noise range, for parity checks of the
    /// bare denoiser: EDM sigmas log-uniform in `[sigma_min, sigma_max)`, VP uniform timesteps.
    pub fn draw_check_level<R: Rng>(&self, rng: &mut R, n: usize) -> TrainingLevel {
        match self {
            Self::Edm(e) => {
                let (lo, hi) = (e.sigma_min.ln(), e.sigma_max.ln());
                TrainingLevel::Sigma((0..n).map(|_| rng.gen_range(lo..hi).exp() as f32).collect())
            }
            // Flow levels are in sigma-space too (`s = sigma / (1 + sigma)`): its grid's range.
            Self::Flow(_) => {
                let g = crate::schedule::NoiseGrid::new(self);
                let (lo, hi) = (g.sigma(0).ln(), g.sigma(g.len() - 1).ln());
                TrainingLevel::Sigma((0..n).map(|_| rng.gen_range(lo..hi).exp() as f32).collect())
            }
            Self::Vp(v) => TrainingLevel::Timestep(
                (0..n)
                    .map(|_| rng.gen_range(0..v.num_timesteps as u32))
                    .collect(),
            ),
        }
    }

    /// The per-sample sigma (f32) of a level input, to build `x = x0 + sigma * eps` with.
    pub fn level_sigmas(&self, level: &TrainingLevel) -> anyhow::Result<Vec<f32>> {
        match (self, level) {
            (Self::Edm(_) | Self::Flow(_), TrainingLevel::Sigma(s)) => Ok(s.clone()),
            (Self::Vp(v), TrainingLevel::Timestep(t)) => {
                let table = v.sigmas();
                t.iter()
                    .map(|&t| {
                        table.get(t as usize).map(|&s| s as f32).ok_or_else(|| {
                            anyhow::anyhow!("timestep {t} is outside 0..{}", table.len())
                        })
                    })
                    .collect()
            }
            _ => anyhow::bail!(
                "this model is conditioned on {}s, not on this level",
                self.denoiser_io().level
            ),
        }
    }
}

impl Denoiser {
    /// One network evaluation as the exported bare denoiser computes it: `level` is its level
    /// input (see [`Parameterisation::denoiser_io`]); returns `denoised` (EDM) or `eps` (VP).
    pub fn io_forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        level: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        match &self.param {
            Parameterisation::Edm(_) | Parameterisation::Flow(_) => {
                let level = self.level_from_sigma(b, level)?;
                self.forward(b, x, &level, labels)
            }
            Parameterisation::Vp(_) => {
                let level = self.level_from_timesteps(b, level)?;
                self.eps(b, x, &level, labels)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;
    use rand::SeedableRng;

    #[test]
    fn check_levels_match_their_sigmas() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let edm = Parameterisation::edm();
        let l = edm.draw_check_level(&mut rng, 64);
        let s = edm.level_sigmas(&l).unwrap();
        assert!(s.iter().all(|&s| (0.002..80.0).contains(&s)), "{s:?}");
        let vp = Parameterisation::vp(BetaSchedule::Linear);
        let l = vp.draw_check_level(&mut rng, 64);
        let TrainingLevel::Timestep(t) = &l else {
            panic!("VP draws timesteps")
        };
        let Parameterisation::Vp(v) = &vp else {
            unreachable!()
        };
        let table = v.sigmas();
        let s = vp.level_sigmas(&l).unwrap();
        for (t, s) in t.iter().zip(&s) {
            assert_eq!(*s, table[*t as usize] as f32);
        }
        assert!(edm.level_sigmas(&l).is_err());
        assert_eq!(vp.denoiser_io().level, "timestep");
        assert_eq!(edm.denoiser_io().output, "denoised");
    }
}
