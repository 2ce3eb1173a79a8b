//! Checks of the fast CPU kernels against candle's stock ops, shared by the AVX2 and the
//! portable-fallback test binaries: values and gradients to f32 round-off.

#![allow(dead_code)]

use candle_core::{Device, Tensor, Var};
use graphs::candle_backend::stock_group_norm;
use graphs::Param;

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// `|a - b| <= tol * max(1, max|b|)`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let (d, s) = (max_diff(a, b), max_abs(b).max(1.0));
    assert!(d <= tol * s, "{what}: differs by {d} (scale {s})");
}

fn randn(shape: &[usize], std: f32) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasKind {
    None,
    Channel,
    Image,
}

/// conv2d `[n, c, h, w]` * `[cout, c, k, k]` (+ bias) vs candle's conv2d + broadcast add.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    bias: BiasKind,
) {
    let what = format!("{n}x{c}x{h}x{w} -> {cout}, k{k} s{stride} p{pad}, bias {bias:?}");
    let x = randn(&[n, c, h, w], 1.0);
    let wt = randn(&[cout, c, k, k], 0.3);
    let b = match bias {
        BiasKind::None => None,
        BiasKind::Channel => Some(randn(&[cout], 1.0)),
        BiasKind::Image => Some(randn(&[n, cout], 1.0)),
    };
    let ours = graphs::kernels::conv2d(&x, &wt, b.as_deref(), stride, pad).unwrap();
    let mut stock = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
    if let Some(b) = &b {
        let shape = if bias == BiasKind::Channel {
            (1, cout, 1, 1)
        } else {
            (n, cout, 1, 1)
        };
        stock = stock.broadcast_add(&b.reshape(shape).unwrap()).unwrap();
    }
    assert_close(&format!("forward {what}"), &ours, &stock, 1e-5);
    // A random upstream gradient, so every output position matters differently.
    let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
    let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = vec![("input", &x), ("weight", &wt)];
    if let Some(b) = &b {
        vars.push(("bias", b));
    }
    for (name, v) in vars {
        let (a, s) = (go.get(v).unwrap(), gs.get(v).unwrap());
        assert_close(&format!("{name} gradient {what}"), a, s, 2e-5);
    }
}

/// `residual + conv2d(x) (+ bias)` fused vs candle's conv2d and adds.
#[allow(clippy::too_many_arguments)]
pub fn conv_residual(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    bias: BiasKind,
) {
    let what = format!("residual {n}x{c}x{h}x{w} -> {cout}, k{k} s{stride} p{pad}, bias {bias:?}");
    let x = randn(&[n, c, h, w], 1.0);
    let wt = randn(&[cout, c, k, k], 0.3);
    let b = match bias {
        BiasKind::None => None,
        BiasKind::Channel => Some(randn(&[cout], 1.0)),
        BiasKind::Image => Some(randn(&[n, cout], 1.0)),
    };
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let r = randn(&[n, cout, ho, wo], 1.0);
    let ours = graphs::kernels::conv2d_residual(&x, &wt, b.as_deref(), &r, stride, pad).unwrap();
    let mut stock = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
    if let Some(b) = &b {
        let shape = if bias == BiasKind::Channel {
            (1, cout, 1, 1)
        } else {
            (n, cout, 1, 1)
        };
        stock = stock.broadcast_add(&b.reshape(shape).unwrap()).unwrap();
    }
    let stock = (r.as_tensor() + stock).unwrap();
    assert_close(&format!("forward {what}"), &ours, &stock, 1e-5);
    let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
    let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = vec![("input", &x), ("weight", &wt), ("residual", &r)];
    if let Some(b) = &b {
        vars.push(("bias", b));
    }
    for (name, v) in vars {
        let (a, s) = (go.get(v).unwrap(), gs.get(v).unwrap());
        assert_close(&format!("{name} gradient {what}"), a, s, 2e-5);
    }
}

pub fn conv_residual_suite() {
    use BiasKind::*;
    conv_residual(2, 6, 8, 8, 5, 3, 1, 1, Channel);
    conv_residual(3, 4, 7, 5, 9, 1, 1, 0, Image);
    conv_residual(2, 5, 9, 9, 4, 3, 2, 1, None);
    conv_residual(1, 16, 8, 8, 32, 1, 1, 0, Channel);
}

