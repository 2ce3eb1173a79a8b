//! Fused GroupNorm (+ optional SiLU) with a closed-form backward, vectorised.
//!
//! Stock candle spends ~8 passes over memory on the forward (mean, center, square, mean, sqrt,
//! divide, scale, shift) and more on the backward. Here each (image, group) is one task whose
//! data stays in cache: the forward reads it for the statistics and once more to write the
//! output; the backward recomputes the statistics, then makes one pass that stores the
//! pre-normalisation gradient in a per-thread buffer and one that writes the input gradient.

use super::scratch::{self, SendPtr, Slot};
use super::simd::{self, dispatch, Simd};
use super::tensor_io::{storage_f32, with_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Sum of `x` and of `(x - shift)^2`, vectorised, accumulated in f64 every few vectors.
#[inline(always)]
unsafe fn sums<S: Simd>(x: &[f32], shift: f32) -> (f64, f64) {
    let (p, n) = (x.as_ptr(), x.len());
    let sh = S::splat(shift);
    let (mut s1, mut s2) = (0f64, 0f64);
    let mut i = 0;
    while i < n {
        let end = (i + 8 * S::LANES).min(n);
        let (mut a, mut b) = (S::zero(), S::zero());
        while i + S::LANES <= end {
            let v = S::load(p.add(i));
            let d = S::sub(v, sh);
            a = S::add(a, v);
            b = S::fma(d, d, b);
            i += S::LANES;
        }
        if i < end {
            // The shift too is loaded partially, so padding lanes add exactly 0 to both sums.
            let m = end - i;
            let shifts = [shift; 16];
            let v = S::load_part(p.add(i), m);
            let d = S::sub(v, S::load_part(shifts.as_ptr(), m));
            a = S::add(a, v);
            b = S::fma(d, d, b);
            i = end;
        }
        s1 += S::hsum(a) as f64;
        s2 += S::hsum(b) as f64;
    }
    (s1, s2)
}

/// Mean and 1/sqrt(var + eps) of one group (two passes: the mean, then squares around it).
#[inline(always)]
unsafe fn stats<S: Simd>(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sums::<S>(x, 0.0).0 / n;
    let var = sums::<S>(x, mean as f32).1 / n;
    (mean as f32, (1.0 / (var.max(0.0) + eps).sqrt()) as f32)
}

dispatch!(unsafe fn fwd_group(x: &[f32], y: *mut f32, hw: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) => fwd_imp);

/// One (image, group): `x` holds `gamma.len()` channels of `hw` values.
#[inline(always)]
unsafe fn fwd_imp<S: Simd>(
    x: &[f32],
    y: *mut f32,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) {
    let (mean, rstd) = stats::<S>(x, eps);
    for (ci, (&g, &b)) in gamma.iter().zip(beta).enumerate() {
        let a = g * rstd;
        let (av, bv) = (S::splat(a), S::splat(b - mean * a));
        let (xp, yp) = (x.as_ptr().add(ci * hw), y.add(ci * hw));
        let mut i = 0;
        while i < hw {
            let m = (hw - i).min(S::LANES);
            let v = if m == S::LANES {
                S::load(xp.add(i))
            } else {
                S::load_part(xp.add(i), m)
            };
            let mut z = S::fma(v, av, bv);
            if silu {
                z = S::mul(z, S::sigmoid(z));
            }
            if m == S::LANES {
                S::store(yp.add(i), z);
            } else {
                S::store_part(yp.add(i), z, m);
            }
            i += m;
        }
    }
}

dispatch!(unsafe fn bwd_group(x: &[f32], dy: &[f32], dx: *mut f32, dz: *mut f32, hw: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool, sums_out: &mut [f32]) => bwd_imp);

/// One (image, group) of the backward. `dz` is scratch for `x.len()` floats; `sums_out` gets,
/// per channel, the sum of dz (beta's gradient) then the sum of dz * xhat (gamma's).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_imp<S: Simd>(
    x: &[f32],
    dy: &[f32],
    dx: *mut f32,
    dz: *mut f32,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
    sums_out: &mut [f32],
) {
    let cg = gamma.len();
    let (mean, rstd) = stats::<S>(x, eps);
    let (mv, rv, one) = (S::splat(mean), S::splat(rstd), S::splat(1.0));
    let (mut a, mut b) = (0f64, 0f64);
    for ci in 0..cg {
        let (gv, bv) = (S::splat(gamma[ci]), S::splat(beta[ci]));
        let o = ci * hw;
        let (mut s1, mut s2) = (S::zero(), S::zero());
        let mut i = 0;
        while i < hw {
            let m = (hw - i).min(S::LANES);
            let (xv, dv) = if m == S::LANES {
                (
                    S::load(x.as_ptr().add(o + i)),
                    S::load(dy.as_ptr().add(o + i)),
                )
            } else {
                (
                    S::load_part(x.as_ptr().add(o + i), m),
                    S::load_part(dy.as_ptr().add(o + i), m),
                )
            };
            let xhat = S::mul(S::sub(xv, mv), rv);
            let d = if silu {
                let z = S::fma(xhat, gv, bv);
                let s = S::sigmoid(z);
                // d silu(z) / dz = s (1 + z (1 - s))
                S::mul(dv, S::mul(s, S::fma(z, S::sub(one, s), one)))
            } else {
                dv
            };
            // Padding lanes: dy is 0 there, so d (and d * xhat) is 0 too.
            s1 = S::add(s1, d);
            s2 = S::fma(d, xhat, s2);
            S::store(dz.add(o + i), d);
            i += m;
        }
        let (t1, t2) = (S::hsum(s1), S::hsum(s2));
        sums_out[ci] = t1;
        sums_out[cg + ci] = t2;
        a += t1 as f64 * gamma[ci] as f64;
        b += t2 as f64 * gamma[ci] as f64;
    }
    let m = x.len() as f64;
    let (av, bv) = (S::splat((a / m) as f32), S::splat((b / m) as f32));
    for (ci, &g) in gamma.iter().enumerate() {
        let gv = S::splat(g);
        let o = ci * hw;
        let mut i = 0;
        while i < hw {
            let m = (hw - i).min(S::LANES);
            let xv = if m == S::LANES {
                S::load(x.as_ptr().add(o + i))
            } else {
                S::load_part(x.as_ptr().add(o + i), m)
            };
            let xhat = S::mul(S::sub(xv, mv), rv);
            let d = S::load(dz.add(o + i));
            let r = S::mul(rv, S::sub(S::sub(S::mul(d, gv), av), S::mul(xhat, bv)));
            if m == S::LANES {
                S::store(dx.add(o + i), r);
            } else {
                S::store_part(dx.add(o + i), r, m);
            }
            i += m;
        }
    }
}

