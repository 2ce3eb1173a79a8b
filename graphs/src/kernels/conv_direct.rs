//! Direct convolution engine (the forward pass and the input gradient of conv2d).
//!
//! Computes `out[pixel][co] = bias[co] + sum_ci sum_t w[co][ci][t] * src[ci][pixel.src + tap[t]]`
//! with no im2col matrix, vectorised over output channels: the source is one image, padded (and
//! phase-split for strides) so that the `PIX` pixels of a run are consecutive floats of every
//! source plane. A register block is `PIX` pixels x 2 vectors of channels; per (channel, tap) it
//! loads 2 weight vectors and broadcasts `PIX` inputs into `2 PIX` FMA accumulators (24 of
//! AVX-512's 32 registers), which keeps the FMA units, not the loads, the bottleneck for any
//! image size. The output is pixel-major (`[pixel][channel]`); callers transpose it to NCHW.

use super::simd::{dispatch, Level, Simd};

/// Input channels per partial sum of a register block.
const CI_BLOCK: usize = 16;

/// Up to `PIX` output pixels that are consecutive in the source: pixel `i` reads source offset
/// `src + i` and writes output row `out + i * out_step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub src: usize,
    pub out: usize,
    pub n: usize,
}

/// Runs covering `rows` rows of `len` pixels, each row split into near-equal runs of at most
/// `pix` pixels. Pixel `(r, i)` reads `r * src_row + i` and writes row
/// `out_base + r * out_row + i * out_step`.
pub fn runs(
    rows: usize,
    len: usize,
    src_row: usize,
    out_base: usize,
    out_row: usize,
    out_step: usize,
    pix: usize,
) -> Vec<Run> {
    let mut out = Vec::new();
    if len == 0 {
        return out;
    }
    let per_row = len.div_ceil(pix);
    for r in 0..rows {
        for k in 0..per_row {
            let (a, b) = (k * len / per_row, (k + 1) * len / per_row);
            out.push(Run {
                src: r * src_row + a,
                out: out_base + r * out_row + a * out_step,
                n: b - a,
            });
        }
    }
    out
}

/// Channels per weight block at `level`: two vectors.
pub fn block_width(level: Level) -> usize {
    2 * level.lanes()
}

/// Pixels per run for a pass with `channels` output channels: twice as many when one vector
/// holds them all (the accumulators are per pixel and vector).
pub fn run_pixels(level: Level, channels: usize) -> usize {
    if channels <= level.lanes() {
        2 * level.pix()
    } else {
        level.pix()
    }
}

/// Weights as the engine reads them: `[co / bw][ci][tap][bw]`, zero-padded to whole blocks of
/// `bw` ([`block_width`]) output channels. `get(co, ci, t)` reads the logical weight. The
/// definition of the layout, against which the fast packers [`pack_rows`] (forward) and
/// [`pack_taps`] (input gradient) are tested.
#[cfg(test)]
pub fn pack(
    cout: usize,
    cin: usize,
    taps: usize,
    bw: usize,
    get: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let blocks = cout.div_ceil(bw);
    let mut w = vec![0f32; blocks * cin * taps * bw];
    for co in 0..cout {
        let (b, c) = (co / bw, co % bw);
        for ci in 0..cin {
            for t in 0..taps {
                w[((b * cin + ci) * taps + t) * bw + c] = get(co, ci, t);
            }
        }
    }
    w
}

/// [`pack`] of a weight whose logical layout is already `[co][row]` (`row = ci * taps + t`, the
/// forward's `[cout][cin][k][k]`): per block, one register-tiled transpose.
pub fn pack_rows(cout: usize, row: usize, bw: usize, w: &[f32], level: Level) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(w.len() >= cout * row);
    let blocks = cout.div_ceil(bw);
    let mut out = vec![0f32; blocks * row * bw];
    out.par_chunks_mut((row * bw).max(1))
        .enumerate()
        .for_each(|(b, wb)| {
            let n = (cout - b * bw).min(bw);
            // SAFETY: rows b*bw..b*bw+n of `w` (asserted above) into this block's `row x bw`.
            unsafe {
                super::layout::transpose(
                    level,
                    w.as_ptr().add(b * bw * row),
                    row,
                    n,
                    row,
                    wb.as_mut_ptr(),
                    bw,
                    std::ptr::null(),
                )
            };
        });
    out
}

