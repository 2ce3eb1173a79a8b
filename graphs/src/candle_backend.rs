//! Executes the graphs with candle (CPU or CUDA), with autograd.

use crate::backend::{Backend, Kind, Param};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// Runs graph definitions on candle tensors. `train` enables dropout; `kernels` routes conv2d,
/// GroupNorm, attention and the fused variants through [`crate::kernels`] (which themselves fall
/// back to candle's ops off the CPU or for non-f32); without it every op is candle's own.
/// `autocast` (f16/bf16) runs convolutions and matrix products in that dtype on f32 tensors and
/// returns f32 (PyTorch's autocast): gradients reach the f32 master weights through the casts.
/// Autocast ops always take candle's path (the kernels are f32).
#[derive(Clone, Debug)]
pub struct CandleBackend {
    pub device: Device,
    pub train: bool,
    pub autocast: Option<DType>,
    pub kernels: bool,
    /// Float dtype of the tensors the backend creates (constants, `to_f32`, `full_batch`): f32,
    /// or f64 for [`CandleBackend::f64_reference`].
    pub float: DType,
}

/// Whether new backends use the fast kernels: yes unless `DISTILL_KERNELS=stock` (an escape
/// hatch to rerun anything on candle's own ops, e.g. to rule out a kernel).
fn kernels_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DISTILL_KERNELS").map_or(true, |v| v != "stock"))
}

impl CandleBackend {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            train: false,
            autocast: None,
            kernels: kernels_default(),
            float: DType::F32,
        }
    }
    /// candle's stock ops in f64 (with an f64 copy of the weights, [`crate::params::in_dtype`]):
    /// the same graph without f32 round-off, so `|f32 result - f64 result|` measures how much the
    /// graph amplifies round-off (what `distill validate` allows a runtime on top of its tolerance).
    pub fn f64_reference(device: &Device) -> Self {
        Self {
            float: DType::F64,
            ..Self::new(device).stock()
        }
    }
    pub fn training(device: &Device) -> Self {
        Self {
            train: true,
            ..Self::new(device)
        }
    }
    /// The same backend on candle's stock ops only (the reference the kernels are tested and
    /// benchmarked against).
    pub fn stock(mut self) -> Self {
        self.kernels = false;
        self
    }
    pub fn with_autocast(mut self, dtype: Option<DType>) -> Self {
        self.autocast = dtype.filter(|d| *d != DType::F32);
        self
    }
    /// Whether f32 ops take the fast kernels.
    fn fast(&self) -> bool {
        self.kernels && self.autocast.is_none()
    }
    /// `t` in the autocast dtype (unchanged without autocast). candle has no bf16 matmul on the
    /// CPU, so there bf16 is emulated the way bf16 tensor cores compute: inputs rounded to bf16,
    /// products accumulated in f32.
    fn down(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match self.autocast {
            Some(DType::BF16) if t.device().is_cpu() => {
                t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
            }
            Some(d) if t.dtype() != d => t.to_dtype(d)?,
            _ => t.clone(),
        })
    }
    /// Back to f32 after an autocast op.
    fn up(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self.autocast {
            Some(_) if t.dtype() != DType::F32 => t.to_dtype(DType::F32)?,
            _ => t,
        })
    }
}

/// Resolves ONNX-style reshape dims (`0` = copy, `-1` = infer) against `dims`.
pub fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                *dims
                    .get(i)
                    .with_context(|| format!("reshape: dim {i} of {dims:?} does not exist"))?,
            ),
            -1 => {
                if infer.is_some() {
                    bail!("reshape: more than one -1 in {shape:?}");
                }
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => bail!("reshape: invalid dim {s} in {shape:?}"),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("reshape: cannot reshape {dims:?} into {shape:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!("reshape: cannot reshape {dims:?} into {shape:?}");
    }
    Ok(out)
}

