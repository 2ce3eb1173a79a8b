//! `scripts/gpu-check.sh`: its CPU dry run runs every phase (so the first GPU call cannot fail on
//! a typo), and its carry check refuses more than 64 MiB. torch is kept out: the PyTorch peer is
//! pointed at a missing interpreter, and the report must say so.

use std::path::Path;
use std::process::Command;

fn script() -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh"));
    c.env("DISTILL_BIN", env!("CARGO_BIN_EXE_distill"))
        .env("GPU_CHECK_PYTHON", "/nonexistent/python-without-torch")
        .env("DISTILL_THREADS", "1");
    c
}

#[test]
fn cpu_dry_run_reports_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let out = script()
        .args(["--device", "cpu"])
        .env("OUT", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let md = std::fs::read_to_string(dir.path().join("gpu-check.md")).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(r["dry_run"], true);
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "carry",
            "unpack",
            "environment",
            "device_check",
            "bench_gpu",
            "train_fp16"
        ]
    );
    for p in phases {
        let (name, status) = (p["name"].as_str().unwrap(), p["status"].as_str().unwrap());
        assert_eq!(status, "ok", "{name}: {status}\n{}", p["log"]);
        assert!(md.contains(&format!("| {name} | ok |")), "{md}");
    }
    let phase = |n: &str| phases.iter().find(|p| p["name"] == n).unwrap();
    // The CUDA-vs-CPU comparison ran (here CPU against CPU: exactly equal), per precision.
    let check = &phase("device_check")["result"];
    assert_eq!(
        (check["device"].as_str(), check["reference"].as_str()),
        (Some("cpu"), Some("cpu"))
    );
    let rows = check["rows"].as_array().unwrap();
    let precs: Vec<&str> = rows
        .iter()
        .map(|r| r["precision"].as_str().unwrap())
        .collect();
    assert_eq!(precs, ["fp32", "bf16", "fp16"]);
    for row in rows {
        assert_eq!(row["passed"], true, "{row}");
        assert_eq!(row["step_applied"], true, "{row}");
        for k in ["forward_rel", "loss_rel", "grad_rel", "weight_max_abs"] {
            assert_eq!(row[k].as_f64(), Some(0.0), "{k}: {row}");
        }
    }
    // Throughput rows for every precision; the PyTorch columns say why they are empty.
    let bench = &phase("bench_gpu")["result"];
    let rows = bench["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        for k in [
            "teacher_images_per_s",
            "dmd2_images_per_s",
            "tdm_images_per_s",
        ] {
            assert!(row[k].as_f64().unwrap() > 0.0, "{k}: {row}");
        }
        assert!(row["torch_images_per_s"].is_null());
    }
    let note = bench["torch_note"].as_str().unwrap();
    assert!(note.contains("python-without-torch"), "{note}");
    assert!(phase("bench_gpu")["log"]
        .as_str()
        .unwrap()
        .contains("PyTorch missing:"));
    // The fp16 run logged its loss scale.
    let train = &phase("train_fp16")["result"];
    let scale = train["loss_scale"]["loss_scale_fake"].as_f64().unwrap();
    assert!(scale >= 1.0, "{train}");
    // The dry run went through the unpack path (pack with xz, unpack, run the unpacked binary).
    assert!(phase("unpack")["log"]
        .as_str()
        .unwrap()
        .contains("unpacked"));
}

#[test]
fn carry_check_refuses_more_than_64_mib_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("distill.xz");
    // Sparse: its apparent size is what the GPU machine's carry limit counts.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 * 1024 * 1024 + 1)
        .unwrap();
    let report = dir.path().join("report");
    let out = script()
        .arg("--device")
        .arg("cuda")
        .env("GPU_CHECK_PACKED", &big)
        .env("OUT", &report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("over the 64 MiB"), "{stderr}");
    assert!(!report.exists(), "nothing ran before the carry check");

    let small = dir.path().join("small.xz");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    let out = script()
        .arg("--check-carry")
        .env("GPU_CHECK_PACKED", &small)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("carry ok: "));
    let missing = script()
        .arg("--check-carry")
        .env("GPU_CHECK_PACKED", dir.path().join("absent.xz"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing"));
}
