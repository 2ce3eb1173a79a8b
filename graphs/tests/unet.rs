//! The UNet, denoiser and samplers on candle.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graphs::sampler::{sample_ode, sample_student, Renoise};
use graphs::{CandleBackend, Denoiser, ModelConfig, Parameterisation, SamplerKind, UNetConfig};

fn tiny(param: Parameterisation) -> (VarMap, Denoiser) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let den = Denoiser::new(vb, &ModelConfig::ours(UNetConfig::tiny(), param)).unwrap();
    (vm, den)
}

fn inputs(n: usize) -> (Tensor, Tensor) {
    let x = Tensor::randn(0f32, 1.0, (n, 1, 16, 16), &Device::Cpu).unwrap();
    let l = Tensor::from_vec(
        (0..n as u32).map(|i| i % 11).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    (x, l)
}

#[test]
fn unet_shapes_and_gradients_reach_every_parameter() {
    let (vm, den) = tiny(Parameterisation::edm());
    let b = CandleBackend::new(&Device::Cpu);
    let (x, l) = inputs(3);
    let sigma = Tensor::new(&[0.1f32, 1.0, 10.0], &Device::Cpu).unwrap();
    let level = den.level_from_sigma(&b, &sigma).unwrap();
    let y = den.forward(&b, &x, &level, &l).unwrap();
    assert_eq!(y.dims(), &[3, 1, 16, 16]);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let params = graphs::params::collect(&den);
    assert_eq!(
        params.len(),
        vm.all_vars().len(),
        "params::collect must see every variable"
    );
    for v in vm.all_vars() {
        let g = grads.get(&v).expect("every parameter gets a gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                >= 0.0
        );
    }
}

#[test]
fn preconditioning_matches_closed_form_at_large_sigma() {
    // At sigma >> sigma_data, c_skip -> 0 and D -> c_out * F: check D - c_skip x = c_out F exactly.
    let (_, den) = tiny(Parameterisation::edm());
    let b = CandleBackend::new(&Device::Cpu);
    let (x, l) = inputs(2);
    let s = 3.0f64;
    let level = den.level_const(&b, &x, s).unwrap();
    let d = den.forward(&b, &x, &level, &l).unwrap();
    let e = graphs::EdmSchedule::default();
    let c_noise = Tensor::new(&[e.c_noise(s) as f32; 2], &Device::Cpu).unwrap();
    let f = den
        .net
        .forward(&b, &(&x * e.c_in(s)).unwrap(), &c_noise, &l)
        .unwrap();
    let want = ((&x * e.c_skip(s)).unwrap() + (f * e.c_out(s)).unwrap()).unwrap();
    let diff = (d - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn vp_denoiser_is_x_minus_sigma_eps() {
    let (_, den) = tiny(Parameterisation::vp(graphs::BetaSchedule::Linear));
    let b = CandleBackend::new(&Device::Cpu);
    let (x, l) = inputs(2);
    let t = Tensor::new(&[10u32, 900], &Device::Cpu).unwrap();
    let level = den.level_from_timesteps(&b, &t).unwrap();
    let eps = den.eps(&b, &x, &level, &l).unwrap();
    let d = den.forward(&b, &x, &level, &l).unwrap();
    let s = level.sigma.reshape((2, 1, 1, 1)).unwrap();
    let want = (&x - eps.broadcast_mul(&s).unwrap()).unwrap();
    let diff = (d - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn samplers_count_their_network_evaluations() {
    let (_, den) = tiny(Parameterisation::edm());
    let b = CandleBackend::new(&Device::Cpu);
    let (z, l) = inputs(2);
    for (kind, steps, nfe) in [
        (SamplerKind::Heun, 5, 9),
        (SamplerKind::Euler, 5, 5),
        (SamplerKind::Heun, 1, 1),
    ] {
        let (x, got) = sample_ode(&b, &den, kind, &z, &l, steps, 1.0).unwrap();
        assert_eq!(got, nfe, "{kind:?} {steps}");
        assert_eq!(got, kind.nfe(steps));
        assert_eq!(x.dims(), z.dims());
    }
    assert!(
        sample_ode(&b, &den, SamplerKind::Ddim, &z, &l, 4, 1.0).is_err(),
        "DDIM needs a VP model"
    );
    let (_, vp) = tiny(Parameterisation::vp(graphs::BetaSchedule::Linear));
    assert_eq!(
        sample_ode(&b, &vp, SamplerKind::Ddim, &z, &l, 4, 2.0)
            .unwrap()
            .1,
        4
    );
}

#[test]
fn student_sampler_renoise_modes() {
    let (_, den) = tiny(Parameterisation::edm());
    let b = CandleBackend::new(&Device::Cpu);
    let (z, l) = inputs(2);
    // One step: just D(80 z, 80) clamped.
    let one = sample_student(&b, &den, &z, &l, &[80.0], &Renoise::Deterministic).unwrap();
    let d = den
        .forward(
            &b,
            &(&z * 80.0).unwrap(),
            &den.level_const(&b, &z, 80.0).unwrap(),
            &l,
        )
        .unwrap()
        .clamp(-1.0, 1.0)
        .unwrap();
    assert_eq!(
        one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        d.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Fresh noise changes the result; deterministic does not depend on it.
    let n1 = Tensor::randn(0f32, 1.0, z.dims(), &Device::Cpu).unwrap();
    let a = sample_student(
        &b,
        &den,
        &z,
        &l,
        &[80.0, 1.0],
        &Renoise::Fresh(vec![n1.clone()]),
    )
    .unwrap();
    let c = sample_student(
        &b,
        &den,
        &z,
        &l,
        &[80.0, 1.0],
        &Renoise::Fresh(vec![(n1 * -1.0).unwrap()]),
    )
    .unwrap();
    assert!(
        (a - c)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    assert!(sample_student(&b, &den, &z, &l, &[80.0, 1.0, 0.1], &Renoise::Fresh(vec![])).is_err());
}

/// The whole network on the fast kernels against candle's stock ops: the teacher loss and the
/// gradient of every parameter agree to f32 round-off (for the test UNet and the default
/// teacher's, which has attention, a channel-changing skip and 3 levels).
#[test]
fn fast_kernels_match_stock_candle_on_the_whole_unet() {
    for (cfg, n) in [(UNetConfig::tiny(), 3), (UNetConfig::mnist_small(), 2)] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let den =
            Denoiser::new(vb, &ModelConfig::ours(cfg.clone(), Parameterisation::edm())).unwrap();
        let r = cfg.resolution;
        let x0 = Tensor::randn(0f32, 1.0, (n, 1, r, r), &Device::Cpu).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (n, 1, r, r), &Device::Cpu).unwrap();
        let labels = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        let sigma = Tensor::new(&[0.3f32, 2.0, 15.0][..n], &Device::Cpu).unwrap();
        let fast = CandleBackend::training(&Device::Cpu);
        let stock = CandleBackend::training(&Device::Cpu).stock();
        let lf = graphs::losses::teacher_loss(&fast, &den, &x0, &labels, &sigma, &noise).unwrap();
        let ls = graphs::losses::teacher_loss(&stock, &den, &x0, &labels, &sigma, &noise).unwrap();
        let (a, b) = (
            lf.to_scalar::<f32>().unwrap(),
            ls.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{cfg:?}: loss {a} vs stock {b}"
        );
        let (gf, gs) = (lf.backward().unwrap(), ls.backward().unwrap());
        for (name, v) in vm.data().lock().unwrap().iter() {
            let (f, s) = (gf.get(v).unwrap(), gs.get(v).unwrap());
            let scale = s
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-3);
            let d = (f - s)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d <= 2e-4 * scale,
                "{name}: gradient differs by {d} (scale {scale})"
            );
        }
    }
}
