//! Property tests: every reader of untrusted bytes (IDX, CIFAR, image folder, safetensors /
//! checkpoint, TOML config, ONNX metadata) gets many seeded random mutations of a valid input
//! and must return Ok or an error, never panic. `DISTILL_FUZZ_CASES=N` scales the cases per
//! reader (default 1500; the README's longer run uses more).

use distill::checkpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn cases(default: usize) -> usize {
    std::env::var("DISTILL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A random mutation: bit flips, byte overwrites, truncation, insertion, splices of
/// interesting values (0, 0xff, lengths), or a duplicated range.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        if b.is_empty() {
            b.push(rng.gen());
            continue;
        }
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..7) {
            0 => b[i] ^= 1 << rng.gen_range(0..8),
            1 => b[i] = rng.gen(),
            2 => b.truncate(i),
            3 => {
                let n = rng.gen_range(1..16);
                let ins: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                b.splice(i..i, ins);
            }
            4 => {
                let v: [u8; 4] = *[
                    [0, 0, 0, 0],
                    [0xff; 4],
                    [0x7f, 0xff, 0xff, 0xff],
                    [0, 0, 1, 0],
                ]
                .get(rng.gen_range(0..4))
                .unwrap();
                for (k, x) in v.iter().enumerate() {
                    if let Some(y) = b.get_mut(i + k) {
                        *y = *x;
                    }
                }
            }
            5 => {
                let j = rng.gen_range(i..b.len().min(i + 64) + 1).min(b.len());
                let dup = b[i..j].to_vec();
                b.splice(i..i, dup);
            }
            _ => b.truncate(rng.gen_range(0..=b.len())),
        }
    }
    b
}

/// Runs `f` on `n` mutations of `seed_input`; returns how many panicked (with the first input).
fn fuzz(name: &str, seed_input: &[u8], n: usize, seed: u64, mut f: impl FnMut(&[u8])) {
    let mut rng = StdRng::seed_from_u64(seed);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics = Vec::new();
    for case in 0..n {
        let input = if case % 50 == 0 {
            (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect()
        } else {
            mutate(&mut rng, seed_input)
        };
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            panics.push(case);
        }
    }
    std::panic::set_hook(hook);
    eprintln!("{name}: {n} cases, {} panics", panics.len());
    assert!(
        panics.is_empty(),
        "{name}: panics at cases {panics:?} (seed {seed})"
    );
}

fn idx_files(n: u32, side: u32) -> (Vec<u8>, Vec<u8>) {
    let mut img = vec![0, 0, 8, 3];
    for v in [n, side, side] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    img.extend((0..n * side * side).map(|i| (i % 251) as u8));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend((0..n).map(|i| (i % 10) as u8));
    (img, lab)
}

#[test]
fn idx_reader_never_panics() {
    let (img, lab) = idx_files(6, 8);
    let p = Path::new("x-images-idx3-ubyte");
    let n = cases(1500);
    fuzz("idx images", &img, n, 1, |b| {
        let _ = distill::data::mnist::from_idx_bytes(b, p, &lab, p, "fuzz".into())
            .and_then(|d| d.to_resolution(16));
    });
    fuzz("idx labels", &lab, n, 2, |b| {
        let _ = distill::data::mnist::from_idx_bytes(&img, p, b, p, "fuzz".into());
    });
    // Through files, gzip included.
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &img).unwrap();
    let gz = gz.finish().unwrap();
    std::fs::write(dir.path().join("x-labels-idx1-ubyte"), &lab).unwrap();
    let path = dir.path().join("x-images-idx3-ubyte.gz");
    fuzz("idx gzip file", &gz, n / 5, 3, |b| {
        std::fs::write(&path, b).unwrap();
        let _ = distill::data::load(Some(&path));
    });
}

#[test]
fn cifar_reader_never_panics() {
    let mut rec = Vec::new();
    for k in 0..3u8 {
        rec.push(k);
        rec.extend((0..3072).map(|i| (i % 256) as u8));
    }
    fuzz("cifar batch", &rec, cases(1500), 4, |b| {
        let (mut px, mut lab) = (Vec::new(), Vec::new());
        let _ =
            distill::data::cifar::parse_batch(b, Path::new("data_batch_1.bin"), &mut px, &mut lab);
    });
}