/// Every conv shape the networks use, and the odd ones around them.
pub fn conv_suite() {
    use BiasKind::*;
    // 3x3, stride 1, same padding (res blocks, up-sampling convs), odd sizes and channel counts.
    conv(2, 3, 8, 8, 4, 3, 1, 1, Channel);
    conv(2, 5, 7, 9, 6, 3, 1, 1, None);
    conv(3, 16, 16, 16, 8, 3, 1, 1, Image);
    conv(1, 4, 32, 32, 32, 3, 1, 1, Channel);
    conv(2, 7, 5, 3, 9, 3, 1, 1, Image);
    // Stride 2 (down-sampling), even and odd sides.
    conv(3, 5, 7, 9, 6, 3, 2, 1, Channel);
    conv(1, 2, 9, 9, 3, 3, 2, 1, None);
    conv(2, 4, 16, 16, 8, 3, 2, 1, Channel);
    conv(2, 8, 32, 32, 8, 3, 2, 1, Image);
    // 1x1 (skip paths, attention projections): read in place, and planes under 8 pixels.
    conv(2, 6, 5, 5, 3, 1, 1, 0, Channel);
    conv(2, 8, 8, 8, 16, 1, 1, 0, Image);
    conv(2, 3, 2, 2, 5, 1, 1, 0, Channel);
    // No padding, bigger kernels, the GAN head's 4x4 stride-2 and kernel = side convs.
    conv(2, 3, 6, 7, 2, 3, 1, 0, None);
    conv(1, 1, 5, 5, 2, 5, 1, 2, Channel);
    conv(2, 8, 8, 8, 8, 4, 2, 1, Channel);
    conv(2, 8, 4, 4, 8, 4, 4, 0, Channel);
    // One output channel (conv_out), one input channel (conv_in), batch 1 (channel-split tasks).
    conv(2, 16, 8, 8, 1, 3, 1, 1, Channel);
    conv(2, 1, 16, 16, 8, 3, 1, 1, Channel);
    conv(1, 16, 8, 8, 20, 3, 1, 1, Channel);
    conv(1, 20, 8, 8, 36, 3, 2, 1, Image);
    // Weight blocks past L1 (input-channel blocks outer, a partial last block of 4), forward
    // and input gradient (its pass reads `cout` channels).
    conv(2, 100, 6, 5, 40, 3, 1, 1, Channel);
    conv(1, 48, 8, 8, 100, 3, 2, 1, Image);
}

/// Fused GroupNorm(+SiLU) vs the stock composition.
pub fn group_norm(n: usize, c: usize, h: usize, w: usize, groups: usize, silu: bool) {
    let what = format!("{n}x{c}x{h}x{w}, {groups} groups, silu {silu}");
    let x = Var::from_tensor(
        &(Tensor::randn(0f32, 2.0, (n, c, h, w), &Device::Cpu).unwrap() + 0.5).unwrap(),
    )
    .unwrap();
    let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &Device::Cpu).unwrap()).unwrap();
    let beta = randn(&[c], 0.3);
    let ours = graphs::kernels::group_norm(&x, groups, 1e-5, &gamma, &beta, silu)
        .unwrap()
        .expect("fused kernel applies on CPU f32");
    let p = |name: &str, v: &Var| Param {
        name: name.into(),
        t: v.as_tensor().clone(),
    };
    let stock = stock_group_norm(&x, groups, 1e-5, &p("g", &gamma), &p("b", &beta)).unwrap();
    let stock = if silu {
        candle_nn::ops::silu(&stock).unwrap()
    } else {
        stock
    };
    assert_close(&format!("forward {what}"), &ours, &stock, 1e-5);
    let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
    let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("input", &x), ("gamma", &gamma), ("beta", &beta)] {
        let (a, s) = (go.get(v).unwrap(), gs.get(v).unwrap());
        assert_close(&format!("{name} gradient {what}"), a, s, 1e-4);
    }
}

pub fn group_norm_suite() {
    for silu in [false, true] {
        group_norm(2, 8, 4, 4, 4, silu);
        group_norm(3, 6, 5, 7, 3, silu);
        group_norm(1, 4, 1, 1, 2, silu);
        group_norm(3, 12, 9, 5, 4, silu);
        group_norm(2, 16, 8, 8, 8, silu);
        group_norm(2, 32, 16, 16, 8, silu);
        group_norm(2, 5, 3, 3, 1, silu);
        group_norm(1, 6, 2, 3, 6, silu);
    }
}

/// The in-place AdamW update against the same formula in candle tensor ops.
pub fn adamw(n: usize, t: u64, grad_scale: f64) {
    use graphs::kernels::adamw::{update, AdamWStep};
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
    let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
    let m = Tensor::randn(0f32, 0.1, n, &dev).unwrap();
    let v = Tensor::randn(0f32, 0.1, n, &dev).unwrap().sqr().unwrap();
    let p = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        t,
        grad_scale,
    };
    let gs = (&g * grad_scale).unwrap();
    let m2 = ((&m * p.beta1).unwrap() + (&gs * (1.0 - p.beta1)).unwrap()).unwrap();
    let v2 = ((&v * p.beta2).unwrap() + (gs.sqr().unwrap() * (1.0 - p.beta2)).unwrap()).unwrap();
    let (bc1, bc2) = (1.0 - p.beta1.powi(t as i32), 1.0 - p.beta2.powi(t as i32));
    let upd =
        ((&m2 / bc1).unwrap() / ((&v2 / bc2).unwrap().sqrt().unwrap() + p.eps).unwrap()).unwrap();
    let w2 = ((&w * (1.0 - p.lr * p.weight_decay)).unwrap() - (upd * p.lr).unwrap()).unwrap();
    let (wc, mc, vc) = (w.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
    update(&wc, &mc, &vc, &g, &p).unwrap();
    assert_close(&format!("adamw m (n {n}, t {t})"), &mc, &m2, 1e-6);
    assert_close(&format!("adamw v (n {n}, t {t})"), &vc, &v2, 1e-6);
    assert_close(&format!("adamw w (n {n}, t {t})"), &wc, &w2, 1e-6);
}

