//! Fast CPU kernels behind candle's custom-op mechanism (forward and backward). The networks keep
//! calling [`crate::Backend`]; only the candle lowering on CPU routes through these.

pub mod conv;
pub mod norm;

pub use conv::conv2d;
pub use norm::group_norm;
