//! The diffusers UNet2DConditionModel lowered through the ONNX backend with optimum's signature,
//! run in tract and ONNX Runtime, compared with diffusers' own output on the parity fixtures
//! (`scripts/fixtures_unet_condition.py`) and with candle.

mod common;

use candle_core::{Device, Tensor};
use common::{run_both, TestInput};
use export::runtime::TensorData;
use export::{export_unet2d_condition, Dim, ExportOptions, Precision};
use graphs::diffusers::{load_unet_condition, AddedCond};
use graphs::CandleBackend;
use ndarray::ArrayD;
use std::path::Path;

fn input(name: &str, t: &Tensor) -> TestInput {
    let shape = t.dims().to_vec();
    let data = TensorData::F32(
        ArrayD::from_shape_vec(shape.clone(), t.flatten_all().unwrap().to_vec1().unwrap()).unwrap(),
    );
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if i == 0 { Dim::Batch } else { Dim::Fixed(d) })
        .collect();
    TestInput {
        name: name.into(),
        data,
        dims,
    }
}

/// Exports fixture `name` at `precision`; returns (tract, ORT) max abs against diffusers'
/// output and against candle's.
fn export_parity(name: &str, precision: Precision) -> ((f64, f64), (f64, f64)) {
    export_parity_of(name, "forward.safetensors", precision)
}

fn export_parity_of(name: &str, file: &str, precision: Precision) -> ((f64, f64), (f64, f64)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../graphs/tests/fixtures/diffusers/models")
        .join(name);
    let dev = Device::Cpu;
    let (model, _) = load_unet_condition(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join(file), &dev).unwrap();
    let hw = (f["sample"].dim(2).unwrap(), f["sample"].dim(3).unwrap());
    let ehs = &f["encoder_hidden_states"];
    let opts = ExportOptions {
        precision,
        ..Default::default()
    };
    let onnx = export_unet2d_condition(&model, hw, ehs.dim(1).unwrap(), &opts).unwrap();
    let mut inputs = vec![
        input("sample", &f["sample"]),
        input("timestep", &f["timestep"]),
        input("encoder_hidden_states", ehs),
    ];
    let added = f.get("text_embeds").map(|t| AddedCond {
        text_embeds: t.clone(),
        time_ids: f["time_ids"].clone(),
    });
    if let Some(a) = &added {
        inputs.push(input("text_embeds", &a.text_embeds));
        inputs.push(input("time_ids", &a.time_ids));
    }
    let label = format!("{name}_{}", precision.name());
    let vs_diffusers = run_both(&onnx, &label, &inputs, &f["expected"]).unwrap();
    let candle = model
        .forward_hw(
            &CandleBackend::new(&dev),
            &f["sample"],
            hw,
            &f["timestep"],
            ehs,
            added.as_ref(),
        )
        .unwrap();
    let vs_candle = run_both(&onnx, &label, &inputs, &candle).unwrap();
    let (ins, outs) = export::runtime::io_specs(&onnx).unwrap();
    let names: Vec<&str> = ins.iter().map(|i| i.name.as_str()).collect();
    let want: &[&str] = if added.is_some() {
        &[
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
        ]
    } else {
        &["sample", "timestep", "encoder_hidden_states"]
    };
    assert_eq!(names, want);
    assert_eq!(outs[0].name, "out_sample");
    (vs_diffusers, vs_candle)
}

fn fp32(name: &str) {
    let ((t, o), (t2, o2)) = export_parity(name, Precision::Fp32);
    assert!(t <= 1e-4 && o <= 1e-4, "{name}: tract {t:.3e}, ORT {o:.3e}");
    assert!(
        t2 <= 1e-4 && o2 <= 1e-4,
        "{name} vs candle: tract {t2:.3e}, ORT {o2:.3e}"
    );
}

#[test]
fn cond_sd15_lowers_to_onnx() {
    fp32("cond_sd15");
}

#[test]
fn cond_linear_lowers_to_onnx() {
    fp32("cond_linear");
}

#[test]
fn cond_sdxl_lowers_to_onnx() {
    fp32("cond_sdxl");
}

#[test]
fn cond_sd15_lowers_to_onnx_fp16() {
    // f16 weights and weight matmuls, f32 activations between ops (see export's ops/mod.rs):
    // the outputs here are O(1), so a few 1e-2 is f16's rounding, not a wrong graph.
    let ((t, o), _) = export_parity("cond_sd15", Precision::Fp16);
    assert!(t <= 5e-2 && o <= 5e-2, "fp16: tract {t:.3e}, ORT {o:.3e}");
}

#[test]
fn cond_misc_and_nomid_lower_to_onnx() {
    fp32("cond_misc");
    fp32("cond_nomid");
}

#[test]
fn non_square_cond_nomid_lowers_to_onnx() {
    let ((t, o), (t2, o2)) =
        export_parity_of("cond_nomid", "forward_wide.safetensors", Precision::Fp32);
    assert!(
        t.max(o).max(t2).max(o2) <= 1e-4,
        "8x12: tract {t:.3e} / {t2:.3e}, ORT {o:.3e} / {o2:.3e}"
    );
}

#[test]
fn dynamic_batch_runs_at_batch_one() {
    // The graph exported above, run on the first item alone: the batch is symbolic everywhere
    // (heads are a separate axis, never folded into it).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../graphs/tests/fixtures/diffusers/models/cond_sdxl");
    let dev = Device::Cpu;
    let (model, _) = load_unet_condition(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let one = |k: &str| f[k].narrow(0, 0, 1).unwrap();
    let onnx = export_unet2d_condition(&model, (8, 8), 5, &ExportOptions::default()).unwrap();
    let inputs: Vec<TestInput> = [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    .iter()
    .map(|k| input(k, &one(k)))
    .collect();
    let (t, o) = run_both(&onnx, "cond_sdxl_batch1", &inputs, &one("expected")).unwrap();
    assert!(
        t <= 1e-4 && o <= 1e-4,
        "batch 1: tract {t:.3e}, ORT {o:.3e}"
    );
}
