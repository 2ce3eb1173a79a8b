//! FLOP counting by shape propagation: [`FlopCounter`] implements [`Backend`] on shapes
//! (`T = Vec<usize>`), so running the very `forward` the other backends run counts its FLOPs,
//! with no second copy of the architecture.
//!
//! Definition (the usual one, also used for the PyTorch side of `distill bench`):
//! * dense FLOPs = 2 x multiply-accumulates of conv2d, linear and matmul (attention `QK^T` and
//!   `AV`); biases are not part of them;
//! * element-wise work is counted separately ([`FlopCount::elementwise`]), per output element:
//!   1 for add/sub/mul/div/exp/log/sqrt/sin/cos/clamp and a bias add, 2 for `affine`,
//!   [`SILU_FLOPS`] for SiLU, [`GROUP_NORM_FLOPS`] for GroupNorm, [`SOFTMAX_FLOPS`] for softmax;
//!   pure data movement (reshape, permute, concat, upsample, gathers) is free.

use crate::backend::{Backend, Kind, Param};
use crate::candle_backend::resolve_shape;
use crate::denoiser::{Denoiser, ModelConfig};
use crate::schedule::Parameterisation;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::fmt;

/// Element-wise FLOPs per element of SiLU (`x / (1 + exp(-x))`: neg/exp, add, div, mul).
pub const SILU_FLOPS: u64 = 4;
/// Element-wise FLOPs per element of GroupNorm (mean, centre, square, sum, scale, gamma, beta).
pub const GROUP_NORM_FLOPS: u64 = 7;
/// Element-wise FLOPs per element of exact GELU (scale, erf, add, two multiplies).
pub const GELU_FLOPS: u64 = 5;
/// Element-wise FLOPs per element of softmax (max, subtract, exp, sum, divide).
pub const SOFTMAX_FLOPS: u64 = 5;

/// FLOPs of one graph evaluation, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlopCount {
    /// 2 x MACs of every conv2d (biases excluded).
    pub conv: u64,
    /// 2 x MACs of every linear layer (biases excluded).
    pub linear: u64,
    /// 2 x MACs of every batched matmul (the attention products).
    pub matmul: u64,
    /// Element-wise work, see the module docs.
    pub elementwise: u64,
}

impl FlopCount {
    /// conv + linear + matmul: the number GFLOP/s figures are based on.
    pub fn dense(&self) -> u64 {
        self.conv + self.linear + self.matmul
    }
    /// Dense plus element-wise.
    pub fn total(&self) -> u64 {
        self.dense() + self.elementwise
    }
}

impl fmt::Display for FlopCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |x: u64| x as f64 * 1e-9;
        write!(
            f,
            "{:.3} GFLOP (conv {:.3}, linear {:.4}, attention matmul {:.3}; element-wise {:.3} more)",
            g(self.dense()),
            g(self.conv),
            g(self.linear),
            g(self.matmul),
            g(self.elementwise)
        )
    }
}

/// Closed form: 2 x MACs of a conv2d producing `[n, cout, hout, wout]` from `cin` channels with a
/// `k x k` kernel.
pub fn conv2d_flops(n: usize, cin: usize, cout: usize, k: usize, hout: usize, wout: usize) -> u64 {
    2 * (n * cout * hout * wout) as u64 * (cin * k * k) as u64
}

/// Closed form: 2 x MACs of a linear layer on `rows` vectors.
pub fn linear_flops(rows: usize, din: usize, dout: usize) -> u64 {
    2 * rows as u64 * din as u64 * dout as u64
}

/// A [`Backend`] on shapes that accumulates FLOPs. Values are never computed; shape mismatches
/// are errors, as they would be at run time.
#[derive(Debug, Default)]
pub struct FlopCounter {
    count: Cell<FlopCount>,
}

impl FlopCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// What has been counted so far.
    pub fn count(&self) -> FlopCount {
        self.count.get()
    }

    pub fn reset(&self) {
        self.count.set(FlopCount::default());
    }

    fn bump(&self, f: impl FnOnce(&mut FlopCount)) {
        let mut c = self.count.get();
        f(&mut c);
        self.count.set(c);
    }

    fn elementwise(&self, shape: &[usize], per_elem: u64) {
        let n = numel(shape) as u64;
        self.bump(|c| c.elementwise += n * per_elem);
    }

    fn unary(&self, x: &[usize], per_elem: u64) -> Result<Vec<usize>> {
        self.elementwise(x, per_elem);
        Ok(x.to_vec())
    }

    fn binary(&self, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
        let out = broadcast(a, b)?;
        self.elementwise(&out, 1);
        Ok(out)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i + s.len() < rank {
            1
        } else {
            s[i + s.len() - rank]
        }
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => bail!("shapes {a:?} and {b:?} do not broadcast"),
        })
        .collect()
}

