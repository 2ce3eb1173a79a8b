//! The parity gate from the command line: `distill export --trt` failing fast without TensorRT,
//! `distill validate --lint --junit` with its exit codes (0 pass, 3 past tolerance, 4 lint),
//! `--allow-missing`, all on one tiny trained teacher.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn distill(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.args(args).env("DISTILL_THREADS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run distill")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A tiny teacher (2 steps) and its 2-step Euler generator, made once for all tests here.
fn fixture() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static F: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let o = distill(
            &[
                "train",
                "teacher",
                "--preset",
                "tiny",
                "--resolution",
                "16",
                "--limit",
                "64",
                "--batch-size",
                "8",
                "--train-steps",
                "2",
                "--sample-every",
                "0",
                "--out",
                run.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
        let ckpt = run.join("checkpoint");
        let out = dir.path().join("export");
        let o = distill(
            &[
                "export",
                ckpt.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--sampler",
                "euler",
                "--steps",
                "2",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
        (dir, ckpt, out.join("generator.onnx"))
    })
}

fn junit(p: &Path) -> (usize, usize, usize, String) {
    let xml = std::fs::read_to_string(p).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let r = doc.root_element();
    let n = |a: &str| r.attribute(a).unwrap().parse().unwrap();
    (n("tests"), n("failures"), n("skipped"), xml.clone())
}

#[test]
fn export_trt_without_tensorrt_fails_fast_and_writes_nothing() {
    let (dir, ckpt, _) = fixture();
    let out = dir.path().join("trt_missing");
    let args = [
        "export",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--trt",
    ];
    // An explicit DISTILL_TRTEXEC that is not there is named (on every machine).
    let o = distill(&args, &[("DISTILL_TRTEXEC", "/nonexistent/trtexec")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("DISTILL_TRTEXEC=/nonexistent/trtexec is not an executable"),
        "{}",
        text(&o)
    );
    // No trtexec anywhere (PATH empty): the message says what to install.
    if !Path::new(export::tensorrt::trtexec::APT_TRTEXEC).exists() {
        let empty = dir.path().join("empty_path");
        std::fs::create_dir_all(&empty).unwrap();
        let o = distill(
            &args,
            &[("PATH", empty.to_str().unwrap()), ("DISTILL_TRTEXEC", "")],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("TensorRT's trtexec not found on PATH: install TensorRT 10"),
            "{t}"
        );
        assert!(t.contains("DISTILL_TRTEXEC=/path/to/trtexec"), "{t}");
    }
    for f in ["generator.plan", "generator.plan.json", "generator.onnx"] {
        assert!(!out.join(f).exists(), "{f} was written");
    }
}

#[test]
fn validate_lint_junit_pass_and_allow_missing() {
    let (dir, ckpt, onnx) = fixture();
    let xml = dir.path().join("pass.xml");
    let o = distill(
        &[
            "validate",
            onnx.to_str().unwrap(),
            "--reference",
            ckpt.to_str().unwrap(),
            "--runtimes",
            "tract,ort",
            "--cases",
            "4",
            "--lint",
            "--junit",
            xml.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("is TensorRT-compatible"), "{}", text(&o));
    let (tests, failures, skipped, body) = junit(&xml);
    assert_eq!((tests, failures, skipped), (3, 0, 0), "{body}");
    assert!(
        body.contains("distill.lint") && body.contains("distill.parity.onnxruntime"),
        "{body}"
    );

    // TensorRT requested with --allow-missing: skipped where it is not installed, run where it is.
    let xml = dir.path().join("missing.xml");
    let o = distill(
        &[
            "validate",
            onnx.to_str().unwrap(),
            "--reference",
            ckpt.to_str().unwrap(),
            "--runtimes",
            "tract,trt",
            "--allow-missing",
            "--cases",
            "2",
            "--junit",
            xml.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (tests, failures, skipped, body) = junit(&xml);
    assert_eq!((tests, failures), (2, 0), "{body}");
    let has_trt = export::tensorrt::Toolchain::locate().is_ok();
    assert_eq!(skipped, usize::from(!has_trt), "{body}");
    // Without --allow-missing a missing TensorRT is an error (exit 1), recorded in the JUnit file.
    if !has_trt {
        let o = distill(
            &[
                "validate",
                onnx.to_str().unwrap(),
                "--reference",
                ckpt.to_str().unwrap(),
                "--runtimes",
                "tract,trt",
                "--cases",
                "2",
                "--junit",
                xml.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let (tests, _, _, body) = junit(&xml);
        assert_eq!(tests, 1);
        assert!(
            body.contains("<error") && (body.contains("trtexec") || body.contains("nvidia-smi")),
            "{body}"
        );
    }
}

#[test]
fn past_tolerance_exits_3_and_lint_failure_exits_4() {
    let (dir, ckpt, onnx) = fixture();
    // An impossible tolerance: the comparison runs and fails.
    let xml = dir.path().join("tol.xml");
    let o = distill(
        &[
            "validate",
            onnx.to_str().unwrap(),
            "--reference",
            ckpt.to_str().unwrap(),
            "--runtimes",
            "tract",
            "--cases",
            "2",
            "--atol",
            "0",
            "--junit",
            xml.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let (tests, failures, _, _) = junit(&xml);
    assert_eq!((tests, failures), (1, 1));

    // The same model with an op TensorRT lacks: --lint stops before any runtime, exit 4.
    let mut m = export::runtime::load_model(onnx).unwrap();
    m.graph
        .as_mut()
        .unwrap()
        .node
        .push(export::proto::NodeProto {
            name: "uniq".into(),
            op_type: "Unique".into(),
            input: vec!["noise".into()],
            output: vec!["u".into()],
            ..Default::default()
        });
    let bad = dir.path().join("bad.onnx");
    export::write_model(&m, &bad).unwrap();
    let xml = dir.path().join("lint.xml");
    let o = distill(
        &[
            "validate",
            bad.to_str().unwrap(),
            "--reference",
            ckpt.to_str().unwrap(),
            "--runtimes",
            "tract",
            "--lint",
            "--junit",
            xml.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("node uniq (Unique): op Unique is not supported by TensorRT 10"),
        "{}",
        text(&o)
    );
    let (tests, failures, _, body) = junit(&xml);
    assert_eq!((tests, failures), (1, 1), "{body}");
    assert!(body.contains("type=\"lint\""), "{body}");
}

#[test]
fn help_documents_the_new_flags() {
    let o = distill(&["export", "--help"], &[]);
    let t = text(&o);
    for f in [
        "--trt",
        "--min-batch",
        "--opt-batch",
        "--max-batch",
        "--trt-precision",
    ] {
        assert!(t.contains(f), "export --help lacks {f}");
    }
    let t = text(&distill(&["validate", "--help"], &[]));
    for f in [
        "--trt <PLAN_OR_ONNX>",
        "--allow-missing",
        "--lint",
        "--junit",
    ] {
        assert!(t.contains(f), "validate --help lacks {f}");
    }
}

/// A 2-step Heun generator (its one step to sigma_min amplifies round-off ~40x) passes the
/// default gate from the command line, and the report carries the reference round-off that
/// set its tolerance; `--roundoff-cases 0` skips the measurement.
#[test]
fn heun_2_steps_passes_the_default_gate_with_its_reference_roundoff() {
    let (dir, ckpt, _) = fixture();
    let out = dir.path().join("heun2");
    let o = distill(
        &[
            "export",
            ckpt.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--sampler",
            "heun",
            "--steps",
            "2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let onnx = out.join("generator.onnx");
    let json = dir.path().join("heun2.json");
    let validate = |extra: &[&str]| {
        let mut args = vec![
            "validate",
            onnx.to_str().unwrap(),
            "--reference",
            ckpt.to_str().unwrap(),
            "--cases",
            "4",
            "--batches",
            "1,3",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        distill(&args, &[])
    };
    let o = validate(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("reference f32 round-off"), "{}", text(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for m in r["metrics"].as_array().unwrap() {
        let roundoff = m["reference_roundoff"].as_f64().unwrap();
        let tol = m["max_abs_tol"].as_f64().unwrap();
        assert!(roundoff > 0.0 && roundoff.is_finite(), "{m}");
        assert_eq!(tol, export::roundoff_tolerance(1e-4, Some(roundoff)), "{m}");
    }
    let o = validate(&["--roundoff-cases", "0", "--atol", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        !text(&o).contains("reference f32 round-off"),
        "{}",
        text(&o)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for m in r["metrics"].as_array().unwrap() {
        assert!(m["reference_roundoff"].is_null(), "{m}");
        assert_eq!(m["max_abs_tol"].as_f64().unwrap(), 1.0, "{m}");
    }
}
