//! `distill bench`: candle vs PyTorch on the CPU, for the same UNet.
//!
//! Times (medians over `iters` after `warmup` untimed runs) the EDM-preconditioned denoiser
//! forward without gradients and a full teacher training step (`teacher_loss` forward, backward
//! and an AdamW step over every parameter, with the trainer's optimiser ([`crate::train::optim`])
//! set up like the PyTorch peer's: lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01, no
//! warm-up or clipping), counts the forward's FLOPs with
//! [`graphs::flops::FlopCounter`] (a training step counts as 3x forward) and reads the process's
//! peak RSS. When a Python with torch is found (`$DISTILL_TORCH_PYTHON`, else `.venv-bench/bin/python`
//! as made by `scripts/setup-bench.sh`), the same run first checks that the PyTorch peer
//! (`bench/torch_unet.py`, embedded in the binary) computes the same denoiser output and loss from
//! the candle model's weights, then times it with the same configuration, batch, threads, warm-up
//! and iterations. Without torch the candle numbers are still reported.
//!
//! Threads: candle's matmuls size their work by `RAYON_NUM_THREADS` (read at every call) and the
//! fast kernels run on the current rayon pool; [`run`] applies [`crate::host::tune_threads`] (as the
//! CLI does for training) and runs all candle work inside a rayon pool of exactly `threads`
//! threads, so it works whenever it is called.

pub mod device_check;
pub mod diffusers_unet;
pub mod gpu;
pub mod inference;
pub mod ops;
pub mod parallel;
mod report;
pub mod timing;
mod torch;

pub use timing::peer_adamw;
use timing::{median, time_it};
use torch::{parity_check, run_peer, time_torch, torch_python_for, write_config, Workdir};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graphs::flops::{self, FlopCount};
use graphs::{CandleBackend, Denoiser, EdmSchedule, ModelConfig, Parameterisation, UNetConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyTorch peer, embedded so the binary needs no source tree.
pub const TORCH_SCRIPT: &str = include_str!("../../bench/torch_unet.py");
/// Largest tolerated |candle - PyTorch| of the denoiser output (and relative difference of the loss).
pub const PARITY_TOL: f64 = 1e-3;
/// Batch of the parity check.
pub const PARITY_BATCH: usize = 4;
/// Printed when no Python with torch is found.
pub const TORCH_MISSING: &str =
    "PyTorch not found: run scripts/setup-bench.sh (installs torch into .venv-bench) to compare";

/// Whether to compare with PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TorchMode {
    /// Compare when a Python with torch is found; otherwise report candle alone.
    Auto,
    /// Fail when no Python with torch is found.
    Require,
    /// Candle only.
    Off,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Name shown in the report (`bench`, `mnist_small`, `tiny` or anything for a custom `unet`).
    pub config_name: String,
    pub unet: UNetConfig,
    pub batch: usize,
    /// Threads for candle and torch; `None` = every available core.
    pub threads: Option<usize>,
    pub warmup: usize,
    pub iters: usize,
    pub torch: TorchMode,
    /// Python to use instead of `$DISTILL_TORCH_PYTHON` / `.venv-bench/bin/python`.
    pub torch_python: Option<PathBuf>,
    /// Where to write the report as JSON.
    pub json_out: Option<PathBuf>,
    /// Seed of the (synthetic) inputs and of the initial weights.
    pub seed: u64,
    /// Also time the model's building blocks one by one (stock candle, fast kernels, PyTorch).
    pub ops: bool,
    /// Also time the whole forward and step on candle's stock ops (slow: the "before").
    pub stock: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            config_name: "bench".into(),
            unet: UNetConfig::bench(),
            batch: 64,
            threads: None,
            warmup: 3,
            iters: 10,
            torch: TorchMode::Auto,
            torch_python: None,
            json_out: None,
            seed: 0,
            ops: false,
            stock: false,
        }
    }
}

impl BenchOptions {
    /// Defaults for a named configuration (see [`unet_config`]).
    pub fn for_config(name: &str) -> Result<Self> {
        Ok(Self {
            config_name: name.to_string(),
            unet: unet_config(name)?,
            ..Self::default()
        })
    }
}

