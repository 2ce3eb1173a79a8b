//! `distill bench --what inference`: the deployed side. The 1-step and 4-step DMD2 students'
//! generator (noise + labels -> images) at batch 1 (latency) and 64 (throughput) in candle, in
//! ONNX Runtime on the exported fp32 and fp16 files (graph optimisation `All`, intra-op threads =
//! the bench's), in tract, and in PyTorch (eager and `torch.compile`; `bench/torch_infer.py`), in
//! the same run and with the same threads.
//!
//! The students are seeded random-init networks with the pipeline students' architecture (the
//! teacher's UNet, `mnist_small` by default) and step sigmas (timesteps 999 and 999,749,499,249,
//! DMD2's fresh re-noising): speed does not depend on the weights' values. Every runtime's output
//! is checked against candle's on one batch before it is timed.

use super::TorchMode;
use crate::checkpoint::{self, CheckpointMeta, Role};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use export::runtime::{Inputs, OrtRunner, Runner, TensorData, TractRunner};
use graphs::{CandleBackend, GeneratorSpec, ModelConfig, NoiseGrid, Parameterisation, SamplerKind};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Largest tolerated |runtime - candle| of the generated images (in [-1, 1]); fp16 looser.
pub const TOL_F32: f64 = 1e-3;
pub const TOL_F16: f64 = 5e-2;

#[derive(Clone, Debug)]
pub struct InferenceOptions {
    /// UNet config of the students (see [`super::unet_config`]).
    pub config: String,
    pub batches: Vec<usize>,
    pub threads: Option<usize>,
    pub warmup: usize,
    pub iters: usize,
    pub torch: TorchMode,
    pub torch_python: Option<PathBuf>,
    /// `torch.compile` too (slow to compile on 2 cores).
    pub torch_compile: bool,
    pub seed: u64,
}

impl Default for InferenceOptions {
    fn default() -> Self {
        Self {
            config: "mnist_small".into(),
            batches: vec![1, 64],
            threads: None,
            warmup: 2,
            iters: 10,
            torch: TorchMode::Auto,
            torch_python: None,
            torch_compile: true,
            seed: 0,
        }
    }
}

/// One runtime at one batch for one student.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InferenceRow {
    pub student: String,
    pub batch: usize,
    pub runtime: String,
    /// Median milliseconds per generator call; `None` when the runtime is missing (see `note`).
    pub ms: Option<f64>,
    pub images_per_s: Option<f64>,
    /// Max |images - candle's images| on the check batch.
    pub max_abs_diff: Option<f64>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InferenceReport {
    pub config: String,
    pub params: usize,
    pub threads: usize,
    pub warmup: usize,
    pub iters: usize,
    pub rows: Vec<InferenceRow>,
}

pub const RUNTIMES: [&str; 6] = [
    "candle",
    "onnxruntime fp32",
    "onnxruntime fp16",
    "tract",
    "pytorch eager",
    "pytorch compile",
];

/// The exported-model runtimes (what a deployment of our ONNX file runs on).
const EXPORTED: [&str; 3] = ["onnxruntime fp32", "onnxruntime fp16", "tract"];

impl InferenceReport {
    fn get(&self, student: &str, batch: usize, runtime: &str) -> Option<&InferenceRow> {
        self.rows
            .iter()
            .find(|r| r.student == student && r.batch == batch && r.runtime == runtime)
    }

    /// The fastest runtime of `among` for (student, batch).
    pub fn fastest(&self, student: &str, batch: usize, among: &[&str]) -> Option<&InferenceRow> {
        among
            .iter()
            .filter_map(|rt| self.get(student, batch, rt))
            .filter(|r| r.ms.is_some())
            .min_by(|a, b| a.ms.partial_cmp(&b.ms).unwrap_or(std::cmp::Ordering::Equal))
    }
}

