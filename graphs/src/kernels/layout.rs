//! Layout changes between the kernels' pixel-major results and candle's NCHW tensors.

/// `dst[c * pixels + p] = src[p * stride + c]` (plus `res[c * pixels + p]` if given), for
/// channels `c_lo..c_hi` and `p < pixels`: one image from pixel-major to channel planes.
///
/// # Safety
/// `dst` (an image's channel-0 plane) must be valid for writes to planes `c_lo..c_hi`.
pub unsafe fn to_planes(src: &[f32], pixels: usize, stride: usize, (c_lo, c_hi): (usize, usize), dst: *mut f32, res: Option<&[f32]>) {
    debug_assert!(c_hi <= stride && src.len() >= (pixels.max(1) - 1) * stride + c_hi);
    // Pixel tiles keep the tile's source rows in L1 while every channel plane is written.
    const PT: usize = 32;
    let mut p0 = 0;
    while p0 < pixels {
        let p1 = (p0 + PT).min(pixels);
        for c in c_lo..c_hi {
            let d = dst.add(c * pixels);
            match res {
                Some(r) => {
                    let r = &r[c * pixels..(c + 1) * pixels];
                    for p in p0..p1 {
                        *d.add(p) = src[p * stride + c] + r[p];
                    }
                }
                None => {
                    for p in p0..p1 {
                        *d.add(p) = src[p * stride + c];
                    }
                }
            }
        }
        p0 = p1;
    }
}
