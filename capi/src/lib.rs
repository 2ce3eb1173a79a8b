//! C ABI of distill (`libdistill_capi.so`, header `capi/include/distill.h`, made by cbindgen).
//!
//! Load an exported generator (`.onnx`, run by ONNX Runtime through distill's `OrtRunner`) or a
//! checkpoint folder (run by candle, exactly as `distill sample`), ask its shapes, and generate
//! images for given class labels from given noise or from a seed into a caller-owned buffer.
//!
//! Every function returns a [`DistillStatus`]; on failure [`distill_last_error`] describes it
//! (per thread). No panic crosses the boundary (each body runs under `catch_unwind`), every
//! pointer is checked for null, and every buffer comes with its length.
//!
//! Layouts: images and noise are f32, row-major `[n, channels, height, width]`, values in
//! [-1, 1] (images) or unit Gaussian (noise). Noise for a model with `num_fresh_noise = k`
//! holds `k + 1` such blocks back to back: `noise`, then `noise_1` .. `noise_k`.

#![allow(clippy::missing_safety_doc)] // The safety contract of each function is in its doc.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use export::runtime::{OrtRunner, Runner, TensorData};
use graphs::{Denoiser, GeneratorSpec};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistillStatus {
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is out of range (label, count, UTF-8 path, ...).
    InvalidArgument = 2,
    /// The model could not be loaded (missing file, not a distill model, no ONNX Runtime).
    Load = 3,
    /// Inference failed.
    Runtime = 4,
    /// A caller buffer is shorter than needed (see `distill_image_len` / `distill_noise_len`).
    BufferTooSmall = 5,
    /// A bug: a Rust panic was caught at the boundary.
    Panic = 6,
}

/// What runs the model.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistillBackend {
    /// An exported `.onnx` generator in ONNX Runtime.
    OnnxRuntime = 0,
    /// A checkpoint folder in candle (CPU), with the checkpoint's own sampler.
    Candle = 1,
}

/// Shapes of a loaded model.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistillModelInfo {
    pub channels: u32,
    pub height: u32,
    pub width: u32,
    /// Valid labels are 0 .. num_classes - 1.
    pub num_classes: u32,
    /// Extra unit-noise blocks a generation takes after the first (students that re-noise).
    pub num_fresh_noise: u32,
    pub backend: DistillBackend,
}

enum Engine {
    Ort(OrtRunner),
    Candle {
        den: Box<Denoiser>,
        spec: GeneratorSpec,
    },
}

/// A loaded model (opaque). Calls on one model are serialised by an internal lock.
pub struct DistillModel {
    engine: Mutex<Engine>,
    info: DistillModelInfo,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// An error with its status.
struct Fail(DistillStatus, String);

impl Fail {
    fn new(s: DistillStatus, e: impl std::fmt::Display) -> Self {
        Fail(s, e.to_string())
    }
}

fn err(s: DistillStatus) -> impl FnOnce(anyhow::Error) -> Fail {
    move |e| Fail(s, format!("{e:#}"))
}

/// Runs `f` with panics caught, storing the error message for `distill_last_error`.
fn guard(f: impl FnOnce() -> std::result::Result<(), Fail>) -> DistillStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            DistillStatus::Ok
        }
        Ok(Err(Fail(s, msg))) => {
            set_error(&msg);
            s
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error (panic): {msg}"));
            DistillStatus::Panic
        }
    }
}

fn not_null<T>(p: *const T, what: &str) -> std::result::Result<(), Fail> {
    if p.is_null() {
        Err(Fail::new(
            DistillStatus::NullArgument,
            format!("{what} is NULL"),
        ))
    } else {
        Ok(())
    }
}

fn load(path: &Path) -> Result<DistillModel> {
    if path.is_dir() || path.file_name().is_some_and(|n| n == "model.safetensors") {
        let (den, meta) = distill::teacher_source::load(path, &Device::Cpu)?;
        let (c, r) = den.image_shape();
        let info = DistillModelInfo {
            channels: c as u32,
            height: r as u32,
            width: r as u32,
            num_classes: den.num_classes() as u32,
            num_fresh_noise: meta.generator.num_fresh_noise() as u32,
            backend: DistillBackend::Candle,
        };
        return Ok(DistillModel {
            engine: Mutex::new(Engine::Candle {
                den: Box::new(den),
                spec: meta.generator,
            }),
            info,
        });
    }
    if export::tensorrt::is_plan(path) {
        bail!(
            "{}: TensorRT plans are loaded with the TensorRT runtime (see examples/cpp/trt); this API takes an .onnx or a checkpoint folder",
            path.display()
        );
    }
    let model = export::runtime::load_model(path)?;
    let meta = export::OnnxMetadata::from_model(&model, &path.display().to_string())?;
    ensure!(
        meta.generator().is_some(),
        "{}: not a distill generator (metadata kind = {:?}); export one with `distill export --what generator`",
        path.display(),
        meta.kind_name()
    );
    let (ins, outs) = export::runtime::io_specs(&model)?;
    ensure!(
        outs.len() == 1 && outs[0].name == "images",
        "{}: expected one output `images`",
        path.display()
    );
    let dims = &ins
        .iter()
        .find(|i| i.name == "noise")
        .context("the model has no `noise` input")?
        .dims;
    let fixed = |i: usize| match dims.get(i) {
        Some(export::Dim::Fixed(n)) => Ok(*n as u32),
        other => bail!("noise dim {i} is {other:?}, expected a fixed size"),
    };
    let info = DistillModelInfo {
        channels: fixed(1)?,
        height: fixed(2)?,
        width: fixed(3)?,
        num_classes: meta.num_classes as u32,
        num_fresh_noise: ins.iter().filter(|i| i.name.starts_with("noise_")).count() as u32,
        backend: DistillBackend::OnnxRuntime,
    };
    Ok(DistillModel {
        engine: Mutex::new(Engine::Ort(OrtRunner::from_path(path)?)),
        info,
    })
}

