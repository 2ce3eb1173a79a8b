//! Hugging Face diffusers models: `UNet2DModel` (config, blocks, weights), written against
//! [`crate::Backend`] with diffusers' own parameter names, so a diffusers checkpoint loads
//! key for key and the same code trains, runs and lowers to ONNX.

pub mod blocks;
pub mod config;
pub mod load;
pub mod save;
pub mod teacher;
pub mod unet2d;
pub mod vae;

pub use config::{BlockType, ClassEmbed, TimeScaleShift, UNet2DConfig};
pub use load::{load_unet, DiffusersFolder};
pub use save::save_unet;
pub use teacher::{DiffusersTeacher, NoiseSpace};
pub use unet2d::UNet2DModel;
pub use vae::{load_vae, AutoencoderKL, AutoencoderKLConfig};
