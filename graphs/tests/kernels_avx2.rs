//! The AVX2 level of the fast CPU kernels against candle's stock ops (on CPUs with AVX-512 the
//! default run tests that level instead; a separate binary because the switch is process-wide).

mod checks;

use graphs::kernels::simd::{force, Level};

#[test]
fn conv2d_avx2_matches_stock() {
    force(Level::Avx2);
    checks::conv_suite();
}

#[test]
fn group_norm_avx2_matches_stock() {
    force(Level::Avx2);
    checks::group_norm_suite();
}

#[test]
fn conv2d_residual_matches_stock() {
    force(Level::Avx2);
    checks::conv_residual_suite();
}

#[test]
fn adamw_update_matches_tensor_ops() {
    force(Level::Avx2);
    checks::adamw_suite();
}

#[test]
fn attention_matches_stock() {
    force(Level::Avx2);
    checks::attention_suite();
}