/// [`pack`] of the input gradient's weights: blocks over the conv's `cin`, rows `(co, t)`
/// reading tap `kt[t]` of `w` (`[cout][cin][kk]`): per output channel, one register-tiled
/// transpose into a `[kk][bw]` buffer, then its rows in `kt`'s order.
pub fn pack_taps(
    w: &[f32],
    (cout, cin, kk): (usize, usize, usize),
    kt: &[usize],
    bw: usize,
    level: Level,
) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(w.len() >= cout * cin * kk && kt.iter().all(|&k| k < kk));
    let (blocks, nt) = (cin.div_ceil(bw), kt.len());
    let mut out = vec![0f32; blocks * cout * nt * bw];
    out.par_chunks_mut((cout * nt * bw).max(1))
        .enumerate()
        .for_each(|(b, wb)| {
            let n = (cin - b * bw).min(bw);
            // Columns n..bw are never written: they stay the zero padding.
            let mut tmp = vec![0f32; kk * bw];
            for co in 0..cout {
                // SAFETY: channels b*bw..b*bw+n of row `co` (asserted above) into `tmp`.
                unsafe {
                    super::layout::transpose(
                        level,
                        w.as_ptr().add((co * cin + b * bw) * kk),
                        kk,
                        n,
                        kk,
                        tmp.as_mut_ptr(),
                        bw,
                        std::ptr::null(),
                    )
                };
                for (t, &k) in kt.iter().enumerate() {
                    wb[(co * nt + t) * bw..][..bw].copy_from_slice(&tmp[k * bw..][..bw]);
                }
            }
        });
    out
}

/// One pass over a prepared source image.
#[derive(Clone, Copy, Debug)]
pub struct Pass<'a> {
    /// Channel-0 plane of the source; `cin` planes `cstride` floats apart. Every tap of every
    /// pixel of every run must stay inside.
    pub src: &'a [f32],
    pub cstride: usize,
    pub cin: usize,
    /// Offset of each tap relative to a pixel's source offset.
    pub taps: &'a [usize],
    /// Weights from [`pack`] for these `cin` and `taps`, blocks of `bw` channels.
    pub w: &'a [f32],
    pub bw: usize,
    /// Output channels (the rest of the last block is padding).
    pub cout: usize,
    pub runs: &'a [Run],
    /// Output rows between consecutive pixels of a run.
    pub out_step: usize,
}

impl Pass<'_> {
    /// Writes channel blocks `b_lo..b_hi` of every run's pixels to `out`, pixel-major with
    /// `out_stride` floats per pixel (at least the padded channel count); `bias` (padded to whole
    /// blocks) initialises the accumulators.
    ///
    /// # Safety
    /// `level.lanes() * 2 == self.bw`; `out` must hold every output row the runs name; the
    /// source must cover every tap of every run; `bias` (if given) whole blocks.
    pub unsafe fn run(
        &self,
        level: Level,
        out: *mut f32,
        out_stride: usize,
        bias: Option<&[f32]>,
        b_lo: usize,
        b_hi: usize,
    ) {
        debug_assert_eq!(self.bw, block_width(level));
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        run_blocks(level, self, out, out_stride, bias, b_lo, b_hi);
    }
}

dispatch!(unsafe fn run_blocks(p: &Pass, out: *mut f32, os: usize, bias: *const f32, b_lo: usize, b_hi: usize) => run_imp);

