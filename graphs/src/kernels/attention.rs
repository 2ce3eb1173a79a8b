//! Fused attention core `out = v softmax(scale q^T k)^T` on `[N, C, L]` tensors, one image per
//! task. candle composes it from two transposing copies, two batched matmuls, a scale and a
//! 5-op softmax, each a graph node with its own gradient pass and accumulation; here the forward
//! is two GEMMs and an in-cache softmax per image, the backward five GEMMs and the softmax
//! adjoint, with the attention weights kept from the forward.

use super::scratch::{self, SendPtr};
use super::simd::{dispatch, level, Simd};
use super::tensor_io::{storage_f32, with_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Mutex;

struct Attention {
    scale: f32,
    /// Softmax weights `[N][L][L]` of the forward, for the backward.
    weights: Mutex<Option<Vec<f32>>>,
}

/// `dst (m x n) = beta * lhs (m x k) * rhs (k x n)` with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    (drs, dcs): (usize, usize),
    lhs: *const f32,
    (lrs, lcs): (usize, usize),
    rhs: *const f32,
    (rrs, rcs): (usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dcs as isize,
        drs as isize,
        false,
        lhs,
        lcs as isize,
        lrs as isize,
        rhs,
        rcs as isize,
        rrs as isize,
        0.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

dispatch!(unsafe fn softmax_rows(s: *mut f32, rows: usize, len: usize) => softmax_imp);

/// Softmax of each of `rows` rows of `len` values, in place.
#[inline(always)]
unsafe fn softmax_imp<S: Simd>(s: *mut f32, rows: usize, len: usize) {
    for r in 0..rows {
        let p = s.add(r * len);
        let mut m = f32::NEG_INFINITY;
        let mut i = 0;
        while i + S::LANES <= len {
            m = m.max(S::hmax(S::load(p.add(i))));
            i += S::LANES;
        }
        for i in i..len {
            m = m.max(*p.add(i));
        }
        let mv = S::splat(m);
        let (mut sum, mut acc) = (0f32, S::zero());
        let mut i = 0;
        while i + S::LANES <= len {
            let e = S::exp(S::sub(S::load(p.add(i)), mv));
            S::store(p.add(i), e);
            acc = S::add(acc, e);
            i += S::LANES;
        }
        for i in i..len {
            let e = (*p.add(i) - m).exp();
            *p.add(i) = e;
            sum += e;
        }
        let inv = S::splat(1.0 / (sum + S::hsum(acc)));
        let mut i = 0;
        while i + S::LANES <= len {
            S::store(p.add(i), S::mul(S::load(p.add(i)), inv));
            i += S::LANES;
        }
        let inv = 1.0 / (sum + S::hsum(acc));
        for i in i..len {
            *p.add(i) *= inv;
        }
    }
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, len] => Ok((n, c, len)),
        d => candle_core::bail!("attention: inputs must be [N, C, L], got {d:?}"),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let (n, c, len) = dims(l1)?;
        if dims(l2)? != (n, c, len) || dims(l3)? != (n, c, len) {
            candle_core::bail!("attention: q, k, v shapes differ");
        }
        let (q, k, v) = (
            storage_f32(s1, l1, "attention")?,
            storage_f32(s2, l2, "attention")?,
            storage_f32(s3, l3, "attention")?,
        );
        let (img, lv) = (c * len, level());
        let mut a = vec![0f32; n * len * len];
        let ap = SendPtr(a.as_mut_ptr());
        // SAFETY: image `i` writes only its own `[L][L]` weights and `[C][L]` output.
        let out = unsafe {
            scratch::filled_by(n * img, |out| {
                let out = SendPtr(out);
                (0..n).into_par_iter().for_each(|i| {
                    let (qi, ki, vi) = (
                        q[i * img..].as_ptr(),
                        k[i * img..].as_ptr(),
                        v[i * img..].as_ptr(),
                    );
                    let ai = ap.add(i * len * len);
                    // S = scale q^T k, A = softmax(S), out = v A^T.
                    mm(
                        len,
                        len,
                        c,
                        ai,
                        (len, 1),
                        qi,
                        (1, len),
                        ki,
                        (len, 1),
                        self.scale,
                    );
                    softmax_rows(lv, ai, len, len);
                    mm(
                        c,
                        len,
                        len,
                        out.add(i * img),
                        (len, 1),
                        vi,
                        (len, 1),
                        ai,
                        (1, len),
                        1.0,
                    );
                });
            })
        };
        *self
            .weights
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: lock poisoned".into()))? = Some(a);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, len) = q.dims3()?;
        let guard = self
            .weights
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: lock poisoned".into()))?;
        let Some(a) = guard.as_ref() else {
            candle_core::bail!("attention: backward before forward")
        };
        let (img, lv, scale) = (c * len, level(), self.scale);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; n * img],
            vec![0f32; n * img],
            vec![0f32; n * img],
        );
        let (dqp, dkp, dvp) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        with_f32(q, |qs| {
            with_f32(k, |ks| {
                with_f32(v, |vs| {
                    with_f32(grad, |gs| {
                        (0..n).into_par_iter().for_each(|i| {
                            let o = i * img;
                            let (qi, ki, vi, gi) = (
                                qs[o..].as_ptr(),
                                ks[o..].as_ptr(),
                                vs[o..].as_ptr(),
                                gs[o..].as_ptr(),
                            );
                            let ai = a[i * len * len..].as_ptr();
                            // SAFETY: per-image slices of the inputs, outputs and scratch.
                            unsafe {
                                // dv = dout A
                                mm(
                                    c,
                                    len,
                                    len,
                                    dvp.add(o),
                                    (len, 1),
                                    gi,
                                    (len, 1),
                                    ai,
                                    (len, 1),
                                    1.0,
                                );
                                scratch::with(scratch::Slot::C, len * len, |da| {
                                    let dap = da.as_mut_ptr();
                                    // dA = dout^T v
                                    mm(len, len, c, dap, (len, 1), gi, (1, len), vi, (len, 1), 1.0);
                                    softmax_adjoint(lv, dap, ai, len);
                                    // dq = scale k dS^T, dk = scale q dS
                                    mm(
                                        c,
                                        len,
                                        len,
                                        dqp.add(o),
                                        (len, 1),
                                        ki,
                                        (len, 1),
                                        dap,
                                        (1, len),
                                        scale,
                                    );
                                    mm(
                                        c,
                                        len,
                                        len,
                                        dkp.add(o),
                                        (len, 1),
                                        qi,
                                        (len, 1),
                                        dap,
                                        (len, 1),
                                        scale,
                                    );
                                });
                            }
                        });
                        Ok(())
                    })
                })
            })
        })?;
        let dev = q.device();
        let t = |d: Vec<f32>, on: bool| {
            if on {
                Tensor::from_vec(d, (n, c, len), dev).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((
            t(dq, q.track_op())?,
            t(dk, k.track_op())?,
            t(dv, v.track_op())?,
        ))
    }
}