impl Backend for FlopCounter {
    type T = Vec<usize>;

    fn conv2d(
        &self,
        x: &Vec<usize>,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
    ) -> Result<Vec<usize>> {
        let &[n, cin, h, wd] = x.as_slice() else {
            bail!("conv2d {}: input {x:?} is not NCHW", w.name)
        };
        let &[cout, wcin, k, k2] = w.dims() else {
            bail!("conv2d {}: weight {:?} is not 4-D", w.name, w.dims())
        };
        ensure!(
            wcin == cin && k == k2,
            "conv2d {}: weight {:?} does not fit input {x:?}",
            w.name,
            w.dims()
        );
        ensure!(
            stride > 0 && h + 2 * pad >= k && wd + 2 * pad >= k,
            "conv2d {}: kernel {k} larger than padded input {x:?}",
            w.name
        );
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (wd + 2 * pad - k) / stride + 1,
        );
        let out = vec![n, cout, ho, wo];
        self.bump(|c| c.conv += conv2d_flops(n, cin, cout, k, ho, wo));
        if let Some(b) = b {
            ensure!(
                b.dims() == [cout],
                "conv2d {}: bias {:?} for {cout} channels",
                w.name,
                b.dims()
            );
            self.elementwise(&out, 1);
        }
        Ok(out)
    }

    fn linear(&self, x: &Vec<usize>, w: &Param, b: Option<&Param>) -> Result<Vec<usize>> {
        let &[dout, din] = w.dims() else {
            bail!("linear {}: weight {:?} is not 2-D", w.name, w.dims())
        };
        ensure!(
            x.last() == Some(&din),
            "linear {}: input {x:?} does not end in {din}",
            w.name
        );
        let rows = numel(&x[..x.len() - 1]);
        let mut out = x.clone();
        *out.last_mut().expect("non-empty") = dout;
        self.bump(|c| c.linear += linear_flops(rows, din, dout));
        if let Some(b) = b {
            ensure!(
                b.dims() == [dout],
                "linear {}: bias {:?} for {dout} outputs",
                w.name,
                b.dims()
            );
            self.elementwise(&out, 1);
        }
        Ok(out)
    }

    fn group_norm(
        &self,
        x: &Vec<usize>,
        groups: usize,
        _eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> Result<Vec<usize>> {
        ensure!(
            x.len() == 4,
            "group_norm {}: input {x:?} is not NCHW",
            gamma.name
        );
        let c = x[1];
        ensure!(
            groups > 0 && c.is_multiple_of(groups),
            "group_norm {}: {c} channels in {groups} groups",
            gamma.name
        );
        ensure!(
            gamma.dims() == [c] && beta.dims() == [c],
            "group_norm {}: affine {:?} for {c} channels",
            gamma.name,
            gamma.dims()
        );
        self.unary(x, GROUP_NORM_FLOPS)
    }

    fn layer_norm(
        &self,
        x: &Vec<usize>,
        _eps: f64,
        gamma: Option<&Param>,
        beta: Option<&Param>,
    ) -> Result<Vec<usize>> {
        let d = x.last().copied().unwrap_or(0);
        for p in gamma.iter().chain(beta.iter()) {
            ensure!(
                p.dims() == [d],
                "layer_norm {}: affine {:?} for last axis {d} of {x:?}",
                p.name,
                p.dims()
            );
        }
        self.unary(x, GROUP_NORM_FLOPS)
    }
    fn silu(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, SILU_FLOPS)
    }
    fn sigmoid(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, SILU_FLOPS - 1)
    }
    fn gelu(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, GELU_FLOPS)
    }
    fn add(&self, a: &Vec<usize>, b: &Vec<usize>) -> Result<Vec<usize>> {
        self.binary(a, b)
    }
    fn sub(&self, a: &Vec<usize>, b: &Vec<usize>) -> Result<Vec<usize>> {
        self.binary(a, b)
    }
    fn mul(&self, a: &Vec<usize>, b: &Vec<usize>) -> Result<Vec<usize>> {
        self.binary(a, b)
    }
    fn div(&self, a: &Vec<usize>, b: &Vec<usize>) -> Result<Vec<usize>> {
        self.binary(a, b)
    }
    fn affine(&self, x: &Vec<usize>, _mul: f64, _add: f64) -> Result<Vec<usize>> {
        self.unary(x, 2)
    }
    fn exp(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }
    fn log(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }
    fn sqrt(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }
    fn sin(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }
    fn cos(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }
    fn clamp(&self, x: &Vec<usize>, _lo: f64, _hi: f64) -> Result<Vec<usize>> {
        self.unary(x, 1)
    }

    fn matmul(&self, a: &Vec<usize>, b: &Vec<usize>) -> Result<Vec<usize>> {
        ensure!(
            a.len() >= 2 && b.len() >= 2,
            "matmul: operands {a:?} and {b:?} need rank >= 2"
        );
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
        ensure!(k == k2, "matmul: inner dims of {a:?} and {b:?} differ");
        let mut out =
            broadcast(&a[..a.len() - 2], &b[..b.len() - 2]).context("matmul batch dims")?;
        let batch = numel(&out) as u64;
        out.extend([m, n]);
        self.bump(|c| c.matmul += 2 * batch * (m * k * n) as u64);
        Ok(out)
    }

    fn softmax_last(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        self.unary(x, SOFTMAX_FLOPS)
    }

    fn reshape(&self, x: &Vec<usize>, shape: &[i64]) -> Result<Vec<usize>> {
        resolve_shape(x, shape)
    }

    fn narrow(&self, x: &Vec<usize>, axis: usize, start: usize, len: usize) -> Result<Vec<usize>> {
        ensure!(
            axis < x.len() && start + len <= x[axis],
            "narrow: [{start}, {}) of axis {axis} of {x:?}",
            start + len
        );
        let mut out = x.clone();
        out[axis] = len;
        Ok(out)
    }
    fn permute(&self, x: &Vec<usize>, perm: &[usize]) -> Result<Vec<usize>> {
        ensure!(perm.len() == x.len(), "permute: {perm:?} for shape {x:?}");
        let mut seen = vec![false; x.len()];
        for &p in perm {
            ensure!(
                p < x.len() && !seen[p],
                "permute: {perm:?} is not a permutation"
            );
            seen[p] = true;
        }
        Ok(perm.iter().map(|&p| x[p]).collect())
    }

    fn upsample_nearest2x(&self, x: &Vec<usize>) -> Result<Vec<usize>> {
        ensure!(x.len() == 4, "upsample: input {x:?} is not NCHW");
        Ok(vec![x[0], x[1], 2 * x[2], 2 * x[3]])
    }

    fn concat(&self, xs: &[&Vec<usize>], axis: usize) -> Result<Vec<usize>> {
        let first = xs.first().context("concat of nothing")?;
        ensure!(axis < first.len(), "concat: axis {axis} of {first:?}");
        let mut out = (*first).clone();
        for x in &xs[1..] {
            ensure!(
                x.len() == first.len(),
                "concat: ranks of {first:?} and {x:?} differ"
            );
            for (i, (&a, &b)) in first.iter().zip(x.iter()).enumerate() {
                ensure!(
                    i == axis || a == b,
                    "concat on axis {axis}: {first:?} and {x:?} differ elsewhere"
                );
            }
            out[axis] += x[axis];
        }
        Ok(out)
    }

    fn embedding(&self, ids: &Vec<usize>, table: &Param) -> Result<Vec<usize>> {
        ensure!(!ids.is_empty(), "embedding {}: scalar ids", table.name);
        let &[_, dim] = table.dims() else {
            bail!(
                "embedding {}: table {:?} is not 2-D",
                table.name,
                table.dims()
            )
        };
        let mut out = ids.clone();
        out.push(dim);
        Ok(out)
    }

    fn param_value(&self, p: &Param) -> Result<Vec<usize>> {
        Ok(p.dims().to_vec())
    }

    fn gather_const(&self, _table: &[f32], ids: &Vec<usize>) -> Result<Vec<usize>> {
        ensure!(ids.len() == 1, "gather_const: ids {ids:?} are not 1-D");
        Ok(ids.clone())
    }

    fn to_f32(&self, ids: &Vec<usize>) -> Result<Vec<usize>> {
        Ok(ids.clone())
    }

    fn constant(&self, values: &[f32], shape: &[usize]) -> Result<Vec<usize>> {
        ensure!(
            values.len() == numel(shape),
            "constant: {} values for shape {shape:?}",
            values.len()
        );
        Ok(shape.to_vec())
    }

    fn full_batch(&self, like: &Vec<usize>, _value: f64, _kind: Kind) -> Result<Vec<usize>> {
        Ok(vec![*like.first().context("full_batch: scalar `like`")?])
    }

    fn dropout(&self, x: &Vec<usize>, _p: f64) -> Result<Vec<usize>> {
        Ok(x.clone())
    }
}

