//! The three passes of conv2d on f32 slices: forward (+ bias, + residual), input gradient and
//! weight (+ bias) gradient.
//!
//! Stock candle runs the forward as im2col + GEMM, the input gradient as a direct
//! conv_transpose2d (~12 GFLOP/s) and the weight gradient as a conv with a huge kernel; the bias
//! is a separate broadcast add with its own reduction in the backward. Here the forward and the
//! input gradient are direct convolutions ([`super::conv_direct`]), the weight gradient an
//! outer-product reduction ([`super::conv_wgrad`]), all per image on thread-local buffers that
//! stay in cache, with the bias (optionally per image: bias + embedding) added in registers and
//! a residual added while the result is laid out as NCHW.

use super::conv_direct::{block_width, Pass, Run};
use super::conv_plan::{blocks, FwdPlan, Geom, GradPlan, WgradPlan};
use super::conv_wgrad::{self, Reduce};
use super::layout::{to_planes, to_planes_part};
use super::scratch::{self, SendPtr, Slot};
use super::simd::Level;
use rayon::prelude::*;

/// Bias of a conv: none, one per output channel, or one per (image, output channel).
#[derive(Clone, Copy, Debug)]
pub enum Bias<'a> {
    None,
    Channel(&'a [f32]),
    Image(&'a [f32]),
}

impl Bias<'_> {
    /// Per image, zero-padded to `cpad` channels (the engine reads whole weight blocks).
    fn padded(&self, n: usize, cout: usize, cpad: usize) -> Option<Vec<f32>> {
        let mut v = vec![0f32; n * cpad];
        match self {
            Bias::None => return None,
            Bias::Channel(b) => v
                .chunks_mut(cpad)
                .for_each(|d| d[..cout].copy_from_slice(b)),
            Bias::Image(b) => v
                .chunks_mut(cpad)
                .zip(b.chunks(cout))
                .for_each(|(d, b)| d[..cout].copy_from_slice(b)),
        }
        Some(v)
    }
}

/// Parts each image's channel blocks are split into, so that small batches still give every
/// thread work (whole images otherwise: the prepared source is then built once per image).
fn parts_per_image(n: usize, blocks: usize) -> usize {
    let want = 2 * rayon::current_num_threads();
    if n >= want {
        1
    } else {
        want.div_ceil(n.max(1)).clamp(1, blocks.max(1))
    }
}

/// Image and channel-block range of task `task`.
fn task_range(task: usize, parts: usize, blocks: usize) -> (usize, usize, usize) {
    let per = blocks.div_ceil(parts);
    let (img, part) = (task / parts, task % parts);
    (
        img,
        (part * per).min(blocks),
        ((part + 1) * per).min(blocks),
    )
}

/// Pixel-run chunks per (image, channel part) of the forward, so that a batch too small to
/// give every thread an image still does when an image has fewer channel blocks than threads
/// (a 32-channel conv at batch 1 is one block).
fn run_chunks(n: usize, parts: usize, runs: usize) -> usize {
    let want = 2 * rayon::current_num_threads();
    if n * parts >= want {
        1
    } else {
        want.div_ceil(n.max(1) * parts).clamp(1, runs.max(1))
    }
}

/// Forward: `[n, cout, ho, wo]`.
pub fn forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Bias,
    residual: Option<&[f32]>,
    level: Level,
) -> Vec<f32> {
    let plan = FwdPlan::new(g, w, level);
    let (nb, cpad) = blocks(g.cout, level);
    let bw = block_width(level);
    let bias = bias.padded(g.n, g.cout, cpad);
    let parts = parts_per_image(g.n, nb);
    let chunks = run_chunks(g.n, parts, plan.runs.len());
    let per_chunk = plan.runs.len().div_ceil(chunks);
    let (in_img, out_img, pix) = (g.in_image(), g.out_image(), g.ho * g.wo);
    // Computes blocks lo..hi of image `img` for the runs `runs` (consecutive output pixels,
    // out_step 1) from its source and writes those pixels of those channel planes.
    let run = |out: SendPtr, src: &[f32], img: usize, lo: usize, hi: usize, runs: &[Run]| {
        let pass = Pass {
            src,
            cstride: plan.cstride,
            cin: g.cin,
            taps: &plan.taps,
            w: &plan.w,
            bw,
            cout: g.cout,
            runs,
            out_step: 1,
        };
        let (p_lo, p_hi) = match (runs.first(), runs.last()) {
            (Some(a), Some(b)) => (a.out, b.out + b.n),
            _ => return,
        };
        let b = bias.as_ref().map(|b| &b[img * cpad..(img + 1) * cpad]);
        scratch::with(Slot::B, pix * cpad, |t| {
            // SAFETY: the plan's runs cover every output pixel and their taps stay inside the
            // prepared (or, direct, the input) image; `t` holds every pixel row.
            unsafe { pass.run(level, t.as_mut_ptr(), cpad, b, lo, hi) };
            let res = residual.map(|r| &r[img * out_img..(img + 1) * out_img]);
            // SAFETY: tasks write disjoint (image, channel, pixel-range) parts of the output.
            unsafe {
                to_planes_part(
                    level,
                    t,
                    pix,
                    cpad,
                    (lo * bw, (hi * bw).min(g.cout)),
                    (p_lo, p_hi),
                    out.add(img * out_img),
                    res,
                )
            };
        });
    };
    // SAFETY: every (image, channel, pixel) of the output is written by exactly one task: the
    // runs, in output order, partition each image's pixels.
    unsafe {
        scratch::filled_by(g.n * out_img, |out| {
            let out = SendPtr(out);
            (0..g.n * parts * chunks).into_par_iter().for_each(|task| {
                let (task, chunk) = (task / chunks, task % chunks);
                let (img, lo, hi) = task_range(task, parts, nb);
                let r_lo = (chunk * per_chunk).min(plan.runs.len());
                let r_hi = ((chunk + 1) * per_chunk).min(plan.runs.len());
                if lo >= hi || r_lo >= r_hi {
                    return;
                }
                let runs = &plan.runs[r_lo..r_hi];
                let xi = &x[img * in_img..(img + 1) * in_img];
                if plan.direct {
                    run(out, xi, img, lo, hi, runs);
                } else {
                    scratch::with(Slot::A, plan.image_len(g), |buf| {
                        plan.prepare(g, xi, buf);
                        run(out, buf, img, lo, hi, runs);
                    });
                }
            });
        })
    }
}

