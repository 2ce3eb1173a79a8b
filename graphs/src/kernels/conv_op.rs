//! conv2d (+ bias, + residual) as one candle custom op whose backward runs the kernels of
//! [`super::conv`]. Fusing the bias and the residual add saves candle two full passes over the
//! output in the forward and a reduction plus a gradient accumulation in the backward.
//!
//! candle's custom ops take at most three tensors, so a conv with both a bias and a residual
//! gets its weight and bias as one flat tensor (`cat` of the two: a copy of the parameters only).

use super::conv::{self, Bias};
use super::conv_plan::Geom;
use super::simd;
use super::tensor_io::{storage_f32, with_f32};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The op's tensor arguments after the input `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Args {
    /// `(x, w)`.
    W,
    /// `(x, w, bias)`; bias `[cout]` or `[n, cout]`.
    WB,
    /// `(x, w, residual)`.
    WR,
    /// `(x, cat(w, bias), residual)`; bias `[n, cout]` if `per_image`, else `[cout]`.
    PackedR { per_image: bool },
}

#[derive(Clone, Copy, Debug)]
struct Conv2dOp {
    stride: usize,
    pad: usize,
    args: Args,
    /// Weight dims `(cout, cin, k)`.
    wdims: (usize, usize, usize),
}

impl Conv2dOp {
    fn geom(&self, x: &[usize]) -> Result<Geom> {
        let (cout, cin, k) = self.wdims;
        let &[n, c, h, w] = x else {
            candle_core::bail!("fast conv2d: input {x:?} is not 4-D");
        };
        if c != cin {
            candle_core::bail!(
                "fast conv2d: input {x:?} does not fit weight {:?}",
                [cout, cin, k, k]
            );
        }
        Geom::new((n, c, h, w), cout, k, self.stride, self.pad).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "fast conv2d: kernel {k} stride {} pad {} does not fit input {x:?}",
                self.stride, self.pad
            ))
        })
    }

    fn wlen(&self) -> usize {
        let (cout, cin, k) = self.wdims;
        cout * cin * k * k
    }

    fn bias<'a>(&self, g: &Geom, v: &'a [f32]) -> Result<Bias<'a>> {
        if v.len() == g.cout {
            Ok(Bias::Channel(v))
        } else if v.len() == g.n * g.cout {
            Ok(Bias::Image(v))
        } else {
            candle_core::bail!(
                "fast conv2d: {} bias values for {} images x {} channels",
                v.len(),
                g.n,
                g.cout
            )
        }
    }

    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        a2: &[f32],
        a3: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(x.1.dims())?;
        let xs = storage_f32(x.0, x.1, "fast conv2d")?;
        let (w, bias, res) = match (self.args, a3) {
            (Args::W, _) => (a2, Bias::None, None),
            (Args::WB, Some(b)) => (a2, self.bias(&g, b)?, None),
            (Args::WR, Some(r)) => (a2, Bias::None, Some(r)),
            (Args::PackedR { .. }, Some(r)) => {
                let (w, b) = a2.split_at(self.wlen());
                (w, self.bias(&g, b)?, Some(r))
            }
            _ => candle_core::bail!("fast conv2d: missing third argument"),
        };
        if w.len() != self.wlen() || res.is_some_and(|r| r.len() != g.n * g.out_image()) {
            candle_core::bail!("fast conv2d: weight or residual size does not fit {:?}", g);
        }
        let y = conv::forward(&g, xs, w, bias, res, simd::level());
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    /// Input gradient (if `x` tracks gradients), weight gradient and per-image bias gradient
    /// `[n, cout]` (if `want_wb`).
    fn grads(
        &self,
        x: &Tensor,
        w: &[f32],
        grad: &Tensor,
        want_wb: bool,
    ) -> Result<(Option<Tensor>, Option<WeightGrads>)> {
        let g = self.geom(x.dims())?;
        let level = simd::level();
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            let v = with_f32(&grad, |dy| Ok(conv::grad_input(&g, dy, w, level)))?;
            Some(Tensor::from_vec(v, x.shape(), x.device())?)
        } else {
            None
        };
        let wb = if want_wb {
            Some(with_f32(x, |xs| {
                with_f32(&grad, |dy| Ok(conv::grad_weight(&g, xs, dy, level)))
            })?)
        } else {
            None
        };
        Ok((dx, wb))
    }
}

/// Weight gradient and per-image bias gradient `[n, cout]`.
type WeightGrads = (Vec<f32>, Vec<f32>);

