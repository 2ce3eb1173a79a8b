//! The `distill` binary end to end on a tiny model: train -> resume -> sample (seeded and from a
//! noise file), plus help text and error exits.

use std::path::Path;
use std::process::Command;

fn distill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .env("DISTILL_THREADS", "2")
        .output()
        .expect("run distill")
}

fn ok(args: &[&str]) -> String {
    let o = distill(args);
    assert!(
        o.status.success(),
        "distill {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        vec!["--help"],
        vec!["train", "teacher", "--help"],
        vec!["sample", "--help"],
        vec!["eval", "--help"],
        vec!["pipeline", "--help"],
    ] {
        let out = ok(&sub);
        assert!(out.contains("Usage"), "{sub:?}: {out}");
    }
}

#[test]
fn train_resume_and_sample_a_tiny_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let common = [
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
        "--checkpoint-every",
        "2",
        "--sample-every",
        "4",
        "--sample-steps",
        "2",
        "--out",
        r,
    ];
    ok(&[&common[..], &["--train-steps", "2"]].concat());
    // Without --resume an existing run is never overwritten.
    let o = distill(&[&common[..], &["--train-steps", "4"]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    // `--steps` is the deprecated name of `--train-steps`.
    ok(&[&common[..], &["--steps", "4", "--resume"]].concat());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/config.json")).unwrap())
            .unwrap();
    assert_eq!(meta["step"], 4);
    assert!(run.join("samples/step_000004.png").exists());
    // log_every 25 > steps: one line at the last step of each invocation, trimmed to one curve on resume.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![2, 4]);

    let png = dir.path().join("s.png");
    let out = ok(&[
        "sample",
        run.join("checkpoint").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "3",
        "--per-class",
        "2",
        "--labels",
        "1,7",
    ]);
    assert!(out.contains("5 NFE"), "{out}");
    let st = std::fs::read(png.with_extension("safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(st.tensor("images").unwrap().shape(), &[4, 1, 16, 16]);
    assert_eq!(
        st.tensor("labels").unwrap().dtype(),
        safetensors::Dtype::I64
    );

    // Feeding the same noise through a file reproduces the seeded run exactly.
    let again = dir.path().join("again.png");
    let noise = dir.path().join("noise.safetensors");
    {
        use candle_core::{Device, Tensor};
        let (den, meta) = distill::checkpoint::load(&run.join("checkpoint"), &Device::Cpu).unwrap();
        let spec = distill::jobs::SamplerOverride {
            sample_steps: Some(3),
            ..Default::default()
        }
        .apply(&meta)
        .unwrap();
        let inp = distill::sample::seeded_noise(&den, &spec, 4, 0, &Device::Cpu).unwrap();
        let t: std::collections::HashMap<String, Tensor> =
            [("noise".to_string(), inp.noise)].into();
        distill::checkpoint::save_tensors(&noise, &t).unwrap();
    }
    ok(&[
        "sample",
        run.join("checkpoint").to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
        "--steps",
        "3",
        "--per-class",
        "2",
        "--labels",
        "1,1,7,7",
        "--noise",
        noise.to_str().unwrap(),
    ]);
    assert_eq!(
        read_images(&png.with_extension("safetensors")),
        read_images(&again.with_extension("safetensors"))
    );
}

fn read_images(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    safetensors::SafeTensors::deserialize(&b)
        .unwrap()
        .tensor("images")
        .unwrap()
        .data()
        .to_vec()
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let o = distill(&["sample", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, [1u8, 2, 3]).unwrap();
    let o = distill(&[
        "train",
        "teacher",
        "--data",
        junk.to_str().unwrap(),
        "--out",
        dir.path().join("r").to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("junk.bin"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = distill(&["--device", "tpu", "sample", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown --device"));
}
