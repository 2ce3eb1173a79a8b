//! `distill bench --what diffusers-unet`: a diffusers `UNet2DModel` at a real size (by default
//! the `google/ddpm-cifar10-32` architecture, 35.7M parameters, from its published config.json in
//! `bench/configs/`, random init) in candle ([`graphs::diffusers::UNet2DModel`]) and in diffusers'
//! own PyTorch UNet2DModel (`bench/torch_diffusers.py`): a no-grad forward and an eps-prediction
//! training step (MSE to the noise + AdamW over every parameter, the same settings both sides) at
//! each batch, same threads, same run. PyTorch first runs candle's weights on a check batch and
//! the outputs are compared.

use super::timing::{median, peer_adamw, time_it};
use super::TorchMode;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graphs::diffusers::{UNet2DConfig, UNet2DModel};
use graphs::CandleBackend;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

/// `google/ddpm-cifar10-32`'s config.json (diffusers' UNet2DModel, 35,746,307 parameters).
pub const DDPM_CIFAR10_32: &str = include_str!("../../bench/configs/ddpm-cifar10-32.json");
const TORCH_DIFFUSERS: &str = include_str!("../../bench/torch_diffusers.py");
/// Largest tolerated max |candle - diffusers| / max |diffusers| of the check batch's output.
pub const PARITY_TOL: f64 = 1e-3;

#[derive(Clone, Debug)]
pub struct DiffusersBenchOptions {
    /// A UNet2DModel config.json; `None`: ddpm-cifar10-32.
    pub config: Option<PathBuf>,
    pub batches: Vec<usize>,
    pub threads: Option<usize>,
    pub warmup: usize,
    pub iters: usize,
    pub torch: TorchMode,
    pub torch_python: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffusersRow {
    pub batch: usize,
    pub candle_forward_ms: f64,
    pub candle_step_ms: f64,
    pub torch_forward_ms: Option<f64>,
    pub torch_step_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffusersReport {
    pub config: String,
    pub params: usize,
    pub threads: usize,
    pub warmup: usize,
    pub iters: usize,
    pub rows: Vec<DiffusersRow>,
    /// PyTorch and diffusers versions, and the parity of the check batch.
    pub torch: Option<String>,
    pub parity_rel: Option<f64>,
    pub torch_note: Option<String>,
}

impl fmt::Display for DiffusersReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "diffusers UNet2DModel `{}` ({:.2}M parameters, random init), {} threads, {} warm-up + {} timed (medians)",
            self.config, self.params as f64 * 1e-6, self.threads, self.warmup, self.iters
        )?;
        match (&self.torch, self.parity_rel) {
            (Some(t), Some(p)) => writeln!(f, "PyTorch peer: {t}; on candle's weights its output matches candle's: max |diff| / max |out| {p:.1e}")?,
            _ => writeln!(f, "PyTorch missing: {}", self.torch_note.as_deref().unwrap_or("?"))?,
        }
        writeln!(
            f,
            "{:>5} {:>14} {:>14} {:>8} {:>14} {:>14} {:>8}",
            "batch",
            "candle fwd ms",
            "torch fwd ms",
            "ratio",
            "candle step ms",
            "torch step ms",
            "ratio"
        )?;
        let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let r = |c: f64, t: Option<f64>| t.map_or("-".into(), |t| format!("{:.2}x", t / c));
        for x in &self.rows {
            writeln!(
                f,
                "{:>5} {:>14.1} {:>14} {:>8} {:>14.1} {:>14} {:>8}",
                x.batch,
                x.candle_forward_ms,
                o(x.torch_forward_ms),
                r(x.candle_forward_ms, x.torch_forward_ms),
                x.candle_step_ms,
                o(x.torch_step_ms),
                r(x.candle_step_ms, x.torch_step_ms)
            )?;
        }
        write!(
            f,
            "ratio = PyTorch time / candle time (above 1: candle is faster)"
        )
    }
}

#[derive(Deserialize)]
struct Peer {
    torch_version: String,
    diffusers_version: String,
    forward_ms: HashMap<String, f64>,
    step_ms: HashMap<String, f64>,
}