pub fn adamw_suite() {
    for (n, t, s) in [(1, 1, 1.0), (7, 3, 0.5), (33, 100, 1.0), (100_000, 2, 0.25)] {
        adamw(n, t, s);
    }
}

/// Nearest 2x upsampling vs candle's `upsample_nearest2d`, values and gradients.
pub fn upsample_suite() {
    for (n, c, h, w) in [(2, 3, 4, 4), (1, 5, 3, 7), (3, 2, 1, 1), (2, 64, 8, 8)] {
        let x = randn(&[n, c, h, w], 1.0);
        let ours = graphs::kernels::upsample_nearest2x(&x).unwrap().unwrap();
        let stock = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
        assert_close("upsample forward", &ours, &stock, 0.0);
        let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
        let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            "upsample gradient",
            go.get(&x).unwrap(),
            gs.get(&x).unwrap(),
            1e-6,
        );
    }
}

/// Channel concatenation (and its split backward) vs `Tensor::cat`, one input not tracked too.
pub fn concat_suite() {
    for ((n, c1, c2, h, w), track2) in [
        ((2, 3, 5, 4, 4), true),
        ((1, 1, 1, 1, 1), true),
        ((3, 64, 32, 8, 8), true),
        ((2, 4, 2, 3, 7), false),
        ((200, 2, 3, 2, 2), true),
    ] {
        let a = randn(&[n, c1, h, w], 1.0);
        let b: Tensor = if track2 {
            randn(&[n, c2, h, w], 1.0).as_tensor().clone()
        } else {
            Tensor::randn(0f32, 1.0, (n, c2, h, w), &Device::Cpu).unwrap()
        };
        // A strided input as well: the kernel takes a contiguous copy.
        let bt = b
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let ours = graphs::kernels::concat_channels(&a, &bt).unwrap().unwrap();
        let stock = Tensor::cat(&[a.as_tensor(), &b], 1).unwrap();
        assert_close("concat forward", &ours, &stock, 0.0);
        let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
        let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            "concat gradient 1",
            go.get(&a).unwrap(),
            gs.get(&a).unwrap(),
            0.0,
        );
        if track2 {
            assert_close(
                "concat gradient 2",
                go.get(&b).unwrap(),
                gs.get(&b).unwrap(),
                0.0,
            );
        } else {
            assert!(go.get(&b).is_none());
        }
    }
    let bad =
        graphs::kernels::concat_channels(&randn(&[2, 3, 4, 4], 1.0), &randn(&[2, 3, 4, 5], 1.0));
    let err = bad.unwrap_err().to_string();
    assert!(err.contains("differ outside the channels"), "{err}");
}

/// Fused attention core vs candle's transpose / matmul / softmax composition.
pub fn attention_suite() {
    for (n, c, l) in [(2, 8, 16), (3, 5, 7), (2, 64, 64), (1, 3, 1), (2, 128, 64)] {
        let what = format!("attention {n}x{c}x{l}");
        let (q, k, v) = (
            randn(&[n, c, l], 1.0),
            randn(&[n, c, l], 1.0),
            randn(&[n, c, l], 1.0),
        );
        let scale = 1.0 / (c as f64).sqrt();
        let ours = graphs::kernels::attention(&q, &k, &v, scale)
            .unwrap()
            .unwrap();
        let qt = q.transpose(1, 2).unwrap().contiguous().unwrap();
        let attn = candle_nn::ops::softmax(
            &(qt.matmul(&k).unwrap() * scale).unwrap(),
            candle_core::D::Minus1,
        )
        .unwrap();
        let stock = v
            .matmul(&attn.transpose(1, 2).unwrap().contiguous().unwrap())
            .unwrap();
        assert_close(&format!("forward {what}"), &ours, &stock, 1e-5);
        let g = Tensor::randn(0f32, 1.0, stock.dims(), &Device::Cpu).unwrap();
        let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(
                &format!("{name} gradient {what}"),
                go.get(t).unwrap(),
                gs.get(t).unwrap(),
                2e-5,
            );
        }
    }
}
