//! The AutoencoderKL decoder and the CLIP text encoder lowered through the ONNX backend, run in
//! tract and ONNX Runtime, compared with candle and with diffusers' / transformers' own outputs
//! (the parity fixtures), fp32 and fp16.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::onnx_check;
use export::runtime::{OrtRunner, Runner, TensorData, TractRunner};
use export::{export_text_encoder, export_vae_decoder, ExportOptions, Precision};
use graphs::diffusers::vae::load_vae;
use graphs::transformers::load_text_encoder;
use graphs::CandleBackend;
use ndarray::ArrayD;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tests/fixtures/diffusers")
}

fn f32_data(t: &Tensor) -> TensorData {
    TensorData::F32(
        ArrayD::from_shape_vec(
            t.dims().to_vec(),
            t.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap(),
    )
}

fn i32_data(t: &Tensor) -> TensorData {
    let v: Vec<i32> = t
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as i32)
        .collect();
    TensorData::I32(ArrayD::from_shape_vec(t.dims().to_vec(), v).unwrap())
}

/// Writes and checks the model, runs it in tract and ONNX Runtime, and returns per runtime the
/// max abs error of each output against each reference in `want` (output name, whose reference,
/// values).
fn run_all(
    model: &export::proto::ModelProto,
    label: &str,
    inputs: &[(String, TensorData)],
    want: &[(&str, &str, &Tensor)],
) -> Result<Vec<(String, f64)>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{label}.onnx"));
    export::write_model(model, &path)?;
    onnx_check(&path)?;
    let runners: Vec<Box<dyn Runner>> = vec![
        Box::new(TractRunner::from_path(&path)?),
        Box::new(OrtRunner::from_path(&path)?),
    ];
    let mut errs = Vec::new();
    for mut r in runners {
        let out = r
            .run(inputs)
            .with_context(|| format!("{label} in {}", r.name()))?;
        for (name, whose, reference) in want {
            let (_, y) = out
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("{label}: no output {name}"))?;
            anyhow::ensure!(
                y.shape() == reference.dims(),
                "{label} {name} in {}: shape {:?}, expected {:?}",
                r.name(),
                y.shape(),
                reference.dims()
            );
            let rv: Vec<f32> = reference.flatten_all()?.to_vec1()?;
            let err = y
                .iter()
                .zip(&rv)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .fold(0.0, f64::max);
            anyhow::ensure!(y.iter().all(|v| v.is_finite()), "{label}: non-finite");
            eprintln!(
                "{label:<24} {name:<18} {:<12} vs {whose:<12} max abs {err:.3e}",
                r.name()
            );
            errs.push((format!("{} {name} vs {whose}", r.name()), err));
        }
    }
    Ok(errs)
}

