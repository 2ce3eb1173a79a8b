//! Networks, noise schedules, losses and samplers of `distill`.
//!
//! Every graph is written once against [`Backend`]: [`CandleBackend`] runs it (training and the
//! reference), and `export` lowers the very same code to ONNX.

pub mod backend;
pub mod candle_backend;
pub mod cond;
pub mod denoiser;
pub mod denoiser_io;
pub mod diffusers;
pub mod flops;
pub mod guidance;
pub mod json;
pub mod kernels;
pub mod losses;
pub mod network;
pub mod nn;
pub mod params;
pub mod precision;
pub mod sampler;
pub mod schedule;
pub mod schedulers;
pub mod training_level;
pub mod transformers;
pub mod unet;

pub use backend::{Backend, Kind, Param};
pub use candle_backend::CandleBackend;
pub use cond::{Cond, NetCond, TextCond};
pub use denoiser::{Denoiser, ModelConfig, NoiseLevel};
pub use denoiser_io::DenoiserIo;
pub use network::{Network, NetworkConfig};
pub use precision::Precision;
pub use sampler::{generate, GeneratorSpec, Renoise, SamplerKind};
pub use schedule::{
    BetaSchedule, EdmSchedule, FlowSchedule, FlowTimeDist, NoiseGrid, Parameterisation, VpSchedule,
};
pub use training_level::TrainingLevel;
pub use unet::{UNet, UNetConfig};
