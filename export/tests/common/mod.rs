//! Helpers shared by the export tests: random modules, the onnx checker, runtime comparison.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use export::runtime::{OrtRunner, Runner, TensorData, TractRunner};
use export::Dim;
use ndarray::ArrayD;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::path::{Path, PathBuf};

/// A VarMap-backed VarBuilder on the CPU (random init as each module's `new` asks).
pub fn varmap() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

/// Seeds every parameter, so the tests see the same weights on every run (candle's own
/// initialisers are unseeded): GroupNorms get a non-trivial affine around gamma 1, beta 0 (so it
/// is tested), label tables N(0, 1), everything else PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn randomize_norms(vm: &VarMap, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let v = &data[&name];
        let dims = v.as_tensor().dims().to_vec();
        let n = v.as_tensor().elem_count();
        let vals: Vec<f32> = if name.contains("norm") {
            let base = if name.ends_with("weight") { 1.0 } else { 0.0 };
            (0..n)
                .map(|_| base + 0.3 * rng.sample::<f32, _>(StandardNormal))
                .collect()
        } else if name.contains("label_emb") {
            (0..n)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        } else {
            let wname = name.replace(".bias", ".weight");
            let fan_in: usize = data
                .get(&wname)
                .map(|w| w.as_tensor().dims()[1..].iter().product())
                .unwrap_or(dims[1..].iter().product::<usize>())
                .max(1);
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-b..b)).collect()
        };
        v.set(&Tensor::from_vec(vals, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `onnx.checker.check_model(onnx.load(P), full_check=True)` with the project's .venv python.
pub fn onnx_check(path: &Path) -> Result<()> {
    let py = workspace().join(".venv/bin/python");
    if !py.exists() {
        bail!(
            "{} is missing: run scripts/setup.sh (creates .venv with onnx and onnxruntime)",
            py.display()
        );
    }
    let out = std::process::Command::new(&py)
        .arg("-c")
        .arg("import sys, onnx; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)")
        .arg(path)
        .output()
        .context("running the onnx checker")?;
    if !out.status.success() {
        bail!(
            "onnx checker rejected {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A named test input: data plus the ONNX dims (batch symbolic).
pub struct TestInput {
    pub name: String,
    pub data: TensorData,
    pub dims: Vec<Dim>,
}

impl TestInput {
    /// f32 normal values with the first dim as the batch.
    pub fn normal(name: &str, shape: &[usize], seed: u64, scale: f32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| scale * rng.sample::<f32, _>(StandardNormal))
            .collect();
        Self {
            name: name.into(),
            data: TensorData::F32(ArrayD::from_shape_vec(shape.to_vec(), v).unwrap()),
            dims: batch_dims(shape),
        }
    }
    pub fn ints(name: &str, values: &[i32]) -> Self {
        Self {
            name: name.into(),
            data: TensorData::I32(
                ArrayD::from_shape_vec(vec![values.len()], values.to_vec()).unwrap(),
            ),
            dims: vec![Dim::Batch],
        }
    }
    pub fn candle(&self) -> Tensor {
        match &self.data {
            TensorData::F32(a) => Tensor::from_vec(
                a.iter().copied().collect::<Vec<_>>(),
                a.shape(),
                &Device::Cpu,
            )
            .unwrap(),
            TensorData::I32(a) => Tensor::from_vec(
                a.iter().map(|&v| v as u32).collect::<Vec<_>>(),
                a.shape(),
                &Device::Cpu,
            )
            .unwrap(),
        }
    }
    pub fn elem(&self) -> export::ElemType {
        match self.data {
            TensorData::F32(_) => export::ElemType::F32,
            TensorData::I32(_) => export::ElemType::I32,
        }
    }
}

fn batch_dims(shape: &[usize]) -> Vec<Dim> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if i == 0 { Dim::Batch } else { Dim::Fixed(d) })
        .collect()
}

/// Writes the model, runs the onnx checker, runs it in tract and ONNX Runtime, and returns the
/// max abs error of each against `reference`.
pub fn run_both(
    model: &export::proto::ModelProto,
    label: &str,
    inputs: &[TestInput],
    reference: &Tensor,
) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{label}.onnx"));
    export::write_model(model, &path)?;
    onnx_check(&path)?;
    let named: Vec<(String, TensorData)> = inputs
        .iter()
        .map(|i| (i.name.clone(), i.data.clone()))
        .collect();
    let reference: Vec<f32> = reference.flatten_all()?.to_vec1()?;
    let mut errs = Vec::new();
    let runners: Vec<Box<dyn Runner>> = vec![
        Box::new(TractRunner::from_path(&path)?),
        Box::new(OrtRunner::from_path(&path)?),
    ];
    for mut r in runners {
        let out = r
            .run(&named)
            .with_context(|| format!("{label} in {}", r.name()))?;
        let y = &out[0].1;
        anyhow::ensure!(
            y.len() == reference.len(),
            "{label} in {}: {} values, expected {}",
            r.name(),
            y.len(),
            reference.len()
        );
        let err = y
            .iter()
            .zip(&reference)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0.0, f64::max);
        anyhow::ensure!(
            y.iter().all(|v| v.is_finite()),
            "{label} in {}: non-finite output",
            r.name()
        );
        eprintln!("{label:<28} {:<12} max abs {err:.3e}", r.name());
        errs.push(err);
    }
    Ok((errs[0], errs[1]))
}

/// Lowers the same body with candle and with the ONNX backend, then compares in both runtimes.
/// `$body` is written once against `$b: &impl Backend` and `$xs: &[B::T]`.
#[macro_export]
macro_rules! parity {
    ($label:expr, $inputs:expr, $tol:expr, |$b:ident, $xs:ident| $body:expr) => {{
        let inputs: Vec<common::TestInput> = $inputs;
        let reference: candle_core::Tensor = {
            let cb = graphs::CandleBackend::new(&candle_core::Device::Cpu);
            let $b = &cb;
            let owned: Vec<candle_core::Tensor> = inputs.iter().map(|i| i.candle()).collect();
            let $xs = &owned[..];
            $body.expect("candle forward")
        };
        let model = {
            let ob = export::OnnxBackend::new(export::Precision::Fp32).unwrap();
            let owned: Vec<String> = inputs
                .iter()
                .map(|i| ob.input(&i.name, i.elem(), &i.dims).unwrap())
                .collect();
            let y: String = {
                let $b = &ob;
                let $xs = &owned[..];
                $body.expect("onnx lowering")
            };
            ob.into_model($label, &[("y", y)], vec![]).unwrap()
        };
        let (t, o) = common::run_both(&model, $label, &inputs, &reference).unwrap();
        assert!(
            t < $tol && o < $tol,
            "{}: max abs tract {t:.3e}, onnxruntime {o:.3e} (tolerance {:.1e})",
            $label,
            $tol
        );
    }};
}
