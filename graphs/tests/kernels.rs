//! Fast CPU kernels (best instruction set of this CPU) against candle's stock implementation.

mod checks;

#[test]
fn conv2d_matches_stock_values_and_gradients() {
    checks::conv_suite();
}

#[test]
fn group_norm_matches_stock_values_and_gradients() {
    checks::group_norm_suite();
}

#[test]
fn conv2d_residual_matches_stock() {
    checks::conv_residual_suite();
}

#[test]
fn adamw_update_matches_tensor_ops() {
    checks::adamw_suite();
}

#[test]
fn upsample_matches_stock() {
    checks::upsample_suite();
}

#[test]
fn attention_matches_stock() {
    checks::attention_suite();
}

#[test]
fn concat_channels_matches_stock() {
    checks::concat_suite();
}
