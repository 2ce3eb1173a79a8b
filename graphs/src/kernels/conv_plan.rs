//! Geometry of a conv2d and the source layouts the engines read: the forward (and weight
//! gradient) source is the input padded and split into `stride` column phases, so output column
//! `ox` of tap `kx` reads phase `kx % s` at column `ox + kx / s` -- contiguous for any stride.
//! The input gradient is a sum of stride-1 convolutions of the padded output gradient, one per
//! output phase `(iy % s, ix % s)`, each with the taps that land on that phase.

use super::conv_direct::{pack, positions, Pos};
use super::simd::LANES;

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

/// How the forward pass (and the weight gradient) reads one input image.
#[derive(Clone, Debug)]
pub struct FwdPlan {
    /// 1x1, stride 1, no padding, >= 8 pixels: the input image is read as it is.
    pub direct: bool,
    /// Rows and columns of one phase plane of the prepared image.
    pub ph: usize,
    pub pw: usize,
    /// Floats per prepared channel (all phases).
    pub cstride: usize,
    /// Offset of tap `ky * k + kx` relative to an output position.
    pub taps: Vec<usize>,
    /// Source floats per output row.
    pub src_row: usize,
    pub pos: Vec<Pos>,
}

impl FwdPlan {
    pub fn new(g: &Geom) -> Self {
        if g.k == 1 && g.s == 1 && g.p == 0 && g.h * g.w >= LANES {
            let hw = g.h * g.w;
            return Self {
                direct: true,
                ph: g.h,
                pw: g.w,
                cstride: hw,
                taps: vec![0],
                src_row: g.w,
                // The whole plane is one row: no per-row tails.
                pos: positions(1, hw, 0, 0),
            };
        }
        let (s, k) = (g.s, g.k);
        let ph = g.h + 2 * g.p;
        // Room for 8-lane loads of the last (or only, short) vector of a row at the last tap.
        let pw = (g.w + 2 * g.p)
            .div_ceil(s)
            .max(g.wo.max(LANES) + (k - 1) / s);
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
            src_row: s * pw,
            pos: positions(g.ho, g.wo, s * pw, g.wo),
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

/// One output phase of the input gradient.
#[derive(Clone, Debug)]
pub struct Phase {
    pub py: usize,
    pub px: usize,
    pub rows: usize,
    pub cols: usize,
    pub taps: Vec<usize>,
    /// Packed weights: output = input channels of the conv, input = its output channels.
    pub w: Vec<f32>,
    pub pos: Vec<Pos>,
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
    pub fn new(g: &Geom, w: &[f32]) -> Self {
        let (s, p, k) = (g.s as isize, g.p as isize, g.k);
        // Taps of output phase `ph` along one axis, with their source offset in the gradient.
        let axis = |ph: usize| -> Vec<(usize, isize)> {
            (0..k)
                .filter(|&t| (ph as isize + p - t as isize).rem_euclid(s) == 0)
                .map(|t| (t, (ph as isize + p - t as isize) / s))
                .collect()
        };
        let mut specs = Vec::new();
        let (mut top, mut left, mut bottom, mut right) = (0isize, 0isize, g.ho as isize, g.wo as isize);
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
                    right = right.max(cols.max(LANES) as isize + dx);
                }
                specs.push((py, px, rows, cols, ay, ax));
            }
        }
        let (top, left) = (top as usize, left as usize);
        let ph = top + bottom as usize;
        let pw = left + right as usize;
        let dst_row = |cols: usize| if g.s == 1 { g.w } else { cols };
        let phases = specs
            .into_iter()
            .map(|(py, px, rows, cols, ay, ax)| {
                let mut taps = Vec::new();
                let mut kt = Vec::new();
                for &(ky, dy) in &ay {
                    for &(kx, dx) in &ax {
                        taps.push((dy + top as isize) as usize * pw + (dx + left as isize) as usize);
                        kt.push(ky * k + kx);
                    }
                }
                let wp = pack(g.cin, g.cout, kt.len(), |ci, co, t| {
                    w[(co * g.cin + ci) * k * k + kt[t]]
                });
                Phase {
                    py,
                    px,
                    rows,
                    cols,
                    taps,
                    w: wp,
                    pos: positions(rows, cols, pw, dst_row(cols)),
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