/// The UNet configurations the bench knows by name.
pub fn unet_config(name: &str) -> Result<UNetConfig> {
    Ok(match name {
        "bench" => UNetConfig::bench(),
        "mnist_small" | "mnist-small" => UNetConfig::mnist_small(),
        "tiny" => UNetConfig::tiny(),
        _ => bail!("unknown bench config {name:?}: use bench, mnist_small or tiny"),
    })
}

/// Timings and memory of one engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineResult {
    /// Every timed forward, in milliseconds.
    pub forward_ms: Vec<f64>,
    /// Every timed training step, in milliseconds.
    pub step_ms: Vec<f64>,
    pub forward_median_ms: f64,
    pub step_median_ms: f64,
    /// Dense forward FLOPs / median forward time.
    pub forward_gflops: f64,
    /// 3x dense forward FLOPs / median step time.
    pub step_gflops: f64,
    /// Process-wide peak resident memory after the forward timings, MiB.
    pub peak_rss_mb_forward: f64,
    /// Process-wide peak resident memory at the end (after the training steps), MiB.
    pub peak_rss_mb: f64,
}

/// What the PyTorch side contributed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TorchResult {
    pub python: PathBuf,
    pub version: String,
    pub threads: usize,
    pub result: EngineResult,
    /// PyTorch's own FlopCounterMode count of one forward at the bench batch.
    pub forward_flops: u64,
    /// Peak RSS right after `import torch` (its libraries alone), MiB.
    pub rss_mb_after_import: f64,
    /// f32 [`GEMM_N`]^3 `torch.mm`, best of 5, GFLOP/s: the machine's GEMM peak as PyTorch
    /// reaches it.
    #[serde(default)]
    pub gemm_gflops: Option<f64>,
    /// Max |D_candle - D_torch| over the parity batch, from the same weights and inputs.
    pub parity_max_abs_diff: f64,
    /// |loss_candle - loss_torch| / |loss_candle| on the parity batch.
    pub parity_loss_rel_diff: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub config_name: String,
    pub unet: UNetConfig,
    pub params: usize,
    pub batch: usize,
    pub threads: usize,
    pub warmup: usize,
    pub iters: usize,
    /// One denoiser forward at `batch`; GFLOP/s use `forward_flops.dense()`.
    pub forward_flops: FlopCount,
    pub candle: EngineResult,
    pub torch: Option<TorchResult>,
    /// Why there is no PyTorch comparison, when there is none.
    pub torch_note: Option<String>,
    /// The same forward and step on candle's stock ops (with [`BenchOptions::stock`]).
    #[serde(default)]
    pub candle_stock: Option<EngineResult>,
    /// Per-op timings (with [`BenchOptions::ops`]).
    #[serde(default)]
    pub ops: Vec<ops::OpRow>,
    /// f32 [`GEMM_N`]^3 matmul in candle (the `gemm` crate), best of 5, GFLOP/s: beside
    /// PyTorch's [`TorchResult::gemm_gflops`], the machine's GEMM peak the achieved GFLOP/s are
    /// compared with.
    #[serde(default)]
    pub candle_gemm_gflops: Option<f64>,
}

/// The GEMM of the peak measurement: f32 `GEMM_N x GEMM_N` times `GEMM_N x GEMM_N`.
pub const GEMM_N: usize = 2048;

/// candle's f32 [`GEMM_N`]^3 matmul on the CPU, best of 5 (after one untimed), GFLOP/s.
pub fn candle_gemm_gflops() -> Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (GEMM_N, GEMM_N), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (GEMM_N, GEMM_N), &dev)?;
    a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        a.matmul(&b)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (GEMM_N as f64).powi(3) / best * 1e-9)
}

