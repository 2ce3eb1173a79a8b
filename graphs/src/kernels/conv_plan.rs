//! Geometry of a conv2d and the source layouts the engines read.
//!
//! * Forward: the input padded and split into `stride` column phases, so output column `ox` of
//!   tap `kx` reads phase `kx % s` at column `ox + kx / s`: the pixels of a run are consecutive
//!   for any stride.
//! * Input gradient: a sum of stride-1 convolutions of the padded output gradient, one per input
//!   phase `(iy % s, ix % s)`, each with the taps that land on that phase; every phase writes its
//!   own rows of the pixel-major result.
//! * Weight gradient: the padded input transposed to pixel-major `[pixel][channel]`.

use super::conv_direct::{block_width, pack_rows, pack_taps, run_pixels, runs, Run};
use super::simd::Level;

/// A square-kernel conv2d on `[n, cin, h, w]` with `cout` filters, stride `s`, zero padding `p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// `None` when the kernel does not fit the padded input or the stride is 0.
    pub fn new(
        (n, cin, h, w): (usize, usize, usize, usize),
        cout: usize,
        k: usize,
        s: usize,
        p: usize,
    ) -> Option<Self> {
        if s == 0 || k == 0 || h + 2 * p < k || w + 2 * p < k {
            return None;
        }
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        Some(Self {
            n,
            cin,
            h,
            w,
            cout,
            k,
            s,
            p,
            ho,
            wo,
        })
    }
    pub fn taps(&self) -> usize {
        self.k * self.k
    }
    pub fn in_image(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub fn out_image(&self) -> usize {
        self.cout * self.ho * self.wo
    }
}

/// Whole weight blocks covering `c` channels at `level`, and their padded channel count.
pub fn blocks(c: usize, level: Level) -> (usize, usize) {
    let bw = block_width(level);
    (c.div_ceil(bw), c.div_ceil(bw) * bw)
}

/// How the forward pass reads one input image.
#[derive(Clone, Debug)]
pub struct FwdPlan {
    /// 1x1, stride 1, no padding: the input image is read as it is.
    pub direct: bool,
    /// Rows and columns of one phase plane of the prepared image.
    pub ph: usize,
    pub pw: usize,
    /// Floats per prepared channel (all phases).
    pub cstride: usize,
    /// Offset of tap `ky * k + kx` relative to an output pixel.
    pub taps: Vec<usize>,
    pub runs: Vec<Run>,
    /// Packed weights.
    pub w: Vec<f32>,
}

impl FwdPlan {
    /// `w`: the conv weight `[cout][cin][k][k]`.
    pub fn new(g: &Geom, w: &[f32], level: Level) -> Self {
        let t = g.taps();
        let w = pack_rows(g.cout, g.cin * t, block_width(level), w, level);
        if g.k == 1 && g.s == 1 && g.p == 0 {
            let hw = g.h * g.w;
            return Self {
                direct: true,
                ph: g.h,
                pw: g.w,
                cstride: hw,
                taps: vec![0],
                // The whole plane is one row: no short runs at row ends.
                runs: runs(1, hw, 0, 0, 0, 1, run_pixels(level, g.cout)),
                w,
            };
        }
        let (s, k) = (g.s, g.k);
        let ph = g.h + 2 * g.p;
        let pw = (g.w + 2 * g.p).div_ceil(s);
        let taps = (0..k * k)
            .map(|t| {
                let (ky, kx) = (t / k, t % k);
                (kx % s) * ph * pw + ky * pw + kx / s
            })
            .collect();
        Self {
            direct: false,
            ph,
            pw,
            cstride: s * ph * pw,
            taps,
            runs: runs(g.ho, g.wo, s * pw, 0, g.wo, 1, run_pixels(level, g.cout)),
            w,
        }
    }

    /// Floats of one prepared image (0 when read directly).
    pub fn image_len(&self, g: &Geom) -> usize {
        if self.direct {
            0
        } else {
            g.cin * self.cstride
        }
    }

