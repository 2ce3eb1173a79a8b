//! diffusers scheduler parity: tables and whole trajectories recorded by diffusers itself
//! (`scripts/make-diffusers-fixtures.py`), and model + scheduler sampling loops end to end.

use candle_core::{DType, Device, Tensor};
use graphs::diffusers::load_unet;
use graphs::schedulers::{Scheduler, StepState};
use graphs::CandleBackend;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

fn load(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap()
}

/// f32 tables equal to within `max_ulp` units in the last place (0: bit for bit).
fn assert_ulps(name: &str, what: &str, got: &[f32], want: &[f32], max_ulp: i64) {
    assert_eq!(got.len(), want.len(), "{name}: {what} length");
    let mut worst = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ulp = (g.to_bits() as i64 - w.to_bits() as i64).abs();
        assert!(
            ulp <= max_ulp,
            "{name}: {what}[{i}] = {g:e}, diffusers {w:e} ({ulp} ulp > {max_ulp})"
        );
        worst = worst.max(ulp);
    }
    eprintln!("{name}: {what} within {worst} ulp");
}

/// Worst `max |a - b| / max(1, max |b|)`: 1e-4 absolute for samples of unit scale; relative
/// beyond (an Euler start at sigma 157 is ~600 in magnitude, where f32's ulp is 6e-5).
fn scaled_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = vec_f32(&b.abs().unwrap().flatten_all().unwrap())
        .into_iter()
        .fold(1f32, f32::max);
    max_abs(a, b) / scale
}

fn scheduler(name: &str) -> (Scheduler, HashMap<String, Tensor>) {
    let dir = fixtures().join("schedulers").join(name);
    let mut s = Scheduler::from_file(&dir.join("scheduler_config.json")).unwrap();
    let f = load(&dir, "trajectory.safetensors");
    if let Scheduler::Ddim(d) = &mut s {
        d.eta = vec_f32(&f["eta"])[0] as f64;
    }
    let steps = f["timesteps"].dim(0).unwrap();
    s.set_timesteps(steps).unwrap();
    (s, f)
}

/// Tables exactly, then the trajectory from diffusers' initial sample with diffusers' model
/// outputs and noise, our own samples fed back: returns the worst step error.
fn trajectory(name: &str) -> f32 {
    let (s, f) = scheduler(name);
    assert_ulps(
        name,
        "timesteps",
        &s.timesteps(),
        &vec_f32(&f["timesteps"]),
        0,
    );
    // Bit for bit, except after rescale_betas_zero_snr: torch's vectorised sqrt (Sleef) is not
    // always correctly rounded, and the rescale takes sqrt of the whole table.
    let rescaled = match &s {
        Scheduler::Ddpm(d) => d.betas.rescale_betas_zero_snr,
        Scheduler::Ddim(d) => d.betas.rescale_betas_zero_snr,
        Scheduler::Euler(d) => d.betas.rescale_betas_zero_snr,
        Scheduler::DpmMultistep(d) => d.betas.rescale_betas_zero_snr,
        Scheduler::FlowMatchEuler(_) => false,
    };
    let tol = if rescaled { 16 } else { 0 };
    if let Some(want) = f.get("sigmas") {
        assert_ulps(name, "sigmas", s.sigmas().unwrap(), &vec_f32(want), tol);
    }
    if let Some(want) = f.get("alphas_cumprod") {
        let got = match &s {
            Scheduler::Ddpm(d) => d.alphas_cumprod.clone(),
            Scheduler::Ddim(d) => d.alphas_cumprod.clone(),
            Scheduler::Euler(d) => d.alphas_cumprod.clone(),
            Scheduler::DpmMultistep(d) => d.alphas_cumprod.clone(),
            Scheduler::FlowMatchEuler(_) => unreachable!("flow has no alphas_cumprod"),
        };
        assert_ulps(name, "alphas_cumprod", &got, &vec_f32(want), tol);
    }
    assert_eq!(
        s.init_noise_sigma() as f32,
        vec_f32(&f["init_noise_sigma"])[0],
        "{name}: init_noise_sigma"
    );
    let b = CandleBackend::new(&Device::Cpu);
    let mut state = StepState::default();
    let mut x = f["sample"].clone();
    let mut worst = 0f32;
    for i in 0..s.timesteps().len() {
        let noise = f.get(&format!("noise_{i}"));
        assert_eq!(noise.is_some(), s.needs_noise(i), "{name}: step {i} noise");
        x = s
            .step(
                &b,
                &mut state,
                i,
                &f[&format!("model_output_{i}")],
                &x,
                noise,
            )
            .unwrap();
        let want = &f[&format!("prev_sample_{i}")];
        let err = scaled_err(&x, want);
        eprintln!(
            "{name} step {i}: scaled max abs {err:.3e} (max abs {:.3e})",
            max_abs(&x, want)
        );
        worst = worst.max(err);
    }
    worst
}

macro_rules! traj {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let err = trajectory(stringify!($name));
            assert!(err <= 1e-4, "{}: scaled max abs {err:.3e} > 1e-4", stringify!($name));
        }
    )*};
}

traj!(
    ddpm_linear_eps,
    ddpm_cos_v_trailing,
    ddpm_sample_linspace_large,
    ddim_scaled_linear_offset,
    ddim_zero_snr_v_trailing_eta,
    ddim_sample_linspace_clip,
    euler_linear_eps,
    euler_scaled_leading_v,
    euler_trailing_zero_snr_sigma_min,
    dpm_2m_eps,
    dpm_2m_v_trailing_trained,
    dpm_2m_heun_sample_leading,
    dpm_1_dpmsolver_sigma_min,
    dpm_2m_dpmsolver_20,
    flow_shift3,
    flow_plain,
    flow_terminal_stochastic
);

