//! Direct convolution engine (the forward pass and the input gradient of conv2d).
//!
//! Computes `out[co][pos] = bias[co] + sum_ci sum_t w[co][ci][t] * src[ci][pos.src + tap[t]]`
//! (+ an optional residual) with no im2col matrix: the source is one image already padded (and
//! phase-split for strides) so that every tap of a vector of 8 adjacent outputs is one unaligned
//! load. A register block is 4 output channels x 3 vectors: 12 FMA accumulators, 3 loads and 4
//! broadcasts per tap, which keeps the FMA units (not the load ports) the bottleneck.

use super::simd::{dispatch, Simd, LANES};

/// Output channels per register block (the packed weights' innermost dimension).
pub const CO_B: usize = 4;
/// Output vectors per register block.
const NV: usize = 3;

/// One output vector: where it reads (offset in a source plane) and writes (offset in an output
/// plane), and how many of its lanes are valid (`LANES` except in rows shorter than a vector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

/// Vectors covering `rows` rows of `len` outputs. Rows of 8 or more end with a vector that
/// overlaps the previous one (recomputing a few outputs) instead of a partial one.
pub fn positions(rows: usize, len: usize, src_row: usize, dst_row: usize) -> Vec<Pos> {
    let mut out = Vec::with_capacity(rows * len.div_ceil(LANES));
    for r in 0..rows {
        let (s, d) = (r * src_row, r * dst_row);
        if len < LANES {
            if len > 0 {
                out.push(Pos { src: s, dst: d, len });
            }
            continue;
        }
        let mut x = 0;
        while x + LANES <= len {
            out.push(Pos {
                src: s + x,
                dst: d + x,
                len: LANES,
            });
            x += LANES;
        }
        if x < len {
            let x = len - LANES;
            out.push(Pos {
                src: s + x,
                dst: d + x,
                len: LANES,
            });
        }
    }
    out
}

/// Weights as the engine reads them: `[co / CO_B][ci][tap][CO_B]`, zero-padded to a multiple of
/// `CO_B` output channels. `get(co, ci, t)` reads the logical weight.
pub fn pack(cout: usize, cin: usize, taps: usize, get: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    let blocks = cout.div_ceil(CO_B);
    let mut w = vec![0f32; blocks * cin * taps * CO_B];
    for co in 0..cout {
        let (b, c) = (co / CO_B, co % CO_B);
        for ci in 0..cin {
            for t in 0..taps {
                w[((b * cin + ci) * taps + t) * CO_B + c] = get(co, ci, t);
            }
        }
    }
    w
}

/// One pass over a prepared source image.
#[derive(Clone, Copy, Debug)]
pub struct Pass<'a> {
    /// Channel-0 plane of the source; `cin` planes `cstride` floats apart. Every load of every
    /// position and tap (8 lanes, even for short rows) must stay inside.
    pub src: &'a [f32],
    pub cstride: usize,
    pub cin: usize,
    /// Offset of each tap relative to a position's `src`.
    pub taps: &'a [usize],
    /// Weights from [`pack`] for these `cin` and `taps`.
    pub w: &'a [f32],
    pub pos: &'a [Pos],
    /// Floats between output planes.
    pub dst_cstride: usize,
}

impl Pass<'_> {
    /// Writes output channels `co_lo..co_hi` (`co_lo` a multiple of [`CO_B`]) of one image to
    /// `dst` (its channel-0 plane). `bias` (per output channel, indexed by absolute channel) and
    /// `residual` (laid out like `dst`) are optional.
    ///
    /// # Safety
    /// `dst` (and `residual`) must be valid for every plane `co_lo..co_hi` at every position, and
    /// the source must cover every load (see [`Pass::src`]); `bias` must have `co_hi` entries.
    pub unsafe fn run(
        &self,
        dst: *mut f32,
        bias: Option<&[f32]>,
        residual: Option<*const f32>,
        co_lo: usize,
        co_hi: usize,
    ) {
        debug_assert!(co_lo % CO_B == 0);
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let res = residual.unwrap_or(std::ptr::null());
        run_blocks(self, dst, bias, res, co_lo, co_hi);
    }
}

