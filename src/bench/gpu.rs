//! `distill bench --device cuda`: teacher-step, DMD2- and TDM-iteration throughput (images/s) and
//! GPU memory at fp32, bf16 and fp16, beside the same UNet's teacher step in PyTorch with AMP
//! (autocast + GradScaler, channels_last; `bench/torch_gpu.py`) on the same GPU, in the same run.
//! On `--device cpu` (`--what gpu`) the same code runs on the CPU: the dry run of
//! `scripts/gpu-check.sh`, with PyTorch's CPU autocast as the peer.

use crate::checkpoint::{CheckpointMeta, Role};
use crate::train::distill::{Method, RunConfig, Teacher};
use crate::train::dmd2::{Dmd2, Dmd2Config};
use crate::train::optim::{
    precision_step, AdamW, AdamWConfig, LossScaleConfig, LossScaler, Precision,
};
use crate::train::tdm::{Tdm, TdmConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use graphs::{CandleBackend, GeneratorSpec, ModelConfig, Parameterisation, SamplerKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GpuBenchOptions {
    pub config: String,
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Python with torch for the peer (`None`: $DISTILL_TORCH_PYTHON, else python3); `off` skips it.
    pub torch_python: Option<PathBuf>,
    pub torch: bool,
}

/// One precision's measurements.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuRow {
    pub precision: String,
    pub teacher_images_per_s: f64,
    pub dmd2_images_per_s: f64,
    pub tdm_images_per_s: f64,
    /// Peak of this process's GPU memory during the timed teacher steps (nvidia-smi, MiB).
    pub teacher_gpu_mib: Option<f64>,
    pub torch_images_per_s: Option<f64>,
    /// PyTorch's `max_memory_allocated` during its timed steps (MiB).
    pub torch_peak_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuReport {
    pub gpu: String,
    pub config: String,
    pub batch: usize,
    pub rows: Vec<GpuRow>,
    /// Why the PyTorch columns are empty, when they are.
    #[serde(default)]
    pub torch_note: Option<String>,
}

impl fmt::Display for GpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "GPU {}, UNet `{}`, batch {}",
            self.gpu, self.config, self.batch
        )?;
        writeln!(
            f,
            "{:<6} {:>14} {:>14} {:>9} {:>12} {:>12} {:>12} {:>12}",
            "prec",
            "teacher img/s",
            "PyTorch img/s",
            "ratio",
            "DMD2 img/s",
            "TDM img/s",
            "GPU MiB",
            "torch MiB"
        )?;
        for r in &self.rows {
            let opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<6} {:>14.0} {:>14} {:>9} {:>12.0} {:>12.0} {:>12} {:>12}",
                r.precision,
                r.teacher_images_per_s,
                opt(r.torch_images_per_s),
                r.torch_images_per_s
                    .map(|t| format!("{:.2}x", r.teacher_images_per_s / t))
                    .unwrap_or_else(|| "-".into()),
                r.dmd2_images_per_s,
                r.tdm_images_per_s,
                opt(r.teacher_gpu_mib),
                opt(r.torch_peak_mib),
            )?;
        }
        write!(
            f,
            "ratio = candle images/s / PyTorch AMP images/s (above 1: candle is faster)"
        )?;
        if let Some(n) = &self.torch_note {
            write!(f, "\nPyTorch missing: {n}")?;
        }
        Ok(())
    }
}

/// Samples this process's GPU memory (nvidia-smi) in the background; `stop` returns the peak.
struct MemPoll {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<f64>>,
}