/// GroupNorm from candle's stock ops (any device/dtype; what the fused CPU kernel is tested against).
pub fn stock_group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    gamma: &Param,
    beta: &Param,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let xg = x.reshape((n, groups, (c / groups) * h * w))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((n, c, h, w))?;
    Ok(xn
        .broadcast_mul(&gamma.t.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.t.reshape((1, c, 1, 1))?)?)
}

impl Backend for CandleBackend {
    type T = Tensor;

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        if !self.fast() {
            let y = self
                .down(x)?
                .conv2d(&self.down(&w.t)?, pad, stride, 1, 1)
                .with_context(|| format!("conv2d {}", w.name))?;
            let y = match b {
                Some(b) => y.broadcast_add(&self.down(&b.t)?.reshape((1, b.t.dim(0)?, 1, 1))?)?,
                None => y,
            };
            return self.up(y);
        }
        crate::kernels::conv2d(x, &w.t, b.map(|b| &b.t), stride, pad)
            .with_context(|| format!("conv2d {}", w.name))
    }

    fn conv2d_shifted(
        &self,
        x: &Tensor,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
        shift: impl FnOnce(&Self) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let shift = shift(self)?;
        let (n, cout) = (x.dim(0)?, w.t.dim(0)?);
        let d = shift.dims();
        if !self.fast()
            || d.len() != 4
            || d[1] != cout
            || d[2] != 1
            || d[3] != 1
            || (d[0] != n && d[0] != 1)
        {
            let y = self.conv2d(x, w, b, stride, pad)?;
            return self.add(&y, &shift);
        }
        // The shift becomes a per-image bias of the conv: no pass over the output for the add.
        let mut bias = shift.reshape((d[0], cout))?;
        if let Some(b) = b {
            bias = bias.broadcast_add(&b.t.reshape((1, cout))?)?;
        }
        if d[0] == 1 {
            bias = bias.reshape(cout)?;
        }
        crate::kernels::conv2d(x, &w.t, Some(&bias), stride, pad)
            .with_context(|| format!("conv2d {}", w.name))
    }

    fn conv2d_residual(
        &self,
        x: &Tensor,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
        residual: impl FnOnce(&Self) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let r = residual(self)?;
        if !self.fast() {
            let y = self.conv2d(x, w, b, stride, pad)?;
            return self.add(&r, &y);
        }
        crate::kernels::conv2d_residual(x, &w.t, b.map(|b| &b.t), &r, stride, pad)
            .with_context(|| format!("conv2d {} + residual", w.name))
    }

    fn linear(&self, x: &Tensor, w: &Param, b: Option<&Param>) -> Result<Tensor> {
        let y = self
            .down(x)?
            .broadcast_matmul(&self.down(&w.t)?.t()?)
            .with_context(|| format!("linear {}", w.name))?;
        let y = match b {
            Some(b) => y.broadcast_add(&self.down(&b.t)?)?,
            None => y,
        };
        self.up(y)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> Result<Tensor> {
        if self.kernels {
            if let Some(y) = crate::kernels::group_norm(x, groups, eps, &gamma.t, &beta.t, false)? {
                return Ok(y);
            }
        }
        stock_group_norm(x, groups, eps, gamma, beta)
    }

    fn group_norm_silu(
        &self,
        x: &Tensor,
        groups: usize,
        eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> Result<Tensor> {
        if self.kernels {
            if let Some(y) = crate::kernels::group_norm(x, groups, eps, &gamma.t, &beta.t, true)? {
                return Ok(y);
            }
        }
        Ok(candle_nn::ops::silu(&stock_group_norm(
            x, groups, eps, gamma, beta,
        )?)?)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        eps: f64,
        gamma: Option<&Param>,
        beta: Option<&Param>,
    ) -> Result<Tensor> {
        // Composed from differentiable ops (candle_nn's fused layer_norm has no backward).
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = xc.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
        if let Some(g) = gamma {
            y = y.broadcast_mul(&g.t)?;
        }
        if let Some(b) = beta {
            y = y.broadcast_add(&b.t)?;
        }
        Ok(y)
    }
    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::silu(x)?)
    }
    fn sigmoid(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(x)?)
    }
    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.gelu_erf()?)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_add(b)?)
    }
    fn sub(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_sub(b)?)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_mul(b)?)
    }
    fn div(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_div(b)?)
    }
    fn affine(&self, x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
        Ok(x.affine(mul, add)?)
    }
    fn exp(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.exp()?)
    }
    fn log(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.log()?)
    }
    fn sqrt(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.sqrt()?)
    }
    fn sin(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.sin()?)
    }
    fn cos(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.cos()?)
    }
    fn clamp(&self, x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
        Ok(x.clamp(lo, hi)?)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.down(a)?.contiguous()?, self.down(b)?.contiguous()?);
        self.up(a.broadcast_matmul(&b)?)
    }
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor> {
        // candle_nn::ops::softmax_last_dim has no backward.
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        if self.fast() {
            if let Some(y) = crate::kernels::attention(q, k, v, scale)? {
                return Ok(y);
            }
        }
        let qt = self.permute(q, &[0, 2, 1])?;
        let scores = self.affine(&self.matmul(&qt, k)?, scale, 0.0)?;
        let attn = self.softmax_last(&scores)?;
        self.matmul(v, &self.permute(&attn, &[0, 2, 1])?)
    }
    fn reshape(&self, x: &Tensor, shape: &[i64]) -> Result<Tensor> {
        let dims = resolve_shape(x.dims(), shape)?;
        Ok(x.reshape(dims)?)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        Ok(x.permute(perm.to_vec())?.contiguous()?)
    }
    fn narrow(&self, x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(x.narrow(axis, start, len)?.contiguous()?)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels {
            if let Some(y) = crate::kernels::upsample_nearest2x(x)? {
                return Ok(y);
            }
        }
        let (_, _, h, w) = x.dims4()?;
        Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
    }
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        if let (true, 1, &[a, b]) = (self.kernels, axis, xs) {
            if let Some(y) = crate::kernels::concat_channels(a, b)? {
                return Ok(y);
            }
        }
        Ok(Tensor::cat(xs, axis)?)
    }
    fn embedding(&self, ids: &Tensor, table: &Param) -> Result<Tensor> {
        let rows = table.t.dim(0)?;
        let mut shape = ids.dims().to_vec();
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= rows {
            bail!(
                "embedding {}: id {max} out of range (table has {rows} rows)",
                table.name
            );
        }
        let y = table.t.index_select(&ids, 0)?;
        if shape.len() == 1 {
            return Ok(y);
        }
        shape.push(table.t.dim(1)?);
        Ok(y.reshape(shape)?)
    }
    fn param_value(&self, p: &Param) -> Result<Tensor> {
        Ok(p.t.clone())
    }
    fn gather_const(&self, table: &[f32], ids: &Tensor) -> Result<Tensor> {
        let t = Tensor::new(table, &self.device)?.to_dtype(self.float)?;
        Ok(t.index_select(&ids.to_dtype(DType::U32)?, 0)?)
    }
    fn to_f32(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(ids.to_dtype(self.float)?)
    }
    fn constant(&self, values: &[f32], shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_slice(values, shape, &self.device)?.to_dtype(self.float)?)
    }
    fn full_batch(&self, like: &Tensor, value: f64, kind: Kind) -> Result<Tensor> {
        let n = like.dim(0)?;
        Ok(match kind {
            Kind::F32 if self.float == DType::F64 => Tensor::full(value, n, &self.device)?,
            Kind::F32 => Tensor::full(value as f32, n, &self.device)?,
            Kind::Label => Tensor::full(value as u32, n, &self.device)?,
        })
    }
    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if self.train && p > 0.0 {
            Ok(candle_nn::ops::dropout(x, p as f32)?)
        } else {
            Ok(x.clone())
        }
    }
}
