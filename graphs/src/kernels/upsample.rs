//! Nearest-neighbour 2x upsampling with a direct backward. candle's backward of
//! `upsample_nearest2d` is a depthwise conv (one conv call per channel); the adjoint is just the
//! sum of each 2x2 block.

use super::scratch::{self, SendPtr};
use super::tensor_io::with_f32;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Upsample2x;

/// Planes per parallel task (keeps tiny planes from becoming one task each).
fn planes_per_task(plane: usize) -> usize {
    (16384 / plane.max(1)).max(1)
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample_nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((a, b)), &[n, c, h, w]) =
            (s, l.contiguous_offsets(), l.dims())
        else {
            candle_core::bail!("upsample_nearest2x: contiguous f32 [N, C, H, W] input only")
        };
        let x = &v[a..b];
        let (plane, k) = (h * w, planes_per_task(4 * h * w));
        // SAFETY: every output plane is written whole by the task that owns it.
        let y = unsafe {
            scratch::filled_by(n * c * 4 * plane, |y| {
                let y = SendPtr(y);
                (0..(n * c).div_ceil(k)).into_par_iter().for_each(|t| {
                    for pc in t * k..((t + 1) * k).min(n * c) {
                        let src = &x[pc * plane..(pc + 1) * plane];
                        let dst = y.add(pc * 4 * plane);
                        for (r, row) in src.chunks(w).enumerate() {
                            let d0 = dst.add(2 * r * 2 * w);
                            for (i, v) in row.iter().enumerate() {
                                *d0.add(2 * i) = *v;
                                *d0.add(2 * i + 1) = *v;
                            }
                            std::ptr::copy_nonoverlapping(d0, d0.add(2 * w), 2 * w);
                        }
                    }
                });
            })
        };
        Ok((CpuStorage::F32(y), Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let (plane, k) = (h * w, planes_per_task(4 * h * w));
        let dx = with_f32(grad, |g| {
            // SAFETY: every input plane is written whole by the task that owns it.
            Ok(unsafe {
                scratch::filled_by(n * c * plane, |dx| {
                    let dx = SendPtr(dx);
                    (0..(n * c).div_ceil(k)).into_par_iter().for_each(|t| {
                        for pc in t * k..((t + 1) * k).min(n * c) {
                            let src = &g[pc * 4 * plane..(pc + 1) * 4 * plane];
                            let dst = dx.add(pc * plane);
                            for r in 0..h {
                                let (r0, r1) = (
                                    &src[2 * r * 2 * w..][..2 * w],
                                    &src[(2 * r + 1) * 2 * w..][..2 * w],
                                );
                                for i in 0..w {
                                    *dst.add(r * w + i) =
                                        (r0[2 * i] + r0[2 * i + 1]) + (r1[2 * i] + r1[2 * i + 1]);
                                }
                            }
                        }
                    });
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Nearest-neighbour upsampling of `[N, C, H, W]` to `[N, C, 2H, 2W]` with its gradient; `None`
/// where the kernel does not apply (non-CPU or non-f32).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Upsample2x)?))
}
