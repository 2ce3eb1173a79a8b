//! No false FAIL: fp32 generators of every ODE sampler at 1-6 steps agree with candle within
//! the default fp32 gate (1e-4 max abs) in tract and ONNX Runtime. Heun's correction to
//! sigma_min used to form `x - D` where `D` equals `x` to 5 digits and multiply it by
//! `h / (2 sigma_min)` (~2e4 at 2 steps); the sampler now steps on the slope written in the
//! network's output with every coefficient folded in f64 (graphs/src/sampler.rs).
//!
//! The one exception is Heun at 2 steps: one step from sigma 80 to 0.002 weights the network's
//! output at sigma_min by h/2 ~ 40, so the runtimes' ordinary round-off in the network (1e-6 to
//! 1e-5 on this random net) is itself amplified to ~1e-4..5e-4; that case is held to 1e-3
//! (measured: tract 5.0e-4, ONNX Runtime 1.4e-4) and is a property of the sampler, not of the
//! export.

mod common;

use common::{randomize_norms, varmap};
use export::{export_generator, validate, ExportOptions, Target, ValidateOptions};
use graphs::{
    BetaSchedule, Denoiser, GeneratorSpec, ModelConfig, Parameterisation, SamplerKind, UNetConfig,
};

fn denoiser(param: Parameterisation, seed: u64) -> (candle_nn::VarMap, Denoiser) {
    let (vm, vb) = varmap();
    let den = Denoiser::new(vb, &ModelConfig::ours(UNetConfig::tiny(), param)).unwrap();
    randomize_norms(&vm, seed).unwrap();
    (vm, den)
}

#[test]
fn ode_generators_at_1_to_6_steps_pass_the_default_fp32_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (_e, edm) = denoiser(Parameterisation::edm(), 11);
    let (_v, vp) = denoiser(Parameterisation::vp(BetaSchedule::Linear), 12);
    let vopts = ValidateOptions {
        cases: 4,
        batches: vec![1, 3],
        ..Default::default()
    };
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (kind, den) in [
        (SamplerKind::Heun, &edm),
        (SamplerKind::Euler, &edm),
        (SamplerKind::Ddim, &vp),
    ] {
        for steps in 1..=6 {
            let spec = GeneratorSpec {
                sampler: kind,
                steps,
                sigmas: vec![],
                fresh_noise: false,
                cfg_scale: 1.0,
            };
            let model = export_generator(den, &spec, &ExportOptions::default()).unwrap();
            let path = dir.path().join(format!("{kind:?}_{steps}.onnx"));
            export::write_model(&model, &path).unwrap();
            let r = validate(&path, den, Target::Generator(&spec), &vopts).unwrap();
            for m in &r.metrics {
                eprintln!(
                    "{kind:?} {steps} steps {:<12} max_abs {:.3e} p99 {:.3e}",
                    m.runtime, m.max_abs, m.p99_abs
                );
                worst = worst.max(m.max_abs);
            }
            assert_eq!(r.metrics.len(), 2);
            let bound = if (kind, steps) == (SamplerKind::Heun, 2) {
                1e-3
            } else {
                1e-4
            };
            let ok = r
                .metrics
                .iter()
                .all(|m| m.nonfinite + m.reference_nonfinite == 0 && m.max_abs <= bound);
            if !ok {
                failures.push(format!("{kind:?} at {steps} steps (bound {bound:e}):\n{r}"));
            }
        }
    }
    eprintln!("worst max_abs over all: {worst:.3e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
