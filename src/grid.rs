//! PNG sample grids: the quick visual check of a teacher or student. Layout follows
//! torchvision's `make_grid` (`nrow` images per row, 2-pixel black padding) and the pixel mapping
//! is the exact inverse of the loaders' `v / 127.5 - 1`, so a dataset image round-trips unchanged.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

/// Gap between images and around the border, in pixels.
pub const PADDING: usize = 2;

/// `[-1, 1]` to `0..=255`, rounding to nearest and clamping; NaN becomes 0 so a diverged model
/// shows up as black tiles instead of failing the write.
pub fn to_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
    }
}

/// Width and height in pixels of a grid of `n` images of `h`x`w` with `nrow` per row.
pub fn grid_size(n: usize, h: usize, w: usize, nrow: usize) -> (usize, usize) {
    let cols = nrow.min(n).max(1);
    let rows = n.div_ceil(cols);
    (
        cols * (w + PADDING) + PADDING,
        rows * (h + PADDING) + PADDING,
    )
}

/// Writes `n` images (`[n, c, h, w]` f32 in `[-1, 1]`) as one 8-bit PNG with `nrow` images per row.
/// `c == 1` gives grayscale, `c == 3` RGB. The file is written to a temporary name in the same
/// directory and renamed, so a reader never sees half a PNG.
pub fn save_grid_png(
    path: &Path,
    images: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    nrow: usize,
) -> Result<()> {
    let color = match c {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        _ => bail!(
            "{}: PNG grids take 1 or 3 channels, got {c}",
            path.display()
        ),
    };
    ensure!(
        n > 0 && h > 0 && w > 0,
        "{}: empty grid ({n} images of {h}x{w})",
        path.display()
    );
    ensure!(nrow > 0, "{}: nrow must be at least 1", path.display());
    let expected = n
        .checked_mul(c)
        .and_then(|v| v.checked_mul(h))
        .and_then(|v| v.checked_mul(w));
    ensure!(
        expected == Some(images.len()),
        "{}: {} values given for {n} images of {c}x{h}x{w} (expected {})",
        path.display(),
        images.len(),
        expected.map_or("an overflowing count".to_string(), |e| e.to_string())
    );
    let (gw, gh) = grid_size(n, h, w, nrow);
    let (pw, ph) = (u32::try_from(gw), u32::try_from(gh));
    let (Ok(pw), Ok(ph)) = (pw, ph) else {
        bail!(
            "{}: grid of {gw}x{gh} pixels is too large for PNG",
            path.display()
        )
    };
    let cols = nrow.min(n);
    let mut buf = vec![0u8; gw * gh * c];
    for (i, img) in images.chunks_exact(c * h * w).enumerate() {
        let (oy, ox) = (
            PADDING + (i / cols) * (h + PADDING),
            PADDING + (i % cols) * (w + PADDING),
        );
        for (ch, plane) in img.chunks_exact(h * w).enumerate() {
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let start = ((oy + y) * gw + ox) * c + ch;
                for (x, &v) in row.iter().enumerate() {
                    buf[start + x * c] = to_u8(v);
                }
            }
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, pw, ph);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .with_context(|| format!("{}: writing PNG header", path.display()))?;
        writer
            .write_image_data(&buf)
            .with_context(|| format!("{}: encoding PNG", path.display()))?;
        writer
            .finish()
            .with_context(|| format!("{}: finishing PNG", path.display()))?;
    }
    crate::checkpoint::write_atomic(path, &bytes)
}

/// [`save_grid_png`] for an `[N, C, H, W]` tensor of any float dtype, on any device.
pub fn tensor_grid_png(path: &Path, images: &Tensor, nrow: usize) -> Result<()> {
    let (n, c, h, w) = images.dims4().with_context(|| {
        format!(
            "{}: grid images must be [N, C, H, W], got {:?}",
            path.display(),
            images.shape()
        )
    })?;
    let v = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    save_grid_png(path, &v, n, c, h, w, nrow)
}
