//! Each lowered module exported alone and compared with candle in tract and ONNX Runtime (every
//! model also passes `onnx.checker.check_model(..., full_check=True)`).

mod common;

use common::{randomize_norms, varmap, TestInput};
use graphs::nn::{
    Conv2d, Embedding, GroupNorm, LayerNorm, Linear, ResBlock, SelfAttention, SinusoidalEmbedding,
};
use graphs::{Backend, UNet, UNetConfig};

const TOL: f64 = 1e-4;

#[test]
fn conv_stride1_and_stride2() {
    let (vm, vb) = varmap();
    let c1 = Conv2d::new(vb.pp("c1"), 3, 8, 3, 1, 1).unwrap();
    let c2 = Conv2d::new(vb.pp("c2"), 8, 8, 3, 2, 1).unwrap();
    let c3 = Conv2d::new(vb.pp("c3"), 3, 5, 1, 1, 0).unwrap();
    randomize_norms(&vm, 1).unwrap();
    parity!(
        "conv_s1",
        vec![TestInput::normal("x", &[3, 3, 16, 16], 1, 1.0)],
        TOL,
        |b, xs| c1.forward(b, &xs[0])
    );
    parity!(
        "conv_s2",
        vec![TestInput::normal("x", &[3, 8, 16, 16], 2, 1.0)],
        TOL,
        |b, xs| c2.forward(b, &xs[0])
    );
    parity!(
        "conv_1x1",
        vec![TestInput::normal("x", &[2, 3, 7, 5], 3, 1.0)],
        TOL,
        |b, xs| c3.forward(b, &xs[0])
    );
}

#[test]
fn group_norm_and_silu() {
    let (vm, vb) = varmap();
    let gn = GroupNorm::new(vb.pp("norm"), 4, 16).unwrap();
    randomize_norms(&vm, 7).unwrap();
    let x = || vec![TestInput::normal("x", &[3, 16, 8, 8], 4, 2.0)];
    parity!("group_norm", x(), TOL, |b, xs| gn.forward(b, &xs[0]));
    parity!("group_norm_silu", x(), TOL, |b, xs| gn
        .forward_silu(b, &xs[0]));
}

#[test]
fn layer_norm_with_and_without_affine() {
    let (vm, vb) = varmap();
    let ln = LayerNorm::new(vb.pp("norm"), 12, 1e-5, true).unwrap();
    let bare = LayerNorm::new(vb.pp("bare"), 12, 1e-6, false).unwrap();
    randomize_norms(&vm, 21).unwrap();
    let x = || vec![TestInput::normal("x", &[2, 5, 12], 22, 3.0)];
    parity!("layer_norm_affine", x(), TOL, |b, xs| ln.forward(b, &xs[0]));
    parity!("layer_norm_bare", x(), TOL, |b, xs| bare.forward(b, &xs[0]));
}

#[test]
fn gelu_sigmoid_and_narrow() {
    let x = || vec![TestInput::normal("x", &[3, 4, 10], 23, 3.0)];
    parity!("gelu", x(), TOL, |b, xs| b.gelu(&xs[0]));
    parity!("sigmoid", x(), TOL, |b, xs| b.sigmoid(&xs[0]));
    // GEGLU's split: first half times gelu of the second half.
    parity!("geglu_halves", x(), TOL, |b, xs| {
        let h = b.narrow(&xs[0], 2, 0, 5).unwrap();
        let g = b.narrow(&xs[0], 2, 5, 5).unwrap();
        b.mul(&h, &b.gelu(&g).unwrap())
    });
    parity!("narrow_axis1", x(), TOL, |b, xs| b.narrow(&xs[0], 1, 1, 2));
}

