//! AdamW update in place. candle's tensor-op version allocates and passes over memory ~12 times
//! per parameter (moments, bias corrections, sqrt, division, decay, difference) and runs ~15
//! small ops per parameter tensor; here the two moments and the weight are updated in place, one
//! vectorised pass each, with no allocation.

use super::scratch::SendPtr;
use super::simd::{dispatch, level, Simd};
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// One update's constants: step size, decay rates, epsilon, weight decay, the 1-based update
/// count (bias correction) and a factor on the gradient (global-norm clipping).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: u64,
    pub grad_scale: f64,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: contiguous f32 tensors only"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: contiguous f32 tensors only"),
    }
}

/// Splits `n` elements into chunks for the pool (one chunk for small tensors).
fn chunk(n: usize) -> usize {
    const MIN: usize = 1 << 15;
    if n <= MIN {
        n.max(1)
    } else {
        n.div_ceil(2 * rayon::current_num_threads()).max(MIN)
    }
}

/// `x = beta x + (1 - beta) (s g)` (or `(s g)^2` for the second moment).
struct Moment {
    beta: f32,
    one_minus: f32,
    scale: f32,
    square: bool,
}

dispatch!(unsafe fn moment(x: *mut f32, g: *const f32, n: usize, beta: f32, one_minus: f32, scale: f32, square: bool) => moment_imp);

#[inline(always)]
unsafe fn moment_imp<S: Simd>(
    x: *mut f32,
    g: *const f32,
    n: usize,
    beta: f32,
    one_minus: f32,
    scale: f32,
    square: bool,
) {
    let (b, c, s) = (S::splat(beta), S::splat(one_minus), S::splat(scale));
    let mut i = 0;
    while i < n {
        let m = (n - i).min(S::LANES);
        let (xv, gv) = if m == S::LANES {
            (S::load(x.add(i)), S::load(g.add(i)))
        } else {
            (S::load_part(x.add(i), m), S::load_part(g.add(i), m))
        };
        let gs = if scale == 1.0 { gv } else { S::mul(gv, s) };
        let term = if square { S::mul(gs, gs) } else { gs };
        let r = S::add(S::mul(xv, b), S::mul(term, c));
        if m == S::LANES {
            S::store(x.add(i), r);
        } else {
            S::store_part(x.add(i), r, m);
        }
        i += m;
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw_moment"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (x, g) = (slice_mut(dst, dst_l)?, slice(g, gl)?);
        if x.len() != g.len() {
            candle_core::bail!(
                "adamw: moment of {} values, gradient of {}",
                x.len(),
                g.len()
            );
        }
        let (lv, c) = (level(), chunk(x.len()));
        x.par_chunks_mut(c).zip(g.par_chunks(c)).for_each(|(x, g)| {
            // SAFETY: both chunks have the same length.
            unsafe {
                moment(
                    lv,
                    x.as_mut_ptr(),
                    g.as_ptr(),
                    x.len(),
                    self.beta,
                    self.one_minus,
                    self.scale,
                    self.square,
                )
            }
        });
        Ok(())
    }
}

/// `w = w (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)`.
struct Weight {
    decay: f32,
    lr: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
}

dispatch!(unsafe fn weight(w: *mut f32, m: *const f32, v: *const f32, n: usize, k: &Weight) => weight_imp);

#[inline(always)]
unsafe fn weight_imp<S: Simd>(w: *mut f32, m: *const f32, v: *const f32, n: usize, k: &Weight) {
    let (d, lr, i1, i2, eps) = (
        S::splat(k.decay),
        S::splat(k.lr),
        S::splat(k.inv_bc1),
        S::splat(k.inv_bc2),
        S::splat(k.eps),
    );
    let mut i = 0;
    while i < n {
        let c = (n - i).min(S::LANES);
        let (wv, mv, vv) = if c == S::LANES {
            (S::load(w.add(i)), S::load(m.add(i)), S::load(v.add(i)))
        } else {
            // Padding lanes: v = 0 gives upd = 0 / eps, discarded by the partial store.
            (
                S::load_part(w.add(i), c),
                S::load_part(m.add(i), c),
                S::load_part(v.add(i), c),
            )
        };
        let upd = S::div(S::mul(mv, i1), S::add(S::sqrt(S::mul(vv, i2)), eps));
        let r = S::sub(S::mul(wv, d), S::mul(upd, lr));
        if c == S::LANES {
            S::store(w.add(i), r);
        } else {
            S::store_part(w.add(i), r, c);
        }
        i += c;
    }
}

impl InplaceOp3 for Weight {
    fn name(&self) -> &'static str {
        "adamw_weight"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (w, m, v) = (slice_mut(dst, dst_l)?, slice(m, ml)?, slice(v, vl)?);
        if w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!(
                "adamw: weight, moments of {} / {} / {} values",
                w.len(),
                m.len(),
                v.len()
            );
        }
        let (lv, c) = (level(), chunk(w.len()));
        let (mp, vp) = (
            SendPtr(m.as_ptr() as *mut f32),
            SendPtr(v.as_ptr() as *mut f32),
        );
        w.par_chunks_mut(c).enumerate().for_each(|(k, w)| {
            // SAFETY: chunk `k` of `m` and `v` has the same range as `w`'s; only read.
            unsafe {
                weight(
                    lv,
                    w.as_mut_ptr(),
                    mp.add(k * c),
                    vp.add(k * c),
                    w.len(),
                    self,
                )
            }
        });
        Ok(())
    }
}

/// Whether [`update`] can run on these tensors (contiguous f32 on the CPU).
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One AdamW update: `m`, `v` (the moments) and `w` (the weight) in place from the gradient `g`,
/// computed like the tensor-op version (moments, bias-corrected ratio, decoupled decay) in f32.
/// `w`, `m` and `v` must not share storage with anything that expects them unchanged.
pub fn update(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, p: &AdamWStep) -> Result<()> {
    if !applies(&[w, m, v, g]) {
        candle_core::bail!("adamw::update needs contiguous f32 CPU tensors");
    }
    let t = p.t.max(1) as i32;
    let scale = p.grad_scale as f32;
    m.inplace_op2(
        g,
        &Moment {
            beta: p.beta1 as f32,
            one_minus: (1.0 - p.beta1) as f32,
            scale,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: p.beta2 as f32,
            one_minus: (1.0 - p.beta2) as f32,
            scale,
            square: true,
        },
    )?;
    w.inplace_op3(
        m,
        v,
        &Weight {
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            lr: p.lr as f32,
            inv_bc1: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            eps: p.eps as f32,
        },
    )
}

/// Sum of squares of a contiguous f32 CPU tensor (f64 accumulation), `None` for others.
pub fn sum_squares(t: &Tensor) -> Result<Option<f64>> {
    if !applies(&[t]) {
        return Ok(None);
    }
    super::tensor_io::with_f32(t, |x| Ok(Some(super::reduce::sum_squares(x))))
}