/// Runs the benchmark (see the module docs) and writes `json_out` if asked.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(
        opts.batch > 0 && opts.iters > 0,
        "batch and iterations must be positive"
    );
    let threads = match opts.threads {
        Some(0) => bail!("threads must be positive"),
        Some(t) => t,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let mcfg = ModelConfig::ours(
        opts.unet.clone(),
        Parameterisation::Edm(EdmSchedule::default()),
    );
    opts.unet.validate()?;

    let python = torch_python_for(opts.torch, opts.torch_python.as_deref())?;

    // The allocator setting of training (as the CLI sets it): the train step is timed as trained.
    crate::host::tune_allocator();
    // The thread settings of training; candle sizes its matmuls by RAYON_NUM_THREADS, and all
    // of candle's work runs in a pool of exactly that size.
    crate::host::tune_threads(Some(threads));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    let work = Workdir::new()?;
    pool.install(|| -> Result<BenchReport> {
        let model = CandleModel::new(&mcfg, opts.seed)?;
        let forward_flops = flops::denoiser_forward(&model.den, opts.batch)?;
        let dense = forward_flops.dense() as f64;

        // Parity first: a mismatch should fail fast, before minutes of timing.
        let parity = match &python {
            Ok(py) => Some(parity_check(py, &model, &mcfg, threads, opts.seed, &work)?),
            Err(_) => None,
        };

        let candle = time_candle(&model, &mcfg, opts, dense, false)?;

        let (torch, torch_note) = match (&python, parity) {
            (Ok(py), Some((diff, loss_rel))) => (
                Some(time_torch(
                    py, &mcfg, opts, threads, dense, diff, loss_rel, &work,
                )?),
                None,
            ),
            (Err(why), _) => (None, Some(why.clone())),
            (Ok(_), None) => unreachable!("parity runs whenever python is found"),
        };
        let candle_stock = if opts.stock {
            Some(time_candle(&model, &mcfg, opts, dense, true)?)
        } else {
            None
        };
        let ops = if opts.ops {
            time_ops(python.as_ref().ok(), &mcfg, opts, threads, &work)?
        } else {
            Vec::new()
        };
        let report = BenchReport {
            config_name: opts.config_name.clone(),
            unet: opts.unet.clone(),
            params: graphs::params::count(&model.den),
            batch: opts.batch,
            threads,
            warmup: opts.warmup,
            iters: opts.iters,
            forward_flops,
            candle,
            torch,
            torch_note,
            candle_stock,
            ops,
            candle_gemm_gflops: Some(candle_gemm_gflops()?),
        };
        if let Some(path) = &opts.json_out {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(report)
    })
}

/// The trainable network (a `VarMap`) and a detached copy for gradient-free forwards.
struct CandleModel {
    varmap: VarMap,
    /// Built on the `VarMap`'s variables: training.
    train: Denoiser,
    /// Built on detached tensors sharing the same storage: no autograd graph is recorded.
    den: Denoiser,
}

impl CandleModel {
    fn new(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let train = Denoiser::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
        // candle's initialisers are unseeded: redraw every tensor from `seed` (PyTorch-style
        // U(+-1/sqrt(fan_in)) for conv/linear, N(0, 1) for the label table, GroupNorm at 1/0).
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_BE1C);
        crate::train::seeded_init_with(&varmap, &mut rng, &dev)?;
        let den = Denoiser::new(
            VarBuilder::from_tensors(detached(&varmap)?, DType::F32, &dev),
            cfg,
        )?;
        Ok(Self { varmap, train, den })
    }
}

