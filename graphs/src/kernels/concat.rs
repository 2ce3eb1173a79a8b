//! Channel concatenation of two `[N, C, H, W]` tensors (the UNet's skip connections), forward
//! and backward as parallel copies. candle's `cat` copies on one thread, and its backward hands
//! each input a strided view of the gradient that the next kernel copies again, on one thread.

use super::scratch::{self, SendPtr};
use super::tensor_io::{storage_f32, with_f32};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct ConcatChannels;

/// Images per parallel task: about 64k floats each, at least one image.
fn images_per_task(image: usize) -> usize {
    (65536 / image.max(1)).max(1)
}

/// Copies `n` images of `src` (`a` floats each, then `b`) into `dst` (`a + b` floats each) when
/// `gather`, or the other way round (the backward's split).
///
/// # Safety
/// `first`/`second` hold `n * a` / `n * b` floats and `joined` `n * (a + b)`; the tasks touch
/// disjoint images.
unsafe fn copy_images(
    n: usize,
    (a, b): (usize, usize),
    first: SendPtr,
    second: SendPtr,
    joined: SendPtr,
    gather: bool,
) {
    let k = images_per_task(a + b);
    (0..n.div_ceil(k)).into_par_iter().for_each(|t| {
        for i in t * k..((t + 1) * k).min(n) {
            let (pa, pb, pj) = (first.add(i * a), second.add(i * b), joined.add(i * (a + b)));
            if gather {
                std::ptr::copy_nonoverlapping(pa, pj, a);
                std::ptr::copy_nonoverlapping(pb, pj.add(a), b);
            } else {
                std::ptr::copy_nonoverlapping(pj, pa, a);
                std::ptr::copy_nonoverlapping(pj.add(a), pb, b);
            }
        }
    });
}

impl CustomOp2 for ConcatChannels {
    fn name(&self) -> &'static str {
        "concat_channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[n, c1, h, w], &[n2, c2, h2, w2]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("concat_channels: [N, C, H, W] inputs only")
        };
        if (n, h, w) != (n2, h2, w2) {
            candle_core::bail!(
                "concat_channels: {:?} and {:?} differ outside the channels",
                l1.dims(),
                l2.dims()
            );
        }
        let (x1, x2) = (
            storage_f32(s1, l1, "concat_channels")?,
            storage_f32(s2, l2, "concat_channels")?,
        );
        let (a, b) = (c1 * h * w, c2 * h * w);
        // SAFETY: sizes as checked above; `y` is written whole, image by image.
        let y = unsafe {
            scratch::filled_by(n * (a + b), |y| {
                copy_images(
                    n,
                    (a, b),
                    SendPtr(x1.as_ptr() as *mut f32),
                    SendPtr(x2.as_ptr() as *mut f32),
                    SendPtr(y),
                    true,
                )
            })
        };
        Ok((CpuStorage::F32(y), Shape::from((n, c1 + c2, h, w))))
    }

    fn bwd(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c1, h, w) = x1.dims4()?;
        let c2 = x2.dim(1)?;
        let (a, b) = (c1 * h * w, c2 * h * w);
        let (d1, d2) = with_f32(grad, |g| {
            let mut d2 = Vec::new();
            // SAFETY: the split writes every float of both outputs.
            let d1 = unsafe {
                scratch::filled_by(n * a, |d1| {
                    d2 = scratch::filled_by(n * b, |d2| {
                        copy_images(
                            n,
                            (a, b),
                            SendPtr(d1),
                            SendPtr(d2),
                            SendPtr(g.as_ptr() as *mut f32),
                            false,
                        )
                    });
                })
            };
            Ok((d1, d2))
        })?;
        let dev = x1.device();
        Ok((
            x1.track_op()
                .then(|| Tensor::from_vec(d1, x1.shape(), dev))
                .transpose()?,
            x2.track_op()
                .then(|| Tensor::from_vec(d2, x2.shape(), dev))
                .transpose()?,
        ))
    }
}

/// `[x1, x2]` along the channels of two `[N, C, H, W]` tensors, with its gradient; `None` where
/// the kernel does not apply (non-CPU, non-f32, other ranks), so the caller uses `Tensor::cat`.
pub fn concat_channels(x1: &Tensor, x2: &Tensor) -> Result<Option<Tensor>> {
    let ok = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4;
    if !ok(x1) || !ok(x2) {
        return Ok(None);
    }
    Ok(Some(
        x1.contiguous()?
            .apply_op2(&x2.contiguous()?, ConcatChannels)?,
    ))
}
