//! The PyTorch peer: finding a Python with torch, running the embedded `bench/torch_unet.py` in a
//! scratch folder, its parity check against the candle model and its timings.

use super::*;

/// A scratch directory removed on drop.
pub(super) struct Workdir(PathBuf);

impl Workdir {
    pub(super) fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("distill-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Workdir {
    /// Set `DISTILL_BENCH_KEEP=1` to keep the exported weights, inputs and peer outputs.
    fn drop(&mut self) {
        if std::env::var_os("DISTILL_BENCH_KEEP").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("distill bench: kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The environment that caps PyTorch at the kernels' instruction set when `DISTILL_SIMD=avx2` emulates
/// an AVX2-only machine (e.g. AMD Zen 3) on an AVX-512 one: oneDNN (convolutions, GEMM) and
/// ATen's vectorised kernels and MKL (torch.mm) then stop at AVX2 too, so both sides run as on such a machine.
/// Values the user set already are kept.
pub(crate) fn isa_cap_env() -> Vec<(&'static str, &'static str)> {
    if graphs::kernels::simd::level() != graphs::kernels::simd::Level::Avx2
        || std::env::var("DISTILL_SIMD").as_deref() != Ok("avx2")
    {
        return Vec::new();
    }
    [
        ("DNNL_MAX_CPU_ISA", "AVX2"),
        ("ATEN_CPU_CAPABILITY", "avx2"),
        ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ]
    .into_iter()
    .filter(|(k, _)| std::env::var_os(k).is_none())
    .collect()
}

/// A command running the PyTorch peer `python`, under [`isa_cap_env`].
pub(super) fn peer_command(python: &Path) -> Command {
    let mut c = Command::new(python);
    c.envs(isa_cap_env());
    c
}

/// The report's line on the instruction sets of both sides; without a PyTorch side in the run,
/// what its peer would run under.
pub(super) fn isa_line(with_torch: bool) -> String {
    let ours = graphs::kernels::simd::level();
    let cap: Vec<String> = isa_cap_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let ours = if cap.is_empty() {
        format!("instruction set: our kernels {ours:?}")
    } else {
        format!("instruction set: our kernels {ours:?} (DISTILL_SIMD=avx2)")
    };
    match (with_torch, cap.is_empty()) {
        (true, true) => format!("{ours}; PyTorch its own best"),
        (true, false) => format!("{ours}; PyTorch capped the same way ({})", cap.join(", ")),
        (false, true) => {
            format!("{ours}; no PyTorch side in this run (it would run at its own best)")
        }
        (false, false) => format!(
            "{ours}; no PyTorch side in this run (it would be capped the same way: {})",
            cap.join(", ")
        ),
    }
}

/// The Python of the PyTorch side as `mode` asks for it: `Err` (the line to print) when it is off
/// or not found, an error when it is required and not found.
pub(super) fn torch_python_for(
    mode: super::TorchMode,
    explicit: Option<&Path>,
) -> Result<std::result::Result<PathBuf, String>> {
    let python = match mode {
        super::TorchMode::Off => Err("PyTorch comparison turned off".to_string()),
        _ => find_torch_python(explicit),
    };
    if let (super::TorchMode::Require, Err(why)) = (mode, &python) {
        anyhow::bail!("{why}");
    }
    Ok(python)
}

/// A Python that imports torch and safetensors: `explicit`, else `$DISTILL_TORCH_PYTHON`, else
/// `.venv-bench/bin/python` under the current directory or this crate's source tree.
/// `Err` carries the line to print.
pub(super) fn find_torch_python(explicit: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let from_env = std::env::var_os("DISTILL_TORCH_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let chosen = explicit.map(Path::to_path_buf).or(from_env);
    let candidates: Vec<PathBuf> = match &chosen {
        Some(p) => vec![p.clone()],
        None => vec![
            PathBuf::from(".venv-bench/bin/python"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-bench/bin/python"),
        ],
    };
    let mut why = None;
    for py in candidates {
        if chosen.is_none() && !py.exists() {
            continue;
        }
        let out = Command::new(&py)
            .args([
                "-c",
                "import torch, safetensors.torch; print(torch.__version__)",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(py),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                why = Some(format!(
                    "{}: {}",
                    py.display(),
                    err.lines().last().unwrap_or("import failed")
                ));
            }
            Err(e) => why = Some(format!("{}: {e}", py.display())),
        }
    }
    Err(match why {
        Some(w) => format!("{TORCH_MISSING} ({w})"),
        None => TORCH_MISSING.to_string(),
    })
}

/// Runs the embedded peer script with `args`; returns its last stdout line parsed as JSON.
pub(super) fn run_peer<T: for<'de> Deserialize<'de>>(
    python: &Path,
    work: &Workdir,
    args: &[String],
) -> Result<T> {
    let script = work.path("torch_unet.py");
    if !script.exists() {
        std::fs::write(&script, TORCH_SCRIPT)?;
    }
    let out = peer_command(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "the PyTorch peer failed ({}):\n{}",
            out.status,
            tail.join("\n")
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("the PyTorch peer printed nothing")?;
    serde_json::from_str(line)
        .with_context(|| format!("parsing the PyTorch peer's output {line:?}"))
}

pub(super) fn write_config(cfg: &ModelConfig, work: &Workdir) -> Result<String> {
    let path = work.path("config.json");
    std::fs::write(&path, serde_json::to_string(cfg)?)?;
    Ok(format!("@{}", path.display()))
}

/// Exports the candle weights and a small input, has PyTorch compute the denoiser output and
/// the teacher loss from them, and compares. Returns (max abs diff, loss relative diff).
pub(super) fn parity_check(
    python: &Path,
    model: &CandleModel,
    cfg: &ModelConfig,
    threads: usize,
    seed: u64,
    work: &Workdir,
) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let inp = Inputs::new(cfg, PARITY_BATCH, seed ^ 0xC4EC)?;
    let b = CandleBackend::new(&dev);
    let level = model.den.level_from_sigma(&b, &inp.sigma)?;
    let d = model.den.forward(&b, &inp.noisy()?, &level, &inp.labels)?;
    let loss =
        graphs::losses::teacher_loss(&b, &model.den, &inp.x0, &inp.labels, &inp.sigma, &inp.noise)?
            .to_scalar::<f32>()? as f64;

    let (weights, input, output) = (
        work.path("weights.safetensors"),
        work.path("input.safetensors"),
        work.path("output.safetensors"),
    );
    candle_core::safetensors::save(&detached(&model.varmap)?, &weights)?;
    let tensors: HashMap<String, Tensor> = [
        ("x0".to_string(), inp.x0.clone()),
        ("noise".to_string(), inp.noise.clone()),
        ("sigma".to_string(), inp.sigma.clone()),
        ("labels".to_string(), inp.labels.to_dtype(DType::I64)?),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &input)?;
    let args: Vec<String> = vec![
        "--config".into(),
        write_config(cfg, work)?,
        "--threads".into(),
        threads.to_string(),
        "--check".into(),
        weights.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--out".into(),
        output.display().to_string(),
    ];
    let _: serde_json::Value = run_peer(python, work, &args)?;
    let got = candle_core::safetensors::load(&output, &dev)?;
    let td = got
        .get("denoised")
        .context("the peer wrote no `denoised`")?;
    ensure!(
        td.dims() == d.dims(),
        "PyTorch denoiser output {:?}, candle {:?}",
        td.dims(),
        d.dims()
    );
    let diff = (td - &d)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    let tloss = got
        .get("loss")
        .context("the peer wrote no `loss`")?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f32>()? as f64;
    let loss_rel = (tloss - loss).abs() / loss.abs().max(1e-12);
    ensure!(diff.is_finite() && diff <= PARITY_TOL, "PyTorch peer differs from candle: max abs diff {diff:.3e} > {PARITY_TOL:e} on the denoiser output");
    ensure!(loss_rel <= PARITY_TOL, "PyTorch peer differs from candle: teacher loss {tloss} vs {loss} (relative {loss_rel:.3e})");
    Ok((diff, loss_rel))
}

#[derive(Deserialize)]
struct PeerTiming {
    torch_version: String,
    threads: usize,
    forward_flops: u64,
    forward_ms: Vec<f64>,
    step_ms: Vec<f64>,
    rss_mb_after_import: f64,
    peak_rss_mb_forward: f64,
    peak_rss_mb: f64,
    #[serde(default)]
    gemm_gflops: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn time_torch(
    python: &Path,
    cfg: &ModelConfig,
    opts: &BenchOptions,
    threads: usize,
    dense: f64,
    diff: f64,
    loss_rel: f64,
    work: &Workdir,
) -> Result<TorchResult> {
    let args: Vec<String> = vec![
        "--config".into(),
        write_config(cfg, work)?,
        "--batch".into(),
        opts.batch.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--warmup".into(),
        opts.warmup.to_string(),
        "--iters".into(),
        opts.iters.to_string(),
        "--seed".into(),
        opts.seed.to_string(),
    ];
    let p: PeerTiming = run_peer(python, work, &args)?;
    ensure!(
        p.forward_ms.len() == opts.iters && p.step_ms.len() == opts.iters,
        "the PyTorch peer returned {} / {} timings, expected {}",
        p.forward_ms.len(),
        p.step_ms.len(),
        opts.iters
    );
    Ok(TorchResult {
        python: python.to_path_buf(),
        version: p.torch_version,
        threads: p.threads,
        result: engine_result(
            p.forward_ms,
            p.step_ms,
            dense,
            p.peak_rss_mb_forward,
            p.peak_rss_mb,
        ),
        forward_flops: p.forward_flops,
        rss_mb_after_import: p.rss_mb_after_import,
        gemm_gflops: p.gemm_gflops,
        parity_max_abs_diff: diff,
        parity_loss_rel_diff: loss_rel,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn isa_line_names_pytorch_only_when_it_ran() {
        let alone = super::isa_line(false);
        assert!(
            alone.contains("no PyTorch side in this run (it would"),
            "{alone}"
        );
        assert!(!alone.contains("PyTorch its own") && !alone.contains("PyTorch capped"));
        let both = super::isa_line(true);
        assert!(!both.contains("no PyTorch side"), "{both}");
        assert!(
            both.contains("PyTorch its own best") || both.contains("PyTorch capped"),
            "{both}"
        );
    }
}