dispatch!(unsafe fn run_blocks(p: &Pass, dst: *mut f32, bias: *const f32, res: *const f32, co_lo: usize, co_hi: usize) => run_imp);

#[inline(always)]
unsafe fn run_imp<S: Simd>(
    p: &Pass,
    dst: *mut f32,
    bias: *const f32,
    res: *const f32,
    co_lo: usize,
    co_hi: usize,
) {
    let mut co = co_lo;
    while co < co_hi {
        match (co_hi - co).min(CO_B) {
            4 => block::<S, 4>(p, dst, bias, res, co),
            3 => block::<S, 3>(p, dst, bias, res, co),
            2 => block::<S, 2>(p, dst, bias, res, co),
            _ => block::<S, 1>(p, dst, bias, res, co),
        }
        co += CO_B;
    }
}

/// All positions of the `CO` channels starting at `co`.
#[inline(always)]
unsafe fn block<S: Simd, const CO: usize>(
    p: &Pass,
    dst: *mut f32,
    bias: *const f32,
    res: *const f32,
    co: usize,
) {
    let mut b = [0f32; CO];
    if !bias.is_null() {
        for (c, b) in b.iter_mut().enumerate() {
            *b = *bias.add(co + c);
        }
    }
    let w = p.w.as_ptr().add(co / CO_B * p.cin * p.taps.len() * CO_B);
    let dst = dst.add(co * p.dst_cstride);
    let res = if res.is_null() {
        res
    } else {
        res.add(co * p.dst_cstride)
    };
    let mut chunks = p.pos.chunks_exact(NV);
    for ps in &mut chunks {
        tile::<S, CO, NV>(p, w, ps, dst, &b, res);
    }
    match chunks.remainder() {
        [a, b2] => tile::<S, CO, 2>(p, w, &[*a, *b2], dst, &b, res),
        [a] => tile::<S, CO, 1>(p, w, &[*a], dst, &b, res),
        _ => {}
    }
}

/// `CO` channels x `V` vectors, accumulated in registers over every input channel and tap.
#[inline(always)]
unsafe fn tile<S: Simd, const CO: usize, const V: usize>(
    p: &Pass,
    w: *const f32,
    ps: &[Pos],
    dst: *mut f32,
    bias: &[f32; CO],
    res: *const f32,
) {
    let mut acc = [[S::zero(); V]; CO];
    for c in 0..CO {
        let b = S::splat(bias[c]);
        for a in acc[c].iter_mut() {
            *a = b;
        }
    }
    let mut sp = [p.src.as_ptr(); V];
    for v in 0..V {
        sp[v] = sp[v].add(ps[v].src);
    }
    let mut wp = w;
    for _ in 0..p.cin {
        for &o in p.taps {
            let mut x = [S::zero(); V];
            for v in 0..V {
                x[v] = S::load(sp[v].add(o));
            }
            for c in 0..CO {
                let wv = S::splat(*wp.add(c));
                for v in 0..V {
                    acc[c][v] = S::fma(wv, x[v], acc[c][v]);
                }
            }
            wp = wp.add(CO_B);
        }
        for s in sp.iter_mut() {
            *s = s.add(p.cstride);
        }
    }
    for c in 0..CO {
        for v in 0..V {
            let off = c * p.dst_cstride + ps[v].dst;
            let mut a = acc[c][v];
            let n = ps[v].len;
            if n == LANES {
                if !res.is_null() {
                    a = S::add(a, S::load(res.add(off)));
                }
                S::store(dst.add(off), a);
            } else {
                if !res.is_null() {
                    a = S::add(a, S::load_part(res.add(off), n));
                }
                S::store_part(dst.add(off), a, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_cover_every_output_once_or_overlap() {
        for len in 1..30 {
            let ps = positions(3, len, 40, len);
            let mut seen = vec![0; 3 * len];
            for p in &ps {
                assert_eq!(p.src / 40, p.dst / len.max(1));
                for i in 0..p.len {
                    seen[p.dst + i] += 1;
                }
                assert!(p.dst % len + p.len <= len);
            }
            assert!(seen.iter().all(|&s| s >= 1), "len {len}: {seen:?}");
        }
    }
}