fn vae_decoder(name: &str) {
    let dir = fixtures().join("vae").join(name);
    let dev = Device::Cpu;
    let (vae, _) = load_vae(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let z = &f["latents"];
    let (h, w) = (z.dim(2).unwrap(), z.dim(3).unwrap());
    let candle = vae
        .decode_latents(&CandleBackend::new(&dev), z, h, w)
        .unwrap();
    let inputs = vec![("latents".to_string(), f32_data(z))];
    let onnx = export_vae_decoder(&vae, h, w, &ExportOptions::default()).unwrap();
    let (ins, outs) = export::runtime::io_specs(&onnx).unwrap();
    assert_eq!(ins[0].name, "latents");
    assert_eq!(outs[0].name, "images");
    // Against candle and against diffusers' own images.
    let want = [
        ("images", "candle", &candle),
        ("images", "diffusers", &f["images"]),
    ];
    for (what, err) in run_all(&onnx, name, &inputs, &want).unwrap() {
        assert!(err <= 1e-4, "{name} {what}: {err:.3e}");
    }
    // fp16 weights: within half-precision round-off of candle's fp32.
    let opts = ExportOptions {
        precision: Precision::Fp16,
        ..Default::default()
    };
    let e = format!("{:#}", export_vae_decoder(&vae, h, w, &opts).unwrap_err());
    assert!(e.contains("force_upcast"), "{e}");
    // A VAE that declares itself fp16-safe (e.g. sdxl-vae-fp16-fix).
    let mut vae16 = vae.clone();
    vae16.cfg.force_upcast = false;
    let onnx16 = export_vae_decoder(&vae16, h, w, &opts).unwrap();
    let scale = candle
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    for (what, err) in run_all(
        &onnx16,
        &format!("{name}_fp16"),
        &inputs,
        &[("images", "candle", &candle)],
    )
    .unwrap()
    {
        assert!(
            err <= 2e-2 * scale.max(1.0),
            "{name} fp16 {what}: {err:.3e} (scale {scale:.2})"
        );
    }
}

#[test]
fn vae_decoder_kl_sd_lowers_to_onnx() {
    vae_decoder("kl_sd");
}

#[test]
fn vae_decoder_kl_sd3_lowers_to_onnx() {
    vae_decoder("kl_sd3");
}

fn text_encoder(name: &str) {
    let dir = fixtures().join("clip").join(name);
    let dev = Device::Cpu;
    let (model, _) = load_text_encoder(&dir.join("text_encoder"), &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let ids = &f["input_ids"];
    let l = ids.dim(1).unwrap();
    let o = model
        .forward(
            &CandleBackend::new(&dev),
            &ids.to_dtype(DType::U32).unwrap(),
            l,
            0,
            true,
        )
        .unwrap();
    let onnx = export_text_encoder(&model, l, 0, true, &ExportOptions::default()).unwrap();
    let (ins, outs) = export::runtime::io_specs(&onnx).unwrap();
    assert_eq!(ins[0].name, "input_ids");
    assert_eq!(outs[0].name, "last_hidden_state");
    let inputs = vec![("input_ids".to_string(), i32_data(ids))];
    let pooled = o.pooled.clone().unwrap();
    // Against candle and against transformers' own outputs.
    let mut want = vec![
        ("last_hidden_state", "candle", &o.hidden),
        ("pooler_output", "candle", &pooled),
        ("last_hidden_state", "transformers", &f["last_hidden_state"]),
        ("pooler_output", "transformers", &f["pooler_output"]),
    ];
    if let (Some(t), Some(theirs)) = (&o.text_embeds, f.get("text_embeds")) {
        want.push(("text_embeds", "candle", t));
        want.push(("text_embeds", "transformers", theirs));
    }
    assert_eq!(o.text_embeds.is_some(), f.contains_key("text_embeds"));
    for (what, err) in run_all(&onnx, name, &inputs, &want).unwrap() {
        assert!(err <= 1e-4, "{name} {what}: {err:.3e}");
    }
    // clip_skip 1, no pooled output: one output.
    let skip = export_text_encoder(&model, l, 1, false, &ExportOptions::default()).unwrap();
    for (what, err) in run_all(
        &skip,
        &format!("{name}_skip1"),
        &inputs,
        &[("last_hidden_state", "transformers", &f["clip_skip_1"])],
    )
    .unwrap()
    {
        assert!(err <= 1e-4, "{name} clip_skip {what}: {err:.3e}");
    }
    let opts = ExportOptions {
        precision: Precision::Fp16,
        ..Default::default()
    };
    let onnx16 = export_text_encoder(&model, l, 0, false, &opts).unwrap();
    for (what, err) in run_all(
        &onnx16,
        &format!("{name}_fp16"),
        &inputs,
        &[("last_hidden_state", "candle", &o.hidden)],
    )
    .unwrap()
    {
        assert!(err <= 2e-2, "{name} fp16 {what}: {err:.3e}");
    }
}

#[test]
fn text_encoder_clip_quick_lowers_to_onnx() {
    text_encoder("clip_quick");
}

#[test]
fn text_encoder_clip_gelu_proj_lowers_to_onnx() {
    text_encoder("clip_gelu_proj");
}
