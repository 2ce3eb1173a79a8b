//! `distill bench` flags, converted into the options of each sub-bench in `distill::bench`.

use anyhow::Result;
use candle_core::Device;
use clap::{Args, ValueEnum};
use distill::bench::TorchMode;
use distill::checkpoint;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to time: `auto` (`cpu` on the CPU, `gpu` on CUDA), `cpu` (forward and teacher step vs
    /// PyTorch on the CPU), `gpu` (teacher/DMD2/TDM images/s per precision vs PyTorch AMP; runs
    /// on the CPU too, as a dry run), `device-check` (--device against the CPU: forward, one
    /// training step at fp32/bf16/fp16; exit code 3 past tolerance), `inference` (the 1- and
    /// 4-step students' generator at batch 1 and --batch in candle, ONNX Runtime fp32/fp16,
    /// tract and PyTorch eager/compile), `diffusers-unet` (google/ddpm-cifar10-32's UNet2DModel,
    /// or --config FILE.json, forward and training step at batch 1 and --batch vs diffusers),
    /// `parallel` (teacher training at global batch --batch: `mpirun -np --ranks` ranks x 1
    /// thread vs 1 process x --ranks threads, images/s and the all-reduce's time and bytes per
    /// iteration, then the ranks with --zero1 and the AdamW moments rank 0 holds; --config is a
    /// `train teacher --preset`, default tiny).
    #[arg(long, value_enum, default_value = "auto")]
    pub what: BenchWhat,
    /// UNet config: `bench` (32-64-128, two res blocks per level), `mnist_small` (the default
    /// teacher) or `tiny` [default: bench; for `--what inference` mnist_small, the pipeline's].
    #[arg(long)]
    pub config: Option<String>,
    /// With `--what inference`: skip `torch.compile` (minutes to compile on 2 cores).
    #[arg(long)]
    pub no_torch_compile: bool,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// PyTorch comparison: `auto` (when torch is found), `require`, or `off`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "require", "off"])]
    pub torch: String,
    /// Skip the per-op table (conv, GroupNorm+SiLU, res block, attention, AdamW: stock candle vs
    /// the fast kernels vs PyTorch).
    #[arg(long)]
    pub no_ops: bool,
    /// Also time the whole forward and step on candle's stock ops (slow).
    #[arg(long)]
    pub stock: bool,
    /// Python interpreter with torch (default: $DISTILL_TORCH_PYTHON, then .venv-bench/bin/python).
    #[arg(long)]
    pub torch_python: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// With `--what parallel`: ranks (and the one process's threads).
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BenchWhat {
    Auto,
    Cpu,
    Gpu,
    DeviceCheck,
    Inference,
    DiffusersUnet,
    Parallel,
}

impl BenchArgs {
    fn torch_mode(&self) -> TorchMode {
        match self.torch.as_str() {
            "require" => TorchMode::Require,
            "off" => TorchMode::Off,
            _ => TorchMode::Auto,
        }
    }

    /// Batch 1 (latency) and `--batch` (throughput).
    fn batches(&self) -> Vec<usize> {
        let mut b = vec![1, self.batch];
        b.dedup();
        b
    }

    /// Also writes the report as JSON to `--json`.
    fn write_json<T: serde::Serialize>(&self, r: &T) -> Result<()> {
        if let Some(p) = &self.json {
            checkpoint::write_atomic(p, serde_json::to_string_pretty(r)?.as_bytes())?;
        }
        Ok(())
    }
}

/// Runs the sub-bench `--what` names (`auto`: `gpu` on CUDA, `cpu` otherwise).
pub fn run(a: &BenchArgs, dev: &Device, threads: Option<usize>) -> Result<()> {
    match a.what {
        BenchWhat::DeviceCheck => device_check(a, dev),
        BenchWhat::Inference => inference(a, threads),
        BenchWhat::DiffusersUnet => diffusers_unet(a, threads),
        BenchWhat::Gpu => gpu(a, dev),
        BenchWhat::Parallel => parallel(a),
        BenchWhat::Auto if dev.is_cuda() => gpu(a, dev),
        BenchWhat::Auto | BenchWhat::Cpu => cpu(a, threads),
    }
}

fn cpu(a: &BenchArgs, threads: Option<usize>) -> Result<()> {
    let mut o = distill::bench::BenchOptions::for_config(a.config.as_deref().unwrap_or("bench"))?;
    o.batch = a.batch;
    o.warmup = a.warmup;
    o.iters = a.iters;
    o.threads = threads;
    o.torch = a.torch_mode();
    o.torch_python = a.torch_python.clone();
    o.json_out = a.json.clone();
    o.ops = !a.no_ops;
    o.stock = a.stock;
    println!("{}", distill::bench::run(&o)?);
    Ok(())
}

fn parallel(a: &BenchArgs) -> Result<()> {
    let o = distill::bench::parallel::ParallelBenchOptions {
        preset: a.config.clone().unwrap_or_else(|| "tiny".into()),
        batch: a.batch,
        iters: a.iters,
        ranks: a.ranks,
        exe: None,
    };
    let r = distill::bench::parallel::run(&o)?;
    println!("{r}");
    a.write_json(&r)
}

fn gpu(a: &BenchArgs, dev: &Device) -> Result<()> {
    let o = distill::bench::gpu::GpuBenchOptions {
        config: a.config.clone().unwrap_or_else(|| "bench".into()),
        batch: a.batch,
        warmup: a.warmup,
        iters: a.iters,
        torch_python: a.torch_python.clone(),
        torch: a.torch != "off",
    };
    let r = distill::bench::gpu::run(&o, dev)?;
    println!("{r}");
    a.write_json(&r)
}

fn inference(a: &BenchArgs, threads: Option<usize>) -> Result<()> {
    let o = distill::bench::inference::InferenceOptions {
        config: a.config.clone().unwrap_or_else(|| "mnist_small".into()),
        batches: a.batches(),
        threads,
        warmup: a.warmup,
        iters: a.iters,
        torch: a.torch_mode(),
        torch_python: a.torch_python.clone(),
        torch_compile: !a.no_torch_compile,
        seed: 0,
    };
    let r = distill::bench::inference::run(&o)?;
    println!("{r}");
    a.write_json(&r)
}

fn diffusers_unet(a: &BenchArgs, threads: Option<usize>) -> Result<()> {
    let o = distill::bench::diffusers_unet::DiffusersBenchOptions {
        config: a.config.clone().map(PathBuf::from),
        batches: a.batches(),
        threads,
        warmup: a.warmup,
        iters: a.iters,
        torch: a.torch_mode(),
        torch_python: a.torch_python.clone(),
    };
    let r = distill::bench::diffusers_unet::run(&o)?;
    println!("{r}");
    a.write_json(&r)
}

fn device_check(a: &BenchArgs, dev: &Device) -> Result<()> {
    let o = distill::bench::device_check::DeviceCheckOptions {
        config: a.config.clone().unwrap_or_else(|| "bench".into()),
        batch: a.batch,
        seed: 0,
    };
    let r = distill::bench::device_check::run(&o, dev)?;
    println!("{r}");
    a.write_json(&r)?;
    if !r.passed() {
        return Err(distill::jobs::Failure::ValidationFailed(format!(
            "{} differs from the CPU past tolerance",
            r.device
        ))
        .into());
    }
    Ok(())
}
