//! A tiny SDXL-like pipeline folder (graphs/tests/fixtures/diffusers/teachers/sdxl_tiny, written
//! by diffusers: scripts/fixtures_sdxl_pipeline.py) through the release binary: `distill sample
//! DIR --prompts FILE` against diffusers' own StableDiffusionXLPipeline call on the same latents
//! (sdxl_tiny_call), `distill export` (generator: noise + prompt_embeds + pooled_prompt_embeds +
//! time_ids -> images; text_encoder.onnx: both encoders in one graph) run in tract on diffusers'
//! inputs, `distill validate` of both in tract and ONNX Runtime with the TensorRT lint, and a few
//! iterations of `distill train tdm --teacher DIR --prompts FILE` whose checkpoint samples and
//! exports.

use candle_core::{Device, Tensor};
use export::runtime::{Runner, TensorData, TractRunner};
use graphs::diffusers::TextToImage;
use graphs::{CandleBackend, Cond};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sdxl_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/fixtures/diffusers/teachers/sdxl_tiny")
}

fn distill(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .env("DISTILL_THREADS", "2")
        .args(args)
        .output()
        .expect("run distill");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

fn data(t: &Tensor) -> TensorData {
    TensorData::F32(
        ndarray::ArrayD::from_shape_vec(
            t.dims().to_vec(),
            t.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn sdxl_sample_export_and_validate_match_diffusers() {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let call = sdxl_tiny().with_file_name("sdxl_tiny_call");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(call.join("prompts.json")).unwrap()).unwrap();
    let f = candle_core::safetensors::load(call.join("expected.safetensors"), &dev).unwrap();
    // The non-empty prompts (a prompt file has no empty lines) with their rows of diffusers' call.
    let rows: Vec<(usize, String)> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.as_str().unwrap().to_string()))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let idx = Tensor::new(rows.iter().map(|r| r.0 as u32).collect::<Vec<_>>(), &dev).unwrap();
    let prompts = tmp.path().join("prompts.txt");
    let text: String = rows.iter().map(|r| format!("{}\n", r.1)).collect();
    std::fs::write(&prompts, text).unwrap();
    let noise = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "noise".to_string(),
            f["noise"].index_select(&idx, 0).unwrap(),
        )]),
        &noise,
    )
    .unwrap();
    let dir = sdxl_tiny();
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("grid.png");
    let steps = meta["steps"].as_u64().unwrap().to_string();
    let g = meta["guidance_scale"].as_f64().unwrap().to_string();
    let (ok, log) = distill(&[
        "sample",
        d,
        "--prompts",
        prompts.to_str().unwrap(),
        "--noise",
        noise.to_str().unwrap(),
        "--per-class",
        "1",
        "--sample-steps",
        &steps,
        "--cfg-scale",
        &g,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    assert!(out.is_file());
    let ours = candle_core::safetensors::load(tmp.path().join("grid.safetensors"), &dev).unwrap();
    // Ours in [-1, 1]; diffusers' np output NHWC in [0, 1].
    let ours = ours["images"].affine(0.5, 0.5).unwrap();
    let want = f["images"]
        .index_select(&idx, 0)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let err = max_abs_diff(&flat(&ours), &flat(&want));
    eprintln!("distill sample --prompts vs StableDiffusionXLPipeline: images max abs {err:.2e}");
    assert!(err <= 1e-3, "{err:.3e}");

    // Export: the generator + text encoders, and the bare UNet with optimum's SDXL inputs.
    let e = tmp.path().join("e");
    let es = e.to_str().unwrap();
    let (ok, log) = distill(&[
        "export",
        d,
        "-o",
        es,
        "--sample-steps",
        &steps,
        "--cfg-scale",
        &g,
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("input_ids_2"), "{log}");
    let (ok, log) = distill(&["export", d, "-o", es, "--what", "denoiser"]);
    assert!(ok && e.join("denoiser.onnx").is_file(), "{log}");
    let (ins, _) =
        export::runtime::io_specs(&export::runtime::load_model(&e.join("denoiser.onnx")).unwrap())
            .unwrap();
    let names: Vec<&str> = ins.iter().map(|i| i.name.as_str()).collect();
    assert!(
        names.contains(&"text_embeds") && names.contains(&"time_ids"),
        "{names:?}"
    );
    // The generator in tract on diffusers' own inputs (its encode_prompt outputs and time ids)
    // gives diffusers' images.
    let n = f["noise"].dim(0).unwrap();
    let mut r = TractRunner::from_path(&e.join("generator.onnx")).unwrap();
    let y = r
        .run(&[
            ("noise".to_string(), data(&f["noise"])),
            ("prompt_embeds".to_string(), data(&f["prompt_embeds"])),
            (
                "pooled_prompt_embeds".to_string(),
                data(&f["pooled_prompt_embeds"]),
            ),
            (
                "time_ids".to_string(),
                data(&f["add_time_ids"].repeat((n, 1)).unwrap()),
            ),
        ])
        .unwrap();
    let got: Vec<f32> = y[0].1.iter().copied().collect();
    let err = max_abs_diff(&got, &flat(&f["images"].permute((0, 3, 1, 2)).unwrap()));
    eprintln!("generator.onnx in tract vs StableDiffusionXLPipeline: images max abs {err:.2e}");
    assert!(err <= 1e-3, "{err:.3e}");
    // The text encoders in tract on our tokenizers' ids give diffusers' encode_prompt outputs.
    let t2i = TextToImage::load(&dir, &dev).unwrap();
    let ps: Vec<&str> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let ids = |tok: &graphs::transformers::ClipTokenizer| {
        let v = tok.encode_batch(&ps).unwrap();
        TensorData::I32(
            ndarray::ArrayD::from_shape_vec(
                vec![ps.len(), tok.max_length],
                v.iter().map(|&i| i as i32).collect(),
            )
            .unwrap(),
        )
    };
    let mut r = TractRunner::from_path(&e.join("text_encoder.onnx")).unwrap();
    let y = r
        .run(&[
            ("input_ids".to_string(), ids(&t2i.prompts.tokenizer)),
            (
                "input_ids_2".to_string(),
                ids(&t2i.sdxl.as_ref().unwrap().prompts_2.tokenizer),
            ),
        ])
        .unwrap();
    for (name, key) in [
        ("prompt_embeds", "prompt_embeds"),
        ("pooled_prompt_embeds", "pooled_prompt_embeds"),
    ] {
        let (_, t) = y.iter().find(|(n, _)| n == name).unwrap();
        let got: Vec<f32> = t.iter().copied().collect();
        let err = max_abs_diff(&got, &flat(&f[key]));
        eprintln!("text_encoder.onnx {name} in tract vs encode_prompt: max abs {err:.2e}");
        assert!(err <= 1e-4, "{name}: {err:.3e}");
    }

    // distill validate: tract and ONNX Runtime against candle on seeded inputs; the TensorRT
    // lint on both files.
    for file in ["generator.onnx", "text_encoder.onnx"] {
        let (ok, log) = distill(&[
            "validate",
            e.join(file).to_str().unwrap(),
            "--reference",
            d,
            "--cases",
            "3",
            "--batches",
            "1,2",
            "--lint",
        ]);
        eprintln!("{log}");
        assert!(ok, "validate {file}: {log}");
        assert!(
            log.contains("tract") && log.contains("onnxruntime"),
            "{log}"
        );
    }
}

#[test]
fn tdm_on_sdxl_trains_samples_and_exports() {
    use distill::jobs::TdmJob;
    use distill::train::tdm::TdmConfig;
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle on a blue square\ndigits\n").unwrap();
    let mut c = TdmConfig::default();
    c.common.teacher = sdxl_tiny();
    c.common.cfg_scale = 3.0;
    let r = &mut c.common.run;
    (r.train_steps, r.batch_size, r.seed) = (4, 2, 7);
    (r.log_every, r.sample_every, r.checkpoint_every) = (2, 0, 4);
    r.ema_decay = 0.0;
    let teacher_unet = TextToImage::load(&sdxl_tiny(), &dev).unwrap().den;
    let ckpt = TdmJob {
        config: c,
        prompts: Some(prompts.clone()),
        out: tmp.path().join("run"),
        ..Default::default()
    }
    .run(&dev)
    .unwrap();
    // The student moved off the teacher's weights (the pooled + time-id condition reached it).
    let (student, meta) = distill::checkpoint::load(&ckpt, &dev).unwrap();
    let moved = graphs::params::collect(&student)
        .iter()
        .zip(graphs::params::collect(&teacher_unet))
        .filter(|(a, b)| {
            (&a.t - &b.t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .count();
    assert!(moved > 0, "no student weight changed");
    let add_moved = graphs::params::collect(&student)
        .iter()
        .zip(graphs::params::collect(&teacher_unet))
        .any(|(a, b)| {
            a.name.starts_with("add_embedding")
                && (&a.t - &b.t)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
        });
    assert!(
        add_moved,
        "the pooled-embedding projection (add_embedding) got no gradient"
    );
    // sample and export of the student checkpoint: the generator in tract = the candle rollout.
    let png = tmp.path().join("s.png");
    let (ok, log) = distill(&[
        "sample",
        ckpt.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--per-class",
        "1",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok && png.is_file(), "{log}");
    let e = tmp.path().join("onnx");
    let (ok, log) = distill(&["export", ckpt.to_str().unwrap(), "-o", e.to_str().unwrap()]);
    assert!(ok && e.join("text_encoder.onnx").is_file(), "{log}");
    let pipe = TextToImage::load(&sdxl_tiny(), &dev).unwrap();
    let b = CandleBackend::new(&dev);
    let ps = ["a red circle on a blue square", "digits"];
    let cond = pipe.condition(&b, &ps).unwrap();
    let (ch, side) = pipe.latent_shape();
    let noise = Tensor::randn(0f32, 1.0, (2, ch, side, side), &dev).unwrap();
    let last =
        graphs::sampler::student_x0(&b, &student, &noise, cond.net(), &meta.generator.sigmas)
            .unwrap();
    let want = pipe.decode(&b, &last).unwrap();
    let Cond::Text { cond: tc, .. } = &cond else {
        unreachable!()
    };
    let a = tc.added.as_ref().unwrap();
    let mut r = TractRunner::from_path(&e.join("generator.onnx")).unwrap();
    let y = r
        .run(&[
            ("noise".to_string(), data(&noise)),
            ("prompt_embeds".to_string(), data(&tc.prompt_embeds)),
            ("pooled_prompt_embeds".to_string(), data(&a.text_embeds)),
            ("time_ids".to_string(), data(&a.time_ids)),
        ])
        .unwrap();
    let got: Vec<f32> = y[0].1.iter().copied().collect();
    let err = max_abs_diff(&got, &flat(&want));
    eprintln!("SDXL TDM student generator.onnx in tract vs candle: max abs {err:.2e}");
    assert!(err <= 1e-3, "{err:.3e}");
}
