//! Access to the f32 data of CPU tensors from custom-op backward passes.

use candle_core::{CpuStorage, Result, Storage, Tensor};

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
