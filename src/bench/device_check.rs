//! `distill bench --what device-check`: the same seeded UNet, inputs and one training step on
//! `--device` and on the CPU reference, at fp32, bf16 and fp16 (autocast on both sides, the fp16
//! step through the dynamic loss scaler), compared value by value. On `--device cpu` it compares
//! the CPU with itself (the dry run of `scripts/gpu-check.sh`: every code path, zero differences).

use crate::train::optim::{
    precision_step, AdamW, AdamWConfig, LossScaleConfig, LossScaler, Precision,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use graphs::{CandleBackend, Denoiser, ModelConfig, Parameterisation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug)]
pub struct DeviceCheckOptions {
    /// UNet config name (see [`super::unet_config`]).
    pub config: String,
    pub batch: usize,
    pub seed: u64,
}

/// Largest tolerated relative differences per precision: (forward, loss, gradient).
pub fn tolerances(p: Precision) -> (f64, f64, f64) {
    match p {
        Precision::Fp32 => (1e-3, 1e-4, 1e-3),
        Precision::Fp16 => (2e-2, 1e-2, 5e-2),
        Precision::Bf16 => (6e-2, 3e-2, 1.5e-1),
    }
}

/// One precision's comparison of `device` against the CPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckRow {
    pub precision: String,
    /// max |D_device - D_cpu| / max |D_cpu| of the denoiser output (no gradients).
    pub forward_rel: f64,
    /// |loss_device - loss_cpu| / |loss_cpu| of the teacher loss.
    pub loss_rel: f64,
    /// ||g_device - g_cpu|| / ||g_cpu|| over every parameter's (unscaled) gradient.
    pub grad_rel: f64,
    /// max |w_device - w_cpu| after the optimiser step (AdamW lr 1e-3: at most ~2e-3 apart).
    pub weight_max_abs: f64,
    /// The step was applied (not skipped by the loss scaler) on both devices.
    pub step_applied: bool,
    pub tolerance: (f64, f64, f64),
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceCheckReport {
    pub device: String,
    pub reference: String,
    pub config: String,
    pub batch: usize,
    pub rows: Vec<CheckRow>,
}

impl DeviceCheckReport {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.passed)
    }
}

impl fmt::Display for DeviceCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} vs {} (reference), UNet `{}`, batch {}: forward, teacher loss, gradients, one AdamW step",
            self.device, self.reference, self.config, self.batch
        )?;
        writeln!(
            f,
            "{:<6} {:>11} {:>11} {:>11} {:>13} {:>8} {:>6}",
            "prec", "forward rel", "loss rel", "grad rel", "weight |max|", "applied", "pass"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<6} {:>11.2e} {:>11.2e} {:>11.2e} {:>13.2e} {:>8} {:>6}",
                r.precision,
                r.forward_rel,
                r.loss_rel,
                r.grad_rel,
                r.weight_max_abs,
                r.step_applied,
                if r.passed { "ok" } else { "FAIL" }
            )?;
        }
        write!(
            f,
            "tolerances (forward, loss, grad): fp32 {:?}, fp16 {:?}, bf16 {:?}",
            tolerances(Precision::Fp32),
            tolerances(Precision::Fp16),
            tolerances(Precision::Bf16)
        )
    }
}

struct Side {
    out: Tensor,
    loss: f64,
    grads: Vec<Tensor>,
    weights: Vec<Tensor>,
    applied: bool,
}

