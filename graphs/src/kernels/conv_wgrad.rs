//! Weight-gradient engine of conv2d: `dW[co][ci][t] = sum_pixels dY[co][p] * src[ci][p + tap[t]]`.
//!
//! An outer-product GEMM with the pixels as the reduction: the output gradient is transposed per
//! image to `[co / 16][pixel][16]`, so each pixel contributes 2 vector loads of 16 output
//! channels and 6 broadcasts of (channel, tap) inputs to a block of 12 accumulators that stay in
//! registers for the whole image; nothing of im2col size is ever materialised.

use super::simd::{dispatch, Simd, LANES};

/// Output channels per block of the transposed gradient.
pub const CB: usize = 2 * LANES;
/// (input channel, tap) pairs per register block.
const J: usize = 6;

/// Geometry of one image's reduction.
#[derive(Clone, Copy, Debug)]
pub struct Reduce<'a> {
    /// Prepared source image (as for the forward pass).
    pub src: &'a [f32],
    /// Offset in `src` of each (input channel, tap) pair `j = ci * taps + t`, at pixel (0, 0).
    pub offs: &'a [usize],
    /// Output rows and columns; source floats per output row.
    pub rows: usize,
    pub cols: usize,
    pub src_row: usize,
    /// Transposed gradient `[block][rows * cols][CB]` (the last block zero-padded).
    pub dyt: &'a [f32],
    pub blocks: usize,
}

impl Reduce<'_> {
    /// Adds this image's contribution for blocks `b_lo..b_hi` to `acc`, laid out `[j][blocks * CB]`.
    ///
    /// # Safety
    /// `offs[j] + (rows - 1) * src_row + cols - 1` must be inside `src` for every `j`; `dyt` must
    /// hold `blocks * rows * cols * CB` floats and `acc` `offs.len() * blocks * CB`.
    pub unsafe fn run(&self, acc: &mut [f32], b_lo: usize, b_hi: usize) {
        debug_assert!(acc.len() >= self.offs.len() * self.blocks * CB);
        debug_assert!(self.dyt.len() >= self.blocks * self.rows * self.cols * CB);
        reduce(self, acc.as_mut_ptr(), b_lo, b_hi)
    }
}

dispatch!(unsafe fn reduce(r: &Reduce, acc: *mut f32, b_lo: usize, b_hi: usize) => reduce_imp);

#[inline(always)]
unsafe fn reduce_imp<S: Simd>(r: &Reduce, acc: *mut f32, b_lo: usize, b_hi: usize) {
    let nj = r.offs.len();
    for b in b_lo..b_hi {
        let mut j = 0;
        while j < nj {
            match nj - j {
                1 => tile::<S, 1>(r, acc, b, j),
                2 => tile::<S, 2>(r, acc, b, j),
                3 => tile::<S, 3>(r, acc, b, j),
                4 => tile::<S, 4>(r, acc, b, j),
                5 => tile::<S, 5>(r, acc, b, j),
                _ => tile::<S, J>(r, acc, b, j),
            }
            j += J;
        }
    }
}

/// `JN` (channel, tap) pairs x 16 output channels of block `b`, over every pixel.
#[inline(always)]
unsafe fn tile<S: Simd, const JN: usize>(r: &Reduce, acc: *mut f32, b: usize, j0: usize) {
    let mut a = [[S::zero(); 2]; JN];
    let mut xp = [r.src.as_ptr(); JN];
    for (j, x) in xp.iter_mut().enumerate() {
        *x = x.add(r.offs[j0 + j]);
    }
    let mut d = r.dyt.as_ptr().add(b * r.rows * r.cols * CB);
    for _ in 0..r.rows {
        for c in 0..r.cols {
            let d0 = S::load(d);
            let d1 = S::load(d.add(LANES));
            for j in 0..JN {
                let x = S::splat(*xp[j].add(c));
                a[j][0] = S::fma(x, d0, a[j][0]);
                a[j][1] = S::fma(x, d1, a[j][1]);
            }
            d = d.add(CB);
        }
        for x in xp.iter_mut() {
            *x = x.add(r.src_row);
        }
    }
    let stride = r.blocks * CB;
    for (j, a) in a.iter().enumerate() {
        let o = acc.add((j0 + j) * stride + b * CB);
        S::store(o, S::add(S::load(o), a[0]));
        S::store(o.add(LANES), S::add(S::load(o.add(LANES)), a[1]));
    }
}

/// Transposes blocks `b_lo..b_hi` of one image's gradient `dy` (`[cout][pixels]`) into `dyt`
/// (`[block][pixel][CB]`, zero-padded) and writes each of their channels' sum over pixels to
/// `sums[co]`.
#[allow(clippy::too_many_arguments)]
pub fn transpose(
    dy: &[f32],
    cout: usize,
    pixels: usize,
    dyt: &mut [f32],
    b_lo: usize,
    b_hi: usize,
    sums: &mut [f32],
) {
    debug_assert!(dy.len() >= cout * pixels && dyt.len() >= b_hi * pixels * CB);
    for b in b_lo..b_hi {
        let blk = &mut dyt[b * pixels * CB..(b + 1) * pixels * CB];
        let n = (cout - b * CB).min(CB);
        // Pixel tiles keep the 16 source rows' lines in L1 while the block is written.
        const PT: usize = 64;
        let mut p0 = 0;
        while p0 < pixels {
            let p1 = (p0 + PT).min(pixels);
            for c in 0..n {
                let row = &dy[(b * CB + c) * pixels..];
                for p in p0..p1 {
                    blk[p * CB + c] = row[p];
                }
            }
            for p in p0..p1 {
                blk[p * CB + n..(p + 1) * CB].fill(0.0);
            }
            p0 = p1;
        }
        for co in b * CB..b * CB + n {
            sums[co] = super::reduce::sum(&dy[co * pixels..(co + 1) * pixels]);
        }
    }
}
