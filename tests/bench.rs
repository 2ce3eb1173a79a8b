//! `distill bench` end to end on a tiny UNet. Speed is never asserted here.
//!
//! The real benchmark (bench config, batch 64, PyTorch side by side when `.venv-bench` exists) is
//! the ignored test: `cargo test --release --test bench -- --ignored --nocapture`.

use distill::bench::{self, BenchOptions, TorchMode};
use graphs::flops;
use graphs::{EdmSchedule, ModelConfig, Parameterisation, UNetConfig};

fn tiny(torch: TorchMode) -> BenchOptions {
    BenchOptions {
        batch: 2,
        warmup: 1,
        iters: 1,
        torch,
        ..BenchOptions::for_config("tiny").unwrap()
    }
}

fn flops_of(cfg: &UNetConfig, batch: usize) -> flops::FlopCount {
    let m = ModelConfig::ours(cfg.clone(), Parameterisation::Edm(EdmSchedule::default()));
    flops::model_forward(&m, batch).unwrap()
}

#[test]
fn tiny_bench_runs_and_counts_flops() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out/report.json");
    let opts = BenchOptions {
        json_out: Some(json.clone()),
        threads: Some(1),
        ..tiny(TorchMode::Off)
    };
    let r = bench::run(&opts).unwrap();
    assert_eq!(r.unet, UNetConfig::tiny());
    assert_eq!((r.batch, r.threads, r.iters), (2, 1, 1));
    assert_eq!(r.candle.forward_ms.len(), 1);
    assert_eq!(r.candle.step_ms.len(), 1);
    assert!(r.candle.forward_median_ms > 0.0 && r.candle.step_median_ms > 0.0);
    assert!(r.candle.forward_gflops > 0.0 && r.candle.step_gflops > 0.0);
    assert!(
        r.candle.peak_rss_mb >= r.candle.peak_rss_mb_forward && r.candle.peak_rss_mb_forward > 0.0
    );
    assert!(r.params > 0);
    // The report's FLOPs are FlopCounter's, and GFLOP/s derive from them.
    let f = flops_of(&UNetConfig::tiny(), 2);
    assert_eq!(r.forward_flops, f);
    assert!(f.dense() > 0 && f.conv > 0 && f.linear > 0 && f.matmul > 0 && f.elementwise > 0);
    let gf = f.dense() as f64 / (r.candle.forward_median_ms * 1e-3) * 1e-9;
    assert!((r.candle.forward_gflops - gf).abs() <= 1e-9 * gf.max(1.0));
    assert!(r.torch.is_none());
    assert!(r.torch_note.is_some());

    let text = r.to_string();
    assert!(
        text.contains("forward (ms)") && text.contains("train step (ms)"),
        "{text}"
    );
    let back: bench::BenchReport =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(back.forward_flops, r.forward_flops);
    assert_eq!(back.candle.forward_ms, r.candle.forward_ms);
}

#[test]
fn unknown_config_and_bad_options_fail() {
    assert!(BenchOptions::for_config("huge").is_err());
    assert!(bench::run(&BenchOptions {
        batch: 0,
        ..tiny(TorchMode::Off)
    })
    .is_err());
    assert!(bench::run(&BenchOptions {
        threads: Some(0),
        ..tiny(TorchMode::Off)
    })
    .is_err());
    let missing = std::path::PathBuf::from("/nonexistent/python");
    let err = bench::run(&BenchOptions {
        torch: TorchMode::Require,
        torch_python: Some(missing.clone()),
        ..tiny(TorchMode::Off)
    })
    .unwrap_err();
    assert!(err.to_string().contains("PyTorch not found"), "{err}");
    // Auto without torch still succeeds, with the hint.
    let r = bench::run(&BenchOptions {
        torch_python: Some(missing),
        ..tiny(TorchMode::Auto)
    })
    .unwrap();
    assert!(r.torch.is_none());
    assert!(r.to_string().contains(bench::TORCH_MISSING));
}

/// With torch installed (scripts/setup-bench.sh), the PyTorch peer must reproduce the candle
/// denoiser and loss from the exported weights; without it this only checks the fallback.
#[test]
fn tiny_bench_with_torch_if_available() {
    let r = bench::run(&tiny(TorchMode::Auto)).unwrap();
    match &r.torch {
        Some(t) => {
            assert!(t.parity_max_abs_diff <= bench::PARITY_TOL);
            assert_eq!(
                t.forward_flops,
                r.forward_flops.dense(),
                "PyTorch's FlopCounterMode disagrees with FlopCounter"
            );
            assert!(t.result.forward_median_ms > 0.0 && t.result.step_median_ms > 0.0);
            println!("{r}");
        }
        None => assert!(r
            .torch_note
            .as_deref()
            .unwrap_or("")
            .contains("PyTorch not found")),
    }
}

/// The real benchmark: `cargo test --release --test bench -- --ignored --nocapture`.
/// Environment: DISTILL_BENCH_CONFIG (bench | mnist_small), DISTILL_BENCH_BATCH,
/// DISTILL_BENCH_THREADS, DISTILL_BENCH_ITERS, DISTILL_BENCH_JSON.
#[test]
#[ignore = "minutes of CPU; run explicitly"]
fn bench_full() {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut opts =
        BenchOptions::for_config(&var("DISTILL_BENCH_CONFIG").unwrap_or_else(|| "bench".into()))
            .unwrap();
    if let Some(b) = var("DISTILL_BENCH_BATCH") {
        opts.batch = b.parse().unwrap();
    }
    if let Some(t) = var("DISTILL_BENCH_THREADS") {
        opts.threads = Some(t.parse().unwrap());
    }
    if let Some(i) = var("DISTILL_BENCH_ITERS") {
        opts.iters = i.parse().unwrap();
    }
    opts.json_out = var("DISTILL_BENCH_JSON").map(Into::into);
    let r = bench::run(&opts).unwrap();
    println!("\n{r}");
}

/// `DISTILL_SIMD=avx2` emulates an AVX2-only machine on both sides: the report names the caps
/// the PyTorch peer runs (here: would run, `--torch off`) under, and a cap the user set already
/// is left to them.
#[test]
fn avx2_cap_is_applied_to_the_pytorch_peer_too() {
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        eprintln!("skipped: no AVX2 on this CPU");
        return;
    }
    let run = |envs: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
            .args([
                "--threads",
                "1",
                "bench",
                "--what",
                "cpu",
                "--config",
                "tiny",
            ])
            .args([
                "--batch", "2", "--iters", "1", "--warmup", "0", "--no-ops", "--torch", "off",
            ])
            .env_remove("DNNL_MAX_CPU_ISA")
            .env_remove("ATEN_CPU_CAPABILITY")
            .env_remove("MKL_ENABLE_INSTRUCTIONS")
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let capped = run(&[("DISTILL_SIMD", "avx2")]);
    assert!(
        capped.contains("our kernels Avx2 (DISTILL_SIMD=avx2); no PyTorch side in this run (it would be capped the same way: DNNL_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2)"),
        "{capped}"
    );
    let own = run(&[("DISTILL_SIMD", "avx2"), ("DNNL_MAX_CPU_ISA", "SSE41")]);
    assert!(
        own.contains(
            "capped the same way: ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2)"
        ),
        "{own}"
    );
    let native = run(&[]);
    assert!(
        native.contains("(it would run at its own best)"),
        "{native}"
    );
}
