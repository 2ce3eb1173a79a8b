//! TensorRT side of the exporter: every model it makes passes the lint, validation with a
//! TensorRT runtime either runs it (trtexec + GPU present) or says exactly what is missing, and
//! the JUnit XML of a run is well-formed with the right counts.

mod common;

use common::{randomize_norms, varmap};
use export::tensorrt::{lint, Toolchain};
use export::{
    export_denoiser, export_generator, validate, ExportOptions, Precision, RuntimeKind, Target,
    ValidateOptions,
};
use graphs::{
    BetaSchedule, Denoiser, GeneratorSpec, ModelConfig, Parameterisation, SamplerKind, UNetConfig,
};

fn denoiser(param: Parameterisation, seed: u64) -> (candle_nn::VarMap, Denoiser) {
    let (vm, vb) = varmap();
    let den = Denoiser::new(vb, &ModelConfig::ours(UNetConfig::tiny(), param)).unwrap();
    randomize_norms(&vm, seed).unwrap();
    (vm, den)
}

fn specs() -> Vec<GeneratorSpec> {
    vec![
        GeneratorSpec {
            sampler: SamplerKind::Student,
            steps: 2,
            sigmas: vec![80.0, 1.2],
            fresh_noise: true,
            cfg_scale: 1.0,
        },
        GeneratorSpec {
            sampler: SamplerKind::Heun,
            steps: 2,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: 1.5,
        },
    ]
}

#[test]
fn every_exported_model_passes_the_tensorrt_lint() {
    let mut n = 0;
    for (param, ddim) in [
        (Parameterisation::edm(), false),
        (Parameterisation::vp(BetaSchedule::Linear), true),
    ] {
        let (_vm, den) = denoiser(param, 11);
        for precision in [Precision::Fp32, Precision::Fp16] {
            let opts = ExportOptions {
                precision,
                ..Default::default()
            };
            let mut models = vec![export_denoiser(&den, &opts).unwrap()];
            for mut spec in specs() {
                if ddim && spec.sampler != SamplerKind::Student {
                    spec.sampler = SamplerKind::Ddim;
                }
                models.push(export_generator(&den, &spec, &opts).unwrap());
            }
            for m in &models {
                let v = lint(m);
                assert!(
                    v.is_empty(),
                    "{:?} {precision}: {v:#?}",
                    m.graph.as_ref().unwrap().name
                );
                n += 1;
            }
        }
    }
    assert_eq!(n, 12);
}

fn write_generator(
    dir: &std::path::Path,
    den: &Denoiser,
    spec: &GeneratorSpec,
) -> std::path::PathBuf {
    let path = dir.join("generator.onnx");
    export::write_model(
        &export_generator(den, spec, &ExportOptions::default()).unwrap(),
        &path,
    )
    .unwrap();
    path
}

#[test]
fn tensorrt_runtime_runs_or_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, den) = denoiser(Parameterisation::edm(), 12);
    let spec = specs().remove(0);
    let path = write_generator(dir.path(), &den, &spec);
    let opts = ValidateOptions {
        cases: 4,
        runtimes: vec![RuntimeKind::Tract, RuntimeKind::TensorRt],
        ..Default::default()
    };
    let here = Toolchain::locate();
    let strict = validate(&path, &den, Target::Generator(&spec), &opts);
    let relaxed = validate(
        &path,
        &den,
        Target::Generator(&spec),
        &ValidateOptions {
            allow_missing: true,
            ..opts.clone()
        },
    )
    .unwrap();
    match here {
        Ok(tc) => {
            // A machine with TensorRT: the engine ran at fp16 tolerances and passed.
            let r = strict.unwrap();
            eprintln!("TensorRT on {}:\n{r}", tc.gpu.name);
            let m = r.metrics.iter().find(|m| m.runtime == "tensorrt").unwrap();
            assert!(
                m.passed && m.max_abs_tol == 2e-2 && m.mean_abs_tol == Some(2e-3),
                "{r}"
            );
            assert!(relaxed.unavailable.is_empty());
        }
        Err(missing) => {
            let e = format!("{:#}", strict.unwrap_err());
            assert!(e.contains(&missing.to_string()), "{e}");
            assert!(e.contains("trtexec") || e.contains("nvidia-smi"), "{e}");
            // --allow-missing: tract still ran and passed, TensorRT is listed as unavailable.
            assert_eq!(relaxed.metrics.len(), 1);
            assert_eq!(relaxed.metrics[0].runtime, "tract");
            assert!(relaxed.passed(), "{relaxed}");
            assert_eq!(relaxed.unavailable.len(), 1);
            assert_eq!(relaxed.unavailable[0].runtime, "tensorrt");
            assert_eq!(relaxed.unavailable[0].reason, missing.to_string());
            assert!(
                relaxed.to_string().contains("tensorrt     unavailable:"),
                "{relaxed}"
            );
        }
    }
    // A broken model is an error even with allow_missing (only *missing* runtimes are skipped).
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = validate(
        &junk,
        &den,
        Target::Generator(&spec),
        &ValidateOptions {
            allow_missing: true,
            ..opts
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("junk.onnx"), "{e:#}");
}