/// FLOPs of one `Denoiser::forward` (preconditioning included) on a batch of `batch` images,
/// with the noise level computed in the graph as in training (EDM: from sigma; VP: from timesteps).
pub fn denoiser_forward(den: &Denoiser, batch: usize) -> Result<FlopCount> {
    let (c, r) = den.image_shape();
    let fc = FlopCounter::new();
    let x = vec![batch, c, r, r];
    let per_sample = vec![batch];
    let level = match &den.param {
        Parameterisation::Edm(_) | Parameterisation::Flow(_) => {
            den.level_from_sigma(&fc, &per_sample)?
        }
        Parameterisation::Vp(_) => den.level_from_timesteps(&fc, &per_sample)?,
    };
    let out = den.forward(&fc, &x, &level, &per_sample)?;
    ensure!(
        out == x,
        "denoiser output {out:?} differs from its input {x:?}"
    );
    Ok(fc.count())
}

/// [`denoiser_forward`] for a configuration, on a throw-away zero-weight network.
pub fn model_forward(cfg: &ModelConfig, batch: usize) -> Result<FlopCount> {
    let den = Denoiser::new(VarBuilder::zeros(DType::F32, &Device::Cpu), cfg)?;
    denoiser_forward(&den, batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Conv2d, Linear};
    use crate::schedule::EdmSchedule;
    use crate::unet::UNetConfig;

    fn vb() -> VarBuilder<'static> {
        VarBuilder::zeros(DType::F32, &Device::Cpu)
    }

    #[test]
    fn conv_matches_closed_form() {
        let fc = FlopCounter::new();
        // 3x3, stride 2, pad 1: 17x17 -> 9x9.
        let conv = Conv2d::new(vb().pp("c"), 5, 7, 3, 2, 1).unwrap();
        let y = conv.forward(&fc, &vec![4, 5, 17, 17]).unwrap();
        assert_eq!(y, vec![4, 7, 9, 9]);
        let c = fc.count();
        assert_eq!(c.conv, 2 * 4 * 7 * 9 * 9 * 5 * 3 * 3);
        assert_eq!(c.conv, conv2d_flops(4, 5, 7, 3, 9, 9));
        assert_eq!(c.elementwise, 4 * 7 * 9 * 9); // the bias
        assert_eq!((c.linear, c.matmul), (0, 0));
    }

    #[test]
    fn linear_matches_closed_form() {
        let fc = FlopCounter::new();
        let lin = Linear::new(vb().pp("l"), 24, 10).unwrap();
        let y = lin.forward(&fc, &vec![3, 6, 24]).unwrap();
        assert_eq!(y, vec![3, 6, 10]);
        assert_eq!(fc.count().linear, 2 * 18 * 24 * 10);
        assert_eq!(fc.count().elementwise, 18 * 10);
        assert_eq!(fc.count().conv, 0);
    }

    #[test]
    fn matmul_and_shape_errors() {
        let fc = FlopCounter::new();
        assert_eq!(
            fc.matmul(&vec![2, 64, 32], &vec![2, 32, 64]).unwrap(),
            vec![2, 64, 64]
        );
        assert_eq!(fc.count().matmul, 2 * 2 * 64 * 32 * 64);
        assert!(fc.matmul(&vec![2, 64, 32], &vec![2, 31, 64]).is_err());
        assert!(fc.add(&vec![2, 3], &vec![4, 3]).is_err());
        assert_eq!(fc.add(&vec![2, 1, 5], &vec![4, 1]).unwrap(), vec![2, 4, 5]);
    }

    fn edm(unet: UNetConfig) -> ModelConfig {
        ModelConfig::ours(unet, Parameterisation::Edm(EdmSchedule::default()))
    }

    #[test]
    fn bench_unet_forward() {
        let f = model_forward(&edm(UNetConfig::bench()), 64).unwrap();
        // 69.02 GFLOP of conv/linear/attention for the benchmark UNet at batch 64 (the decoder
        // dominates: its upsampling convs run at the finer resolution with the coarser level's
        // channels, and its first convs see the concatenated skips). PyTorch's FlopCounterMode
        // gives the same number for the peer in bench/torch_unet.py.
        assert!((68e9..70e9).contains(&(f.dense() as f64)), "{f}");
        eprintln!("bench() UNet, batch 64: {f}; dense = {} FLOP", f.dense());
        // Linear in the batch.
        let f1 = model_forward(&edm(UNetConfig::bench()), 1).unwrap();
        assert_eq!(f1.dense() * 64, f.dense());
    }
}