/// The forward output, loss, unscaled gradients and stepped weights on `dev`, all returned on the CPU.
fn side(cfg: &ModelConfig, o: &DeviceCheckOptions, p: Precision, dev: &Device) -> Result<Side> {
    let (_vm, den, vars): (_, Denoiser, _) =
        crate::train::teacher::init_trainable(cfg, o.seed, dev)?;
    let u = &cfg;
    let Parameterisation::Edm(e) = &cfg.parameterisation else {
        anyhow::bail!("the device check uses the EDM parameterisation")
    };
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0xDE71CE);
    let shape = [o.batch, u.channels(), u.resolution(), u.resolution()];
    let n: usize = shape.iter().product();
    let x0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let noise: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    let labels: Vec<u32> = (0..o.batch)
        .map(|_| rng.gen_range(0..=u.num_classes() as u32))
        .collect();
    let sigma: Vec<f32> = (0..o.batch)
        .map(|_| (e.p_mean + e.p_std * rng.sample::<f64, _>(StandardNormal)).exp() as f32)
        .collect();
    let x0 = Tensor::from_vec(x0, &shape, dev)?;
    let noise = Tensor::from_vec(noise, &shape, dev)?;
    let labels = Tensor::from_vec(labels, o.batch, dev)?;
    let sigma = Tensor::from_vec(sigma, o.batch, dev)?;

    let eval = CandleBackend::new(dev).with_autocast(p.autocast());
    let level = den.level_from_sigma(&eval, &sigma)?;
    let x = (&x0 + noise.broadcast_mul(&sigma.reshape((o.batch, 1, 1, 1))?)?)?;
    let out = den
        .forward(&eval, &x, &level, &labels)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;

    let b = CandleBackend::training(dev).with_autocast(p.autocast());
    let loss = graphs::losses::teacher_loss(&b, &den, &x0, &labels, &sigma, &noise)?;
    let mut scaler = p
        .needs_loss_scaling()
        .then(|| LossScaler::new(LossScaleConfig::default()));
    let grads = match &scaler {
        Some(s) => s.scale_loss(&loss)?.backward()?,
        None => loss.backward()?,
    };
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-3,
            warmup_steps: 0,
            ..Default::default()
        },
    )?;
    let g = opt.grads_of(&grads);
    let unscale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let grads_cpu = g
        .iter()
        .zip(&vars)
        .map(|(g, (name, _))| {
            let g = g
                .as_ref()
                .with_context(|| format!("no gradient for {name}"))?;
            Ok((g.to_dtype(DType::F32)? / unscale)?.to_device(&Device::Cpu)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let applied = precision_step(&mut opt, scaler.as_mut(), g)?.is_some();
    let weights = vars
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().to_device(&Device::Cpu)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Side {
        out,
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
        grads: grads_cpu,
        weights,
        applied,
    })
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

fn sq_sum(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// Runs the check on `dev` against the CPU; the caller decides what a failure means.
pub fn run(o: &DeviceCheckOptions, dev: &Device) -> Result<DeviceCheckReport> {
    let cfg = ModelConfig::ours(super::unet_config(&o.config)?, Parameterisation::edm());
    let mut rows = Vec::new();
    for p in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let d = side(&cfg, o, p, dev).with_context(|| format!("{} on {dev:?}", p.name()))?;
        let c = side(&cfg, o, p, &Device::Cpu).with_context(|| format!("{} on cpu", p.name()))?;
        let forward_rel = max_abs(&(&d.out - &c.out)?)? / max_abs(&c.out)?.max(1e-12);
        let loss_rel = (d.loss - c.loss).abs() / c.loss.abs().max(1e-12);
        let (mut diff, mut norm) = (0.0, 0.0);
        for (a, b) in d.grads.iter().zip(&c.grads) {
            diff += sq_sum(&(a - b)?)?;
            norm += sq_sum(b)?;
        }
        let grad_rel = (diff / norm.max(1e-30)).sqrt();
        let mut weight_max_abs = 0f64;
        for (a, b) in d.weights.iter().zip(&c.weights) {
            weight_max_abs = weight_max_abs.max(max_abs(&(a - b)?)?);
        }
        let tol = tolerances(p);
        let step_applied = d.applied && c.applied;
        let finite = [forward_rel, loss_rel, grad_rel, weight_max_abs]
            .iter()
            .all(|v| v.is_finite());
        rows.push(CheckRow {
            precision: p.name().into(),
            forward_rel,
            loss_rel,
            grad_rel,
            weight_max_abs,
            step_applied,
            tolerance: tol,
            passed: finite
                && step_applied
                && forward_rel <= tol.0
                && loss_rel <= tol.1
                && grad_rel <= tol.2
                // AdamW moves each weight by at most ~lr per step on either side.
                && weight_max_abs <= 2.5e-3,
        });
    }
    Ok(DeviceCheckReport {
        device: if dev.is_cuda() { "cuda" } else { "cpu" }.into(),
        reference: "cpu".into(),
        config: o.config.clone(),
        batch: o.batch,
        rows,
    })
}
