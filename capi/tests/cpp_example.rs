//! The C API end to end: examples/cpp/capi/main.cpp compiled with the C++ compiler on PATH
//! against include/distill.h and the cdylib cargo built, run on a tiny trained checkpoint and
//! on the generator exported from it; its raw output must match the Rust reference (candle)
//! within 1e-4. Plus the API's error handling, called directly through the rlib.

use candle_core::{Device, Tensor};
use distill::train::teacher::{self, TeacherConfig};
use distill::train::RunDir;
use distill_capi::*;
use graphs::{GeneratorSpec, SamplerKind, UNetConfig};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// 16 synthetic 16x16 "digits" (a bar at row k + 3 for class k).
fn toy_data() -> distill::data::Dataset {
    let (n, h, w) = (16, 16, 16);
    let mut images = vec![-1f32; n * h * w];
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    for (i, &l) in labels.iter().enumerate() {
        for x in 2..14 {
            images[i * h * w + (l as usize + 3) * w + x] = 1.0;
        }
    }
    distill::data::Dataset {
        images,
        labels,
        channels: 1,
        height: h,
        width: w,
        num_classes: 10,
        class_names: (0..10).map(|i| i.to_string()).collect(),
        source: "toy".into(),
    }
}

/// A tiny teacher trained for 3 steps, and its 2-step Euler generator as ONNX.
fn fixture() -> &'static (tempfile::TempDir, PathBuf, PathBuf, GeneratorSpec) {
    static F: OnceLock<(tempfile::TempDir, PathBuf, PathBuf, GeneratorSpec)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(&dir.path().join("run")).unwrap();
        let mut cfg = TeacherConfig {
            model: UNetConfig::tiny(),
            train_steps: 3,
            batch_size: 8,
            log_every: 1,
            checkpoint_every: 3,
            sample_every: 0,
            sample_steps: 2,
            ..Default::default()
        };
        cfg.optim.warmup_steps = 1;
        teacher::train(&cfg, &toy_data(), &run, false, false, &Device::Cpu).unwrap();
        let ckpt = run.checkpoint();
        let (den, _) = distill::checkpoint::load(&ckpt, &Device::Cpu).unwrap();
        let spec = GeneratorSpec {
            sampler: SamplerKind::Euler,
            steps: 2,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: 1.0,
        };
        let onnx = dir.path().join("generator.onnx");
        let model =
            export::export_generator(&den, &spec, &export::ExportOptions::default()).unwrap();
        export::write_model(&model, &onnx).unwrap();
        (dir, ckpt, onnx, spec)
    })
}

/// Candle's images for `labels` from the seeded noise `distill sample --seed` uses.
fn reference(ckpt: &Path, spec: &GeneratorSpec, labels: &[u32], seed: u64) -> Vec<f32> {
    let dev = Device::Cpu;
    let (den, _) = distill::checkpoint::load(ckpt, &dev).unwrap();
    let n = labels.len();
    let inputs = distill::sample::seeded_noise(&den, spec, n, seed, &dev).unwrap();
    let lt = Tensor::from_vec(labels.to_vec(), n, &dev).unwrap();
    distill::sample::generate(&den, spec, &inputs, &lt, n, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The cdylib cargo built for this test run (target/<profile>/ or its deps/).
fn cdylib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for d in [deps, deps.parent().unwrap()] {
        if d.join("libdistill_capi.so").exists() {
            return d.to_path_buf();
        }
    }
    panic!("libdistill_capi.so not found next to {}", exe.display());
}

fn compiler() -> String {
    for c in ["c++", "g++", "clang++"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("no C++ compiler on PATH (c++, g++ or clang++): install one, e.g. `apt install g++`");
}

/// Builds examples/cpp/capi once per test process.
fn demo() -> &'static PathBuf {
    static EXE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &EXE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("distill_capi_demo");
        let lib = cdylib_dir();
        let ws = workspace();
        let out = Command::new(compiler())
            .args(["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&exe)
            .arg(ws.join("examples/cpp/capi/main.cpp"))
            .arg(format!("-I{}", ws.join("capi/include").display()))
            .arg(format!("-L{}", lib.display()))
            .arg("-ldistill_capi")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compiling examples/cpp/capi/main.cpp failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, exe)
    })
    .1
}

fn run_demo(model: &Path, out_prefix: &Path, seed: u64, labels: &[u32]) -> String {
    let mut c = Command::new(demo());
    c.arg(model)
        .arg(out_prefix)
        .args(["--seed", &seed.to_string()]);
    c.args(labels.iter().map(|l| l.to_string()));
    let o = c.env("RAYON_NUM_THREADS", "2").output().unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "demo failed on {}:\n{text}",
        model.display()
    );
    text
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

