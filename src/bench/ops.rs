//! The per-op part of `distill bench`: the building blocks of the benchmarked UNet, at its
//! shapes and batch, on candle's stock ops, on the fast kernels and (same run) in PyTorch.
//!
//! Each op is timed forward without gradients and forward + backward (of `sum(y * g)` for a
//! fixed random `g`, with the input requiring its gradient too); the optimiser row times one
//! AdamW step over every parameter of the model from fixed gradients.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use graphs::nn::{Conv2d, GroupNorm, ResBlock, SelfAttention};
use graphs::{CandleBackend, Denoiser, ModelConfig, UNetConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What an op row runs (the PyTorch peer builds the same module from it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `Conv2d` with bias.
    Conv,
    /// `GroupNorm` then SiLU.
    GnSilu,
    /// A res block (`cin` -> `cout`) with its embedding projection.
    Resblock,
    /// Self-attention on `cin` channels.
    Attention,
    /// One AdamW step over all parameters of the model.
    Adamw,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpSpec {
    pub name: String,
    pub kind: OpKind,
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub hw: usize,
    pub groups: usize,
    pub emb_dim: usize,
}

/// Medians (ms) of one op: forward, and forward + backward (or the optimiser step).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpTimes {
    pub fwd_ms: Option<f64>,
    pub fwdbwd_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpRow {
    pub spec: OpSpec,
    pub stock: OpTimes,
    pub ours: OpTimes,
    pub torch: Option<OpTimes>,
}

/// The ops of `cfg` at `batch`: the first, last and a down-sampling level's convs, the
/// decoder's 1x1 skip, GroupNorm+SiLU, a res block, the bottleneck attention and AdamW.
pub fn specs(cfg: &UNetConfig, batch: usize) -> Vec<OpSpec> {
    let (b, r, g) = (cfg.base_channels, cfg.resolution, cfg.groups);
    let levels = cfg.channel_mult.len();
    let c0 = b * cfg.channel_mult[0];
    let cl = b * cfg.channel_mult[levels - 1];
    let c1 = b * cfg.channel_mult[1.min(levels - 1)];
    let rl = r >> (levels - 1);
    let spec = |name: String,
                kind: OpKind,
                cin: usize,
                cout: usize,
                k: usize,
                stride: usize,
                hw: usize| OpSpec {
        name,
        kind,
        batch,
        cin,
        cout,
        k,
        stride,
        hw,
        groups: g,
        emb_dim: cfg.emb_dim(),
    };
    let mut v = vec![
        spec(
            format!("conv3x3 {c0}->{c0} @{r}"),
            OpKind::Conv,
            c0,
            c0,
            3,
            1,
            r,
        ),
        spec(
            format!("conv3x3 {cl}->{cl} @{rl}"),
            OpKind::Conv,
            cl,
            cl,
            3,
            1,
            rl,
        ),
    ];
    if levels > 1 {
        v.push(spec(
            format!("conv3x3/2 {c0}->{c0} @{r}"),
            OpKind::Conv,
            c0,
            c0,
            3,
            2,
            r,
        ));
        v.push(spec(
            format!("conv1x1 {}->{c0} @{r}", c0 + c1),
            OpKind::Conv,
            c0 + c1,
            c0,
            1,
            1,
            r,
        ));
    }
    v.push(spec(
        format!("groupnorm+silu {c0} @{r}"),
        OpKind::GnSilu,
        c0,
        c0,
        0,
        1,
        r,
    ));
    v.push(spec(
        format!("resblock {c0} @{r}"),
        OpKind::Resblock,
        c0,
        c0,
        3,
        1,
        r,
    ));
    v.push(spec(
        format!("attention {cl} @{rl}"),
        OpKind::Attention,
        cl,
        cl,
        1,
        1,
        rl,
    ));
    v.push(spec(
        "adamw step (all params)".into(),
        OpKind::Adamw,
        0,
        0,
        0,
        0,
        0,
    ));
    v
}

/// A module built twice on the same weights: on `Var`s (gradients) and detached (inference).
struct Built<M> {
    train: M,
    infer: M,
}

fn build<M>(f: impl Fn(VarBuilder) -> candle_core::Result<M>) -> Result<Built<M>> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let train = f(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let detached: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let infer = f(VarBuilder::from_tensors(detached, DType::F32, &dev))?;
    Ok(Built { train, infer })
}

/// Median of `iters` timed runs after `warmup`, in ms.
fn median_ms(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let ms = super::timing::time_it(warmup, iters, &mut f)?;
    Ok(super::timing::median(&ms))
}

/// Times `fwd` (an op's forward on backend `b`) without and with the backward.
fn time_op(
    warmup: usize,
    iters: usize,
    x: &Var,
    fwd: impl Fn(&CandleBackend, &Tensor, bool) -> Result<Tensor>,
    b: &CandleBackend,
) -> Result<OpTimes> {
    let xd = x.as_tensor().detach();
    let g = Tensor::randn(0f32, 1.0, fwd(b, &xd, false)?.dims(), &Device::Cpu)?;
    let f = median_ms(warmup, iters, || {
        fwd(b, &xd, false)?;
        Ok(())
    })?;
    let fb = median_ms(warmup, iters, || {
        (fwd(b, x.as_tensor(), true)? * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(OpTimes {
        fwd_ms: Some(f),
        fwdbwd_ms: Some(fb),
    })
}

/// Times one spec on stock candle and on the fast kernels. `model` supplies the parameters
/// (and a gradient for each) of the optimiser row.
pub fn time_candle(
    spec: &OpSpec,
    model: &ModelConfig,
    warmup: usize,
    iters: usize,
) -> Result<(OpTimes, OpTimes)> {
    let dev = Device::Cpu;
    let (ours, stock) = (
        CandleBackend::training(&dev),
        CandleBackend::training(&dev).stock(),
    );
    let x = Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (spec.batch, spec.cin, spec.hw, spec.hw),
        &dev,
    )?)?;
    let both = |f: &dyn Fn(&CandleBackend, &Tensor, bool) -> Result<Tensor>| -> Result<(OpTimes, OpTimes)> {
        Ok((time_op(warmup, iters, &x, f, &stock)?, time_op(warmup, iters, &x, f, &ours)?))
    };
    match spec.kind {
        OpKind::Conv => {
            let m =
                build(|vb| Conv2d::new(vb, spec.cin, spec.cout, spec.k, spec.stride, spec.k / 2))?;
            both(&|b, x, grad| {
                if grad {
                    m.train.forward(b, x)
                } else {
                    m.infer.forward(b, x)
                }
            })
        }
        OpKind::GnSilu => {
            let m = build(|vb| GroupNorm::new(vb, spec.groups, spec.cin))?;
            both(&|b, x, grad| {
                if grad {
                    m.train.forward_silu(b, x)
                } else {
                    m.infer.forward_silu(b, x)
                }
            })
        }
        OpKind::Resblock => {
            let m =
                build(|vb| ResBlock::new(vb, spec.cin, spec.cout, spec.emb_dim, spec.groups, 0.0))?;
            let emb = Tensor::randn(0f32, 1.0, (spec.batch, spec.emb_dim), &dev)?;
            both(&|b, x, grad| {
                if grad {
                    m.train.forward(b, x, &emb)
                } else {
                    m.infer.forward(b, x, &emb)
                }
            })
        }
        OpKind::Attention => {
            let m = build(|vb| SelfAttention::new(vb, spec.cin, spec.groups))?;
            let hw = spec.hw;
            both(&|b, x, grad| {
                if grad {
                    m.train.forward(b, x, hw, hw)
                } else {
                    m.infer.forward(b, x, hw, hw)
                }
            })
        }
        OpKind::Adamw => time_adamw(model, warmup, iters),
    }
}

/// One AdamW step over the model's parameters: candle_nn's AdamW (stock) and the trainer's.
fn time_adamw(model: &ModelConfig, warmup: usize, iters: usize) -> Result<(OpTimes, OpTimes)> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    Denoiser::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), model)?;
    // Gradients of a sum over all parameters: one per variable, as a backward pass gives.
    let vars = vm.all_vars();
    let mut loss = Tensor::zeros((), DType::F32, &dev)?;
    for v in &vars {
        let g = Tensor::randn(0f32, 1.0, v.dims(), &dev)?;
        loss = (loss + (v.as_tensor() * g)?.sum_all()?)?;
    }
    let grads = loss.backward()?;
    let mut stock = candle_nn::AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    let s = median_ms(warmup, iters, || Ok(stock.step(&grads)?))?;
    let mut ours = super::timing::peer_adamw(&vm)?;
    let o = median_ms(warmup, iters, || {
        ours.step(&grads)?;
        Ok(())
    })?;
    let row = |v| OpTimes {
        fwd_ms: None,
        fwdbwd_ms: Some(v),
    };
    Ok((row(s), row(o)))
}

