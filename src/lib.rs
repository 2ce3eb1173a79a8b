//! `distill`: train a diffusion teacher, distil it into a 1-4 step student (DMD2, TDM), export it
//! to ONNX / TensorRT and validate parity. The binary in `main.rs` is a thin CLI over this library.

pub mod bench;
pub mod bench_gpu;
pub mod bench_ops;
pub mod checkpoint;
pub mod checks;
pub mod cli;
pub mod cli_distill;
pub mod data;
pub mod diffusers_io;
pub mod engine;
pub mod eval;
pub mod gate;
pub mod grid;
pub mod pipeline;
pub mod plot;
pub mod sample;
pub mod train;
