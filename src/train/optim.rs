//! AdamW with state that can be saved and resumed (candle_nn's AdamW keeps its moments private),
//! global-norm gradient clipping, a warm-up learning-rate schedule and an EMA of the weights.

use anyhow::{bail, ensure, Context, Result};
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
    /// The global gradient norm of the last update.
    last_norm: f64,
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
            last_norm: 0.0,
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
        let p = self.begin_step(grad_norm(grads)?)?;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            if let Some(w) = update_tensor(var.as_tensor(), &mut self.m[i], &mut self.v[i], g, &p)?
            {
                var.set(&w)?;
            }
        }
        Ok(StepStats {
            grad_norm: self.last_norm,
            lr: p.lr,
        })
    }

    /// Starts the next update from the global gradient norm: refuses a non-finite one (the
    /// weights stay untouched), counts the update and returns its constants (learning rate,
    /// bias-correction count, clipping factor as `grad_scale`) for [`update_tensor`].
    pub fn begin_step(&mut self, norm: f64) -> Result<AdamWStep> {
        if !norm.is_finite() {
            bail!(
                "gradient norm is {norm} at step {}: refusing to update the weights",
                self.t
            );
        }
        let grad_scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / norm
        } else {
            1.0
        };
        let lr = self.lr_at(self.t);
        self.t += 1;
        self.last_norm = norm;
        Ok(AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            t: self.t,
            grad_scale,
        })
    }

    /// True while the moments are here (not sharded over the ranks by ZeRO-1).
    pub fn holds_moments(&self) -> bool {
        self.m.len() == self.vars.len()
    }

    /// Hands the moments out (ZeRO-1 keeps a shard of them): the optimiser holds none until
    /// [`Self::set_moments`].
    pub fn take_moments(&mut self) -> (Vec<Tensor>, Vec<Tensor>) {
        (std::mem::take(&mut self.m), std::mem::take(&mut self.v))
    }

    /// Puts full moments back (one per variable, in variable order, of its shape).
    pub fn set_moments(&mut self, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        ensure!(
            m.len() == self.vars.len() && v.len() == self.vars.len(),
            "{} / {} moments for {} variables",
            m.len(),
            v.len(),
            self.vars.len()
        );
        (self.m, self.v) = (m, v);
        Ok(())
    }

    /// Bytes of the moments this optimiser holds (0 while ZeRO-1 shards them).
    pub fn moment_bytes(&self) -> u64 {
        self.m
            .iter()
            .chain(&self.v)
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Moments as named tensors (`adam.m.<name>`, `adam.v.<name>`) for the training state file.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.state_with_prefix("adam.")
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        self.load_state_with_prefix(state, "adam.", t)
    }

    /// Moments as `<prefix>m.<name>` and `<prefix>v.<name>` (they share storage with the live
    /// moments, which the next step updates in place: save them before stepping again). None
    /// while ZeRO-1 shards them ([`super::zero`] gathers them to rank 0 for a checkpoint).
    pub fn state_with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        if !self.holds_moments() {
            return out;
        }
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
        if !self.holds_moments() {
            bail!(
                "the moments are sharded over the ranks (ZeRO-1): load the state before sharding"
            );
        }
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