/// The peer's answer to `--ops`.
#[derive(Deserialize)]
pub struct PeerOp {
    pub name: String,
    pub fwd_ms: Option<f64>,
    pub fwdbwd_ms: Option<f64>,
}

/// Joins candle's rows with the peer's (by name).
pub fn join(
    rows: Vec<(OpSpec, OpTimes, OpTimes)>,
    peer: Option<Vec<PeerOp>>,
) -> Result<Vec<OpRow>> {
    rows.into_iter()
        .map(|(spec, stock, ours)| {
            let torch = match &peer {
                None => None,
                Some(p) => {
                    let r = p.iter().find(|r| r.name == spec.name).with_context(|| {
                        format!("the PyTorch peer did not time {:?}", spec.name)
                    })?;
                    Some(OpTimes {
                        fwd_ms: r.fwd_ms,
                        fwdbwd_ms: r.fwdbwd_ms,
                    })
                }
            };
            Ok(OpRow {
                spec,
                stock,
                ours,
                torch,
            })
        })
        .collect()
}

/// The per-op table: ms of each engine, then ours' speed-up over stock candle and its speed
/// relative to PyTorch (PyTorch time / ours; above 1: ours is faster).
pub fn table(rows: &[OpRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<30} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "op (median ms)", "pass", "stock", "ours", "PyTorch", "vs stock", "vs torch"
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    };
    for row in rows {
        let t = row.torch.clone().unwrap_or_default();
        for (pass, st, ou, to) in [
            ("fwd", row.stock.fwd_ms, row.ours.fwd_ms, t.fwd_ms),
            (
                "fwd+bwd",
                row.stock.fwdbwd_ms,
                row.ours.fwdbwd_ms,
                t.fwdbwd_ms,
            ),
        ] {
            if ou.is_none() {
                continue;
            }
            let pass = if row.spec.kind == OpKind::Adamw {
                "step"
            } else {
                pass
            };
            let _ = writeln!(
                s,
                "{:<30} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8}",
                row.spec.name,
                pass,
                f(st),
                f(ou),
                f(to),
                r(st, ou),
                r(to, ou)
            );
        }
    }
    s
}
