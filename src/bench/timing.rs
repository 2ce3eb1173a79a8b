//! What the CPU and GPU benchmarks and the per-op table share: timing and the peer optimiser.

use anyhow::Result;
use candle_nn::VarMap;
use std::time::Instant;

/// The median (NaN for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Runs `f` `warmup + iters` times and returns the last `iters` durations in milliseconds.
pub fn time_it(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        f()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            out.push(ms);
        }
    }
    Ok(out)
}

/// The trainer's AdamW over every variable of `varmap`, configured like the PyTorch peer's
/// `torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)`.
pub fn peer_adamw(varmap: &VarMap) -> Result<crate::train::optim::AdamW> {
    let vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cfg = crate::train::optim::AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        warmup_steps: 0,
        grad_clip: 0.0,
        ..Default::default()
    };
    crate::train::optim::AdamW::new(vars, cfg)
}