dispatch!(unsafe fn softmax_adjoint(da: *mut f32, a: *const f32, len: usize) => adjoint_imp);

/// `dS = A * (dA - rowsum(A * dA))`, rows of `len`, written over `dA`.
#[inline(always)]
unsafe fn adjoint_imp<S: Simd>(da: *mut f32, a: *const f32, len: usize) {
    for r in 0..len {
        let (d, p) = (da.add(r * len), a.add(r * len));
        let (mut acc, mut tail) = (S::zero(), 0f32);
        let mut i = 0;
        while i + S::LANES <= len {
            acc = S::fma(S::load(d.add(i)), S::load(p.add(i)), acc);
            i += S::LANES;
        }
        for i in i..len {
            tail += *d.add(i) * *p.add(i);
        }
        let dot = S::hsum(acc) + tail;
        let dv = S::splat(dot);
        let mut i = 0;
        while i + S::LANES <= len {
            S::store(
                d.add(i),
                S::mul(S::load(p.add(i)), S::sub(S::load(d.add(i)), dv)),
            );
            i += S::LANES;
        }
        for i in i..len {
            *d.add(i) = *p.add(i) * (*d.add(i) - dot);
        }
    }
}

/// `v softmax(scale q^T k)^T` for `[N, C, L]` inputs (softmax over the keys), with gradients to
/// all three; `None` where the kernel does not apply (non-CPU or non-f32).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if [q, k, v]
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || t.rank() != 3)
    {
        return Ok(None);
    }
    let op = Attention {
        scale: scale as f32,
        weights: Mutex::new(None),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}
