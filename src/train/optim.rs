//! AdamW with state that can be saved and resumed (candle_nn's AdamW keeps its moments private),
//! global-norm gradient clipping, a warm-up learning-rate schedule and an EMA of the weights.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up of the learning rate over this many steps.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
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

    pub fn lr_at(&self, t: u64) -> f64 {
        if self.cfg.warmup_steps == 0 {
            self.cfg.lr
        } else {
            self.cfg.lr * ((t + 1) as f64 / self.cfg.warmup_steps as f64).min(1.0)
        }
    }

    /// Global L2 norm of the gradients of our variables (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// Clips, checks for non-finite gradients (error: the weights stay untouched) and updates.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        let norm = self.grad_norm(grads)?;
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
            let Some(g) = grads.get(var) else { continue };
            let g = if scale != 1.0 {
                g.affine(scale, 0.0)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let w = var.as_tensor();
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
        let mut out = HashMap::new();
        for (i, (n, _)) in self.vars.iter().enumerate() {
            out.insert(format!("adam.m.{n}"), self.m[i].clone());
            out.insert(format!("adam.v.{n}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (n, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{kind}.{n}");
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
                *slot = t.to_device(var.device())?;
            }
        }
        self.t = t;
        Ok(())
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
