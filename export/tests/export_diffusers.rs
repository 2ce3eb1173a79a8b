//! The diffusers UNet2DModel lowered through the ONNX backend, run in tract and ONNX Runtime,
//! compared with diffusers' own output on the parity fixtures.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{run_both, TestInput};
use export::runtime::TensorData;
use export::{export_unet2d, ExportOptions};
use graphs::diffusers::load_unet;
use graphs::CandleBackend;
use ndarray::ArrayD;
use std::path::Path;

fn input(name: &str, t: &Tensor) -> TestInput {
    let shape = t.dims().to_vec();
    let data = if t.dtype() == DType::F32 {
        TensorData::F32(
            ArrayD::from_shape_vec(shape.clone(), t.flatten_all().unwrap().to_vec1().unwrap())
                .unwrap(),
        )
    } else {
        TensorData::I32(
            ArrayD::from_shape_vec(
                shape.clone(),
                t.to_dtype(DType::I64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<i64>()
                    .unwrap()
                    .into_iter()
                    .map(|v| v as i32)
                    .collect(),
            )
            .unwrap(),
        )
    };
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if i == 0 {
                export::Dim::Batch
            } else {
                export::Dim::Fixed(d)
            }
        })
        .collect();
    TestInput {
        name: name.into(),
        data,
        dims,
    }
}

fn export_parity(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../graphs/tests/fixtures/diffusers/models")
        .join(name);
    let dev = Device::Cpu;
    let (model, _) = load_unet(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let side = f["sample"].dim(3).unwrap();
    let onnx = export_unet2d(&model, side, &ExportOptions::default()).unwrap();
    let mut inputs = vec![
        input("sample", &f["sample"]),
        input("timestep", &f["timestep"]),
    ];
    if let Some(l) = f.get("class_labels") {
        inputs.push(input("class_labels", l));
    }
    // Against diffusers' output (the fixture), not only against candle.
    let (tract, ort) = run_both(&onnx, name, &inputs, &f["expected"]).unwrap();
    assert!(
        tract <= 1e-4 && ort <= 1e-4,
        "{name}: tract {tract:.3e}, ORT {ort:.3e}"
    );
    let labels = f.get("class_labels").map(|l| {
        if l.dtype() == DType::F32 {
            l.clone()
        } else {
            l.to_dtype(DType::U32).unwrap()
        }
    });
    let candle = model
        .forward(
            &CandleBackend::new(&dev),
            &f["sample"],
            side,
            &f["timestep"],
            labels.as_ref(),
        )
        .unwrap();
    let (t2, o2) = run_both(&onnx, name, &inputs, &candle).unwrap();
    assert!(
        t2 <= 1e-4 && o2 <= 1e-4,
        "{name} vs candle: tract {t2:.3e}, ORT {o2:.3e}"
    );
    let (ins, outs) = export::runtime::io_specs(&onnx).unwrap();
    let names: Vec<&str> = ins.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(&names[..2], ["sample", "timestep"]);
    assert_eq!(outs[0].name, "out_sample");
}

#[test]
fn uncond_lowers_to_onnx() {
    export_parity("uncond");
}

#[test]
fn class_scale_shift_lowers_to_onnx() {
    export_parity("class_scale_shift");
}

#[test]
fn timestep_class_lowers_to_onnx() {
    export_parity("timestep_class");
}

#[test]
fn identity_nomid_lowers_to_onnx() {
    export_parity("identity_nomid");
}