impl MemPoll {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pid = std::process::id().to_string();
        let handle = std::thread::spawn(move || {
            let mut peak: Option<f64> = None;
            while !s.load(Ordering::Relaxed) {
                let out = std::process::Command::new("nvidia-smi")
                    .args([
                        "--query-compute-apps=pid,used_memory",
                        "--format=csv,noheader,nounits",
                    ])
                    .output();
                if let Ok(o) = out {
                    for line in String::from_utf8_lossy(&o.stdout).lines() {
                        let mut it = line.split(',').map(str::trim);
                        if it.next() == Some(pid.as_str()) {
                            if let Some(m) = it.next().and_then(|m| m.parse::<f64>().ok()) {
                                peak = Some(peak.map_or(m, |p: f64| p.max(m)));
                            }
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            peak
        });
        Self { stop, handle }
    }
    fn stop(self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Median seconds of `f` over `iters` calls after `warmup`, synchronising the device each time.
fn time(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(u64) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup {
        f(i as u64)?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(iters);
    for i in 0..iters {
        let t0 = Instant::now();
        f((warmup + i) as u64)?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn teacher_step_s(
    cfg: &ModelConfig,
    o: &GpuBenchOptions,
    p: Precision,
    dev: &Device,
) -> Result<(f64, Option<f64>)> {
    let (_vm, den, vars) = crate::train::teacher::init_trainable(cfg, 0, dev)?;
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let mut scaler = p
        .needs_loss_scaling()
        .then(|| LossScaler::new(LossScaleConfig::default()));
    let b = CandleBackend::training(dev).with_autocast(p.autocast());
    let (c, r) = (cfg.channels(), cfg.resolution());
    let n = o.batch;
    let x0 = Tensor::rand(-1f32, 1f32, (n, c, r, r), dev)?;
    let labels = Tensor::from_vec(
        (0..n as u32)
            .map(|i| i % cfg.num_classes() as u32)
            .collect::<Vec<_>>(),
        n,
        dev,
    )?;
    let sigma = Tensor::rand(0.1f32, 5f32, n, dev)?;
    let noise = x0.randn_like(0.0, 1.0)?;
    let mut step = |_: u64| -> Result<()> {
        let loss = graphs::losses::teacher_loss(&b, &den, &x0, &labels, &sigma, &noise)?;
        let grads = match &scaler {
            Some(s) => s.scale_loss(&loss)?.backward()?,
            None => loss.backward()?,
        };
        let g = opt.grads_of(&grads);
        precision_step(&mut opt, scaler.as_mut(), g)?;
        Ok(())
    };
    for i in 0..o.warmup {
        step(i as u64)?;
    }
    let poll = dev.is_cuda().then(MemPoll::start);
    let s = time(dev, 0, o.iters, &mut step)?;
    Ok((s, poll.and_then(MemPoll::stop)))
}

fn random_teacher(cfg: &ModelConfig, dev: &Device) -> Result<Teacher> {
    let (_vm, den, _) = crate::train::teacher::init_trainable(cfg, 1, dev)?;
    let den = graphs::params::detached(&den)?;
    let spec = GeneratorSpec {
        sampler: SamplerKind::Heun,
        steps: 18,
        sigmas: vec![],
        fresh_noise: false,
        cfg_scale: 1.5,
    };
    Ok(Teacher {
        den,
        meta: CheckpointMeta::new(Role::Teacher, cfg.clone(), spec, 0),
        dir: PathBuf::from("<random bench teacher>"),
        sha256: String::new(),
        text: None,
        pipeline: None,
        guide: None,
    })
}

fn run_cfg(o: &GpuBenchOptions, p: Precision) -> RunConfig {
    RunConfig {
        batch_size: o.batch,
        precision: p,
        ..Default::default()
    }
}

/// Runs the GPU benchmark on `dev` (a CUDA device, or the CPU for a dry run). A failing PyTorch
/// peer leaves its columns empty with the reason in `torch_note`; candle's rows still come.
pub fn run(o: &GpuBenchOptions, dev: &Device) -> Result<GpuReport> {
    let unet = super::unet_config(&o.config)?;
    let cfg = ModelConfig::ours(unet.clone(), Parameterisation::edm());
    let teacher = random_teacher(&cfg, dev)?;
    let data = crate::data::embedded_mnist()?.to_resolution(unet.resolution)?;
    let (torch, torch_note) = if o.torch {
        match torch_peer(o, &cfg, dev) {
            Ok(t) => (t, None),
            Err(e) => (vec![], Some(format!("{e:#}"))),
        }
    } else {
        (vec![], Some("turned off (--torch off)".into()))
    };
    let mut rows = Vec::new();
    for p in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let (ts, mem) = teacher_step_s(&cfg, o, p, dev)?;
        let mut d = Dmd2::new(
            {
                let mut c = Dmd2Config {
                    dfake_gen_update_ratio: 5,
                    ..Default::default()
                };
                c.common.run = run_cfg(o, p);
                c
            },
            &teacher,
            &data,
            dev,
        )?;
        let ds = time(dev, o.warmup, o.iters, |i| d.step(i).map(|_| ()))?;
        let mut t = Tdm::new(
            {
                let mut c = TdmConfig::default();
                c.common.run = run_cfg(o, p);
                c
            },
            &teacher,
            dev,
        )?;
        let tds = time(dev, o.warmup, o.iters, |i| t.step(i).map(|_| ()))?;
        let peer = torch.iter().find(|r| r.precision == p.name());
        rows.push(GpuRow {
            precision: p.name().into(),
            teacher_images_per_s: o.batch as f64 / ts,
            dmd2_images_per_s: o.batch as f64 / ds,
            tdm_images_per_s: o.batch as f64 / tds,
            teacher_gpu_mib: mem,
            torch_images_per_s: peer.map(|r| r.images_per_s),
            torch_peak_mib: peer.and_then(|r| r.peak_mib),
        });
    }
    let gpu = if dev.is_cuda() {
        torch
            .first()
            .map(|r| r.gpu.clone())
            .unwrap_or_else(|| gpu_name().unwrap_or_else(|| "unknown GPU".into()))
    } else {
        "cpu (dry run)".into()
    };
    Ok(GpuReport {
        gpu,
        config: o.config.clone(),
        batch: o.batch,
        rows,
        torch_note,
    })
}

fn gpu_name() -> Option<String> {
    let o = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()?
            .trim()
            .to_string(),
    )
}

#[derive(Deserialize)]
struct TorchRow {
    precision: String,
    images_per_s: f64,
    /// `None` on the CPU (no CUDA allocator statistics).
    peak_mib: Option<f64>,
    gpu: String,
}

fn torch_peer(o: &GpuBenchOptions, cfg: &ModelConfig, dev: &Device) -> Result<Vec<TorchRow>> {
    let py = o
        .torch_python
        .clone()
        .or_else(|| std::env::var_os("DISTILL_TORCH_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_gpu.py");
    let script = if script.exists() {
        script
    } else {
        PathBuf::from("bench/torch_gpu.py")
    };
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg("--config")
        .arg(serde_json::to_string(cfg)?)
        .arg("--batch")
        .arg(o.batch.to_string())
        .arg("--warmup")
        .arg(o.warmup.to_string())
        .arg("--iters")
        .arg(o.iters.to_string())
        .arg("--device")
        .arg(if dev.is_cuda() { "cuda" } else { "cpu" })
        .output()
        .with_context(|| {
            format!(
                "running the PyTorch peer {} with {}",
                script.display(),
                py.display()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "the PyTorch peer failed ({}): {}",
            py.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).context("parsing the PyTorch peer's output"))
        .collect()
}