/// Input gradient: `[n, cin, h, w]`.
pub fn grad_input(g: &Geom, dy: &[f32], w: &[f32], level: Level) -> Vec<f32> {
    let plan = GradPlan::new(g, w, level);
    let (nb, cpad) = blocks(g.cin, level);
    let bw = block_width(level);
    let parts = parts_per_image(g.n, nb);
    let (in_img, out_img, hw) = (g.in_image(), g.out_image(), g.h * g.w);
    // SAFETY: every (image, channel) plane is written by one task: the phases' runs partition
    // the image's pixels.
    unsafe {
        scratch::filled_by(g.n * in_img, |dx| {
            let dx = SendPtr(dx);
            (0..g.n * parts).into_par_iter().for_each(|task| {
                let (img, lo, hi) = task_range(task, parts, nb);
                if lo >= hi {
                    return;
                }
                let dyi = &dy[img * out_img..(img + 1) * out_img];
                scratch::with(Slot::A, plan.image_len(g), |buf| {
                    plan.prepare(g, dyi, buf);
                    scratch::with(Slot::B, hw * cpad, |t| {
                        for ph in &plan.phases {
                            let pass = Pass {
                                src: buf,
                                cstride: plan.ph * plan.pw,
                                cin: g.cout,
                                taps: &ph.taps,
                                w: &ph.w,
                                bw,
                                cout: g.cin,
                                runs: &ph.runs,
                                out_step: g.s,
                            };
                            pass.run(level, t.as_mut_ptr(), cpad, None, lo, hi);
                        }
                        to_planes(
                            level,
                            t,
                            hw,
                            cpad,
                            (lo * bw, (hi * bw).min(g.cin)),
                            dx.add(img * in_img),
                            None,
                        );
                    });
                });
            });
        })
    }
}

/// Weight gradient `[cout, cin, k, k]` and the per-image bias gradient `[n, cout]`.
pub fn grad_weight(g: &Geom, x: &[f32], dy: &[f32], level: Level) -> (Vec<f32>, Vec<f32>) {
    let plan = WgradPlan::new(g);
    let taps = g.taps();
    let (nb, cpad) = blocks(g.cout, level);
    let bw = block_width(level);
    let threads = rayon::current_num_threads();
    let chunks = g.n.min(threads).max(1);
    let groups = if g.n >= threads {
        1
    } else {
        threads.div_ceil(g.n.max(1)).min(nb)
    };
    let per = nb.div_ceil(groups);
    let (in_img, out_img, pix) = (g.in_image(), g.out_image(), g.ho * g.wo);
    let mut db = vec![0f32; g.n * g.cout];
    let dbp = SendPtr(db.as_mut_ptr());
    let accs: Vec<Vec<f32>> = (0..chunks * groups)
        .into_par_iter()
        .map(|task| {
            let (c, grp) = (task / groups, task % groups);
            let (b_lo, b_hi) = (grp * per, ((grp + 1) * per).min(nb));
            let mut acc = vec![0f32; taps * g.cin * cpad];
            if b_lo >= b_hi {
                return acc;
            }
            for img in c * g.n / chunks..(c + 1) * g.n / chunks {
                let xi = &x[img * in_img..(img + 1) * in_img];
                let dyi = &dy[img * out_img..(img + 1) * out_img];
                scratch::with(Slot::B, cpad * pix, |dyt| {
                    // SAFETY: (image, channel) pairs are disjoint across tasks.
                    let sums =
                        unsafe { std::slice::from_raw_parts_mut(dbp.add(img * g.cout), g.cout) };
                    conv_wgrad::transpose(level, dyi, g.cout, pix, bw, dyt, b_lo, b_hi, sums);
                    scratch::with(Slot::A, plan.image_len(g), |xt| {
                        plan.prepare(level, g, xi, xt);
                        let r = Reduce {
                            xt,
                            cin: g.cin,
                            taps: &plan.taps,
                            pw: plan.pw,
                            s: g.s,
                            rows: g.ho,
                            cols: g.wo,
                            dyt,
                            bw,
                            cout: g.cout,
                            cpad,
                        };
                        // SAFETY: the padded image holds every tap of every output pixel;
                        // sizes as allocated above.
                        unsafe { r.run(level, &mut acc, b_lo, b_hi) }
                    });
                });
            }
            acc
        })
        .collect();
    // Sum of the tasks' accumulators, transposed to `[cout][cin][tap]`: parallel over output
    // channels (serial, this epilogue was a tenth of a batch-1 step of a 35M-parameter UNet).
    let mut dw = vec![0f32; g.cout * g.cin * taps];
    dw.par_chunks_mut(g.cin * taps)
        .enumerate()
        .for_each(|(co, d)| {
            for ci in 0..g.cin {
                for t in 0..taps {
                    let i = (t * g.cin + ci) * cpad + co;
                    d[ci * taps + t] = accs.iter().fold(0f32, |s, a| s + a[i]);
                }
            }
        });
    (dw, db)
}