    /// Pads and phase-splits one input image `x` (`[cin][h][w]`) into `dst`.
    pub fn prepare(&self, g: &Geom, x: &[f32], dst: &mut [f32]) {
        let (s, p, w) = (g.s, g.p, g.w);
        for ci in 0..g.cin {
            let plane = &x[ci * g.h * w..(ci + 1) * g.h * w];
            for q in 0..s {
                for r in 0..self.ph {
                    let off = ci * self.cstride + (q * self.ph + r) * self.pw;
                    let row = &mut dst[off..off + self.pw];
                    let iy = r as isize - p as isize;
                    if iy < 0 || iy >= g.h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    if s == 1 {
                        row[..p].fill(0.0);
                        row[p..p + w].copy_from_slice(src);
                        row[p + w..].fill(0.0);
                    } else {
                        for (j, o) in row.iter_mut().enumerate() {
                            let ix = (j * s + q) as isize - p as isize;
                            *o = if ix >= 0 && (ix as usize) < w {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
}

/// One input phase of the input gradient.
#[derive(Clone, Debug)]
pub struct Phase {
    pub taps: Vec<usize>,
    /// Packed weights: output = the conv's input channels, input = its output channels.
    pub w: Vec<f32>,
    pub runs: Vec<Run>,
}

/// How the input gradient reads one padded output-gradient image.
#[derive(Clone, Debug)]
pub struct GradPlan {
    pub phases: Vec<Phase>,
    pub top: usize,
    pub left: usize,
    pub ph: usize,
    pub pw: usize,
}

impl GradPlan {
    /// `w`: the conv weight `[cout][cin][k][k]`.
    pub fn new(g: &Geom, w: &[f32], level: Level) -> Self {
        let (s, p, k) = (g.s as isize, g.p as isize, g.k);
        // Taps of input phase `ph` along one axis, with their source offset in the gradient.
        let axis = |ph: usize| -> Vec<(usize, isize)> {
            (0..k)
                .filter(|&t| (ph as isize + p - t as isize).rem_euclid(s) == 0)
                .map(|t| (t, (ph as isize + p - t as isize) / s))
                .collect()
        };
        let mut specs = Vec::new();
        let (mut top, mut left) = (0isize, 0isize);
        let (mut bottom, mut right) = (g.ho as isize, g.wo as isize);
        for py in 0..g.s.min(g.h) {
            for px in 0..g.s.min(g.w) {
                let (rows, cols) = ((g.h - py).div_ceil(g.s), (g.w - px).div_ceil(g.s));
                let (ay, ax) = (axis(py), axis(px));
                for &(_, dy) in &ay {
                    top = top.max(-dy);
                    bottom = bottom.max(rows as isize + dy);
                }
                for &(_, dx) in &ax {
                    left = left.max(-dx);
                    right = right.max(cols as isize + dx);
                }
                specs.push((py, px, rows, cols, ay, ax));
            }
        }
        let (top, left) = (top as usize, left as usize);
        let (ph, pw) = (top + bottom as usize, left + right as usize);
        let bw = block_width(level);
        let phases = specs
            .into_iter()
            .map(|(py, px, rows, cols, ay, ax)| {
                let mut taps = Vec::new();
                let mut kt = Vec::new();
                for &(ky, dy) in &ay {
                    for &(kx, dx) in &ax {
                        let (y, x) = ((dy + top as isize) as usize, (dx + left as isize) as usize);
                        taps.push(y * pw + x);
                        kt.push(ky * k + kx);
                    }
                }
                let wp = pack_taps(w, (g.cout, g.cin, k * k), &kt, bw, level);
                Phase {
                    taps,
                    w: wp,
                    runs: runs(
                        rows,
                        cols,
                        pw,
                        py * g.w + px,
                        g.s * g.w,
                        g.s,
                        run_pixels(level, g.cin),
                    ),
                }
            })
            .collect();
        Self {
            phases,
            top,
            left,
            ph,
            pw,
        }
    }

    /// Floats of one padded gradient image.
    pub fn image_len(&self, g: &Geom) -> usize {
        g.cout * self.ph * self.pw
    }

    /// Pads one output-gradient image `dy` (`[cout][ho][wo]`) into `dst`.
    pub fn prepare(&self, g: &Geom, dy: &[f32], dst: &mut [f32]) {
        let plane = self.ph * self.pw;
        for co in 0..g.cout {
            let d = &mut dst[co * plane..(co + 1) * plane];
            d[..self.top * self.pw].fill(0.0);
            for r in 0..g.ho {
                let row = &mut d[(self.top + r) * self.pw..(self.top + r + 1) * self.pw];
                row[..self.left].fill(0.0);
                let src = &dy[(co * g.ho + r) * g.wo..(co * g.ho + r + 1) * g.wo];
                row[self.left..self.left + g.wo].copy_from_slice(src);
                row[self.left + g.wo..].fill(0.0);
            }
            d[(self.top + g.ho) * self.pw..].fill(0.0);
        }
    }
}

/// The weight gradient's view of one input image: padded, pixel-major `[ph * pw][cin]`.
#[derive(Clone, Debug)]
pub struct WgradPlan {
    pub ph: usize,
    pub pw: usize,
    /// Offset (in pixels of the padded image) of tap `ky * k + kx`.
    pub taps: Vec<usize>,
}

impl WgradPlan {
    pub fn new(g: &Geom) -> Self {
        let (ph, pw) = (g.h + 2 * g.p, g.w + 2 * g.p);
        Self {
            ph,
            pw,
            taps: (0..g.taps()).map(|t| (t / g.k) * pw + t % g.k).collect(),
        }
    }

    pub fn image_len(&self, g: &Geom) -> usize {
        self.ph * self.pw * g.cin
    }

    /// Transposes and pads one input image `x` (`[cin][h][w]`) into `dst`.
    pub fn prepare(&self, level: Level, g: &Geom, x: &[f32], dst: &mut [f32]) {
        let (c, p) = (g.cin, g.p);
        let row_len = self.pw * c;
        assert!(x.len() >= g.in_image() && dst.len() >= self.ph * row_len);
        dst[..p * row_len].fill(0.0);
        dst[(p + g.h) * row_len..self.ph * row_len].fill(0.0);
        for iy in 0..g.h {
            let row = &mut dst[(p + iy) * row_len..(p + iy + 1) * row_len];
            row[..p * c].fill(0.0);
            row[(p + g.w) * c..].fill(0.0);
            // SAFETY: reads pixel (iy, ix) of every channel plane (inside `x`, asserted), writes
            // one pixel row of `cin` floats inside `row`.
            unsafe {
                transpose_row(
                    level,
                    x.as_ptr().add(iy * g.w),
                    g.h * g.w,
                    g.w,
                    c,
                    row.as_mut_ptr().add(p * c),
                )
            };
        }
    }
}

/// `dst[ix * c + ch] = x[ch * plane + ix]` for `ix < w`, `ch < c`: one pixel row of every
/// channel plane to pixel-major.
unsafe fn transpose_row(
    level: Level,
    x: *const f32,
    plane: usize,
    w: usize,
    c: usize,
    dst: *mut f32,
) {
    super::layout::transpose(level, x, plane, c, w, dst, c, std::ptr::null())
}
