//! Access to the f32 data of CPU tensors from custom-op backward passes.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Runs `f` on the contiguous f32 data of `t` (copied first only if `t` is strided).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*s else {
        candle_core::bail!("fast CPU kernels take f32 CPU tensors, got {:?}", t.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => f(&v[a..b]),
        None => candle_core::bail!("tensor is not contiguous after contiguous()"),
    }
}

/// The contiguous f32 data of a custom op's CPU input (`what` names the op and input in the
/// error).
pub fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 input only"),
    }
}
