//! Out-of-range and malformed flags of `train teacher`, `sample`, `eval` and `validate`.

use super::*;

#[test]
fn cli_flags_are_range_checked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let t = |name: &str, extra: &[&str], needles: &[&str]| {
        Case::new(name, teacher_flags(&out, extra), 1, needles).keep(d.path())
    };
    let mut cases = vec![
        t(
            "cfg-scale nan",
            &["--cfg-scale", "nan"],
            &["cfg_scale", "NaN"],
        ),
        t(
            "cfg-scale inf",
            &["--cfg-scale", "inf"],
            &["cfg_scale", "inf"],
        ),
        t(
            "cfg-scale negative",
            &["--cfg-scale=-1"],
            &["cfg_scale", "out of range"],
        ),
        t("lr zero", &["--lr", "0"], &["optim.lr"]),
        t("lr nan", &["--lr", "NaN"], &["optim.lr"]),
        t("lr negative", &["--lr=-0.001"], &["optim.lr"]),
        t("ema-decay above 1", &["--ema-decay", "1.5"], &["ema_decay"]),
        t(
            "label-dropout 1",
            &["--label-dropout", "1"],
            &["label_dropout"],
        ),
        t("dropout nan", &["--dropout", "nan"], &["model.dropout"]),
        t(
            "flow-shift nan",
            &["--parameterisation", "flow", "--flow-shift", "nan"],
            &["flow.shift"],
        ),
        t(
            "flow-shift zero",
            &["--parameterisation", "flow", "--flow-shift", "0"],
            &["shift must be positive"],
        ),
        t(
            "weight-decay inf",
            &["--weight-decay", "inf"],
            &["weight_decay"],
        ),
        t("grad-clip negative", &["--grad-clip=-1"], &["grad_clip"]),
        t("batch-size 0", &["--batch-size", "0"], &["batch_size"]),
        t("train-steps 0", &["--train-steps", "0"], &["train_steps"]),
        t("deprecated steps 0", &["--steps", "0"], &["train_steps"]),
        t("limit 0", &["--limit", "0"], &["--limit 0"]),
        t(
            "resolution 0",
            &["--resolution", "0"],
            &["model.resolution"],
        ),
        t(
            "resolution 100000",
            &["--resolution", "100000"],
            &["model.resolution", "100000"],
        ),
        t(
            "absurd memory",
            &["--resolution", "4096", "--batch-size", "60000"],
            &["needs about", "memory"],
        ),
        t(
            "resolution not divisible",
            &["--resolution", "17"],
            &["not divisible"],
        ),
        t(
            "base-channels 0",
            &["--base-channels", "0"],
            &["base_channels"],
        ),
        t(
            "channel-mult 0",
            &["--channel-mult", "1,0"],
            &["channel_mult"],
        ),
        t(
            "num-res-blocks 0",
            &["--num-res-blocks", "0"],
            &["num_res_blocks"],
        ),
        t("log-every 0", &["--log-every", "0"], &["log_every"]),
        t(
            "checkpoint-every 0",
            &["--checkpoint-every", "0"],
            &["checkpoint_every"],
        ),
        t(
            "sample-steps 0",
            &["--sample-steps", "0"],
            &["sample_steps"],
        ),
        t("num-classes 0", &["--num-classes", "0"], &["num_classes"]),
        t("unknown device", &["--device", "tpu"], &["--device"]),
    ];
    cases.push(
        Case::new(
            "allow-resume-change without resume",
            teacher_flags(&out, &["--allow-resume-change"]),
            2,
            &["--resume"],
        )
        .keep(d.path()),
    );
    cases.push(Case::new(
        "unknown parameterisation",
        teacher_flags(&out, &["--parameterisation", "ddpm"]),
        2,
        &["parameterisation"],
    ));
    cases.push(Case::new(
        "pipeline: unknown parameterisation",
        vec![
            "pipeline".into(),
            "-o".into(),
            out.display().to_string(),
            "--parameterisation".into(),
            "ddpm".into(),
        ],
        2,
        &["--parameterisation"],
    ));
    assert_cases(cases);
    assert!(
        !out.join("checkpoint").exists(),
        "a refused run wrote a checkpoint"
    );
}

