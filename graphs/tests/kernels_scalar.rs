//! The portable (non-AVX2) fallback of the fast CPU kernels against candle's stock ops. A
//! separate test binary, because the instruction-set switch is process-wide.

mod checks;

#[test]
fn conv2d_fallback_matches_stock() {
    graphs::kernels::simd::force(graphs::kernels::simd::Level::Scalar);
    checks::conv_suite();
}

#[test]
fn group_norm_fallback_matches_stock() {
    graphs::kernels::simd::force(graphs::kernels::simd::Level::Scalar);
    checks::group_norm_suite();
}

#[test]
fn conv2d_residual_matches_stock() {
    graphs::kernels::simd::force(graphs::kernels::simd::Level::Scalar);
    checks::conv_residual_suite();
}

#[test]
fn adamw_update_matches_tensor_ops() {
    graphs::kernels::simd::force(graphs::kernels::simd::Level::Scalar);
    checks::adamw_suite();
}

#[test]
fn attention_matches_stock() {
    graphs::kernels::simd::force(graphs::kernels::simd::Level::Scalar);
    checks::attention_suite();
}