/// Calls `tile::<S, CV, P>` for the run length `n`: up to 12 pixels with two channel vectors,
/// up to 24 with one (the same 24 accumulators).
macro_rules! by_len {
    ($S:ty, 1, $n:expr, $($args:expr),*) => {
        match $n {
            1 => tile::<$S, 1, 1>($($args),*),
            2 => tile::<$S, 1, 2>($($args),*),
            3 => tile::<$S, 1, 3>($($args),*),
            4 => tile::<$S, 1, 4>($($args),*),
            5 => tile::<$S, 1, 5>($($args),*),
            6 => tile::<$S, 1, 6>($($args),*),
            7 => tile::<$S, 1, 7>($($args),*),
            8 => tile::<$S, 1, 8>($($args),*),
            9 => tile::<$S, 1, 9>($($args),*),
            10 => tile::<$S, 1, 10>($($args),*),
            11 => tile::<$S, 1, 11>($($args),*),
            12 => tile::<$S, 1, 12>($($args),*),
            13 => tile::<$S, 1, 13>($($args),*),
            14 => tile::<$S, 1, 14>($($args),*),
            15 => tile::<$S, 1, 15>($($args),*),
            16 => tile::<$S, 1, 16>($($args),*),
            17 => tile::<$S, 1, 17>($($args),*),
            18 => tile::<$S, 1, 18>($($args),*),
            19 => tile::<$S, 1, 19>($($args),*),
            20 => tile::<$S, 1, 20>($($args),*),
            21 => tile::<$S, 1, 21>($($args),*),
            22 => tile::<$S, 1, 22>($($args),*),
            23 => tile::<$S, 1, 23>($($args),*),
            _ => tile::<$S, 1, 24>($($args),*),
        }
    };
    ($S:ty, $cv:literal, $n:expr, $($args:expr),*) => {
        match $n {
            1 => tile::<$S, $cv, 1>($($args),*),
            2 => tile::<$S, $cv, 2>($($args),*),
            3 => tile::<$S, $cv, 3>($($args),*),
            4 => tile::<$S, $cv, 4>($($args),*),
            5 => tile::<$S, $cv, 5>($($args),*),
            6 => tile::<$S, $cv, 6>($($args),*),
            7 => tile::<$S, $cv, 7>($($args),*),
            8 => tile::<$S, $cv, 8>($($args),*),
            9 => tile::<$S, $cv, 9>($($args),*),
            10 => tile::<$S, $cv, 10>($($args),*),
            11 => tile::<$S, $cv, 11>($($args),*),
            _ => tile::<$S, $cv, 12>($($args),*),
        }
    };
}

/// Weight bytes of one channel block above which the input-channel blocks become the outer
/// loop (each block's weights, `CI_BLOCK x taps x bw` floats, then stay in L1 across the runs
/// instead of the whole block streaming from L2 once per run).
const L1_WEIGHTS: usize = 48 * 1024;

#[inline(always)]
unsafe fn run_imp<S: Simd>(
    p: &Pass,
    out: *mut f32,
    os: usize,
    bias: *const f32,
    b_lo: usize,
    b_hi: usize,
) {
    let wblock = p.cin * p.taps.len() * p.bw;
    // Either order adds the same partial sums in the same order: results are identical.
    let ci_outer = wblock * 4 > L1_WEIGHTS;
    for b in b_lo..b_hi {
        // One vector suffices for a last block with at most LANES real channels.
        let cv1 = p.cout - b * p.bw <= S::LANES;
        let w = p.w.as_ptr().add(b * wblock);
        let bias = if bias.is_null() {
            bias
        } else {
            bias.add(b * p.bw)
        };
        let out = out.add(b * p.bw);
        // A loop, not a closure: closures do not inherit the caller's target features.
        let step = if p.cin == 0 || !ci_outer {
            p.cin.max(1)
        } else {
            CI_BLOCK
        };
        let mut ci = 0;
        loop {
            let end = (ci + step).min(p.cin);
            for r in p.runs {
                debug_assert!(r.n >= 1 && r.n <= if cv1 { 2 * S::PIX } else { S::PIX });
                if cv1 {
                    by_len!(S, 1, r.n, p, w, bias, r, out, os, ci, end);
                } else {
                    by_len!(S, 2, r.n, p, w, bias, r, out, os, ci, end);
                }
            }
            ci = end;
            if ci >= p.cin {
                break;
            }
        }
    }
}

