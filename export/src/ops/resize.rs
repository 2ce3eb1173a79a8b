//! `upsample_nearest2x` -> `Resize(X, roi = "", scales = [1, 1, 2, 2])`, mode `nearest`,
//! coordinate_transformation_mode `asymmetric`, nearest_mode `floor`: output pixel `i` reads
//! input `floor(i / 2)`, which is exactly candle's `upsample_nearest2d` (source index
//! `floor(i * in / out)`).

use super::f32_input;
use crate::builder::{attr_str, Dim, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};

pub fn upsample_nearest2x(b: &OnnxBackend, x: &str) -> Result<String> {
    let xi = f32_input(b, "Resize", x)?;
    ensure!(xi.rank() == 4, "Resize: input {x} has rank {}", xi.rank());
    let scales = b.const_f32(&[1.0, 1.0, 2.0, 2.0], &[4])?;
    let up = |d: Dim| match d {
        Dim::Fixed(n) => Dim::Fixed(2 * n),
        _ => Dim::Unknown,
    };
    let dims = vec![xi.dims[0], xi.dims[1], up(xi.dims[2]), up(xi.dims[3])];
    let attrs = vec![
        attr_str("mode", "nearest"),
        attr_str("coordinate_transformation_mode", "asymmetric"),
        attr_str("nearest_mode", "floor"),
    ];
    b.node(
        "Resize",
        &[x, "", &scales],
        attrs,
        ValueInfo::new(xi.elem, dims),
    )
}