/// Runs the bench (see the module docs).
pub fn run(o: &DiffusersBenchOptions) -> Result<DiffusersReport> {
    ensure!(
        o.iters > 0 && !o.batches.is_empty() && o.batches.iter().all(|&b| b > 0),
        "batches and iterations must be positive"
    );
    let threads = match o.threads {
        Some(0) => bail!("threads must be positive"),
        Some(t) => t,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let (name, text) = match &o.config {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => (
            "google/ddpm-cifar10-32".to_string(),
            DDPM_CIFAR10_32.to_string(),
        ),
    };
    let v = graphs::json::parse(&text).with_context(|| format!("parsing {name}"))?;
    let cfg = UNet2DConfig::from_json(&v).with_context(|| format!("in {name}"))?;
    ensure!(
        matches!(cfg.class_embed, graphs::diffusers::ClassEmbed::None),
        "{name}: the diffusers bench times unconditional UNets only"
    );
    let python = super::torch_python_for(o.torch, o.torch_python.as_deref())?;
    crate::host::tune_allocator();
    crate::host::tune_threads(Some(threads));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    let dev = Device::Cpu;
    let work = super::Workdir::new()?;
    pool.install(|| -> Result<DiffusersReport> {
        let varmap = VarMap::new();
        let unet = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
        let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        let (c, s) = (cfg.in_channels, cfg.sample_size.unwrap_or(32));
        let eval = CandleBackend::new(&dev);
        let train = CandleBackend::training(&dev);
        // The check batch for the peer (candle's output on the weights the peer receives).
        let check_x = Tensor::randn(0f32, 1.0, (2, c, s, s), &dev)?;
        let check_t = Tensor::new(&[10f32, 700.0], &dev)?;
        let mut rows = Vec::new();
        for &b in &o.batches {
            let x = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
            let eps = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
            let t = Tensor::from_vec((0..b).map(|i| ((i * 397) % 1000) as f32).collect::<Vec<_>>(), b, &dev)?;
            let fwd = time_it(o.warmup, o.iters, || {
                unet.forward(&eval, &x, s, &t, None)?;
                Ok(())
            })?;
            let mut opt = peer_adamw(&varmap)?;
            let step = time_it(o.warmup, o.iters, || {
                let pred = unet.forward(&train, &x, s, &t, None)?;
                let loss = (pred - &eps)?.sqr()?.mean_all()?;
                opt.step(&loss.backward()?)?;
                Ok(())
            })?;
            rows.push(DiffusersRow {
                batch: b,
                candle_forward_ms: median(&fwd),
                candle_step_ms: median(&step),
                torch_forward_ms: None,
                torch_step_ms: None,
            });
        }
        let mut report = DiffusersReport {
            config: name.clone(),
            params,
            threads,
            warmup: o.warmup,
            iters: o.iters,
            rows,
            torch: None,
            parity_rel: None,
            torch_note: None,
        };
        let py = match python {
            Ok(p) => p,
            Err(why) => {
                report.torch_note = Some(why);
                return Ok(report);
            }
        };
        let want = unet.forward(&eval, &check_x, s, &check_t, None)?;
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let (wp, cin, cout, cp, sp) = (
            work.path("weights.safetensors"),
            work.path("check_in.safetensors"),
            work.path("check_out.safetensors"),
            work.path("config.json"),
            work.path("torch_diffusers.py"),
        );
        candle_core::safetensors::save(&weights, &wp)?;
        candle_core::safetensors::save(
            &HashMap::from([("sample".to_string(), check_x.clone()), ("timestep".to_string(), check_t.clone())]),
            &cin,
        )?;
        std::fs::write(&cp, &text)?;
        std::fs::write(&sp, TORCH_DIFFUSERS)?;
        let batches: Vec<String> = o.batches.iter().map(|b| b.to_string()).collect();
        let out = super::torch::peer_command(&py)
            .arg(&sp)
            .args(["--config".as_ref(), cp.as_os_str()])
            .args(["--weights".as_ref(), wp.as_os_str()])
            .args(["--check-input".as_ref(), cin.as_os_str()])
            .args(["--check-output".as_ref(), cout.as_os_str()])
            .args(["--batches", &batches.join(",")])
            .args(["--threads", &threads.to_string()])
            .args(["--warmup", &o.warmup.to_string()])
            .args(["--iters", &o.iters.to_string()])
            .output()
            .with_context(|| format!("running {}", py.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            report.torch_note = Some(format!(
                "the diffusers peer failed: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
            return Ok(report);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .context("the diffusers peer printed nothing")?;
        let p: Peer = serde_json::from_str(line)
            .with_context(|| format!("parsing the diffusers peer's output {line:?}"))?;
        let got = candle_core::safetensors::load(&cout, &dev)?;
        let got = got.get("sample").context("the peer wrote no `sample`")?;
        let max = |t: &Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64) };
        let rel = max(&(got - &want)?)? / max(&want)?.max(1e-12);
        ensure!(
            rel <= PARITY_TOL,
            "diffusers' UNet2DModel differs from candle's on the same weights: {rel:.2e} > {PARITY_TOL:e}"
        );
        report.parity_rel = Some(rel);
        report.torch = Some(format!("torch {}, diffusers {} ({} threads)", p.torch_version, p.diffusers_version, threads));
        for r in &mut report.rows {
            r.torch_forward_ms = p.forward_ms.get(&r.batch.to_string()).copied();
            r.torch_step_ms = p.step_ms.get(&r.batch.to_string()).copied();
        }
        Ok(report)
    })
}
