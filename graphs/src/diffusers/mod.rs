//! Hugging Face diffusers models: `UNet2DModel` (config, blocks, weights) and
//! `UNet2DConditionModel` (`unet2d_condition.rs`, `transformer2d.rs`, `condition_config.rs`), written against
//! [`crate::Backend`] with diffusers' own parameter names, so a diffusers checkpoint loads
//! key for key and the same code trains, runs and lowers to ONNX.

pub mod blocks;
pub mod condition_config;
pub mod config;
pub mod load;
pub mod pipeline;
pub mod save;
pub mod teacher;
pub mod transformer2d;
pub mod unet2d;
pub mod unet2d_condition;
pub mod vae;

pub use condition_config::{CondBlockType, CondMidBlock, TextTime, UNet2DConditionConfig};
pub use config::{BlockType, ClassEmbed, TimeScaleShift, UNet2DConfig};
pub use load::{load_unet, DiffusersFolder};
pub use pipeline::{is_text_to_image, SdxlText, TextToImage};
pub use save::{save_unet, save_unet_condition};
pub use teacher::{DiffusersTeacher, NoiseSpace};
pub use unet2d::UNet2DModel;
pub use unet2d_condition::{
    load_unet_condition, parameter_count, AddedCond, UNet2DConditionModel, SDXL_TIME_IDS,
};
pub use vae::{load_vae, AutoencoderKL, AutoencoderKLConfig};