/// The generic diffusers sampling loop with our UNet2DModel and scheduler.
fn pipeline(name: &str) -> f32 {
    let dir = fixtures().join("pipelines").join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.json")).unwrap()).unwrap();
    let dev = Device::Cpu;
    let (model, _) = load_unet(
        &fixtures()
            .join("models")
            .join(meta["model"].as_str().unwrap()),
        &dev,
    )
    .unwrap();
    let sdir = fixtures()
        .join("schedulers")
        .join(meta["scheduler"].as_str().unwrap());
    let mut s = Scheduler::from_file(&sdir.join("scheduler_config.json")).unwrap();
    if let (Scheduler::Ddim(d), Some(eta)) = (&mut s, meta["eta"].as_f64()) {
        d.eta = eta;
    }
    s.set_timesteps(meta["steps"].as_u64().unwrap() as usize)
        .unwrap();
    let f = load(&dir, "expected.safetensors");
    let labels = f.get("class_labels").map(|l| {
        if l.dtype() == DType::F32 {
            l.clone()
        } else {
            l.to_dtype(DType::U32).unwrap()
        }
    });
    let b = CandleBackend::new(&dev);
    let side = f["noise"].dim(3).unwrap();
    let n = f["noise"].dim(0).unwrap();
    let mut x = f["noise"].affine(s.init_noise_sigma(), 0.0).unwrap();
    let mut state = StepState::default();
    let mut worst = 0f32;
    for (i, t) in s.timesteps().into_iter().enumerate() {
        let tt = Tensor::full(t, n, &dev).unwrap();
        let mo = model
            .forward(
                &b,
                &s.scale_model_input(&b, &x, i).unwrap(),
                side,
                &tt,
                labels.as_ref(),
            )
            .unwrap();
        let mo_err = scaled_err(&mo, &f[&format!("model_output_{i}")]);
        x = s
            .step(&b, &mut state, i, &mo, &x, f.get(&format!("noise_{i}")))
            .unwrap();
        let err = scaled_err(&x, &f[&format!("sample_{i}")]);
        eprintln!("{name} step {i} (t = {t}): model output {mo_err:.3e}, sample {err:.3e} (scaled max abs)");
        worst = worst.max(err).max(mo_err);
    }
    assert!(scaled_err(&x, &f["images"]) <= worst);
    worst
}

macro_rules! pipe {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let err = pipeline(stringify!($name));
            assert!(err <= 1e-4, "{}: scaled max abs {err:.3e} > 1e-4", stringify!($name));
        }
    )*};
}

pipe!(
    uncond_ddpm,
    class_dpm_v,
    timestep_class_euler,
    identity_flow,
    scale_shift_ddim_eta
);

fn parse_err(v: serde_json::Value) -> String {
    format!("{:#}", Scheduler::from_json(&v).unwrap_err())
}

#[test]
fn unsupported_and_unknown_scheduler_keys_are_refused_by_name() {
    use serde_json::json;
    for (class, key, value) in [
        ("DDPMScheduler", "variance_type", json!("learned_range")),
        ("DDPMScheduler", "thresholding", json!(true)),
        ("DDPMScheduler", "beta_schedule", json!("sigmoid")),
        ("DDIMScheduler", "timestep_spacing", json!("karras")),
        ("DDIMScheduler", "prediction_type", json!("flow_prediction")),
        ("EulerDiscreteScheduler", "use_karras_sigmas", json!(true)),
        (
            "EulerDiscreteScheduler",
            "interpolation_type",
            json!("log_linear"),
        ),
        (
            "EulerDiscreteScheduler",
            "timestep_type",
            json!("continuous"),
        ),
        ("DPMSolverMultistepScheduler", "solver_order", json!(3)),
        (
            "DPMSolverMultistepScheduler",
            "algorithm_type",
            json!("sde-dpmsolver++"),
        ),
        (
            "DPMSolverMultistepScheduler",
            "use_flow_sigmas",
            json!(true),
        ),
        (
            "FlowMatchEulerDiscreteScheduler",
            "use_dynamic_shifting",
            json!(true),
        ),
        (
            "FlowMatchEulerDiscreteScheduler",
            "invert_sigmas",
            json!(true),
        ),
    ] {
        let e = parse_err(json!({"_class_name": class, key: value.clone()}));
        assert!(
            e.contains(key) && e.contains(&value.to_string()),
            "{class} {key}: {e}"
        );
    }
    let e = parse_err(json!({"_class_name": "DDIMScheduler", "skip_prk_steps": true}));
    assert!(e.contains("unknown") && e.contains("skip_prk_steps"), "{e}");
    let e = parse_err(json!({"_class_name": "PNDMScheduler"}));
    assert!(e.contains("PNDMScheduler"), "{e}");
    let e = parse_err(json!({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2]}));
    assert!(e.contains("trained_betas"), "{e}");
}

#[test]
fn absent_keys_take_diffusers_defaults() {
    let Scheduler::Ddpm(d) =
        Scheduler::from_json(&serde_json::json!({"_class_name": "DDPMScheduler"})).unwrap()
    else {
        panic!()
    };
    assert_eq!(d.betas.num_train_timesteps, 1000);
    assert_eq!(d.clip, Some(1.0));
    assert_eq!(d.spacing, graphs::schedulers::Spacing::Leading);
    let Scheduler::Euler(e) =
        Scheduler::from_json(&serde_json::json!({"_class_name": "EulerDiscreteScheduler"}))
            .unwrap()
    else {
        panic!()
    };
    assert_eq!(e.spacing, graphs::schedulers::Spacing::Linspace);
}
