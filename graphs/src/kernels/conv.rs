//! conv2d as im2col + GEMM. Stock candle computes the input gradient with a direct
//! conv_transpose2d loop and the kernel gradient as a conv with a huge kernel (~12-26 GFLOP/s);
//! here every FLOP-heavy part is a matmul (candle's gemm, ~180 GFLOP/s on this machine) and
//! only the cheap data movement (im2col / col2im) is custom: `Im2Col`'s backward is `Col2Im`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one square-kernel convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
}

/// `[N, C, H, W]` -> `[C*k*k, N*Ho*Wo]`: rows ordered (c, ky, kx) like a conv weight's
/// flattening, columns (n, oy, ox), so the whole batch is one GEMM with the weight.
struct Im2Col(Geom, usize);
/// Adjoint of [`Im2Col`]: scatter-adds the columns back to `[N, C, H, W]`.
struct Col2Im(Geom, usize);

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fast conv kernels take f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fast conv kernels need contiguous input"),
    }
}

/// Input column range `[lo, hi)` of output positions whose input index `o*stride + k - pad` is in `[0, size)`.
fn valid_range(k: usize, stride: usize, pad: usize, size: usize, out: usize) -> (usize, usize) {
    let lo = if k >= pad {
        0
    } else {
        (pad - k).div_ceil(stride)
    };
    let hi = if size + pad > k {
        ((size + pad - k - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, n) = (self.0, self.1);
        let x = f32_slice(s, l)?;
        let (ho, wo) = g.out_hw();
        let rows = g.c * g.k * g.k;
        let plane = ho * wo;
        let mut out = vec![0f32; rows * n * plane];
        out.par_chunks_mut(n * plane)
            .enumerate()
            .for_each(|(r, dst)| {
                let (c, ky, kx) = (r / (g.k * g.k), (r / g.k) % g.k, r % g.k);
                let (x_lo, x_hi) = valid_range(kx, g.stride, g.pad, g.w, wo);
                for b in 0..n {
                    let src = &x[(b * g.c + c) * g.h * g.w..(b * g.c + c + 1) * g.h * g.w];
                    for oy in 0..ho {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue; // zero padding (already zero)
                        }
                        let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let drow = &mut dst[b * plane + oy * wo..b * plane + (oy + 1) * wo];
                        if g.stride == 1 {
                            let off = x_lo + kx - g.pad;
                            drow[x_lo..x_hi].copy_from_slice(&srow[off..off + (x_hi - x_lo)]);
                        } else {
                            for ox in x_lo..x_hi {
                                drow[ox] = srow[ox * g.stride + kx - g.pad];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, n * plane))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0, self.1))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, n) = (self.0, self.1);
        let cols = f32_slice(s, l)?;
        let (ho, wo) = g.out_hw();
        let plane = ho * wo;
        let mut out = vec![0f32; n * g.c * g.h * g.w];
        out.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(bc, dst)| {
                let (b, c) = (bc / g.c, bc % g.c);
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let r = (c * g.k + ky) * g.k + kx;
                        let (x_lo, x_hi) = valid_range(kx, g.stride, g.pad, g.w, wo);
                        let src = &cols[(r * n + b) * plane..(r * n + b + 1) * plane];
                        for oy in 0..ho {
                            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            let drow = &mut dst[iy as usize * g.w..(iy as usize + 1) * g.w];
                            let srow = &src[oy * wo..(oy + 1) * wo];
                            for ox in x_lo..x_hi {
                                drow[ox * g.stride + kx - g.pad] += srow[ox];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, g.c, g.h, g.w))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0, self.1))?))
    }
}

/// conv2d (`w` `[Cout, Cin, k, k]`, square stride/padding, no bias) with gradients for both
/// inputs; falls back to candle's own conv for non-f32 or non-CPU tensors.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (cout, cin, k, k2) = w.dims4()?;
    if cin != c || k != k2 {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        );
    }
    let g = Geom {
        c,
        h,
        w: wd,
        k,
        stride,
        pad,
    };
    let (ho, wo) = g.out_hw();
    let wm = w.reshape((cout, cin * k * k))?;
    let cols = if k == 1 && stride == 1 && pad == 0 {
        x.reshape((n, c, h * wd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c, n * h * wd))?
    } else {
        x.contiguous()?.apply_op1(Im2Col(g, n))?
    };
    // [Cout, N*HoWo] -> [N, Cout, Ho, Wo]
    wm.matmul(&cols)?
        .reshape((cout, n, ho * wo))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, cout, ho, wo))
}
