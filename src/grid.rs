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

/// At most this many caption lines under an image; a longer prompt ends in `..`.
pub const CAPTION_LINES: usize = 3;

/// `text` wrapped at word boundaries into lines of at most `width` characters (a longer word is
/// cut), at most [`CAPTION_LINES`] of them, the last ending in `..` when text was left out.
/// Characters outside printable ASCII (which the 8x8 font has) become `?`.
pub fn wrap_caption(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let text: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word;
        loop {
            let sep = usize::from(!cur.is_empty());
            if cur.len() + sep + word.len() <= width {
                if sep == 1 {
                    cur.push(' ');
                }
                cur.push_str(word);
                break;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
                continue;
            }
            // A word wider than a line: cut it.
            let (head, tail) = word.split_at(width);
            lines.push(head.to_string());
            word = tail;
            if word.is_empty() {
                break;
            }
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    if lines.len() > CAPTION_LINES {
        lines.truncate(CAPTION_LINES);
        let last = &mut lines[CAPTION_LINES - 1];
        while last.len() + 2 > width && !last.is_empty() {
            last.pop();
        }
        last.push_str("..");
        last.truncate(width);
    }
    lines
}

/// [`save_grid_png`] of `images` (`[n, c, h, w]` in `[-1, 1]`) with `captions[i]` written under
/// image `i` in an 8x8 bitmap font (white on black; 2x from 256 pixels wide), wrapped to the
/// image's width, at most [`CAPTION_LINES`] lines: a text-to-image sample grid, the prompt under
/// each image.
pub fn save_captioned_grid_png(
    path: &Path,
    images: &Tensor,
    captions: &[String],
    nrow: usize,
) -> Result<()> {
    let (n, c, h, w) = images.dims4().with_context(|| {
        format!(
            "{}: grid images must be [N, C, H, W], got {:?}",
            path.display(),
            images.shape()
        )
    })?;
    ensure!(
        captions.len() == n,
        "{}: {} captions for {n} images",
        path.display(),
        captions.len()
    );
    let scale = (w / 256).max(1);
    let glyph = 8 * scale;
    let wrapped: Vec<Vec<String>> = captions
        .iter()
        .map(|t| wrap_caption(t, w / glyph))
        .collect();
    let lines = wrapped.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let cap_h = lines * glyph + 2;
    let hh = h + cap_h;
    let v = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![-1f32; n * c * hh * w];
    for i in 0..n {
        for ch in 0..c {
            let src = &v[(i * c + ch) * h * w..][..h * w];
            out[(i * c + ch) * hh * w..][..h * w].copy_from_slice(src);
            let plane = &mut out[(i * c + ch) * hh * w..][..hh * w];
            for (l, line) in wrapped[i].iter().enumerate() {
                for (k, ch) in line.bytes().enumerate() {
                    let rows = font8x8::legacy::BASIC_LEGACY[usize::from(ch & 0x7f)];
                    for (gy, bits) in rows.iter().enumerate() {
                        for gx in 0..8 {
                            if bits & (1 << gx) == 0 {
                                continue;
                            }
                            for sy in 0..scale {
                                for sx in 0..scale {
                                    let y = h + 1 + l * glyph + gy * scale + sy;
                                    let x = k * glyph + gx * scale + sx;
                                    plane[y * w + x] = 1.0;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    save_grid_png(path, &out, n, c, hh, w, nrow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_wrap_at_words_cut_long_words_and_end_in_dots() {
        assert_eq!(wrap_caption("a red fox", 5), vec!["a red", "fox"]);
        assert_eq!(wrap_caption("abcdefgh", 3), vec!["abc", "def", "gh"]);
        assert_eq!(
            wrap_caption("one two three four five", 5),
            vec!["one", "two", "thr.."]
        );
        assert_eq!(wrap_caption("caf\u{e9}", 8), vec!["caf?"]);
        assert!(wrap_caption("   ", 4).is_empty());
    }

    #[test]
    fn a_captioned_grid_has_the_text_under_each_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        let imgs = Tensor::full(-1f32, (2, 1, 16, 16), &candle_core::Device::Cpu).unwrap();
        save_captioned_grid_png(&p, &imgs, &["ab".into(), "".into()], 2).unwrap();
        let d = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut r = d.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        // One caption line: 16 + 8 + 2 rows per image.
        assert_eq!((info.width, info.height), (2 * 18 + 2, 26 + 4));
        let lit = |x0: usize, x1: usize| {
            (PADDING + 16..PADDING + 26)
                .flat_map(|y| (x0..x1).map(move |x| (y, x)))
                .filter(|&(y, x)| buf[y * info.width as usize + x] == 255)
                .count()
        };
        // The first image's caption has lit pixels, the empty one none; the images stay black.
        assert!(lit(PADDING, PADDING + 16) > 10);
        assert_eq!(lit(2 * PADDING + 16, 2 * PADDING + 32), 0);
        assert!(buf[..(PADDING + 16) * info.width as usize]
            .iter()
            .all(|&b| b == 0));
    }
}