/// Sums a per-image bias gradient `[n, cout]` over images.
fn sum_images(db: &[f32], cout: usize) -> Vec<f32> {
    let mut s = vec![0f32; cout];
    for row in db.chunks(cout) {
        for (a, v) in s.iter_mut().zip(row) {
            *a += v;
        }
    }
    s
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), storage_f32(s2, l2, "fast conv2d")?, None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, wb) = with_f32(w, |ws| self.grads(x, ws, grad, w.track_op()))?;
        let dw = wb
            .map(|(dw, _)| Tensor::from_vec(dw, w.shape(), w.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        match self.args {
            Args::WR | Args::PackedR { .. } => "conv2d_residual",
            _ => "conv2d_bias",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(
            (s1, l1),
            storage_f32(s2, l2, "fast conv2d")?,
            Some(storage_f32(s3, l3, "fast conv2d")?),
        )
    }
    fn bwd(
        &self,
        x: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        let cout = self.wdims.0;
        let want = a2.track_op() || (self.args == Args::WB && a3.track_op());
        let (dx, wb) = with_f32(a2, |v| self.grads(x, &v[..self.wlen()], grad, want))?;
        // The residual's gradient is the output's.
        let dres = || {
            if a3.track_op() {
                Some(grad.clone())
            } else {
                None
            }
        };
        Ok(match (self.args, wb) {
            (Args::WB, Some((dw, db))) => {
                let dw = a2
                    .track_op()
                    .then(|| Tensor::from_vec(dw, a2.shape(), dev))
                    .transpose()?;
                let db = if !a3.track_op() {
                    None
                } else if a3.rank() == 1 {
                    Some(Tensor::from_vec(sum_images(&db, cout), cout, dev)?)
                } else {
                    Some(Tensor::from_vec(db, a3.shape(), dev)?)
                };
                (dx, dw, db)
            }
            (Args::WR, Some((dw, _))) => (dx, Some(Tensor::from_vec(dw, a2.shape(), dev)?), dres()),
            (Args::PackedR { per_image }, Some((mut dw, db))) => {
                if per_image {
                    dw.extend_from_slice(&db);
                } else {
                    dw.extend(sum_images(&db, cout));
                }
                (dx, Some(Tensor::from_vec(dw, a2.shape(), dev)?), dres())
            }
            _ => (dx, None, dres()),
        })
    }
}

fn fast(ts: &[Option<&Tensor>]) -> bool {
    ts.iter()
        .flatten()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Candle's own conv2d with the bias (`[cout]` or `[n, cout]`) broadcast-added.
fn stock(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let y = x.conv2d(w, pad, stride, 1, 1)?;
    match bias {
        None => Ok(y),
        Some(b) if b.rank() == 1 => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        Some(b) => y.broadcast_add(&b.reshape((b.dim(0)?, b.dim(1)?, 1, 1))?),
    }
}

fn op(w: &Tensor, stride: usize, pad: usize, args: Args) -> Result<Conv2dOp> {
    let (cout, cin, k, k2) = w.dims4()?;
    if k != k2 {
        candle_core::bail!("fast conv2d: square kernels only, got {:?}", w.dims());
    }
    Ok(Conv2dOp {
        stride,
        pad,
        args,
        wdims: (cout, cin, k),
    })
}

/// conv2d of `x` `[n, cin, h, w]` with `w` `[cout, cin, k, k]` (square stride and zero padding),
/// plus `bias` `[cout]` or, per image, `[n, cout]` (e.g. a conv bias plus an embedding).
/// Gradients flow to all three. Runs the fast kernels for f32 on the CPU and candle's own conv
/// elsewhere.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    if !fast(&[Some(x), Some(w), bias]) {
        return stock(x, w, bias, stride, pad);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        None => x.apply_op2(&w, op(&w, stride, pad, Args::W)?),
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op(&w, stride, pad, Args::WB)?),
    }
}

/// `residual + conv2d(x, w, bias)` (shapes as in [`conv2d`]; `residual` like the output), the
/// add fused into the kernel.
pub fn conv2d_residual(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    if !fast(&[Some(x), Some(w), bias, Some(residual)]) {
        return residual + stock(x, w, bias, stride, pad)?;
    }
    let (cout, _, k, _) = w.dims4()?;
    let g = Geom::new(x.dims4()?, cout, k, stride, pad);
    if g.map(|g| [g.n, g.cout, g.ho, g.wo])
        .as_ref()
        .map(|d| &d[..])
        != Some(residual.dims())
    {
        candle_core::bail!(
            "conv2d_residual: residual {:?} does not fit the conv of {:?} with {:?}",
            residual.dims(),
            x.dims(),
            w.dims()
        );
    }
    let (x, r) = (x.contiguous()?, residual.contiguous()?);
    match bias {
        None => {
            let w = w.contiguous()?;
            x.apply_op3(&w, &r, op(&w, stride, pad, Args::WR)?)
        }
        Some(b) => {
            let o = op(
                w,
                stride,
                pad,
                Args::PackedR {
                    per_image: b.rank() == 2,
                },
            )?;
            let packed = Tensor::cat(&[&w.flatten_all()?, &b.flatten_all()?], 0)?;
            x.apply_op3(&packed, &r, o)
        }
    }
}
