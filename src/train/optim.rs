//! AdamW with state that can be saved and resumed (candle_nn's AdamW keeps its moments private),
//! global-norm gradient clipping, a warm-up learning-rate schedule and an EMA of the weights.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use graphs::kernels::adamw::{self, AdamWStep};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up of the learning rate over this many updates.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// After warm-up: `constant`, or `cosine` decay to `min_lr_ratio * lr` at `decay_steps` updates.
    pub schedule: LrSchedule,
    /// Updates over which the cosine schedule decays (usually the run's total).
    pub decay_steps: u64,
    pub min_lr_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps: 200,
            grad_clip: 1.0,
            schedule: LrSchedule::Constant,
            decay_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

/// AdamW over a fixed list of named variables.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates applied (drives bias correction and warm-up).
    pub t: u64,
}

/// What one optimiser step did, for the metrics log.
#[derive(Clone, Debug, Serialize)]
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    /// `vars` sorted by name, so the state layout is stable across runs.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// Learning rate of update number `t` (0-based): linear warm-up, then the schedule.
    pub fn lr_at(&self, t: u64) -> f64 {
        let c = &self.cfg;
        if c.warmup_steps > 0 && t < c.warmup_steps {
            return c.lr * (t + 1) as f64 / c.warmup_steps as f64;
        }
        match c.schedule {
            LrSchedule::Constant => c.lr,
            LrSchedule::Cosine => {
                let span = c.decay_steps.saturating_sub(c.warmup_steps).max(1) as f64;
                let p = ((t - c.warmup_steps.min(t)) as f64 / span).min(1.0);
                let floor = c.min_lr_ratio * c.lr;
                floor + (c.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }

    /// This optimiser's gradients out of a store, in variable order (missing ones are `None`).
    pub fn grads_of(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|(_, v)| grads.get(v).cloned())
            .collect()
    }

    /// Global L2 norm of the gradients of our variables (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        grad_norm(&self.grads_of(grads))
    }

    /// Clips, checks for non-finite gradients (error: the weights stay untouched) and updates.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        let g = self.grads_of(grads);
        self.step_grads(&g)
    }

    /// [`Self::step`] on gradients given in variable order (e.g. accumulated over micro-batches).
    pub fn step_grads(&mut self, grads: &[Option<Tensor>]) -> Result<StepStats> {
        anyhow::ensure!(
            grads.len() == self.vars.len(),
            "{} gradients for {} variables",
            grads.len(),
            self.vars.len()
        );
        let norm = grad_norm(grads)?;
        if !norm.is_finite() {
            bail!(
                "gradient norm is {norm} at step {}: refusing to update the weights",
                self.t
            );
        }
        let scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / norm
        } else {
            1.0
        };
        let lr = self.lr_at(self.t);
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let w = var.as_tensor();
            let (m, v) = (&self.m[i], &self.v[i]);
            if adamw::applies(&[w, m, v]) && adamw::applies(&[g]) {
                // One in-place pass per tensor (CPU f32): the same formula as below.
                let p = AdamWStep {
                    lr,
                    beta1: b1,
                    beta2: b2,
                    eps: self.cfg.eps,
                    weight_decay: self.cfg.weight_decay,
                    t: self.t,
                    grad_scale: scale,
                };
                adamw::update(w, m, v, g, &p)?;
                continue;
            }
            let g = if scale != 1.0 {
                g.affine(scale, 0.0)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = (w * (1.0 - lr * self.cfg.weight_decay))?;
            var.set(&(decayed - (upd * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(StepStats {
            grad_norm: norm,
            lr,
        })
    }

    /// Moments as named tensors (`adam.m.<name>`, `adam.v.<name>`) for the training state file.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.state_with_prefix("adam.")
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        self.load_state_with_prefix(state, "adam.", t)
    }

    /// Moments as `<prefix>m.<name>` and `<prefix>v.<name>` (they share storage with the live
    /// moments, which the next step updates in place: save them before stepping again).
    pub fn state_with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (n, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{prefix}m.{n}"), self.m[i].clone());
            out.insert(format!("{prefix}v.{n}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments written by [`Self::state_with_prefix`] and the update count `t`.
    pub fn load_state_with_prefix(
        &mut self,
        state: &HashMap<String, Tensor>,
        prefix: &str,
        t: u64,
    ) -> Result<()> {
        for (i, (n, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}{kind}.{n}");
                let t = state
                    .get(&key)
                    .with_context(|| format!("training state lacks {key}"))?;
                if t.dims() != var.dims() {
                    bail!(
                        "training state {key} has shape {:?}, the model needs {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                // A copy: the moments are updated in place, the caller's tensors must not be.
                *slot = t.to_device(var.device())?.copy()?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of a list of gradients (missing ones count as zero).
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += match adamw::sum_squares(g)? {
            Some(s) => s,
            None => g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?,
        };
    }
    Ok(sq.sqrt())
}

/// Sums gradients over micro-batches (gradient accumulation); [`Self::mean`] is their average.
pub struct GradAccum {
    sum: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccum {
    pub fn new(n_vars: usize) -> Self {
        Self {
            sum: vec![None; n_vars],
            count: 0,
        }
    }
    pub fn add(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        anyhow::ensure!(grads.len() == self.sum.len(), "gradient count changed");
        for (s, g) in self.sum.iter_mut().zip(grads) {
            if let Some(g) = g {
                *s = Some(match s.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        self.count += 1;
        Ok(())
    }
    pub fn mean(self) -> Result<Vec<Option<Tensor>>> {
        let k = self.count.max(1) as f64;
        Ok(self
            .sum
            .into_iter()
            .map(|g| g.map(|g| g.affine(1.0 / k, 0.0)).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?)
    }
}

/// Exponential moving average of weights, with the usual warm-up `min(decay, (1+t)/(10+t))`.
pub struct Ema {
    pub decay: f64,
    pub names: Vec<String>,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        Ok(Self {
            decay,
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            shadow: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?,
        })
    }

    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(self.shadow.iter().cloned())
            .collect()
    }

    pub fn load(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (n, s) in self.names.iter().zip(self.shadow.iter_mut()) {
            let t = weights
                .get(n)
                .with_context(|| format!("EMA weights lack {n}"))?;
            *s = t.to_device(s.device())?;
        }
        Ok(())
    }
}
