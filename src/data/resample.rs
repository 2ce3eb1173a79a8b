//! Spatial resampling of NCHW f32 buffers: symmetric padding (to grow MNIST 28 -> 32 without
//! touching the digits) and area-averaging downscaling (exact box filter for integer factors,
//! fractional coverage otherwise, so no aliasing from skipped pixels).

/// Pads each `h`x`w` plane to `th`x`tw` with `value`, centred (the odd pixel goes right/bottom).
pub(crate) fn pad(
    src: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    value: f32,
) -> Vec<f32> {
    debug_assert!(th >= h && tw >= w && src.len() == planes * h * w);
    let (top, left) = ((th - h) / 2, (tw - w) / 2);
    let mut out = vec![value; planes * th * tw];
    for (p, plane) in src.chunks_exact(h * w).enumerate() {
        for (y, row) in plane.chunks_exact(w).enumerate() {
            let o = p * th * tw + (top + y) * tw + left;
            out[o..o + w].copy_from_slice(row);
        }
    }
    out
}

/// For each of `out_len` output cells, the (source index, weight) pairs covering it when `in_len`
/// source cells are squeezed onto it; weights of one cell sum to 1.
fn area_weights(in_len: usize, out_len: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|i| {
            let (a, b) = (i as f64 * scale, (i + 1) as f64 * scale);
            let (lo, hi) = (a.floor() as usize, (b.ceil() as usize).min(in_len));
            (lo..hi)
                .filter_map(|j| {
                    let cover = b.min(j as f64 + 1.0) - a.max(j as f64);
                    (cover > 1e-12).then_some((j, (cover / scale) as f32))
                })
                .collect()
        })
        .collect()
}

/// Area-average downscale of each `h`x`w` plane to `oh`x`ow` (requires `oh <= h`, `ow <= w`).
pub(crate) fn area_downscale(
    src: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    debug_assert!(oh <= h && ow <= w && src.len() == planes * h * w);
    let (wx, wy) = (area_weights(w, ow), area_weights(h, oh));
    let mut out = vec![0f32; planes * oh * ow];
    let mut rows = vec![0f32; h * ow];
    for (p, plane) in src.chunks_exact(h * w).enumerate() {
        // Horizontal pass into `rows` [h, ow], then vertical pass into the output plane.
        for (y, row) in plane.chunks_exact(w).enumerate() {
            for (x, taps) in wx.iter().enumerate() {
                rows[y * ow + x] = taps.iter().map(|&(j, k)| row[j] * k).sum();
            }
        }
        let dst = &mut out[p * oh * ow..(p + 1) * oh * ow];
        for (y, taps) in wy.iter().enumerate() {
            for x in 0..ow {
                dst[y * ow + x] = taps.iter().map(|&(j, k)| rows[j * ow + x] * k).sum();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_factor_is_a_box_filter() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let out = area_downscale(&src, 1, 4, 4, 2, 2);
        assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5]);
    }

    #[test]
    fn fractional_weights_sum_to_one_and_keep_constants() {
        for (i, o) in [(7, 3), (28, 16), (33, 32), (5, 5)] {
            for taps in area_weights(i, o) {
                let s: f32 = taps.iter().map(|t| t.1).sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o}: {s}");
            }
        }
        let out = area_downscale(&vec![0.25; 2 * 7 * 5], 2, 7, 5, 3, 4);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn pad_centres_odd_margins_right() {
        let out = pad(&[1.0], 1, 1, 1, 2, 3, -1.0);
        assert_eq!(out, vec![-1.0, 1.0, -1.0, -1.0, -1.0, -1.0]);
    }
}
