//! The tiny StableDiffusionPipeline folder (graphs/tests/fixtures/diffusers/teachers/sd_tiny) as
//! one ONNX generator (noise + prompt_embeds -> guided DDIM steps -> VAE decoder -> images) and
//! its text encoder as a second graph, run in tract and ONNX Runtime against candle and against
//! diffusers' own pipeline call (sd_tiny_call).

mod common;

use candle_core::{DType, Device, Tensor};
use common::onnx_check;
use export::runtime::{OrtRunner, Runner, TensorData, TractRunner};
use export::{export_text_encoder, export_text_to_image, ExportOptions};
use graphs::diffusers::TextToImage;
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

fn max_err(y: &ArrayD<f32>, want: &Tensor) -> f64 {
    assert_eq!(y.shape(), want.dims());
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    y.iter()
        .zip(&w)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max)
}

fn run(
    model: &export::proto::ModelProto,
    inputs: &[(String, TensorData)],
) -> Vec<(String, ArrayD<f32>)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    export::write_model(model, &path).unwrap();
    onnx_check(&path).unwrap();
    let mut outs = Vec::new();
    let runners: Vec<Box<dyn Runner>> = vec![
        Box::new(TractRunner::from_path(&path).unwrap()),
        Box::new(OrtRunner::from_path(&path).unwrap()),
    ];
    for mut r in runners {
        let o = r.run(inputs).unwrap();
        let (_, y) = o.into_iter().next().unwrap();
        outs.push((r.name().to_string(), y));
    }
    outs
}

#[test]
fn text_to_image_generator_and_text_encoder_run_in_tract_and_onnx_runtime() {
    let dev = Device::Cpu;
    let t2i = TextToImage::load(&fixtures().join("teachers/sd_tiny"), &dev).unwrap();
    let call = fixtures().join("teachers/sd_tiny_call");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(call.join("prompts.json")).unwrap()).unwrap();
    let f = candle_core::safetensors::load(call.join("expected.safetensors"), &dev).unwrap();
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let g = meta["guidance_scale"].as_f64().unwrap();
    let kind = t2i.default_sampler();
    let onnx = export_text_to_image(&t2i, kind, steps, g, &ExportOptions::default()).unwrap();
    let b = CandleBackend::new(&dev);
    let prompts: Vec<&str> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let ours = t2i
        .generate(&b, &prompts, &f["noise"], kind, steps, g)
        .unwrap();
    let want = f["images"].permute((0, 3, 1, 2)).unwrap();
    let inputs = vec![
        ("noise".to_string(), f32_data(&f["noise"])),
        ("prompt_embeds".to_string(), f32_data(&f["prompt_embeds"])),
    ];
    for (rt, y) in run(&onnx, &inputs) {
        let (ec, ed) = (max_err(&y, &ours), max_err(&y, &want));
        eprintln!("text_to_image_generator in {rt}: vs candle {ec:.2e}, vs diffusers {ed:.2e}");
        assert!(ec <= 1e-3 && ed <= 1e-3, "{rt}: {ec} {ed}");
    }

    // The text encoder: input_ids -> the prompt embeddings diffusers' pipeline made.
    let seq = t2i.prompts.tokenizer.max_length;
    let te =
        export_text_encoder(&t2i.prompts.model, seq, 0, false, &ExportOptions::default()).unwrap();
    let ids = t2i.prompts.tokenizer.encode_tensor(&prompts, &dev).unwrap();
    let v: Vec<i32> = ids
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as i32)
        .collect();
    let inputs = vec![(
        "input_ids".to_string(),
        TensorData::I32(ArrayD::from_shape_vec(ids.dims().to_vec(), v).unwrap()),
    )];
    for (rt, y) in run(&te, &inputs) {
        let e = max_err(&y, &f["prompt_embeds"]);
        eprintln!("text encoder in {rt}: vs diffusers' prompt_embeds {e:.2e}");
        assert!(e <= 1e-4, "{rt}: {e}");
    }
}
