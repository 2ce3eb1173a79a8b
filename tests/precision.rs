//! Mixed precision on the CPU: the dynamic loss scaler (skip + halve on overflow, growth after N
//! clean steps, master weights untouched by a skipped step), autocast casts, and short fp16/bf16
//! runs that track the fp32 loss curve.

use candle_core::{DType, Device, Tensor, Var};
use distill::data::Dataset;
use distill::train::optim::{
    precision_step, AdamW, AdamWConfig, LossScaleConfig, LossScaler, Precision,
};
use distill::train::teacher::{self, TeacherConfig};
use distill::train::RunDir;
use graphs::{Backend, CandleBackend, Param, UNetConfig};

fn var(v: &[f32]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn overflow_skips_the_step_halves_the_scale_and_keeps_the_weights() {
    let w = var(&[1.0, 2.0, 3.0]);
    let mut opt = AdamW::new(
        vec![("w".into(), w.clone())],
        AdamWConfig {
            lr: 0.1,
            warmup_steps: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = LossScaleConfig {
        init_scale: 1024.0,
        growth_interval: 3,
        ..Default::default()
    };
    let mut s = LossScaler::new(cfg);
    let before = vals(w.as_tensor());
    let g = Tensor::new(&[1.0f32, f32::INFINITY, 0.5], &Device::Cpu).unwrap();
    let r = precision_step(&mut opt, Some(&mut s), vec![Some(g)]).unwrap();
    assert!(r.is_none(), "skipped");
    assert_eq!(vals(w.as_tensor()), before, "master weights unchanged");
    assert_eq!((s.scale, s.skipped, opt.t), (512.0, 1, 0));
    let nan = Tensor::new(&[f32::NAN, 0.0, 0.0], &Device::Cpu).unwrap();
    assert!(precision_step(&mut opt, Some(&mut s), vec![Some(nan)])
        .unwrap()
        .is_none());
    assert_eq!(s.scale, 256.0);
    // Clean steps: unscaled gradients reach the optimiser; the scale doubles every 3.
    for i in 1..=7 {
        let scaled = Tensor::new(&[256.0f32 * 0.5, 0.0, -256.0], &Device::Cpu).unwrap();
        let scaled = (scaled * (s.scale / 256.0)).unwrap();
        let st = precision_step(&mut opt, Some(&mut s), vec![Some(scaled)])
            .unwrap()
            .unwrap();
        let want = (0.25f64 + 1.0).sqrt();
        assert!(
            (st.grad_norm - want).abs() < 1e-5,
            "step {i}: norm {} (unscaled)",
            st.grad_norm
        );
        let expect = if i < 3 {
            256.0
        } else if i < 6 {
            512.0
        } else {
            1024.0
        };
        assert_eq!(s.scale, expect, "after clean step {i}");
    }
    assert_eq!(opt.t, 7);
    assert_ne!(vals(w.as_tensor()), before);
    // State round-trips through the training-state metadata.
    let mut meta = std::collections::HashMap::new();
    s.save("scaler", &mut meta);
    let mut t = LossScaler::new(LossScaleConfig::default());
    t.load("scaler", &meta).unwrap();
    assert_eq!(
        (t.scale, t.good_steps, t.skipped),
        (s.scale, s.good_steps, s.skipped)
    );
}

#[test]
fn autocast_runs_convs_in_half_precision_and_keeps_f32_gradients() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap();
    let p = |name: &str, v: &Var| Param {
        name: name.into(),
        t: v.as_tensor().clone(),
    };
    let (pw, pb) = (p("w", &w), p("b", &bias));
    let f32b = CandleBackend::training(&dev);
    let want = f32b.conv2d(&x, &pw, Some(&pb), 1, 1).unwrap();
    for dt in [DType::F16, DType::BF16] {
        let b = CandleBackend::training(&dev).with_autocast(Some(dt));
        let y = b.conv2d(&x, &pw, Some(&pb), 1, 1).unwrap();
        assert_eq!(y.dtype(), DType::F32, "autocast ops return f32");
        let err = (&y - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let tol = if dt == DType::F16 { 1e-2 } else { 6e-2 };
        assert!(err > 0.0 && err < tol, "{dt:?}: max abs {err}");
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gw = g.get(&w).unwrap();
        assert_eq!(gw.dtype(), DType::F32, "master-weight gradient is f32");
        let g32 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let r = (gw - g32.get(&w).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = g32
            .get(&w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            r < 0.05 * scale,
            "{dt:?}: gradient differs by {r} (scale {scale})"
        );
    }
    // GroupNorm and softmax stay f32 under autocast.
    let b = CandleBackend::training(&dev).with_autocast(Some(DType::F16));
    assert_eq!(b.softmax_last(&x).unwrap().dtype(), DType::F32);
}

fn toy_data() -> Dataset {
    let d = distill::data::embedded_mnist()
        .unwrap()
        .to_resolution(16)
        .unwrap();
    d.subset(256)
}

fn run_teacher(precision: Precision, steps: u64) -> Vec<f64> {
    let mut c = TeacherConfig {
        model: UNetConfig::tiny(),
        train_steps: steps,
        batch_size: 16,
        log_every: 1,
        checkpoint_every: steps,
        sample_every: 0,
        sample_steps: 3,
        precision,
        ..Default::default()
    };
    c.optim.warmup_steps = 5;
    c.optim.lr = 1e-3;
    // 2^12 does not overflow this model's f16 gradients, so no step is skipped and the curves
    // align step by step (the default 2^16 skips the first step, as PyTorch's GradScaler does).
    c.loss_scale.init_scale = 4096.0;
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    teacher::train(&c, &toy_data(), &run, false, false, &Device::Cpu).unwrap();
    // Checkpoints are f32 whatever the precision.
    let w = distill::checkpoint::load_tensors(
        &run.checkpoint().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(w.values().all(|t| t.dtype() == DType::F32));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.metrics())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    if precision == Precision::Fp16 {
        let last = lines.last().unwrap();
        eprintln!(
            "fp16: loss scale {} after {} skipped steps",
            last["loss_scale"], last["skipped_steps"]
        );
        assert_eq!(
            last["loss_scale"].as_f64(),
            Some(4096.0),
            "the scale is logged"
        );
        assert_eq!(last["skipped_steps"].as_u64(), Some(0));
    }
    lines.iter().map(|v| v["loss"].as_f64().unwrap()).collect()
}

#[test]
fn fp16_and_bf16_teacher_runs_track_the_fp32_loss_curve() {
    let steps = 15;
    let a = run_teacher(Precision::Fp32, steps);
    for (p, tol) in [(Precision::Fp16, 0.005), (Precision::Bf16, 0.01)] {
        let b = run_teacher(p, steps);
        eprintln!("fp32 {a:.4?}\n{p:?} {b:.4?}");
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * x.abs(),
                "{p:?} step {}: fp32 {x} vs {y}",
                i + 1
            );
        }
    }
}