/// `P` pixels x `CV` channel vectors, accumulated in registers over input channels
/// `ci0..ci1` (in blocks of [`CI_BLOCK`]) and every tap; the first block (`ci0 == 0`) starts
/// from the bias and stores, later ones add to the output.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<S: Simd, const CV: usize, const P: usize>(
    p: &Pass,
    w: *const f32,
    bias: *const f32,
    r: &Run,
    out: *mut f32,
    os: usize,
    ci0: usize,
    ci1: usize,
) {
    let mut sp = p.src.as_ptr().add(r.src + ci0 * p.cstride);
    let mut wp = w.add(ci0 * p.taps.len() * p.bw);
    let mut ci = ci0;
    // Input channels in blocks: each block's sum is added to the output separately, which keeps
    // the round-off of long reductions (e.g. 256 channels x 9 taps) near a blocked GEMM's.
    while ci < ci1 {
        let end = (ci + CI_BLOCK).min(ci1);
        let mut acc = [[S::zero(); CV]; P];
        if ci == 0 && !bias.is_null() {
            for v in 0..CV {
                let b = S::load(bias.add(v * S::LANES));
                for a in acc.iter_mut() {
                    a[v] = b;
                }
            }
        }
        for _ in ci..end {
            for &o in p.taps {
                let xp = sp.add(o);
                let mut wv = [S::zero(); CV];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = S::load(wp.add(v * S::LANES));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = S::splat(*xp.add(i));
                    for v in 0..CV {
                        a[v] = S::fma(x, wv[v], a[v]);
                    }
                }
                wp = wp.add(p.bw);
            }
            sp = sp.add(p.cstride);
        }
        for (i, a) in acc.iter().enumerate() {
            let o = out.add((r.out + i * p.out_step) * os);
            for (v, a) in a.iter().enumerate() {
                let o = o.add(v * S::LANES);
                S::store(o, if ci == 0 { *a } else { S::add(S::load(o), *a) });
            }
        }
        ci = end;
    }
    if p.cin == 0 {
        // No input channels (a phase without taps is handled the same way): bias or zero.
        for i in 0..P {
            let o = out.add((r.out + i * p.out_step) * os);
            for v in 0..CV {
                let b = if bias.is_null() {
                    S::zero()
                } else {
                    S::load(bias.add(v * S::LANES))
                };
                S::store(o.add(v * S::LANES), b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SIMD level this CPU runs.
    fn levels() -> &'static [Level] {
        match crate::kernels::simd::detect() {
            Level::Avx512 => &[Level::Scalar, Level::Avx2, Level::Avx512],
            Level::Avx2 => &[Level::Scalar, Level::Avx2],
            Level::Scalar => &[Level::Scalar],
        }
    }

    #[test]
    fn pack_rows_matches_pack() {
        for &level in levels() {
            for (cout, cin, taps) in [(1, 1, 1), (5, 3, 9), (32, 4, 9), (40, 7, 1), (100, 3, 4)] {
                let bw = block_width(level);
                let w: Vec<f32> = (0..cout * cin * taps)
                    .map(|i| i as f32 * 0.5 - 3.0)
                    .collect();
                let a = pack(cout, cin, taps, bw, |co, ci, t| {
                    w[(co * cin + ci) * taps + t]
                });
                let b = pack_rows(cout, cin * taps, bw, &w, level);
                assert_eq!(a, b, "{level:?} {cout}x{cin}x{taps}");
            }
        }
    }

    #[test]
    fn pack_taps_matches_pack() {
        for &level in levels() {
            let bw = block_width(level);
            for (cout, cin, kk, kt) in [
                (1, 1, 1, vec![0]),
                (3, 5, 9, (0..9).rev().collect::<Vec<_>>()),
                (6, 40, 9, vec![8, 6, 2, 0]),
                (2, 33, 16, vec![15, 13, 7, 5]),
                (4, 3, 9, vec![]),
            ] {
                let w: Vec<f32> = (0..cout * cin * kk)
                    .map(|i| i as f32 * 0.25 - 7.0)
                    .collect();
                let a = pack(cin, cout, kt.len(), bw, |ci, co, t| {
                    w[(co * cin + ci) * kk + kt[t]]
                });
                let b = pack_taps(&w, (cout, cin, kk), &kt, bw, level);
                assert_eq!(a, b, "{level:?} {cout}x{cin}x{kk} {kt:?}");
            }
        }
    }

    #[test]
    fn runs_cover_every_pixel_once() {
        for len in 1..40 {
            for pix in [6, 12] {
                let rs = runs(3, len, 50, 7, len, 1, pix);
                let mut seen = vec![0; 7 + 3 * len];
                for r in &rs {
                    assert!(r.n >= 1 && r.n <= pix);
                    assert_eq!(r.src / 50, (r.out - 7) / len);
                    for i in 0..r.n {
                        seen[r.out + i] += 1;
                    }
                }
                assert!(seen[7..].iter().all(|&s| s == 1), "len {len}: {seen:?}");
            }
        }
    }
}
