//! Networks, noise schedules, losses and samplers of `distill`.
//!
//! Every graph is written once against [`Backend`]: [`CandleBackend`] runs it (training and the
//! reference), and `export` lowers the very same code to ONNX.

pub mod backend;
pub mod candle_backend;
pub mod denoiser;
pub mod diffusers;
pub mod flops;
pub mod kernels;
pub mod losses;
pub mod nn;
pub mod params;
pub mod sampler;
pub mod schedule;
pub mod schedulers;
pub mod unet;

pub use backend::{Backend, Kind, Param};
pub use candle_backend::CandleBackend;
pub use denoiser::{Denoiser, ModelConfig, NoiseLevel};
pub use sampler::{generate, GeneratorSpec, Renoise, SamplerKind};
pub use schedule::{BetaSchedule, EdmSchedule, NoiseGrid, Parameterisation, VpSchedule};
pub use unet::{UNet, UNetConfig};

// glibc returns large freed blocks to the OS, so every activation of a training step page-faults
// fresh memory (a third of a CPU step went to clear_page). mimalloc keeps and reuses them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tunes the allocator for training: never hand freed pages back to the OS (each step allocates
/// and frees the same activation sizes). Called by the CLI and the trainers; idempotent.
pub fn tune_allocator() {
    // SAFETY: sets a global mimalloc option; valid at any time.
    // `mi_option_purge_delay` (15 in mimalloc v2's enum; the -sys crate names no constant for it).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Sets up CPU threading for training and inference; call before any candle op (the CLI and
/// the bench do):
///
/// * `RAYON_NUM_THREADS` = `threads` if given (the `--threads` flag), else left as set, else the
///   number of available cores. The kernels in [`kernels`] and candle's matmuls run on that many
///   threads (candle otherwise re-reads `/proc/cpuinfo` on every matmul to count cores).
/// * `CANDLE_NUM_THREADS` = 1 unless set: candle's own element-wise pool spin-waits on its
///   workers, which then compete with the rayon workers of the kernels for the same cores; the
///   element-wise ops that remain are memory-bound and run faster inline (measured: backward
///   -25%, optimizer step 4x faster on 2 cores).
pub fn tune_threads(threads: Option<usize>) {
    let set = |k: &str, v: String| {
        // Called at start-up, before other threads read the environment.
        std::env::set_var(k, v)
    };
    match threads {
        Some(t) => set("RAYON_NUM_THREADS", t.to_string()),
        None if std::env::var_os("RAYON_NUM_THREADS").is_none() => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            set("RAYON_NUM_THREADS", n.to_string())
        }
        None => {}
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        set("CANDLE_NUM_THREADS", "1".into());
    }
}