#[test]
fn linear_2d_gemm_and_3d_matmul() {
    let (vm, vb) = varmap();
    let l = Linear::new(vb.pp("lin"), 12, 20).unwrap();
    randomize_norms(&vm, 2).unwrap();
    parity!(
        "linear_2d",
        vec![TestInput::normal("x", &[3, 12], 5, 1.0)],
        TOL,
        |b, xs| l.forward(b, &xs[0])
    );
    parity!(
        "linear_3d",
        vec![TestInput::normal("x", &[3, 4, 12], 6, 1.0)],
        TOL,
        |b, xs| l.forward(b, &xs[0])
    );
}

#[test]
fn self_attention() {
    let (vm, vb) = varmap();
    let a = SelfAttention::new(vb.pp("attn"), 16, 4).unwrap();
    randomize_norms(&vm, 8).unwrap();
    parity!(
        "self_attention",
        vec![TestInput::normal("x", &[3, 16, 8, 8], 9, 1.0)],
        TOL,
        |b, xs| a.forward(b, &xs[0], 8, 8)
    );
}

#[test]
fn upsample_then_conv() {
    let (vm, vb) = varmap();
    let c = Conv2d::new(vb.pp("up"), 8, 8, 3, 1, 1).unwrap();
    randomize_norms(&vm, 3).unwrap();
    parity!(
        "upsample",
        vec![TestInput::normal("x", &[2, 8, 4, 5], 10, 1.0)],
        TOL,
        |b, xs| b.upsample_nearest2x(&xs[0])
    );
    parity!(
        "upsample_conv",
        vec![TestInput::normal("x", &[3, 8, 8, 8], 11, 1.0)],
        TOL,
        |b, xs| c.forward(b, &b.upsample_nearest2x(&xs[0]).unwrap())
    );
}

#[test]
fn sinusoidal_and_label_embedding() {
    let (vm, vb) = varmap();
    let sin = SinusoidalEmbedding::new(16, 1.0);
    let emb = Embedding::new(vb.pp("label_emb"), 11, 16).unwrap();
    randomize_norms(&vm, 4).unwrap();
    let inputs = || {
        vec![
            TestInput::normal("c_noise", &[5], 12, 1.5),
            TestInput::ints("labels", &[0, 3, 10, 7, 3]),
        ]
    };
    parity!("sinusoidal", inputs(), TOL, |b, xs| sin.forward(b, &xs[0]));
    parity!("label_embedding", inputs(), TOL, |b, xs| emb
        .forward(b, &xs[1]));
    parity!("sinusoidal_plus_label", inputs(), TOL, |b, xs| b.add(
        &sin.forward(b, &xs[0]).unwrap(),
        &emb.forward(b, &xs[1]).unwrap()
    ));
}

#[test]
fn res_block() {
    let (vm, vb) = varmap();
    let r = ResBlock::new(vb.pp("res"), 8, 16, 32, 4, 0.1).unwrap();
    let same = ResBlock::new(vb.pp("res2"), 16, 16, 32, 4, 0.0).unwrap();
    randomize_norms(&vm, 13).unwrap();
    let inputs = |c| {
        vec![
            TestInput::normal("x", &[3, c, 8, 8], 14, 1.0),
            TestInput::normal("emb", &[3, 32], 15, 1.0),
        ]
    };
    parity!("res_block_skip_conv", inputs(8), TOL, |b, xs| r
        .forward(b, &xs[0], &xs[1]));
    parity!("res_block_identity_skip", inputs(16), TOL, |b, xs| same
        .forward(b, &xs[0], &xs[1]));
}

#[test]
fn tiny_unet() {
    let (vm, vb) = varmap();
    let u = UNet::new(vb, &UNetConfig::tiny()).unwrap();
    randomize_norms(&vm, 16).unwrap();
    let inputs = vec![
        TestInput::normal("x", &[3, 1, 16, 16], 17, 1.0),
        TestInput::normal("c_noise", &[3], 18, 1.0),
        TestInput::ints("labels", &[1, 10, 4]),
    ];
    parity!("tiny_unet", inputs, TOL, |b, xs| u
        .forward(b, &xs[0], &xs[1], &xs[2]));
}