impl fmt::Display for InferenceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Student generators (UNet `{}`, {:.2}M parameters, seeded random init, the pipeline students' architecture and steps), {} threads, {} warm-up + {} timed calls (medians)",
            self.config, self.params as f64 * 1e-6, self.threads, self.warmup, self.iters
        )?;
        writeln!(
            f,
            "{:<11} {:>5} {:<17} {:>11} {:>10} {:>9} {:>10}",
            "student", "batch", "runtime", "ms/call", "images/s", "vs candle", "max |diff|"
        )?;
        let mut students: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !students.contains(&r.student.as_str()) {
                students.push(&r.student);
            }
        }
        for r in &self.rows {
            let candle = self.get(&r.student, r.batch, "candle").and_then(|c| c.ms);
            let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
            let ratio = match (candle, r.ms) {
                (Some(c), Some(m)) => format!("{:.2}x", c / m),
                _ => "-".into(),
            };
            let diff = r.max_abs_diff.map_or("-".into(), |d| format!("{d:.1e}"));
            write!(
                f,
                "{:<11} {:>5} {:<17} {:>11} {:>10} {:>9} {:>10}",
                r.student,
                r.batch,
                r.runtime,
                opt(r.ms, 2),
                opt(r.images_per_s, 1),
                ratio,
                diff
            )?;
            match &r.note {
                Some(n) if r.ms.is_none() => writeln!(f, "  missing: {n}")?,
                Some(n) => writeln!(f, "  ({n})")?,
                None => writeln!(f)?,
            }
        }
        writeln!(
            f,
            "vs candle = candle time / this runtime's time (above 1: faster than candle)"
        )?;
        for s in &students {
            let mut batches: Vec<usize> = self
                .rows
                .iter()
                .filter(|r| r.student == *s)
                .map(|r| r.batch)
                .collect();
            batches.sort_unstable();
            batches.dedup();
            for b in batches {
                if let (Some(e), Some(a)) =
                    (self.fastest(s, b, &EXPORTED), self.fastest(s, b, &RUNTIMES))
                {
                    writeln!(
                        f,
                        "{s} batch {b}: fastest for the exported ONNX: {} ({:.2} ms); fastest overall: {} ({:.2} ms)",
                        e.runtime,
                        e.ms.unwrap_or(f64::NAN),
                        a.runtime,
                        a.ms.unwrap_or(f64::NAN)
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn time_ms(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = std::time::Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

/// A student's generator inputs at one batch, as candle tensors and as ONNX inputs.
struct GenInputs {
    z: Tensor,
    labels: Tensor,
    fresh: Vec<Tensor>,
    onnx: Vec<(String, TensorData)>,
}

impl GenInputs {
    fn new(cfg: &ModelConfig, spec: &GeneratorSpec, batch: usize, seed: u64) -> Result<Self> {
        let dev = Device::Cpu;
        let u = &cfg;
        let shape = [batch, u.channels(), u.resolution(), u.resolution()];
        let draw =
            |k: u64| crate::rng::randn(&mut crate::rng::step_rng(seed, k, 0x1F3E), &shape, &dev);
        let z = draw(0)?;
        let fresh = (0..spec.num_fresh_noise())
            .map(|i| draw(1 + i as u64))
            .collect::<Result<Vec<_>>>()?;
        let labels: Vec<u32> = (0..batch as u32)
            .map(|i| i % u.num_classes() as u32)
            .collect();
        let arr = |t: &Tensor| -> Result<TensorData> {
            Ok(TensorData::F32(ArrayD::from_shape_vec(
                shape.to_vec(),
                t.flatten_all()?.to_vec1::<f32>()?,
            )?))
        };
        let mut onnx = vec![
            ("noise".to_string(), arr(&z)?),
            (
                "class_labels".to_string(),
                TensorData::I32(ArrayD::from_shape_vec(
                    vec![batch],
                    labels.iter().map(|&l| l as i32).collect(),
                )?),
            ),
        ];
        for (i, f) in fresh.iter().enumerate() {
            onnx.push((format!("noise_{}", i + 1), arr(f)?));
        }
        Ok(Self {
            labels: Tensor::from_vec(labels, batch, &dev)?,
            z,
            fresh,
            onnx,
        })
    }
}

fn max_abs_diff(a: &ArrayD<f32>, want: &Tensor) -> Result<f64> {
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    ensure!(
        a.len() == w.len(),
        "output has {} values, candle {}",
        a.len(),
        w.len()
    );
    Ok(a.iter()
        .zip(&w)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max))
}

/// Times an exported file in one runtime at every batch (checking its output first).
fn time_runner(
    runner: &mut dyn Runner,
    inputs: &[(usize, GenInputs, Tensor)],
    o: &InferenceOptions,
) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for (_, inp, want) in inputs {
        let outs = runner.run(&inp.onnx as &Inputs)?;
        let diff = max_abs_diff(&outs.first().context("the model has no output")?.1, want)?;
        let ms = time_ms(o.warmup, o.iters, || runner.run(&inp.onnx).map(|_| ()))?;
        out.push((ms, diff));
    }
    Ok(out)
}

/// Runs the inference bench (see the module docs).
pub fn run(o: &InferenceOptions) -> Result<InferenceReport> {
    ensure!(
        o.iters > 0 && !o.batches.is_empty(),
        "iterations and batches must be positive"
    );
    ensure!(o.batches.iter().all(|&b| b > 0), "batches must be positive");
    let threads = match o.threads {
        Some(0) => bail!("threads must be positive"),
        Some(t) => t,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let cfg = ModelConfig::ours(super::unet_config(&o.config)?, Parameterisation::edm());
    crate::host::tune_threads(Some(threads));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    let work = super::Workdir::new()?;
    let python = super::torch_python_for(o.torch, o.torch_python.as_deref())?;
    let grid = NoiseGrid::new(&cfg.parameterisation);
    let mut rows = Vec::new();
    let mut params = 0;
    for (name, ts) in [
        ("dmd2_1step", vec![999]),
        ("dmd2_4step", vec![999, 749, 499, 249]),
    ] {
        let sigmas = grid.sigmas_of(&ts);
        let spec = GeneratorSpec {
            sampler: SamplerKind::Student,
            steps: sigmas.len(),
            fresh_noise: sigmas.len() > 1,
            sigmas,
            cfg_scale: 1.0,
        };
        let dir = work.path(name);
        let ckpt = dir.join("checkpoint");
        let (varmap, _, _) = crate::train::teacher::init_trainable(&cfg, o.seed, &Device::Cpu)?;
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        checkpoint::save(
            &ckpt,
            &CheckpointMeta::new(Role::Dmd2, cfg.clone(), spec.clone(), 0),
            &weights,
        )?;
        let (den, _) = checkpoint::load(&ckpt, &Device::Cpu)?;
        params = graphs::params::count(&den);
        let b = CandleBackend::new(&Device::Cpu);
        // candle: the reference images of every batch, then the timings.
        let inputs = pool.install(|| -> Result<Vec<(usize, GenInputs, Tensor)>> {
            o.batches
                .iter()
                .map(|&n| {
                    let inp = GenInputs::new(&cfg, &spec, n, o.seed ^ n as u64)?;
                    let img = graphs::generate(&b, &den, &spec, &inp.z, &inp.labels, &inp.fresh)?;
                    Ok((n, inp, img))
                })
                .collect()
        })?;
        let mut push = |runtime: &str, batch: usize, r: Result<(f64, f64)>, tol: f64| {
            let (ms, diff, note) = match r {
                Ok((ms, d)) if d <= tol => (Some(ms), Some(d), None),
                Ok((ms, d)) => (
                    Some(ms),
                    Some(d),
                    Some(format!("differs from candle: {d:.2e} > {tol:e}")),
                ),
                Err(e) => (None, None, Some(format!("{e:#}"))),
            };
            rows.push(InferenceRow {
                student: name.into(),
                batch,
                runtime: runtime.into(),
                images_per_s: ms.map(|m| batch as f64 / (m * 1e-3)),
                ms,
                max_abs_diff: diff,
                note,
            });
        };
        for (n, inp, _) in &inputs {
            let ms = pool.install(|| {
                time_ms(o.warmup, o.iters, || {
                    graphs::generate(&b, &den, &spec, &inp.z, &inp.labels, &inp.fresh)?;
                    Ok(())
                })
            });
            push("candle", *n, ms.map(|m| (m, 0.0)), 0.0);
        }
        // The exported files, in ONNX Runtime and tract.
        let mut files = HashMap::new();
        for p in [export::Precision::Fp32, export::Precision::Fp16] {
            let job = crate::jobs::ExportJob::generator(&ckpt, &dir.join(format!("{p:?}")), p);
            files.insert(format!("{p:?}"), job.write_onnx());
        }
        for (rt, key, tol) in [
            ("onnxruntime fp32", "Fp32", TOL_F32),
            ("onnxruntime fp16", "Fp16", TOL_F16),
        ] {
            let res = match &files[key] {
                Ok(path) => OrtRunner::from_path_tuned(path, threads)
                    .and_then(|mut r| time_runner(&mut r, &inputs, o)),
                Err(e) => Err(anyhow::anyhow!("export failed: {e:#}")),
            };
            record(&mut push, rt, &inputs, res, tol);
        }
        let res = match &files["Fp32"] {
            Ok(path) => pool.install(|| {
                TractRunner::from_path(path).and_then(|mut r| time_runner(&mut r, &inputs, o))
            }),
            Err(e) => Err(anyhow::anyhow!("export failed: {e:#}")),
        };
        record(&mut push, "tract", &inputs, res, TOL_F32);
        // PyTorch.
        match &python {
            Ok(py) => {
                let r = torch_peer(
                    py,
                    &cfg,
                    &spec,
                    &ckpt,
                    &inputs[0],
                    threads,
                    o,
                    &work.path(""),
                );
                for (n, _, _) in &inputs {
                    match &r {
                        Ok(p) => {
                            let diff = p.parity_max_abs_diff;
                            let eager = p.eager_ms.get(&n.to_string()).copied();
                            push(
                                "pytorch eager",
                                *n,
                                eager.map(|m| (m, diff)).context("no eager timing"),
                                TOL_F32,
                            );
                            let comp = match (p.compile_ms.get(&n.to_string()), &p.compile_note) {
                                (Some(&m), _) => Ok((m, diff)),
                                (None, Some(note)) => Err(anyhow::anyhow!("{note}")),
                                (None, None) => Err(anyhow::anyhow!("torch.compile turned off")),
                            };
                            push("pytorch compile", *n, comp, TOL_F32);
                        }
                        Err(e) => {
                            for rt in ["pytorch eager", "pytorch compile"] {
                                push(rt, *n, Err(anyhow::anyhow!("{e:#}")), TOL_F32);
                            }
                        }
                    }
                }
            }
            Err(why) => {
                for (n, _, _) in &inputs {
                    for rt in ["pytorch eager", "pytorch compile"] {
                        push(rt, *n, Err(anyhow::anyhow!("{why}")), TOL_F32);
                    }
                }
            }
        }
    }
    Ok(InferenceReport {
        config: o.config.clone(),
        params,
        threads,
        warmup: o.warmup,
        iters: o.iters,
        rows,
    })
}

/// One row per batch from a runtime's per-batch results (or its one error).
fn record(
    push: &mut impl FnMut(&str, usize, Result<(f64, f64)>, f64),
    runtime: &str,
    inputs: &[(usize, GenInputs, Tensor)],
    res: Result<Vec<(f64, f64)>>,
    tol: f64,
) {
    match res {
        Ok(v) => {
            for ((n, _, _), r) in inputs.iter().zip(v) {
                push(runtime, *n, Ok(r), tol);
            }
        }
        Err(e) => {
            for (n, _, _) in inputs {
                push(runtime, *n, Err(anyhow::anyhow!("{e:#}")), tol);
            }
        }
    }
}

#[derive(Deserialize)]
struct PeerInference {
    parity_max_abs_diff: f64,
    eager_ms: HashMap<String, f64>,
    compile_ms: HashMap<String, f64>,
    compile_note: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn torch_peer(
    py: &Path,
    cfg: &ModelConfig,
    spec: &GeneratorSpec,
    ckpt: &Path,
    check: &(usize, GenInputs, Tensor),
    threads: usize,
    o: &InferenceOptions,
    work: &Path,
) -> Result<PeerInference> {
    let (_, inp, want) = check;
    let cin = work.join("check_input.safetensors");
    let cout = work.join("check_output.safetensors");
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("noise".into(), inp.z.clone());
    t.insert("labels".into(), inp.labels.to_dtype(DType::I64)?);
    for (i, f) in inp.fresh.iter().enumerate() {
        t.insert(format!("noise_{}", i + 1), f.clone());
    }
    candle_core::safetensors::save(&t, &cin)?;
    candle_core::safetensors::save(
        &HashMap::from([("images".to_string(), want.clone())]),
        &cout,
    )?;
    let config = work.join("config.json");
    std::fs::write(&config, serde_json::to_string(cfg)?)?;
    let script = work.join("torch_infer.py");
    std::fs::write(&script, TORCH_INFER)?;
    std::fs::write(work.join("torch_unet.py"), super::TORCH_SCRIPT)?;
    let sigmas: Vec<String> = spec.sigmas.iter().map(|s| format!("{s:.17e}")).collect();
    let batches: Vec<String> = o.batches.iter().map(|b| b.to_string()).collect();
    let mut c = super::torch::peer_command(py);
    c.arg(&script)
        .arg("--config")
        .arg(format!("@{}", config.display()))
        .arg("--weights")
        .arg(ckpt.join("model.safetensors"))
        .arg("--sigmas")
        .arg(sigmas.join(","))
        .arg("--batches")
        .arg(batches.join(","))
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--warmup")
        .arg(o.warmup.to_string())
        .arg("--iters")
        .arg(o.iters.to_string())
        .arg("--check-input")
        .arg(&cin)
        .arg("--check-output")
        .arg(&cout)
        .arg("--compile")
        .arg(if o.torch_compile { "on" } else { "off" });
    if spec.fresh_noise {
        c.arg("--fresh-noise");
    }
    let out = c
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "the PyTorch peer failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the PyTorch peer printed nothing")?;
    serde_json::from_str(line)
        .with_context(|| format!("parsing the PyTorch peer's output {line:?}"))
}

/// The PyTorch side, embedded so the binary needs no source tree.
pub const TORCH_INFER: &str = include_str!("../../bench/torch_infer.py");