impl DistillModel {
    fn image_len(&self, n: usize) -> usize {
        n * (self.info.channels * self.info.height * self.info.width) as usize
    }
    fn noise_len(&self, n: usize) -> usize {
        self.image_len(n) * (1 + self.info.num_fresh_noise as usize)
    }

    /// The seeded noise `distill sample --seed` uses (same seed, same images).
    fn seeded_noise(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        let i = &self.info;
        let shape = [n, i.channels as usize, i.height as usize, i.width as usize];
        let mut v = Vec::with_capacity(self.noise_len(n));
        for k in 0..=i.num_fresh_noise as u64 {
            let t = distill::train::randn(
                &mut distill::train::step_rng(seed, k, 0x5A3),
                &shape,
                &Device::Cpu,
            )?;
            v.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(v)
    }

    fn generate(&self, labels: &[i32], noise: &[f32]) -> Result<Vec<f32>> {
        let n = labels.len();
        let i = &self.info;
        if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as u32 >= i.num_classes) {
            bail!(
                "class label {bad} is out of range: the model has {} classes (0..{})",
                i.num_classes,
                i.num_classes - 1
            );
        }
        let per = self.image_len(n);
        let shape = vec![n, i.channels as usize, i.height as usize, i.width as usize];
        let blocks: Vec<&[f32]> = noise
            .chunks(per.max(1))
            .take(1 + i.num_fresh_noise as usize)
            .collect();
        let mut engine = self
            .engine
            .lock()
            .map_err(|_| anyhow::anyhow!("the model was poisoned by an earlier panic"))?;
        match &mut *engine {
            Engine::Ort(r) => {
                let mut inputs = vec![
                    (
                        "noise".to_string(),
                        TensorData::F32(ndarray::ArrayD::from_shape_vec(
                            shape.clone(),
                            blocks[0].to_vec(),
                        )?),
                    ),
                    (
                        "class_labels".to_string(),
                        TensorData::I32(ndarray::ArrayD::from_shape_vec(vec![n], labels.to_vec())?),
                    ),
                ];
                for (k, b) in blocks.iter().enumerate().skip(1) {
                    inputs.push((
                        format!("noise_{k}"),
                        TensorData::F32(ndarray::ArrayD::from_shape_vec(
                            shape.clone(),
                            b.to_vec(),
                        )?),
                    ));
                }
                let out = r.run(&inputs)?;
                let (_, y) = out
                    .into_iter()
                    .find(|(name, _)| name == "images")
                    .context("no images output")?;
                Ok(y.iter().copied().collect())
            }
            Engine::Candle { den, spec } => {
                let dev = Device::Cpu;
                let t = |b: &[f32]| Tensor::from_vec(b.to_vec(), shape.as_slice(), &dev);
                let inputs = distill::sample::NoiseInputs {
                    noise: t(blocks[0])?,
                    fresh: blocks[1..]
                        .iter()
                        .map(|b| t(b))
                        .collect::<candle_core::Result<_>>()?,
                };
                let lt = Tensor::from_vec(
                    labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
                    n,
                    &dev,
                )?;
                let y = distill::sample::generate(den, spec, &inputs, &lt, n.max(1), &dev)?;
                Ok(y.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Loads a model: an exported generator `.onnx` (ONNX Runtime: `ORT_DYLIB_PATH`, else the
/// project's `.venv`) or a checkpoint folder (candle). On success `*out` owns a model to
/// release with `distill_model_free`.
///
/// # Safety
/// `path` is a NUL-terminated UTF-8 string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn distill_model_load(
    path: *const c_char,
    out: *mut *mut DistillModel,
) -> DistillStatus {
    guard(|| {
        not_null(path, "path")?;
        not_null(out, "out")?;
        *out = std::ptr::null_mut();
        let p = CStr::from_ptr(path)
            .to_str()
            .map_err(|_| Fail::new(DistillStatus::InvalidArgument, "path is not UTF-8"))?;
        let m = load(Path::new(p)).map_err(err(DistillStatus::Load))?;
        *out = Box::into_raw(Box::new(m));
        Ok(())
    })
}

/// Releases a model (NULL is allowed and ignored).
///
/// # Safety
/// `model` came from `distill_model_load` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn distill_model_free(model: *mut DistillModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// Writes the model's shapes to `*out`.
///
/// # Safety
/// `model` is a live model; `out` points to a writable `DistillModelInfo`.
#[no_mangle]
pub unsafe extern "C" fn distill_model_info(
    model: *const DistillModel,
    out: *mut DistillModelInfo,
) -> DistillStatus {
    guard(|| {
        not_null(model, "model")?;
        not_null(out, "out")?;
        *out = (*model).info;
        Ok(())
    })
}

/// Floats in `n` images (`n * channels * height * width`); 0 for a NULL model.
///
/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn distill_image_len(model: *const DistillModel, n: usize) -> usize {
    if model.is_null() {
        0
    } else {
        (*model).image_len(n)
    }
}

/// Floats of noise `n` images take (`(1 + num_fresh_noise) * distill_image_len`); 0 for NULL.
///
/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn distill_noise_len(model: *const DistillModel, n: usize) -> usize {
    if model.is_null() {
        0
    } else {
        (*model).noise_len(n)
    }
}

/// Writes the seeded unit noise for `n` images (what `distill sample --seed` draws) to `out`,
/// which holds `out_len >= distill_noise_len(model, n)` floats.
///
/// # Safety
/// `model` is a live model; `out` points to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn distill_seeded_noise(
    model: *const DistillModel,
    n: usize,
    seed: u64,
    out: *mut f32,
    out_len: usize,
) -> DistillStatus {
    guard(|| {
        not_null(model, "model")?;
        not_null(out, "out")?;
        let m = &*model;
        let need = m.noise_len(n);
        if out_len < need {
            return Err(Fail::new(
                DistillStatus::BufferTooSmall,
                format!("out holds {out_len} floats, {need} needed"),
            ));
        }
        let v = m
            .seeded_noise(n, seed)
            .map_err(err(DistillStatus::Runtime))?;
        std::slice::from_raw_parts_mut(out, need).copy_from_slice(&v);
        Ok(())
    })
}

/// Generates `n` images for `labels[0..n]` from `noise` (`noise_len >= distill_noise_len`
/// floats: `noise` then the fresh-noise blocks) into `out` (`out_len >= distill_image_len`).
///
/// # Safety
/// `model` is a live model; `labels`, `noise`, `out` point to `n`, `noise_len`, `out_len`
/// elements (`out` writable and not overlapping the inputs).
#[no_mangle]
pub unsafe extern "C" fn distill_generate(
    model: *const DistillModel,
    labels: *const i32,
    n: usize,
    noise: *const f32,
    noise_len: usize,
    out: *mut f32,
    out_len: usize,
) -> DistillStatus {
    guard(|| {
        not_null(model, "model")?;
        not_null(labels, "labels")?;
        not_null(noise, "noise")?;
        not_null(out, "out")?;
        let m = &*model;
        if n == 0 {
            return Err(Fail::new(DistillStatus::InvalidArgument, "n is 0"));
        }
        let (need_noise, need_out) = (m.noise_len(n), m.image_len(n));
        if noise_len < need_noise {
            return Err(Fail::new(
                DistillStatus::BufferTooSmall,
                format!("noise holds {noise_len} floats, {need_noise} needed for {n} images"),
            ));
        }
        if out_len < need_out {
            return Err(Fail::new(
                DistillStatus::BufferTooSmall,
                format!("out holds {out_len} floats, {need_out} needed for {n} images"),
            ));
        }
        let labels = std::slice::from_raw_parts(labels, n);
        let noise = std::slice::from_raw_parts(noise, need_noise);
        let y = m.generate(labels, noise).map_err(|e| {
            let s = if format!("{e}").contains("out of range") {
                DistillStatus::InvalidArgument
            } else {
                DistillStatus::Runtime
            };
            Fail(s, format!("{e:#}"))
        })?;
        if y.len() != need_out {
            return Err(Fail::new(
                DistillStatus::Runtime,
                format!("the model returned {} floats, expected {need_out}", y.len()),
            ));
        }
        std::slice::from_raw_parts_mut(out, need_out).copy_from_slice(&y);
        Ok(())
    })
}

/// `distill_generate` from the seeded noise of `distill_seeded_noise(model, n, seed)`.
///
/// # Safety
/// As `distill_generate`.
#[no_mangle]
pub unsafe extern "C" fn distill_generate_seeded(
    model: *const DistillModel,
    labels: *const i32,
    n: usize,
    seed: u64,
    out: *mut f32,
    out_len: usize,
) -> DistillStatus {
    let mut noise = Vec::new();
    let s = guard(|| {
        not_null(model, "model")?;
        noise = (*model)
            .seeded_noise(n, seed)
            .map_err(err(DistillStatus::Runtime))?;
        Ok(())
    });
    if s != DistillStatus::Ok {
        return s;
    }
    distill_generate(model, labels, n, noise.as_ptr(), noise.len(), out, out_len)
}

/// The message of this thread's last failed call ("" after a success). Valid until the next
/// call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn distill_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version, e.g. "0.1.0". Static; never NULL.
#[no_mangle]
pub extern "C" fn distill_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