/// One AdamW update of weight `w` and its moments `m`, `v` from gradient `g` with `p`'s constants:
/// in place for contiguous f32 CPU tensors (`None`), else by tensor ops (the same formula),
/// replacing the moments and returning the new weight.
pub fn update_tensor(
    w: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    g: &Tensor,
    p: &AdamWStep,
) -> Result<Option<Tensor>> {
    if adamw::applies(&[w, m, v]) && adamw::applies(&[g]) {
        // One in-place pass per tensor (CPU f32).
        adamw::update(w, m, v, g, p)?;
        return Ok(None);
    }
    let (b1, b2) = (p.beta1, p.beta2);
    let bc1 = 1.0 - b1.powi(p.t as i32);
    let bc2 = 1.0 - b2.powi(p.t as i32);
    let g = if p.grad_scale != 1.0 {
        g.affine(p.grad_scale, 0.0)?
    } else {
        g.clone()
    };
    let m1 = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
    let v1 = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let upd = ((&m1 / bc1)? / ((&v1 / bc2)?.sqrt()? + p.eps)?)?;
    let decayed = (w * (1.0 - p.lr * p.weight_decay))?;
    (*m, *v) = (m1, v1);
    Ok(Some((decayed - (upd * p.lr)?)?))
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
                // detach first: a copy of a Var keeps an autograd edge to it, and a model built on
                // tracked weights records (and keeps alive) every activation of its forward passes.
                .map(|(_, v)| v.as_tensor().detach().copy())
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

/// Compute precision of training (see [`graphs::Precision`] for what each means).
pub use graphs::Precision;

/// Dynamic loss scaling (as torch.cuda.amp.GradScaler).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScaleConfig {
    pub init_scale: f64,
    /// Multiply the scale by this after `growth_interval` clean steps.
    pub growth_factor: f64,
    /// Multiply the scale by this on a step with inf/NaN gradients (which is skipped).
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The loss scaler's state: scale the loss up before backward, unscale the gradients, skip the
/// update and halve the scale when they overflowed, grow it after a run of clean steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub cfg: LossScaleConfig,
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub good_steps: u64,
    /// Steps skipped because of inf/NaN gradients, in total.
    pub skipped: u64,
}

impl LossScaler {
    pub fn new(cfg: LossScaleConfig) -> Self {
        Self {
            scale: cfg.init_scale,
            cfg,
            good_steps: 0,
            skipped: 0,
        }
    }

    /// `loss * scale`, what `backward` is called on.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.affine(self.scale, 0.0)?)
    }

    /// Unscales `grads` in place of the scaled ones. Returns `None` (the step must be skipped)
    /// when any gradient is inf/NaN, after backing the scale off; otherwise updates the growth
    /// counter and returns the true gradients.
    pub fn unscale(&mut self, grads: Vec<Option<Tensor>>) -> Result<Option<Vec<Option<Tensor>>>> {
        let inv = 1.0 / self.scale;
        let mut out = Vec::with_capacity(grads.len());
        let mut finite = true;
        for g in grads {
            match g {
                Some(g) => {
                    let g = g.to_dtype(candle_core::DType::F32)?.affine(inv, 0.0)?;
                    let s = g
                        .abs()?
                        .max_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_scalar::<f64>()?;
                    if !s.is_finite() {
                        finite = false;
                    }
                    out.push(Some(g));
                }
                None => out.push(None),
            }
        }
        Ok(self.record(finite).then_some(out))
    }

    /// Records a step's overflow decision (the same on every rank): on inf/NaN gradients backs
    /// the scale off and counts a skip (false: skip the update); otherwise counts a clean step
    /// and grows the scale after `growth_interval` of them (true).
    pub fn record(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= self.cfg.backoff_factor;
            self.good_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.cfg.growth_interval {
            self.scale *= self.cfg.growth_factor;
            self.good_steps = 0;
        }
        true
    }

    /// State for the training-state file (metadata strings).
    pub fn save(&self, prefix: &str, meta: &mut HashMap<String, String>) {
        meta.insert(format!("{prefix}.loss_scale"), self.scale.to_string());
        meta.insert(format!("{prefix}.good_steps"), self.good_steps.to_string());
        meta.insert(format!("{prefix}.skipped"), self.skipped.to_string());
    }

    /// Restores [`Self::save`]'s state; a run saved in another precision starts a fresh scaler.
    pub fn load(&mut self, prefix: &str, meta: &HashMap<String, String>) -> Result<()> {
        let get = |k: &str| meta.get(&format!("{prefix}.{k}"));
        if let (Some(s), Some(g), Some(k)) = (get("loss_scale"), get("good_steps"), get("skipped"))
        {
            self.scale = s.parse()?;
            self.good_steps = g.parse()?;
            self.skipped = k.parse()?;
        }
        Ok(())
    }
}

/// One optimiser update under a precision: unscale (fp16) and skip on overflow, else step.
/// Returns the step's stats, or `None` for a skipped step.
pub fn precision_step(
    opt: &mut AdamW,
    scaler: Option<&mut LossScaler>,
    grads: Vec<Option<Tensor>>,
) -> Result<Option<StepStats>> {
    let grads = match scaler {
        Some(s) => match s.unscale(grads)? {
            Some(g) => g,
            None => return Ok(None),
        },
        None => grads,
    };
    Ok(Some(opt.step_grads(&grads)?))
}
