//! `DPMSolverMultistepScheduler`: DPM-Solver (`dpmsolver`) and DPM-Solver++ (`dpmsolver++`),
//! orders 1 and 2 (2M: the sampler the TDM releases use at 4 steps), midpoint or Heun.

use super::betas::{np_arange, np_linspace, BetaConfig, Prediction, Spacing};
use super::euler::sigmas_at;
use super::{lin, StepState};
use crate::backend::Backend;
use crate::json::Reader;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct DpmMultistep {
    pub betas: BetaConfig,
    pub prediction: Prediction,
    pub solver_order: usize,
    /// `dpmsolver++` (data prediction) rather than `dpmsolver` (noise prediction).
    pub plus_plus: bool,
    pub heun: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigma_min: bool,
    pub lambda_min_clipped: f64,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<i64>,
    pub sigmas: Vec<f32>,
}

impl DpmMultistep {
    pub fn read(r: &mut Reader) -> Result<Self> {
        let betas = BetaConfig::read(r)?;
        let solver_order = r.usize_or("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(r.unsupported("solver_order", &solver_order.into(), "supported: 1, 2"));
        }
        let prediction = Prediction::read(r)?;
        r.require("thresholding", &false.into())?;
        r.f64_opt("dynamic_thresholding_ratio")?;
        r.f64_opt("sample_max_value")?;
        let plus_plus = r.choice("algorithm_type", &["dpmsolver++", "dpmsolver"])? == "dpmsolver++";
        let heun = r.choice("solver_type", &["midpoint", "heun"])? == "heun";
        let lower_order_final = r.bool_or("lower_order_final", true)?;
        let euler_at_final = r.bool_or("euler_at_final", false)?;
        for k in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            r.require(k, &false.into())?;
        }
        // Only read by use_flow_sigmas / dynamic shifting, refused above.
        r.f64_opt("flow_shift")?;
        r.choice("time_shift_type", &["exponential"])?;
        let final_sigma_min = r.choice("final_sigmas_type", &["zero", "sigma_min"])? == "sigma_min";
        if !plus_plus && !final_sigma_min {
            bail!(
                "{}: algorithm_type dpmsolver needs final_sigmas_type sigma_min (as in diffusers)",
                r.file
            );
        }
        let lambda_min_clipped = r.f64_or("lambda_min_clipped", f64::NEG_INFINITY)?;
        r.require("variance_type", &serde_json::Value::Null)?;
        let spacing = Spacing::read(r, "linspace")?;
        let steps_offset = r.i64_or("steps_offset", 0)?;
        let mut acp = betas.alphas_cumprod();
        if betas.rescale_betas_zero_snr {
            *acp.last_mut().expect("timesteps") = 2f32.powi(-24);
        }
        Ok(Self {
            betas,
            prediction,
            solver_order,
            plus_plus,
            heun,
            lower_order_final,
            euler_at_final,
            final_sigma_min,
            lambda_min_clipped,
            spacing,
            steps_offset,
            alphas_cumprod: acp,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.betas.num_train_timesteps;
        if n == 0 {
            bail!("DPMSolverMultistepScheduler: 0 inference steps");
        }
        // searchsorted(flip(lambda_t), lambda_min_clipped), lambda_t in f32 as diffusers has it.
        let mut lambdas: Vec<f32> = self
            .alphas_cumprod
            .iter()
            .map(|a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect();
        lambdas.reverse();
        let clipped = lambdas
            .iter()
            .take_while(|l| (**l as f64) < self.lambda_min_clipped)
            .count();
        let last = (t - clipped) as f64;
        self.timesteps = match self.spacing {
            Spacing::Linspace => {
                let v = np_linspace(0.0, last - 1.0, n + 1);
                v[1..]
                    .iter()
                    .rev()
                    .map(|x| x.round_ties_even() as i64)
                    .collect()
            }
            Spacing::Leading => {
                let r = (last as usize) / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * r) as i64 + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => np_arange(last, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect(),
        };
        let ts = self.timesteps.iter().map(|&x| x as f64);
        self.sigmas = sigmas_at(&self.alphas_cumprod, ts, self.final_sigma_min);
        Ok(())
    }

    /// `(alpha_t, sigma_t, lambda_t)` of a sigma-space noise level.
    fn ast(sigma: f32) -> (f64, f64, f64) {
        let s = sigma as f64;
        let a = 1.0 / (s * s + 1.0).sqrt();
        let st = s * a;
        (a, st, a.ln() - st.ln())
    }

    /// The model output converted to the solver's variable (x0 for ++, eps otherwise).
    fn convert<B: Backend>(
        &self,
        b: &B,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
    ) -> Result<B::T> {
        let (a, s, _) = Self::ast(self.sigmas[i]);
        Ok(match (self.plus_plus, self.prediction) {
            (true, Prediction::Epsilon) => {
                b.affine(&lin(b, sample, 1.0, model_output, -s)?, 1.0 / a, 0.0)?
            }
            (true, Prediction::Sample) => model_output.clone(),
            (true, Prediction::VPrediction) => lin(b, sample, a, model_output, -s)?,
            (false, Prediction::Epsilon) => model_output.clone(),
            (false, Prediction::Sample) => {
                b.affine(&lin(b, sample, 1.0, model_output, -a)?, 1.0 / s, 0.0)?
            }
            (false, Prediction::VPrediction) => lin(b, model_output, a, sample, s)?,
        })
    }

    pub fn step<B: Backend>(
        &self,
        b: &B,
        state: &mut StepState<B::T>,
        i: usize,
        model_output: &B::T,
        sample: &B::T,
    ) -> Result<B::T> {
        let n = self.timesteps.len();
        let lower_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || !self.final_sigma_min);
        let m = self.convert(b, i, model_output, sample)?;
        state.outputs.push(m.clone());
        if state.outputs.len() > self.solver_order {
            state.outputs.remove(0);
        }
        let (at, st, lt) = Self::ast(self.sigmas[i + 1]);
        let (a0, s0, l0) = Self::ast(self.sigmas[i]);
        let h = lt - l0;
        let out = if self.solver_order == 1 || state.lower_order_nums < 1 || lower_final {
            if self.plus_plus {
                lin(b, sample, st / s0, &m, -at * ((-h).exp() - 1.0))?
            } else {
                lin(b, sample, at / a0, &m, -st * (h.exp() - 1.0))?
            }
        } else {
            // Order 2 is the highest supported, so diffusers' `lower_order_second` (drop from 3
            // to 2 near the end) changes nothing here.
            let (_, _, l1) = Self::ast(self.sigmas[i - 1]);
            let m1 = &state.outputs[state.outputs.len() - 2];
            let r0 = (l0 - l1) / h;
            // D1 = (m0 - m1) / r0
            let d1 = b.affine(&b.sub(&m, m1)?, 1.0 / r0, 0.0)?;
            let (c_s, c_d0, c_d1) = match (self.plus_plus, self.heun) {
                (true, false) => {
                    let e = at * ((-h).exp() - 1.0);
                    (st / s0, -e, -0.5 * e)
                }
                (true, true) => {
                    let e = (-h).exp() - 1.0;
                    (st / s0, -at * e, at * (e / h + 1.0))
                }
                (false, false) => {
                    let e = st * (h.exp() - 1.0);
                    (at / a0, -e, -0.5 * e)
                }
                (false, true) => {
                    let e = h.exp() - 1.0;
                    (at / a0, -st * e, -st * (e / h - 1.0))
                }
            };
            b.add(&lin(b, sample, c_s, &m, c_d0)?, &b.affine(&d1, c_d1, 0.0)?)?
        };
        if state.lower_order_nums < self.solver_order {
            state.lower_order_nums += 1;
        }
        Ok(out)
    }
}
