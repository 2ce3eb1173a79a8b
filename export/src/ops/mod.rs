//! One file per lowered op (tract style): find an op's ONNX emission in one guess.
//!
//! | `Backend` method      | file            | ONNX                                                    |
//! |-----------------------|-----------------|---------------------------------------------------------|
//! | conv2d                | `conv.rs`       | Conv (+bias)                                            |
//! | linear                | `linear.rs`     | Gemm(transB=1) on 2-D, else MatMul(W^T) + Add           |
//! | group_norm, layer_norm | `norm.rs`      | Reshape, InstanceNormalization, Reshape, Mul, Add; LayerNormalization |
//! | silu, sigmoid, gelu, softmax_last | `activation.rs` | Sigmoid + Mul; Sigmoid; Mul, Erf, Add, Mul; Softmax(axis=-1) |
//! | add .. cos, clamp     | `elementwise.rs`| Add/Sub/Mul/Div, Exp/Log/Sqrt/Sin/Cos, Clip             |
//! | matmul                | `matmul.rs`     | MatMul                                                  |
//! | reshape, permute, concat, narrow | `shape.rs` | Reshape (0/-1), Transpose, Concat, Slice         |
//! | upsample_nearest2x    | `resize.rs`     | Resize nearest, asymmetric, floor, scales [1,1,2,2]     |
//! | embedding, gather_const | `gather.rs`   | Gather                                                  |
//! | param_value           | `param.rs`      | an f32 initializer (no node)                            |
//! | full_batch            | `constant.rs`   | Shape, Slice[0:1], ConstantOfShape                      |
//! | constant, to_f32, dropout | `backend.rs` | Constant; Cast; identity                               |
//!
//! With [`crate::Precision::Fp16`], `conv.rs` and `linear.rs` store f16 weights and wrap the op
//! in Cast(f16) .. Cast(f32): activations stay f32 between ops (normalisation, softmax and the
//! sampler arithmetic run in f32).

pub mod activation;
pub mod constant;
pub mod conv;
pub mod elementwise;
pub mod gather;
pub mod linear;
pub mod matmul;
pub mod norm;
pub mod param;
pub mod resize;
pub mod shape;

use crate::builder::{ElemType, OnnxBackend, ValueInfo};
use anyhow::{ensure, Result};

/// Checks `v` is f32 and returns its info.
pub(crate) fn f32_input(b: &OnnxBackend, op: &str, v: &str) -> Result<ValueInfo> {
    let i = b.info(v)?;
    ensure!(
        i.elem == ElemType::F32,
        "{op}: input {v} is {:?}, expected f32",
        i.elem
    );
    Ok(i)
}
