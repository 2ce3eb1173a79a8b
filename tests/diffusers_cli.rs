//! `distill export DIR --what denoiser` of a diffusers model folder: the written file runs in
//! tract and reproduces diffusers' own output (the parity fixture).

use export::runtime::{Runner, TensorData, TractRunner};
use std::path::Path;
use std::process::Command;

fn distill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("run distill")
}

#[test]
fn exports_a_diffusers_unet_with_its_own_signature() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/fixtures/diffusers/models/uncond");
    let out = tempfile::tempdir().unwrap();
    let o = distill(&[
        "export",
        model.to_str().unwrap(),
        "-o",
        out.path().to_str().unwrap(),
        "--what",
        "denoiser",
    ]);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("kind = diffusers_unet2d"), "{text}");
    let f = candle_core::safetensors::load(
        model.join("forward.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let arr = |name: &str| {
        let t = &f[name];
        ndarray::ArrayD::from_shape_vec(
            t.dims().to_vec(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        )
        .unwrap()
    };
    let mut r = TractRunner::from_path(&out.path().join("denoiser.onnx")).unwrap();
    let y = r
        .run(&[
            ("sample".into(), TensorData::F32(arr("sample"))),
            ("timestep".into(), TensorData::F32(arr("timestep"))),
        ])
        .unwrap();
    assert_eq!(y[0].0, "out_sample");
    let want = arr("expected");
    let err = y[0]
        .1
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err <= 1e-4, "max abs {err:.3e} vs diffusers");

    let o = distill(&[
        "export",
        model.to_str().unwrap(),
        "-o",
        out.path().to_str().unwrap(),
    ]);
    // The generator unrolls the sampler of the folder's scheduler: a bare model folder has none.
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("no scheduler_config.json"),
        "{text}"
    );
}
