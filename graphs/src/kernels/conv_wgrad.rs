//! Weight-gradient engine of conv2d: `dW[co][ci][t] = sum_pixels dY[co][p] * x[ci][p + tap[t]]`.
//!
//! An outer-product GEMM with the pixels as the reduction. Per image, the output gradient is
//! transposed to `[block][pixel][bw]` and the padded input to pixel-major `[pixel][cin]`; then
//! each pixel of a register block (one tap, `PIX` input channels, 2 vectors of output channels)
//! costs 2 vector loads and `PIX` broadcasts from one row for `2 PIX` FMAs, with the
//! accumulators in registers for the whole image. Nothing of im2col size is materialised.

use super::simd::{dispatch, Level, Simd};

/// One image's reduction.
#[derive(Clone, Copy, Debug)]
pub struct Reduce<'a> {
    /// Padded input, pixel-major with `cin` floats per pixel.
    pub xt: &'a [f32],
    pub cin: usize,
    /// Pixel offset of each tap in the padded input; padded pixels per row; stride.
    pub taps: &'a [usize],
    pub pw: usize,
    pub s: usize,
    /// Output rows and columns.
    pub rows: usize,
    pub cols: usize,
    /// Transposed output gradient `[block][rows * cols][bw]` (the last block zero-padded).
    pub dyt: &'a [f32],
    pub bw: usize,
    /// Output channels, and their padded count (`blocks * bw`).
    pub cout: usize,
    pub cpad: usize,
}

impl Reduce<'_> {
    /// Adds this image's contribution for blocks `b_lo..b_hi` to `acc`, laid out
    /// `[tap][ci][cpad]`.
    ///
    /// # Safety
    /// `bw == 2 * level.lanes()`; every tap of every output pixel must lie inside `xt`; `dyt` and
    /// `acc` must have the sizes documented above.
    pub unsafe fn run(&self, level: Level, acc: &mut [f32], b_lo: usize, b_hi: usize) {
        debug_assert!(acc.len() >= self.taps.len() * self.cin * self.cpad);
        debug_assert!(self.dyt.len() >= self.cpad * self.rows * self.cols);
        reduce(level, self, acc.as_mut_ptr(), b_lo, b_hi)
    }
}

dispatch!(unsafe fn reduce(r: &Reduce, acc: *mut f32, b_lo: usize, b_hi: usize) => reduce_imp);

/// Calls `tile::<S, CV, J>` for `n` input channels: up to 12 with two output-channel vectors,
/// up to 24 with one.
macro_rules! by_width {
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

#[inline(always)]
unsafe fn reduce_imp<S: Simd>(r: &Reduce, acc: *mut f32, b_lo: usize, b_hi: usize) {
    for b in b_lo..b_hi {
        // A last block with at most one vector of real channels accumulates one vector (and twice
        // the input channels per register block).
        let cv1 = r.cout - b * r.bw <= S::LANES;
        let width = if cv1 { 2 * S::PIX } else { S::PIX };
        for (t, &tap) in r.taps.iter().enumerate() {
            let mut ci = 0;
            while ci < r.cin {
                let n = (r.cin - ci).min(width);
                if cv1 {
                    by_width!(S, 1, n, r, acc, b, t, tap, ci);
                } else {
                    by_width!(S, 2, n, r, acc, b, t, tap, ci);
                }
                ci += n;
            }
        }
    }
}

/// Tap `t`, input channels `ci0..ci0 + J`, 2 vectors of output channels of block `b`, over every
/// output pixel.
#[inline(always)]
unsafe fn tile<S: Simd, const CV: usize, const J: usize>(
    r: &Reduce,
    acc: *mut f32,
    b: usize,
    t: usize,
    tap: usize,
    ci0: usize,
) {
    let mut a = [[S::zero(); CV]; J];
    let px = r.s * r.cin;
    let mut d = r.dyt.as_ptr().add(b * r.rows * r.cols * r.bw);
    for y in 0..r.rows {
        let mut x = r.xt.as_ptr().add((y * r.s * r.pw + tap) * r.cin + ci0);
        for _ in 0..r.cols {
            let mut dv = [S::zero(); CV];
            for (v, dv) in dv.iter_mut().enumerate() {
                *dv = S::load(d.add(v * S::LANES));
            }
            for (j, a) in a.iter_mut().enumerate() {
                let xv = S::splat(*x.add(j));
                for v in 0..CV {
                    a[v] = S::fma(xv, dv[v], a[v]);
                }
            }
            d = d.add(r.bw);
            x = x.add(px);
        }
    }
    for (j, a) in a.iter().enumerate() {
        let o = acc.add((t * r.cin + ci0 + j) * r.cpad + b * r.bw);
        for (v, a) in a.iter().enumerate() {
            let p = o.add(v * S::LANES);
            S::store(p, S::add(S::load(p), *a));
        }
    }
}

/// Transposes blocks `b_lo..b_hi` of one image's gradient `dy` (`[cout][pixels]`) into `dyt`
/// (`[block][pixel][bw]`, zero-padded) and writes each of their channels' sum over pixels to
/// `sums[co]`.
#[allow(clippy::too_many_arguments)]
pub fn transpose(
    level: Level,
    dy: &[f32],
    cout: usize,
    pixels: usize,
    bw: usize,
    dyt: &mut [f32],
    b_lo: usize,
    b_hi: usize,
    sums: &mut [f32],
) {
    assert!(dy.len() >= cout * pixels && dyt.len() >= b_hi * pixels * bw);
    for b in b_lo..b_hi {
        let n = (cout - b * bw).min(bw);
        // SAFETY: the transpose reads channels b*bw..b*bw+n of `dy` (asserted above) and writes
        // this block of `dyt`.
        unsafe {
            transpose_block(
                level,
                dy.as_ptr().add(b * bw * pixels),
                n,
                pixels,
                bw,
                dyt.as_mut_ptr().add(b * pixels * bw),
            )
        };
        for co in b * bw..b * bw + n {
            sums[co] = super::reduce::sum(&dy[co * pixels..(co + 1) * pixels]);
        }
    }
}

/// `dst[p * bw + c] = dy[c * pixels + p]` for `c < n` (0 for `n <= c < bw`), `p < pixels`.
unsafe fn transpose_block(
    level: Level,
    dy: *const f32,
    n: usize,
    pixels: usize,
    bw: usize,
    dst: *mut f32,
) {
    super::layout::transpose(level, dy, pixels, n, pixels, dst, bw, std::ptr::null());
    if n < bw {
        for p in 0..pixels {
            std::ptr::write_bytes(dst.add(p * bw + n), 0, bw - n);
        }
    }
}
