//! Layout changes between the kernels' pixel-major (`[pixel][channel]`) buffers and candle's
//! NCHW tensors, by register-tile transposes.

use super::simd::Level;

/// Source rows per block of a transpose: they stay in L1 while the columns are written.
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
    channels: (usize, usize),
    dst: *mut f32,
    res: Option<&[f32]>,
) {
    to_planes_part(level, src, pixels, stride, channels, (0, pixels), dst, res)
}

/// [`to_planes`] of pixels `p_lo..p_hi` only (the rows of `src` a task computed).
///
/// # Safety
/// As [`to_planes`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn to_planes_part(
    level: Level,
    src: &[f32],
    pixels: usize,
    stride: usize,
    (c_lo, c_hi): (usize, usize),
    (p_lo, p_hi): (usize, usize),
    dst: *mut f32,
    res: Option<&[f32]>,
) {
    debug_assert!(c_hi <= stride && src.len() >= (pixels.max(1) - 1) * stride + c_hi);
    debug_assert!(res.is_none_or(|r| r.len() >= c_hi * pixels));
    debug_assert!(p_lo <= p_hi && p_hi <= pixels);
    let res = res.map_or(std::ptr::null(), |r| r.as_ptr().add(c_lo * pixels + p_lo));
    transpose(
        level,
        src.as_ptr().add(p_lo * stride + c_lo),
        stride,
        p_hi - p_lo,
        c_hi - c_lo,
        dst.add(c_lo * pixels + p_lo),
        pixels,
        res,
    )
}

/// `dst[j * ds + i] = src[i * ss + j]`, plus `res[j * ds + i]` where `res` is not null, for
/// `i < ni`, `j < nj`: a strided matrix transpose. With AVX2 (also used at the AVX-512 level)
/// full 8 x 8 tiles go through registers (8 row loads, 24 shuffles, 8 stores), several times
/// faster than a strided gather per output vector; the edges are scalar.
///
/// # Safety
/// `src` must be readable at every `i * ss + j`, `dst` (and `res`, if not null) at every
/// `j * ds + i`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn transpose(
    level: Level,
    src: *const f32,
    ss: usize,
    ni: usize,
    nj: usize,
    dst: *mut f32,
    ds: usize,
    res: *const f32,
) {
    #[cfg(target_arch = "x86_64")]
    if level != Level::Scalar {
        return transpose_avx2(src, ss, ni, nj, dst, ds, res);
    }
    let _ = level;
    transpose_scalar(src, ss, (0, ni), (0, nj), dst, ds, res);
}

#[inline(always)]
unsafe fn transpose_scalar(
    src: *const f32,
    ss: usize,
    (i_lo, i_hi): (usize, usize),
    (j_lo, j_hi): (usize, usize),
    dst: *mut f32,
    ds: usize,
    res: *const f32,
) {
    // Tiles of PT rows keep the source rows in L1 while the columns are written.
    let mut i0 = i_lo;
    while i0 < i_hi {
        let i1 = (i0 + PT).min(i_hi);
        for j in j_lo..j_hi {
            for i in i0..i1 {
                let r = if res.is_null() {
                    0.0
                } else {
                    *res.add(j * ds + i)
                };
                *dst.add(j * ds + i) = *src.add(i * ss + j) + r;
            }
        }
        i0 = i1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_avx2(
    src: *const f32,
    ss: usize,
    ni: usize,
    nj: usize,
    dst: *mut f32,
    ds: usize,
    res: *const f32,
) {
    use std::arch::x86_64::*;
    let (fi, fj) = (ni / 8 * 8, nj / 8 * 8);
    // Blocks of PT source rows: they stay in L1 while every column tile is written, and each
    // destination row gets PT contiguous floats per visit (not 8 floats at a plane's stride).
    let mut ib = 0;
    while ib < fi {
        let ie = (ib + PT).min(fi);
        let mut j0 = 0;
        while j0 < fj {
            let mut i0 = ib;
            while i0 < ie {
                let s = src.add(i0 * ss + j0);
                let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add(k * ss)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let o = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (k, &v) in o.iter().enumerate() {
                    let off = (j0 + k) * ds + i0;
                    let v = if res.is_null() {
                        v
                    } else {
                        _mm256_add_ps(v, _mm256_loadu_ps(res.add(off)))
                    };
                    _mm256_storeu_ps(dst.add(off), v);
                }
                i0 += 8;
            }
            j0 += 8;
        }
        ib = ie;
    }
    // Edges: the last `nj % 8` columns of the full rows, then the last `ni % 8` rows.
    transpose_scalar(src, ss, (0, fi), (fj, nj), dst, ds, res);
    transpose_scalar(src, ss, (fi, ni), (0, nj), dst, ds, res);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd and tile-multiple sizes, strides wider than the rows, with and without `res`, at
    /// every level this CPU has, against the plain definition (exact: a copy, or one add).
    #[test]
    fn transpose_matches_definition() {
        let mut levels = vec![Level::Scalar];
        if super::super::simd::level() != Level::Scalar {
            levels.push(Level::Avx2);
        }
        for level in levels {
            for (ni, nj) in [(1, 1), (3, 5), (8, 8), (9, 17), (16, 8), (33, 7), (5, 40)] {
                let (ss, ds) = (nj + 3, ni + 2);
                let src: Vec<f32> = (0..ni * ss).map(|k| k as f32 * 0.5 - 7.0).collect();
                let res: Vec<f32> = (0..nj * ds).map(|k| (k % 13) as f32 - 6.0).collect();
                for with_res in [false, true] {
                    let mut dst = vec![f32::NAN; nj * ds];
                    let rp = if with_res {
                        res.as_ptr()
                    } else {
                        std::ptr::null()
                    };
                    // SAFETY: the sizes above cover every index the definition touches.
                    unsafe { transpose(level, src.as_ptr(), ss, ni, nj, dst.as_mut_ptr(), ds, rp) };
                    for j in 0..nj {
                        for i in 0..ni {
                            let r = if with_res { res[j * ds + i] } else { 0.0 };
                            assert_eq!(
                                dst[j * ds + i],
                                src[i * ss + j] + r,
                                "{level:?} {ni}x{nj} res={with_res} at ({i}, {j})"
                            );
                        }
                        // Padding columns stay untouched.
                        for i in ni..ds {
                            assert!(dst[j * ds + i].is_nan());
                        }
                    }
                }
            }
        }
    }
}
