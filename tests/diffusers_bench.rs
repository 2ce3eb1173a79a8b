//! `distill bench --what diffusers-unet` on a tiny diffusers config: every batch gets candle's
//! forward and training step, and the PyTorch columns say why they are empty (torch is kept out
//! of tests). The real size (google/ddpm-cifar10-32) is the README's command. Speed is never
//! asserted here.

use distill::bench::diffusers_unet::{self, DiffusersBenchOptions, DDPM_CIFAR10_32};
use distill::bench::TorchMode;
use std::path::Path;

#[test]
fn tiny_diffusers_bench_times_forward_and_step() {
    let o = DiffusersBenchOptions {
        config: Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("graphs/tests/fixtures/diffusers/models/uncond/config.json"),
        ),
        batches: vec![1, 2],
        threads: Some(1),
        warmup: 0,
        iters: 1,
        torch: TorchMode::Off,
        torch_python: None,
    };
    let r = diffusers_unet::run(&o).unwrap();
    assert_eq!(r.rows.iter().map(|x| x.batch).collect::<Vec<_>>(), [1, 2]);
    for x in &r.rows {
        assert!(x.candle_forward_ms > 0.0 && x.candle_step_ms > 0.0, "{x:?}");
        assert!(x.torch_forward_ms.is_none());
    }
    assert!(r
        .to_string()
        .contains("PyTorch missing: PyTorch comparison turned off"));
}

#[test]
fn the_ddpm_cifar10_32_config_is_the_35_7m_parameter_unet() {
    let v = graphs::json::parse(DDPM_CIFAR10_32).unwrap();
    let cfg = graphs::diffusers::UNet2DConfig::from_json(&v).unwrap();
    let vm = candle_nn::VarMap::new();
    let vb =
        candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
    graphs::diffusers::UNet2DModel::new(vb, &cfg).unwrap();
    let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    // diffusers' own count for this config.json (UNet2DModel.from_config, 0.42.1).
    assert_eq!(n, 35_746_307);
}
