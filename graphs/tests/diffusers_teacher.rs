//! A diffusers model as a sigma-space denoiser: x0 from diffusers' own samples along its own
//! sampling loops (the pipeline fixtures), against the x0 diffusers' scheduler derives from the
//! same model output (eps / v / flow velocity).

use candle_core::{DType, Device, Tensor};
use graphs::diffusers::{load_unet, DiffusersTeacher, NoiseSpace};
use graphs::schedulers::Scheduler;
use graphs::CandleBackend;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

fn scaled_err(a: &Tensor, b: &Tensor) -> f32 {
    let finite = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    };
    assert!(finite(a) && finite(b), "non-finite values");
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    m(&(a - b).unwrap()) / m(b).max(1.0)
}

fn teacher(
    pipeline: &str,
) -> (
    DiffusersTeacher,
    Scheduler,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = fixtures().join("pipelines").join(pipeline);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.json")).unwrap()).unwrap();
    let (unet, _) = load_unet(
        &fixtures()
            .join("models")
            .join(meta["model"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let mut s = Scheduler::from_file(
        &fixtures()
            .join("schedulers")
            .join(meta["scheduler"].as_str().unwrap())
            .join("scheduler_config.json"),
    )
    .unwrap();
    s.set_timesteps(meta["steps"].as_u64().unwrap() as usize)
        .unwrap();
    let f = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let side = f["noise"].dim(3).unwrap();
    (
        DiffusersTeacher {
            unet,
            space: NoiseSpace::from_scheduler(&s),
            side,
        },
        s,
        f,
    )
}

/// For every step: (sigma, the sample in sigma-space, diffusers' x0) from the model's space.
fn check(
    pipeline: &str,
    to_sigma: impl Fn(&Scheduler, usize, &Tensor, &Tensor) -> (f64, Tensor, Tensor),
) -> f32 {
    let (t, s, f) = teacher(pipeline);
    let labels = f.get("class_labels").map(|l| {
        if l.dtype() == DType::F32 {
            l.clone()
        } else {
            l.to_dtype(DType::U32).unwrap()
        }
    });
    let b = CandleBackend::new(&Device::Cpu);
    let n = f["noise"].dim(0).unwrap();
    let mut worst = 0f32;
    for (i, ts) in s.timesteps().into_iter().enumerate() {
        let x_model = if i == 0 {
            f["noise"].affine(s.init_noise_sigma(), 0.0).unwrap()
        } else {
            f[&format!("sample_{}", i - 1)].clone()
        };
        let mo = &f[&format!("model_output_{i}")];
        let (sigma, x, want) = to_sigma(&s, i, &x_model, mo);
        if sigma.is_infinite() {
            // Flow's pure-noise start (s = 1) has no sigma-space point.
            assert_eq!(i, 0, "{pipeline}: infinite sigma after the first step");
            continue;
        }
        let sig = Tensor::full(sigma as f32, n, &Device::Cpu).unwrap();
        let tt = Tensor::full(ts, n, &Device::Cpu).unwrap();
        let got = t.x0(&b, &x, &sig, &tt, labels.as_ref()).unwrap();
        let err = scaled_err(&got, &want);
        eprintln!("{pipeline} step {i}: sigma {sigma:.4}, x0 scaled max abs {err:.3e}");
        worst = worst.max(err);
    }
    worst
}

fn af(t: &Tensor, a: f64) -> Tensor {
    t.affine(a, 0.0).unwrap()
}

#[test]
fn euler_eps_teacher() {
    let err = check("timestep_class_euler", |s, i, x, mo| {
        let sig = s.sigmas().unwrap()[i] as f64;
        // Euler's samples are sigma-space already; x0 = x - sigma eps.
        (sig, x.clone(), (x - af(mo, sig)).unwrap())
    });
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn dpm_v_teacher() {
    let err = check("class_dpm_v", |s, i, x, mo| {
        let sig = s.sigmas().unwrap()[i] as f64;
        let a = 1.0 / (1.0 + sig * sig).sqrt();
        (sig, af(x, 1.0 / a), (af(x, a) - af(mo, sig * a)).unwrap())
    });
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn ddpm_eps_teacher() {
    let err = check("uncond_ddpm", |s, i, x, mo| {
        let Scheduler::Ddpm(d) = s else { panic!() };
        let acp = d.alphas_cumprod[d.timesteps[i] as usize] as f64;
        let sig = ((1.0 - acp) / acp).sqrt();
        (
            sig,
            af(x, 1.0 / acp.sqrt()),
            af(&(x - af(mo, (1.0 - acp).sqrt())).unwrap(), 1.0 / acp.sqrt()),
        )
    });
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn ddim_v_teacher() {
    let err = check("scale_shift_ddim_eta", |s, i, x, mo| {
        let Scheduler::Ddim(d) = s else { panic!() };
        let acp = d.alphas_cumprod[d.timesteps[i] as usize] as f64;
        let sig = ((1.0 - acp) / acp).sqrt();
        (
            sig,
            af(x, 1.0 / acp.sqrt()),
            (af(x, acp.sqrt()) - af(mo, (1.0 - acp).sqrt())).unwrap(),
        )
    });
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn flow_teacher() {
    let err = check("identity_flow", |s, i, x, mo| {
        let fs = s.sigmas().unwrap()[i] as f64;
        // x_t = (1 - s) x0 + s eps  =>  x_t / (1 - s) = x0 + s / (1 - s) eps.
        (
            fs / (1.0 - fs),
            af(x, 1.0 / (1.0 - fs)),
            (x - af(mo, fs)).unwrap(),
        )
    });
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn timestep_of_sigma_inverts_the_training_table() {
    let (t, s, _) = teacher("uncond_ddpm");
    let NoiseSpace::Vp { sigmas, .. } = &t.space else {
        panic!()
    };
    for k in [0usize, 1, 17, 500, 998, 999] {
        assert_eq!(t.timestep(sigmas[k] as f64), k as f64, "timestep {k}");
    }
    let (lo, hi) = (sigmas[10] as f64, sigmas[11] as f64);
    let mid = t.timestep((lo * hi).sqrt());
    assert!((mid - 10.5).abs() < 1e-9, "{mid}");
    drop(s);
    let (f, s, _) = teacher("identity_flow");
    for (ts, fs) in s.timesteps().iter().zip(s.sigmas().unwrap()) {
        let sigma = *fs as f64 / (1.0 - *fs as f64);
        if *fs == 1.0 {
            assert_eq!(f.timestep(sigma), 1000.0, "pure noise is timestep T");
            continue;
        }
        assert!((f.timestep(sigma) - *ts as f64).abs() < 1e-3, "{ts}");
    }
}

#[test]
fn loads_a_pipeline_folder_and_needs_its_scheduler() {
    let t = tempfile::tempdir().unwrap();
    let unet = t.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    for e in std::fs::read_dir(fixtures().join("models/uncond")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), unet.join(e.file_name())).unwrap();
    }
    std::fs::write(t.path().join("model_index.json"), "{}").unwrap();
    let e = format!(
        "{:#}",
        DiffusersTeacher::load(t.path(), &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("scheduler_config.json"), "{e}");
    std::fs::create_dir(t.path().join("scheduler")).unwrap();
    std::fs::copy(
        fixtures().join("schedulers/ddpm_linear_eps/scheduler_config.json"),
        t.path().join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let teacher = DiffusersTeacher::load(t.path(), &Device::Cpu).unwrap();
    assert_eq!(teacher.side, 16);
    let (smin, smax) = teacher.sigma_range();
    assert!(smin < 0.02 && smax > 100.0, "{smin} {smax}");
}
