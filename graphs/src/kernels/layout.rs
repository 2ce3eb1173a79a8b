//! Layout changes between the kernels' pixel-major (`[pixel][channel]`) buffers and candle's
//! NCHW tensors, with vector gathers: each output vector is one strided gather and one store.

use super::simd::{dispatch, Level, Simd};

/// Pixels per tile: the tile's source rows stay in L1 while every channel is gathered.
const PT: usize = 32;

/// `dst[c * pixels + p] = src[p * stride + c]` (plus `res[c * pixels + p]` if given), for
/// channels `c_lo..c_hi` and `p < pixels`: one image from pixel-major to channel planes.
///
/// # Safety
/// `dst` (an image's channel-0 plane) must be valid for writes to planes `c_lo..c_hi`.
pub unsafe fn to_planes(
    level: Level,
    src: &[f32],
    pixels: usize,
    stride: usize,
    (c_lo, c_hi): (usize, usize),
    dst: *mut f32,
    res: Option<&[f32]>,
) {
    debug_assert!(c_hi <= stride && src.len() >= (pixels.max(1) - 1) * stride + c_hi);
    debug_assert!(res.is_none_or(|r| r.len() >= c_hi * pixels));
    let res = res.map_or(std::ptr::null(), |r| r.as_ptr());
    to_planes_d(level, src.as_ptr(), pixels, stride, c_lo, c_hi, dst, res)
}

dispatch!(unsafe fn to_planes_d(src: *const f32, pixels: usize, stride: usize, c_lo: usize, c_hi: usize, dst: *mut f32, res: *const f32) => to_planes_imp);

#[inline(always)]
unsafe fn to_planes_imp<S: Simd>(
    src: *const f32,
    pixels: usize,
    stride: usize,
    c_lo: usize,
    c_hi: usize,
    dst: *mut f32,
    res: *const f32,
) {
    let mut p0 = 0;
    while p0 < pixels {
        let p1 = (p0 + PT).min(pixels);
        for c in c_lo..c_hi {
            let (s, d) = (src.add(c), dst.add(c * pixels));
            let r = if res.is_null() {
                res
            } else {
                res.add(c * pixels)
            };
            let mut p = p0;
            while p + S::LANES <= p1 {
                let mut v = S::gather(s.add(p * stride), stride);
                if !r.is_null() {
                    v = S::add(v, S::load(r.add(p)));
                }
                S::store(d.add(p), v);
                p += S::LANES;
            }
            for p in p..p1 {
                *d.add(p) = *s.add(p * stride) + if r.is_null() { 0.0 } else { *r.add(p) };
            }
        }
        p0 = p1;
    }
}

/// `dst[p * dst_stride + c] = src[c * src_plane + p_src(p)]` for `c < channels`: one pixel's
/// channels gathered from channel planes (`src` points at the pixel in plane 0). Writes
/// `channels` values.
///
/// # Safety
/// `src` must be readable at every `c * src_plane` for `c < channels`, `dst` writable for
/// `channels` floats.
#[inline(always)]
pub unsafe fn gather_pixel<S: Simd>(
    src: *const f32,
    src_plane: usize,
    channels: usize,
    dst: *mut f32,
) {
    let mut c = 0;
    while c + S::LANES <= channels {
        S::store(dst.add(c), S::gather(src.add(c * src_plane), src_plane));
        c += S::LANES;
    }
    for c in c..channels {
        *dst.add(c) = *src.add(c * src_plane);
    }
}
