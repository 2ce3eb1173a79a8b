//! Fast CPU kernels behind candle's custom-op mechanism (forward and backward). The networks keep
//! calling [`crate::Backend`]; only the candle lowering on CPU routes through these.

pub mod adamw;
pub mod attention;
pub mod concat;
mod conv;
mod conv_direct;
pub mod conv_op;
mod conv_plan;
mod conv_wgrad;
mod layout;
pub mod norm;
mod reduce;
pub mod scratch;
pub mod simd;
mod tensor_io;
pub mod upsample;

pub use attention::attention;
pub use concat::concat_channels;
pub use conv_op::{conv2d, conv2d_residual};
pub use norm::group_norm;
pub use upsample::upsample_nearest2x;