#[test]
fn sample_eval_validate_flags_are_checked() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let ck = p(&f.ckpt);
    let png = p(&d.path().join("s.png"));
    let sample = |name: &str, extra: &[&str], needles: &[&str]| {
        let mut a = s(&["sample", &ck, "-o", &png]);
        a.extend(s(extra));
        Case::new(name, a, 1, needles).keep(&f.ckpt)
    };
    let noise = d.path().join("noise.safetensors");
    let nan =
        candle_core::Tensor::full(f32::NAN, (2, 1, 16, 16), &candle_core::Device::Cpu).unwrap();
    distill::checkpoint::save_tensors(&noise, &[("noise".to_string(), nan)].into_iter().collect())
        .unwrap();
    let wrong = d.path().join("wrong.safetensors");
    let z = candle_core::Tensor::zeros(
        (2, 1, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    distill::checkpoint::save_tensors(&wrong, &[("noise".to_string(), z)].into_iter().collect())
        .unwrap();
    let validate = |name: &str, extra: &[&str], code: i32, needles: &[&str]| {
        let mut a = s(&[
            "validate",
            &p(&f.onnx),
            "--reference",
            &ck,
            "--runtimes",
            "tract",
        ]);
        a.extend(s(extra));
        Case::new(name, a, code, needles).keep(&f.root)
    };
    assert_cases(vec![
        sample("per-class 0", &["--per-class", "0"], &["--per-class"]),
        sample("batch-size 0", &["--batch-size", "0"], &["--batch-size"]),
        sample("steps 0", &["--steps", "0"], &["--steps"]),
        sample("cfg-scale nan", &["--cfg-scale", "nan"], &["--cfg-scale"]),
        sample("label out of range", &["--labels", "42"], &["label 42"]),
        sample(
            "ddim on an edm model",
            &["--sampler", "ddim"],
            &["DDIM is for VP"],
        ),
        sample(
            "student on a teacher",
            &["--sampler", "student"],
            &["no student sampler"],
        ),
        sample(
            "all-NaN noise file",
            &["--noise", &p(&noise)],
            &["NaN", "noise.safetensors"],
        ),
        sample(
            "noise of the wrong shape",
            &["--noise", &p(&wrong)],
            &["shape"],
        ),
        Case::new(
            "conflicting --noise and --seed",
            s(&[
                "sample",
                &ck,
                "-o",
                &png,
                "--noise",
                &p(&noise),
                "--seed",
                "3",
            ]),
            2,
            &["--seed"],
        ),
        Case::new("eval n 1", s(&["eval", &ck, "--n", "1"]), 1, &["--n"]).keep(&f.ckpt),
        Case::new(
            "eval rejects a 16x16 model before training its classifier",
            s(&[
                "eval",
                &ck,
                "--n",
                "10",
                "--cache-dir",
                &p(&d.path().join("cache")),
            ]),
            1,
            &["cannot be evaluated"],
        ),
        Case::new(
            "eval of a sample file with sampler flags",
            s(&["eval", &p(&noise), "--sampler", "heun"]),
            1,
            &["apply to a checkpoint"],
        ),
        Case::new(
            "dmd2 min-step above max-step",
            s(&[
                "train",
                "dmd2",
                "--teacher",
                &ck,
                "--min-step",
                "0.9",
                "--max-step",
                "0.1",
                "--out",
                &p(&d.path().join("d")),
            ]),
            1,
            &["min_step"],
        ),
        Case::new(
            "dmd2 real-guidance-scale inf",
            s(&[
                "train",
                "dmd2",
                "--teacher",
                &ck,
                "--real-guidance-scale",
                "inf",
                "--out",
                &p(&d.path().join("d")),
            ]),
            1,
            &["cfg_scale"],
        ),
        Case::new(
            "dmd2 limit 0",
            s(&[
                "train",
                "dmd2",
                "--teacher",
                &ck,
                "--limit",
                "0",
                "--out",
                &p(&d.path().join("d")),
            ]),
            1,
            &["--limit 0"],
        )
        .keep(&f.ckpt),
        Case::new(
            "tdm cfg-scale nan",
            s(&[
                "train",
                "tdm",
                "--teacher",
                &ck,
                "--cfg-scale",
                "nan",
                "--out",
                &p(&d.path().join("t")),
            ]),
            1,
            &["cfg_scale"],
        ),
        Case::new(
            "tdm grad-accum 0",
            s(&[
                "train",
                "tdm",
                "--teacher",
                &ck,
                "--grad-accum",
                "0",
                "--out",
                &p(&d.path().join("t")),
            ]),
            1,
            &["grad_accum"],
        ),
        validate("cases 0", &["--cases", "0"], 1, &["zero cases"]),
        validate("atol nan", &["--atol", "nan"], 1, &["--atol"]),
        validate(
            "unknown runtime",
            &["--runtimes", "tensorflow"],
            1,
            &["unknown runtime"],
        ),
    ]);
    assert!(
        !d.path().join("cache").exists(),
        "eval trained its classifier before rejecting the input"
    );
}
