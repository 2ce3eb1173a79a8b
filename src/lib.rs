//! `distill`: train a diffusion teacher, distil it into a 1-4 step student (DMD2, TDM), export it
//! to ONNX / TensorRT and validate parity. The binary (`main.rs`, `cli/`) only turns flags into [`jobs`]; this library knows nothing of
//! the command line.

pub mod bench;
pub mod checkpoint;
pub mod checks;
pub mod data;
pub mod diffusers_io;
pub mod eval;
pub mod fsio;
pub mod grid;
pub mod host;
pub mod jobs;
pub mod lora_io;
pub mod parallel;
pub mod plot;
pub mod rng;
pub mod sample;
pub mod teacher_source;
pub mod text_student;
pub mod train;
