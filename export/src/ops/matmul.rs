//! `matmul` of two activations -> `MatMul` (numpy semantics: batched over leading dims). Stays
//! f32 in every precision (only matmuls by a weight run in f16, see `linear.rs`).

use super::f32_input;
use crate::builder::{broadcast, Dim, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};

pub fn matmul(b: &OnnxBackend, a: &str, c: &str) -> Result<String> {
    let ai = f32_input(b, "MatMul", a)?;
    let ci = f32_input(b, "MatMul", c)?;
    ensure!(
        ai.rank() >= 2 && ci.rank() >= 2,
        "MatMul: {a} {:?} x {c} {:?} needs rank >= 2",
        ai.dims,
        ci.dims
    );
    let (ra, rc) = (ai.rank(), ci.rank());
    let (k1, k2) = (ai.dims[ra - 1], ci.dims[rc - 2]);
    ensure!(
        k1 == k2 || k1 == Dim::Unknown || k2 == Dim::Unknown,
        "MatMul: {a} {:?} x {c} {:?}",
        ai.dims,
        ci.dims
    );
    let mut dims = broadcast(&ai.dims[..ra - 2], &ci.dims[..rc - 2])?;
    dims.push(ai.dims[ra - 2]);
    dims.push(ci.dims[rc - 1]);
    b.node("MatMul", &[a, c], vec![], ValueInfo::new(ai.elem, dims))
}