fn detached(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

/// Synthetic training inputs: images in [-1, 1], labels including the null class, log-normal
/// EDM training sigmas, unit noise.
struct Inputs {
    x0: Tensor,
    labels: Tensor,
    sigma: Tensor,
    noise: Tensor,
}

impl Inputs {
    fn new(cfg: &ModelConfig, batch: usize, seed: u64) -> Result<Self> {
        let dev = Device::Cpu;
        let u = cfg.unet_config().context("the bench uses our UNet")?;
        let Parameterisation::Edm(e) = &cfg.parameterisation else {
            bail!("the bench uses the EDM parameterisation")
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let shape = [batch, u.channels, u.resolution, u.resolution];
        let n: usize = shape.iter().product();
        let x0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let labels: Vec<u32> = (0..batch)
            .map(|_| rng.gen_range(0..=u.num_classes as u32))
            .collect();
        let sigma: Vec<f32> = (0..batch)
            .map(|_| (e.p_mean + e.p_std * rng.sample::<f64, _>(StandardNormal)).exp() as f32)
            .collect();
        let noise: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
        Ok(Self {
            x0: Tensor::from_vec(x0, &shape, &dev)?,
            labels: Tensor::from_vec(labels, batch, &dev)?,
            sigma: Tensor::from_vec(sigma, batch, &dev)?,
            noise: Tensor::from_vec(noise, &shape, &dev)?,
        })
    }

    /// `x0 + sigma * noise`.
    fn noisy(&self) -> Result<Tensor> {
        let n = self.sigma.dim(0)?;
        Ok((&self.x0
            + self
                .noise
                .broadcast_mul(&self.sigma.reshape((n, 1, 1, 1))?)?)?)
    }
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mb() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kb: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("parsing VmHWM")?;
    Ok(kb / 1024.0)
}

fn engine_result(
    forward_ms: Vec<f64>,
    step_ms: Vec<f64>,
    dense: f64,
    peak_rss_mb_forward: f64,
    peak_rss_mb: f64,
) -> EngineResult {
    let (f, s) = (median(&forward_ms), median(&step_ms));
    EngineResult {
        forward_gflops: dense / (f * 1e-3) * 1e-9,
        step_gflops: 3.0 * dense / (s * 1e-3) * 1e-9,
        forward_ms,
        step_ms,
        forward_median_ms: f,
        step_median_ms: s,
        peak_rss_mb_forward,
        peak_rss_mb,
    }
}

/// Times the forward and the step on the fast kernels, or (`stock`) on candle's own ops.
fn time_candle(
    model: &CandleModel,
    cfg: &ModelConfig,
    opts: &BenchOptions,
    dense: f64,
    stock: bool,
) -> Result<EngineResult> {
    let dev = Device::Cpu;
    let inp = Inputs::new(cfg, opts.batch, opts.seed)?;
    let x = inp.noisy()?;
    let (mut b, mut bt) = (CandleBackend::new(&dev), CandleBackend::training(&dev));
    if stock {
        (b, bt) = (b.stock(), bt.stock());
    }
    let forward_ms = time_it(opts.warmup, opts.iters, || {
        let level = model.den.level_from_sigma(&b, &inp.sigma)?;
        let d = model.den.forward(&b, &x, &level, &inp.labels)?;
        ensure!(
            d.dims() == x.dims(),
            "denoiser output {:?} for input {:?}",
            d.dims(),
            x.dims()
        );
        Ok(())
    })?;
    let rss_forward = peak_rss_mb()?;

    let mut opt = peer_adamw(&model.varmap)?;
    let step_ms = time_it(opts.warmup, opts.iters, || {
        let loss = graphs::losses::teacher_loss(
            &bt,
            &model.train,
            &inp.x0,
            &inp.labels,
            &inp.sigma,
            &inp.noise,
        )?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        Ok(())
    })?;
    Ok(engine_result(
        forward_ms,
        step_ms,
        dense,
        rss_forward,
        peak_rss_mb()?,
    ))
}

/// The per-op rows: candle (stock and fast) here, then the same specs in the PyTorch peer.
fn time_ops(
    python: Option<&PathBuf>,
    cfg: &ModelConfig,
    opts: &BenchOptions,
    threads: usize,
    work: &Workdir,
) -> Result<Vec<ops::OpRow>> {
    use ops;
    let specs = ops::specs(
        cfg.unet_config().context("the bench uses our UNet")?,
        opts.batch,
    );
    let (warmup, iters) = (opts.warmup.max(1), opts.iters);
    let mut rows = Vec::new();
    for s in &specs {
        let (stock, ours) = ops::time_candle(s, cfg, warmup, iters)
            .with_context(|| format!("timing {}", s.name))?;
        rows.push((s.clone(), stock, ours));
    }
    let peer = match python {
        Some(py) => {
            let path = work.path("ops.json");
            std::fs::write(&path, serde_json::to_string(&specs)?)?;
            let args: Vec<String> = vec![
                "--config".into(),
                write_config(cfg, work)?,
                "--ops".into(),
                format!("@{}", path.display()),
                "--threads".into(),
                threads.to_string(),
                "--warmup".into(),
                warmup.to_string(),
                "--iters".into(),
                iters.to_string(),
            ];
            #[derive(Deserialize)]
            struct Answer {
                ops: Vec<ops::PeerOp>,
            }
            Some(run_peer::<Answer>(py, work, &args)?.ops)
        }
        None => None,
    };
    ops::join(rows, peer)
}