#[test]
fn image_folder_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("a");
    std::fs::create_dir_all(&class).unwrap();
    let good = class.join("good.png");
    {
        let f = std::fs::File::create(&good).unwrap();
        let mut e = png::Encoder::new(std::io::BufWriter::new(f), 12, 10);
        e.set_color(png::ColorType::Grayscale);
        e.set_depth(png::BitDepth::Eight);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&(0..120).map(|i| i as u8).collect::<Vec<_>>())
            .unwrap();
    }
    let png_bytes = std::fs::read(&good).unwrap();
    let bad = class.join("mutated.png");
    fuzz("image folder", &png_bytes, cases(1500) / 5, 5, |b| {
        std::fs::write(&bad, b).unwrap();
        let _ = distill::data::load_folder(dir.path(), Some(16));
        let _ = distill::data::load_folder(dir.path(), None);
    });
}

fn tiny_checkpoint(dir: &Path) {
    use candle_nn::{VarBuilder, VarMap};
    let cfg =
        graphs::ModelConfig::ours(graphs::UNetConfig::tiny(), graphs::Parameterisation::edm());
    let vm = VarMap::new();
    let den = graphs::Denoiser::new(
        VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu),
        &cfg,
    )
    .unwrap();
    let weights: HashMap<String, candle_core::Tensor> = graphs::params::collect(&den)
        .into_iter()
        .map(|p| (p.name, p.t))
        .collect();
    let spec = graphs::GeneratorSpec {
        sampler: graphs::SamplerKind::Heun,
        steps: 2,
        sigmas: vec![],
        fresh_noise: false,
        cfg_scale: 1.0,
    };
    let meta = checkpoint::CheckpointMeta::new(checkpoint::Role::Teacher, cfg, spec, 1);
    checkpoint::save(dir, &meta, &weights).unwrap();
}

#[test]
fn safetensors_and_checkpoint_readers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    tiny_checkpoint(&ck);
    let dev = candle_core::Device::Cpu;
    let weights = std::fs::read(ck.join(checkpoint::WEIGHTS_FILE)).unwrap();
    let config = std::fs::read(ck.join(checkpoint::CONFIG_FILE)).unwrap();
    // Header region mostly: that is where the structure lives.
    let head = weights[..weights.len().min(4096)].to_vec();
    let n = cases(1500);
    fuzz("safetensors bytes", &head, n, 6, |b| {
        let _ = checkpoint::tensors_from_bytes(b, Path::new("model.safetensors"), &dev);
    });
    let w = ck.join(checkpoint::WEIGHTS_FILE);
    fuzz("checkpoint weights", &weights, n / 10, 7, |b| {
        std::fs::write(&w, b).unwrap();
        let _ = checkpoint::load(&ck, &dev);
    });
    std::fs::write(&w, &weights).unwrap();
    let c = ck.join(checkpoint::CONFIG_FILE);
    fuzz("checkpoint config.json", &config, n / 5, 8, |b| {
        std::fs::write(&c, b).unwrap();
        let _ = checkpoint::load(&ck, &dev);
    });
}

#[test]
fn toml_config_reader_never_panics() {
    let cfg = distill::train::teacher::TeacherConfig::default();
    let text = toml::to_string(&cfg).unwrap();
    fuzz("teacher TOML", text.as_bytes(), cases(1500), 9, |b| {
        let s = String::from_utf8_lossy(b);
        if let Ok(c) = toml::from_str::<distill::train::teacher::TeacherConfig>(&s) {
            let _ = distill::train::checks::teacher(&c);
        }
    });
    let dmd2 = toml::to_string(&distill::train::dmd2::Dmd2Config::default()).unwrap();
    fuzz("dmd2 TOML", dmd2.as_bytes(), cases(1500) / 2, 10, |b| {
        let s = String::from_utf8_lossy(b);
        if let Ok(c) = toml::from_str::<distill::train::dmd2::Dmd2Config>(&s) {
            let _ = distill::train::checks::dmd2(&c);
        }
    });
}

#[test]
fn onnx_metadata_reader_never_panics() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    tiny_checkpoint(&ck);
    let (den, meta) = checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let model =
        export::export_generator(&den, &meta.generator, &export::ExportOptions::default()).unwrap();
    // Everything but the large initializers: the structure, metadata and shapes.
    let mut small = model.clone();
    for t in &mut small.graph.as_mut().unwrap().initializer {
        t.raw_data.truncate(64);
    }
    let bytes = small.encode_to_vec();
    let path = dir.path().join("m.onnx");
    fuzz("onnx metadata", &bytes, cases(1500) / 3, 11, |b| {
        if let Ok(m) = export::proto::ModelProto::decode(b) {
            let _ = export::metadata(&m);
            let _ = export::OnnxMetadata::from_model(&m, "fuzz");
            let _ = export::runtime::io_specs(&m);
            let _ = export::runtime::guard::model_bytes(&m);
        }
        std::fs::write(&path, b).unwrap();
        let _ = export::tensorrt::metadata_of(&path);
    });
}
