//! Fast CPU kernels against candle's stock implementation: values and gradients.

use candle_core::{Device, Tensor, Var};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(n: usize, c: usize, h: usize, w: usize, cout: usize, k: usize, stride: usize, pad: usize) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap()).unwrap();
    let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (cout, c, k, k), &dev).unwrap()).unwrap();
    let ours = graphs::kernels::conv2d(&x, &wt, stride, pad).unwrap();
    let stock = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
    assert_eq!(
        ours.dims(),
        stock.dims(),
        "shape for {n}x{c}x{h}x{w} k{k} s{stride} p{pad}"
    );
    let scale = stock
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    assert!(
        max_diff(&ours, &stock) <= 1e-5 * scale,
        "forward differs: {}",
        max_diff(&ours, &stock)
    );
    // A random upstream gradient, so every output position matters differently.
    let g = Tensor::randn(0f32, 1.0, stock.dims(), &dev).unwrap();
    let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("input", &x), ("weight", &wt)] {
        let (a, b) = (go.get(v).unwrap(), gs.get(v).unwrap());
        let s = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert!(
            max_diff(a, b) <= 2e-5 * s,
            "{name} gradient differs by {} ({n}x{c}x{h}x{w} k{k} s{stride} p{pad})",
            max_diff(a, b)
        );
    }
}

#[test]
fn conv2d_3x3_same_padding() {
    check(2, 3, 8, 8, 4, 3, 1, 1);
}

#[test]
fn conv2d_odd_sizes_and_stride_2() {
    check(3, 5, 7, 9, 6, 3, 2, 1);
    check(1, 2, 9, 9, 3, 3, 2, 1);
    check(2, 4, 16, 16, 8, 3, 2, 1);
}

#[test]
fn conv2d_1x1_and_no_padding() {
    check(2, 6, 5, 5, 3, 1, 1, 0);
    check(2, 3, 6, 7, 2, 3, 1, 0);
    check(1, 1, 5, 5, 2, 5, 1, 2);
}

fn check_gn(n: usize, c: usize, h: usize, w: usize, groups: usize, silu: bool) {
    use graphs::candle_backend::stock_group_norm;
    use graphs::Param;
    let dev = Device::Cpu;
    let x =
        Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, h, w), &dev).unwrap() + 0.5).unwrap())
            .unwrap();
    let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev).unwrap()).unwrap();
    let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev).unwrap()).unwrap();
    let ours = graphs::kernels::group_norm(&x, groups, 1e-5, &gamma, &beta, silu)
        .unwrap()
        .expect("fused kernel applies on CPU f32");
    let (pg, pb) = (
        Param {
            name: "g".into(),
            t: gamma.as_tensor().clone(),
        },
        Param {
            name: "b".into(),
            t: beta.as_tensor().clone(),
        },
    );
    let stock = stock_group_norm(&x, groups, 1e-5, &pg, &pb).unwrap();
    let stock = if silu {
        candle_nn::ops::silu(&stock).unwrap()
    } else {
        stock
    };
    assert!(
        max_diff(&ours, &stock) < 1e-5,
        "forward differs by {}",
        max_diff(&ours, &stock)
    );
    let g = Tensor::randn(0f32, 1.0, stock.dims(), &dev).unwrap();
    let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (stock * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("input", &x), ("gamma", &gamma), ("beta", &beta)] {
        let (a, b) = (go.get(v).unwrap(), gs.get(v).unwrap());
        let s = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert!(
            max_diff(a, b) <= 1e-4 * s,
            "{name} gradient differs by {} ({n}x{c}x{h}x{w}, {groups} groups, silu {silu})",
            max_diff(a, b)
        );
    }
}

#[test]
fn group_norm_matches_stock_values_and_gradients() {
    check_gn(2, 8, 4, 4, 4, false);
    check_gn(3, 6, 5, 7, 3, false);
    check_gn(1, 4, 1, 1, 2, false);
}

#[test]
fn group_norm_silu_matches_stock_values_and_gradients() {
    check_gn(2, 8, 4, 4, 4, true);
    check_gn(3, 12, 9, 5, 4, true);
    check_gn(2, 16, 8, 8, 8, true);
}