#[test]
fn cpp_demo_matches_the_rust_reference_on_a_checkpoint_and_an_onnx() {
    let (dir, ckpt, onnx, spec) = fixture();
    let labels = [1u32, 7, 3];
    let seed = 5;
    // The checkpoint runs its own sampler (Heun, 2 steps); the ONNX the Euler spec it unrolled.
    let meta = distill::checkpoint::load_meta(ckpt).unwrap();
    for (model, spec, backend) in [
        (ckpt.as_path(), &meta.generator, "candle"),
        (onnx.as_path(), spec, "onnxruntime"),
    ] {
        let prefix = dir.path().join(format!("demo_{backend}"));
        let text = run_demo(model, &prefix, seed, &labels);
        assert!(
            text.contains(&format!("({backend}), 1x16x16, 10 classes")),
            "{text}"
        );
        let got = read_f32(&prefix.with_extension("f32"));
        let want = reference(ckpt, spec, &labels, seed);
        let err = max_abs(&got, &want);
        eprintln!("{backend}: C++ demo vs candle max abs {err:.3e}");
        assert!(err <= 1e-4, "{backend}: max abs {err:.3e}");
        assert!(got.iter().all(|v| (-1.0..=1.0).contains(v)));
        // The zlib-free PNG decodes, with the images side by side.
        let png = std::fs::File::open(prefix.with_extension("png")).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut buf).unwrap();
        assert_eq!((frame.width, frame.height), (48, 16));
        assert_eq!(frame.color_type, png::ColorType::Grayscale);
        let px = |k: usize, y: usize, x: usize| buf[y * 48 + k * 16 + x];
        let want_px = |k: usize, y: usize, x: usize| {
            ((want[(k * 16 + y) * 16 + x].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
        };
        for (k, y, x) in [(0, 0, 0), (1, 8, 5), (2, 15, 15)] {
            assert!(
                px(k, y, x).abs_diff(want_px(k, y, x)) <= 1,
                "pixel {k},{y},{x}"
            );
        }
    }
    // A bad label is reported by the demo with the library's message.
    let o = Command::new(demo())
        .arg(ckpt)
        .arg(dir.path().join("bad"))
        .arg("12")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("class label 12 is out of range"));
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(distill_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn c_api_checks_its_arguments() {
    let (_dir, ckpt, onnx, _) = fixture();
    unsafe {
        let mut m: *mut DistillModel = std::ptr::null_mut();
        assert_eq!(
            distill_model_load(std::ptr::null(), &mut m),
            DistillStatus::NullArgument
        );
        assert!(last_error().contains("path is NULL"));
        let missing = CString::new("/nonexistent/model.onnx").unwrap();
        assert_eq!(
            distill_model_load(missing.as_ptr(), &mut m),
            DistillStatus::Load
        );
        assert!(
            m.is_null() && last_error().contains("/nonexistent/model.onnx"),
            "{}",
            last_error()
        );
        let plan = CString::new("/x/generator.plan").unwrap();
        assert_eq!(
            distill_model_load(plan.as_ptr(), &mut m),
            DistillStatus::Load
        );
        assert!(last_error().contains("TensorRT plans"), "{}", last_error());

        for path in [ckpt.as_path(), onnx.as_path()] {
            let p = CString::new(path.to_str().unwrap()).unwrap();
            assert_eq!(
                distill_model_load(p.as_ptr(), &mut m),
                DistillStatus::Ok,
                "{}",
                last_error()
            );
            assert_eq!(last_error(), "");
            let mut info = std::mem::MaybeUninit::<DistillModelInfo>::uninit();
            assert_eq!(distill_model_info(m, info.as_mut_ptr()), DistillStatus::Ok);
            let info = info.assume_init();
            assert_eq!(
                (info.channels, info.height, info.width, info.num_classes),
                (1, 16, 16, 10)
            );
            assert_eq!(info.num_fresh_noise, 0);
            assert_eq!(distill_image_len(m, 2), 512);
            assert_eq!(distill_noise_len(m, 2), 512);
            let labels = [3i32, 4];
            let mut out = vec![0f32; 512];
            // Buffers too small, NULLs, n = 0, labels out of range.
            assert_eq!(
                distill_generate_seeded(m, labels.as_ptr(), 2, 0, out.as_mut_ptr(), 511),
                DistillStatus::BufferTooSmall
            );
            assert!(
                last_error().contains("511 floats, 512 needed"),
                "{}",
                last_error()
            );
            assert_eq!(
                distill_generate_seeded(m, std::ptr::null(), 2, 0, out.as_mut_ptr(), 512),
                DistillStatus::NullArgument
            );
            assert_eq!(
                distill_generate_seeded(m, labels.as_ptr(), 0, 0, out.as_mut_ptr(), 512),
                DistillStatus::InvalidArgument
            );
            let bad = [3i32, 10];
            assert_eq!(
                distill_generate_seeded(m, bad.as_ptr(), 2, 0, out.as_mut_ptr(), 512),
                DistillStatus::InvalidArgument
            );
            assert!(
                last_error().contains("class label 10 is out of range"),
                "{}",
                last_error()
            );
            // Given noise = seeded noise gives the same images.
            let mut noise = vec![0f32; 512];
            assert_eq!(
                distill_seeded_noise(m, 2, 9, noise.as_mut_ptr(), 512),
                DistillStatus::Ok
            );
            assert_eq!(
                distill_generate(
                    m,
                    labels.as_ptr(),
                    2,
                    noise.as_ptr(),
                    511,
                    out.as_mut_ptr(),
                    512
                ),
                DistillStatus::BufferTooSmall
            );
            assert_eq!(
                distill_generate(
                    m,
                    labels.as_ptr(),
                    2,
                    noise.as_ptr(),
                    512,
                    out.as_mut_ptr(),
                    512
                ),
                DistillStatus::Ok
            );
            let mut seeded = vec![0f32; 512];
            assert_eq!(
                distill_generate_seeded(m, labels.as_ptr(), 2, 9, seeded.as_mut_ptr(), 512),
                DistillStatus::Ok
            );
            assert_eq!(out, seeded);
            distill_model_free(m);
        }
        distill_model_free(std::ptr::null_mut());
        assert_eq!(
            distill_model_info(std::ptr::null(), std::ptr::null_mut()),
            DistillStatus::NullArgument
        );
        assert_eq!(distill_image_len(std::ptr::null(), 3), 0);
        assert!(!CStr::from_ptr(distill_version()).to_bytes().is_empty());
    }
}
