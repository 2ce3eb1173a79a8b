//! Building blocks. Each has `new(vb, ..)` (parameters from a `VarBuilder`, named by their
//! safetensors key) and a `forward` generic over [`crate::Backend`].

mod attention;
mod conv;
mod embedding;
mod gan_head;
mod linear;
pub mod lora;
mod norm;
mod resblock;

pub use attention::SelfAttention;
pub use conv::Conv2d;
pub use embedding::{Embedding, SinusoidalEmbedding};
pub use gan_head::GanHead;
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};
pub use resblock::ResBlock;

use crate::backend::Param;
use candle_core::Shape;
use candle_nn::VarBuilder;

/// Gets (or creates) a parameter and records its full safetensors key.
pub fn param<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    init: candle_nn::Init,
) -> candle_core::Result<Param> {
    let t = vb.get_with_hints(shape, name, init)?;
    let prefix = vb.prefix();
    let name = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    };
    Ok(Param { name, t })
}

/// PyTorch's default init for conv/linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn uniform_fan_in(fan_in: usize) -> candle_nn::Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    candle_nn::Init::Uniform { lo: -b, up: b }
}