#[test]
fn junit_xml_is_well_formed_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, den) = denoiser(Parameterisation::edm(), 13);
    let spec = specs().remove(0);
    let path = write_generator(dir.path(), &den, &spec);
    let mut r = validate(
        &path,
        &den,
        Target::Generator(&spec),
        &ValidateOptions {
            cases: 2,
            runtimes: vec![RuntimeKind::Tract, RuntimeKind::OnnxRuntime],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.passed());
    // One runtime made to fail, one marked unavailable, and a lint violation.
    r.metrics[1].passed = false;
    r.unavailable.push(export::Unavailable {
        runtime: "tensorrt".into(),
        reason: "TensorRT's trtexec not found on PATH <&>".into(),
    });
    let violations = vec![export::tensorrt::Violation {
        location: "node uniq (Unique)".into(),
        message: "op Unique is not supported".into(),
    }];
    let xml = export::junit::to_junit("generator.onnx", Some(&violations), Some(&r), None);
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("tests"), Some("4"));
    assert_eq!(root.attribute("failures"), Some("2"));
    assert_eq!(root.attribute("skipped"), Some("1"));
    assert_eq!(root.attribute("errors"), Some("0"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 4);
    let by_class = |c: &str| {
        cases
            .iter()
            .find(|n| n.attribute("classname") == Some(c))
            .unwrap()
    };
    let tract = by_class("distill.parity.tract");
    assert_eq!(tract.attribute("name"), Some("images"));
    assert!(tract.children().all(|c| !c.has_tag_name("failure")));
    let out = tract
        .children()
        .find(|c| c.has_tag_name("system-out"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        out.contains("max_abs")
            && out.contains("cosine")
            && out.contains("tolerance max abs <= 1.0e-4"),
        "{out}"
    );
    let ort = by_class("distill.parity.onnxruntime");
    let f = ort.children().find(|c| c.has_tag_name("failure")).unwrap();
    assert_eq!(f.attribute("type"), Some("tolerance"));
    assert!(f.attribute("message").unwrap().contains("past tolerance"));
    let trt = by_class("distill.parity.tensorrt");
    let s = trt.children().find(|c| c.has_tag_name("skipped")).unwrap();
    assert_eq!(
        s.attribute("message"),
        Some("TensorRT's trtexec not found on PATH <&>")
    );
    let l = by_class("distill.lint");
    assert_eq!(
        l.children()
            .find(|c| c.has_tag_name("failure"))
            .unwrap()
            .attribute("type"),
        Some("lint")
    );
    // A run that failed outright is one error test.
    let xml = export::junit::to_junit("m.onnx", None, None, Some("loading m.onnx: no such file"));
    let doc = roxmltree::Document::parse(&xml).unwrap();
    assert_eq!(doc.root_element().attribute("errors"), Some("1"));
    assert_eq!(doc.root_element().attribute("tests"), Some("1"));
}