impl GroupNormOp {
    fn dims(&self, d: &[usize]) -> Result<(usize, usize, usize)> {
        if d.len() != 4 || self.groups == 0 || !d[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "fused group_norm: input {d:?} is not [N, C, H, W] with C divisible by {}",
                self.groups
            );
        }
        Ok((d[0], d[1], d[2] * d[3]))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "group_norm_silu"
        } else {
            "group_norm"
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
        let (_, c, hw) = self.dims(l1.dims())?;
        let (x, gamma, beta) = (
            storage_f32(s1, l1, "fused group_norm input")?,
            storage_f32(s2, l2, "fused group_norm gamma")?,
            storage_f32(s3, l3, "fused group_norm beta")?,
        );
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("fused group_norm: gamma/beta must have {c} entries");
        }
        let cg = c / self.groups;
        let level = simd::level();
        // SAFETY: the tasks write the disjoint (image, group) blocks that make up `y`.
        let y = unsafe {
            scratch::filled_by(x.len(), |y| {
                let y = SendPtr(y);
                (0..x.len() / (cg * hw)).into_par_iter().for_each(|ng| {
                    let c0 = (ng % self.groups) * cg;
                    let xg = &x[ng * cg * hw..(ng + 1) * cg * hw];
                    fwd_group(
                        level,
                        xg,
                        y.add(ng * cg * hw),
                        hw,
                        &gamma[c0..c0 + cg],
                        &beta[c0..c0 + cg],
                        self.eps,
                        self.silu,
                    );
                });
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, hw) = self.dims(x.dims())?;
        let cg = c / self.groups;
        let level = simd::level();
        let (dx, partial) = with_f32(x, |xv| {
            with_f32(gamma, |gv| {
                with_f32(beta, |bv| {
                    with_f32(grad, |dyv| {
                        let n_groups = xv.len() / (cg * hw);
                        let mut partial = vec![0f32; n_groups * 2 * cg];
                        let pp = SendPtr(partial.as_mut_ptr());
                        // SAFETY: each task writes its own (image, group) block of `dx` and its
                        // own `2 cg` partial sums.
                        let dx = unsafe {
                            scratch::filled_by(xv.len(), |dx| {
                                let dx = SendPtr(dx);
                                (0..n_groups).into_par_iter().for_each(|ng| {
                                    let c0 = (ng % self.groups) * cg;
                                    let r = ng * cg * hw..(ng + 1) * cg * hw;
                                    let sums =
                                        std::slice::from_raw_parts_mut(pp.add(ng * 2 * cg), 2 * cg);
                                    scratch::with(Slot::C, cg * hw + 16, |dz| {
                                        bwd_group(
                                            level,
                                            &xv[r.clone()],
                                            &dyv[r.clone()],
                                            dx.add(r.start),
                                            dz.as_mut_ptr(),
                                            hw,
                                            &gv[c0..c0 + cg],
                                            &bv[c0..c0 + cg],
                                            self.eps,
                                            self.silu,
                                            sums,
                                        )
                                    });
                                });
                            })
                        };
                        Ok((dx, partial))
                    })
                })
            })
        })?;
        let (mut dgamma, mut dbeta) = (vec![0f64; c], vec![0f64; c]);
        for (ng, p) in partial.chunks(2 * cg).enumerate() {
            let c0 = (ng % self.groups) * cg;
            for ci in 0..cg {
                dbeta[c0 + ci] += p[ci] as f64;
                dgamma[c0 + ci] += p[cg + ci] as f64;
            }
        }
        let dev = x.device();
        let to = |v: Vec<f64>| {
            Tensor::from_vec(v.into_iter().map(|f| f as f32).collect::<Vec<_>>(), c, dev)
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            if gamma.track_op() {
                Some(to(dgamma)?)
            } else {
                None
            },
            if beta.track_op() {
                Some(to(dbeta)?)
            } else {
                None
            },
        ))
    }
}

/// GroupNorm over `[N, C, H, W]` with per-channel `gamma`, `beta` (`[C]`), then SiLU if `silu`.
/// Returns `None` where the fused kernel does not apply (non-CPU or non-f32), so the caller can
/// use the stock composition.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    gamma: &Tensor,
    beta: &Tensor,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || gamma.dtype() != DType::F32
        || beta.dtype() != DType::F32
    {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNormOp { groups, eps, silu },
    )?))
}
