//! The bad-input corpus (issue #13): every case drives the built binary and asserts its exit
//! code, that its output names the problem, that no panic reached the user, and that nothing on
//! disk was lost (every file that existed before is byte-identical after, no temp files left).
//!
//! Not here: divergence during training keeping the last good checkpoint (the training runner
//! owns that; its tests live with it).

mod common;

use common::*;
use std::path::Path;

/// The tiny teacher's flags with `extra` added; a flag given in `extra` replaces the base one.
fn teacher_flags(out: &Path, extra: &[&str]) -> Vec<String> {
    let base = tiny_teacher(out, 2);
    let given: Vec<&str> = extra
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap())
        // The deprecated name replaces the base's flag too.
        .map(|a| if a == "--steps" { "--train-steps" } else { a })
        .collect();
    let mut a = Vec::new();
    let mut i = 0;
    while i < base.len() {
        if given.contains(&base[i].as_str()) {
            i += 2;
            continue;
        }
        a.push(base[i].clone());
        i += 1;
    }
    a.extend(s(extra));
    a
}

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

#[test]
fn toml_configs_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let toml = |name: &str, body: &str, code: i32, needles: &[&str]| {
        let path = d.path().join(format!("{}.toml", name.replace(' ', "_")));
        std::fs::write(&path, body).unwrap();
        let a = s(&[
            "train",
            "teacher",
            "--config",
            &p(&path),
            "--out",
            &p(&out),
            "--limit",
            "8",
            "--sample-every",
            "0",
        ]);
        Case::new(name, a, code, needles).keep(d.path())
    };
    assert_cases(vec![
        toml(
            "unknown field",
            "stepz = 3\n",
            1,
            &["unknown field", "stepz"],
        ),
        toml("syntax error", "train_steps = = 3\n", 1, &["parsing"]),
        toml("cfg nan", "cfg_scale = nan\n", 1, &["cfg_scale"]),
        toml(
            "negative train_steps",
            "train_steps = -5\n",
            1,
            &["parsing"],
        ),
        toml(
            "both train_steps and its old name",
            "train_steps = 3\nsteps = 3\n",
            1,
            &["duplicate field", "train_steps"],
        ),
        toml("lr inf", "[optim]\nlr = inf\n", 1, &["optim.lr"]),
        toml(
            "huge resolution",
            "[model]\nresolution = 100000\n",
            1,
            &["model.resolution"],
        ),
        toml(
            "unknown parameterisation",
            "parameterisation = \"foo\"\n",
            1,
            &["parameterisation"],
        ),
        toml(
            "empty channel_mult",
            "[model]\nchannel_mult = []\n",
            1,
            &["channel_mult"],
        ),
        toml(
            "beta1 above 1",
            "[optim]\nbeta1 = 1.5\n",
            1,
            &["optim.beta1"],
        ),
        Case::new(
            "missing config file",
            s(&[
                "train",
                "teacher",
                "--config",
                "/nonexistent/run.toml",
                "--out",
                &p(&out),
            ]),
            1,
            &["/nonexistent/run.toml"],
        ),
    ]);
    // A partial [model] table fills the rest from the defaults and trains; a config with the
    // deprecated `steps` still trains, with a note naming the new key.
    for (steps_key, note) in [("train_steps", false), ("steps", true)] {
        let path = d.path().join(format!("partial_{steps_key}.toml"));
        std::fs::write(
            &path,
            format!("{steps_key} = 1\nbatch_size = 2\n[model]\nbase_channels = 8\nresolution = 16\nchannel_mult = [1, 2]\nattn_resolutions = []\n"),
        )
        .unwrap();
        let o = run(
            &s(&[
                "train",
                "teacher",
                "--config",
                &p(&path),
                "--out",
                &p(&out.join(steps_key)),
                "--limit",
                "4",
                "--sample-every",
                "0",
            ]),
            &[],
        );
        assert!(o.status.success(), "partial [model] table: {}", text(&o));
        let deprecated = text(&o).contains("`steps` is deprecated, use `train_steps`");
        assert_eq!(deprecated, note, "{}", text(&o));
    }
}

#[test]
fn bad_data_is_refused_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let data = |name: &str, path: &Path, needles: &[&str]| {
        let mut a = tiny_teacher(&out, 1);
        a.extend(s(&["--data", &p(path)]));
        Case::new(name, a, 1, needles).keep(d.path())
    };
    let label42 = write_idx(&d.path().join("label42"), &[1, 2, 42, 3]);
    let trunc = write_idx(&d.path().join("trunc"), &[1, 2, 3, 4]);
    let ti = trunc.join("x-images-idx3-ubyte");
    let b = std::fs::read(&ti).unwrap();
    std::fs::write(&ti, &b[..b.len() - 10]).unwrap();
    let magic = write_idx(&d.path().join("magic"), &[1, 2]);
    flip(&magic.join("x-images-idx3-ubyte"), 3);
    let count = write_idx(&d.path().join("count"), &[1, 2, 3]);
    let lab = count.join("x-labels-idx1-ubyte");
    let mut b = std::fs::read(&lab).unwrap();
    b.pop();
    b[7] = 2;
    std::fs::write(&lab, b).unwrap();
    let gz = d.path().join("gz");
    std::fs::create_dir_all(&gz).unwrap();
    std::fs::write(
        gz.join("x-images-idx3-ubyte.gz"),
        [0x1f, 0x8b, 8, 0, 1, 2, 3],
    )
    .unwrap();
    std::fs::write(
        gz.join("x-labels-idx1-ubyte.gz"),
        [0x1f, 0x8b, 8, 0, 1, 2, 3],
    )
    .unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir_all(empty.join("a")).unwrap();
    let undec = d.path().join("undecodable");
    write_png(&undec.join("a/ok.png"), 8, 8, 1);
    std::fs::write(undec.join("a/bad.png"), b"not a png at all").unwrap();
    let mixed_ch = d.path().join("mixed_channels");
    write_png(&mixed_ch.join("a/gray.png"), 8, 8, 1);
    write_png(&mixed_ch.join("b/rgb.png"), 8, 8, 3);
    let cifar = d.path().join("data_batch_1.bin");
    std::fs::write(&cifar, vec![3u8; 3073 + 100]).unwrap();
    let cifar_label = d.path().join("cifar_label").join("data_batch_1.bin");
    std::fs::create_dir_all(cifar_label.parent().unwrap()).unwrap();
    let mut rec = vec![0u8; 3073];
    rec[0] = 200;
    std::fs::write(&cifar_label, rec).unwrap();
    let unknown = d.path().join("notes.txt");
    std::fs::write(&unknown, "hello").unwrap();
    assert_cases(vec![
        data(
            "IDX label 42 with 10 classes",
            &label42,
            &["label 42", "num_classes is 10"],
        ),
        data(
            "truncated IDX",
            &trunc,
            &["x-images-idx3-ubyte", "truncated"],
        ),
        data("wrong IDX magic", &magic, &["x-images-idx3-ubyte", "magic"]),
        data("image/label count mismatch", &count, &["labels"]),
        data("corrupt gzip", &gz, &["gzip"]),
        data("class folder without images", &empty, &["no .png"]),
        data("undecodable image", &undec, &["bad.png", "decode"]),
        data("mixed channel counts", &mixed_ch, &["rgb.png"]),
        data(
            "truncated CIFAR batch",
            &cifar,
            &["data_batch_1.bin", "truncated"],
        ),
        data("CIFAR label out of range", &cifar_label, &["label 200"]),
        data(
            "unknown format",
            &unknown,
            &["notes.txt", "unknown dataset format"],
        ),
        data(
            "missing path",
            &d.path().join("nope"),
            &["nope", "No such file"],
        ),
    ]);
    assert!(!out.join("checkpoint").exists());
    // Mixed image sizes are resized to the model resolution (documented in the README).
    let mixed = d.path().join("mixed_sizes");
    write_png(&mixed.join("a/small.png"), 8, 8, 1);
    write_png(&mixed.join("b/big.png"), 40, 24, 1);
    let mut a = tiny_teacher(&d.path().join("mixed_run"), 1);
    a.extend(s(&["--data", &p(&mixed)]));
    let o = run(&a, &[]);
    assert!(o.status.success(), "mixed sizes: {}", text(&o));
}

#[test]
fn damaged_checkpoints_are_refused() {
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let png = p(&d.path().join("s.png"));
    let sample = |name: &str, ck: &Path, extra: &[&str], code: i32, needles: &[&str]| {
        let mut a = s(&["sample", &p(ck), "-o", &png, "--per-class", "1"]);
        a.extend(s(extra));
        Case::new(name, a, code, needles).keep(ck)
    };
    let w = |c: &Path| c.join("model.safetensors");
    let flipped = ckpt_copy(d.path(), "flipped");
    flip(&w(&flipped), safetensors_data_start(&w(&flipped)));
    let truncated = ckpt_copy(d.path(), "truncated");
    let b = std::fs::read(w(&truncated)).unwrap();
    std::fs::write(w(&truncated), &b[..b.len() / 2]).unwrap();
    let no_config = ckpt_copy(d.path(), "no_config");
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    let bad_json = ckpt_copy(d.path(), "bad_json");
    std::fs::write(bad_json.join("config.json"), "{ not json").unwrap();
    let edit = |name: &str, from: &str, to: &str| {
        let c = ckpt_copy(d.path(), name);
        let t = std::fs::read_to_string(c.join("config.json")).unwrap();
        assert!(t.contains(from), "{name}: {from} not in config.json");
        std::fs::write(c.join("config.json"), t.replacen(from, to, 1)).unwrap();
        c
    };
    let version = edit("version", "\"format_version\": 1", "\"format_version\": 99");
    let sigma0 = edit("sigma_data", "\"sigma_data\": 0.5", "\"sigma_data\": 0.0");
    let nan_ck = ckpt_copy(d.path(), "nan_weights");
    let dev = candle_core::Device::Cpu;
    let mut t = distill::checkpoint::load_tensors(&w(&nan_ck), &dev).unwrap();
    let k = t.keys().next().unwrap().clone();
    let shape = t[&k].dims().to_vec();
    t.insert(
        k,
        candle_core::Tensor::full(f32::NAN, shape.as_slice(), &dev).unwrap(),
    );
    distill::checkpoint::save_tensors(&w(&nan_ck), &t).unwrap();
    let missing = ckpt_copy(d.path(), "missing_tensor");
    let mut t = distill::checkpoint::load_tensors(&w(&missing), &dev).unwrap();
    let k = t.keys().next().unwrap().clone();
    t.remove(&k);
    distill::checkpoint::save_tensors(&w(&missing), &t).unwrap();
    let ex = p(&d.path().join("export"));
    assert_cases(vec![
        sample(
            "flipped weight byte",
            &flipped,
            &[],
            1,
            &["corrupted", "--no-verify"],
        ),
        sample(
            "flipped byte with --no-verify",
            &flipped,
            &["--no-verify"],
            0,
            &[],
        ),
        sample(
            "truncated weights",
            &truncated,
            &[],
            1,
            &["model.safetensors"],
        ),
        sample("missing config.json", &no_config, &[], 1, &["config.json"]),
        sample(
            "garbled config.json",
            &bad_json,
            &[],
            1,
            &["parsing", "config.json"],
        ),
        sample("unknown format version", &version, &[], 1, &["format 99"]),
        sample("sigma_data 0", &sigma0, &[], 1, &["sigma_data"]),
        sample("NaN weights", &nan_ck, &["--no-verify"], 1, &["NaN"]),
        sample(
            "missing tensor",
            &missing,
            &["--no-verify"],
            1,
            &["model.safetensors"],
        ),
        sample(
            "no such checkpoint",
            &d.path().join("nope"),
            &[],
            1,
            &["does not exist"],
        ),
        Case::new(
            "export NaN weights",
            s(&["export", &p(&nan_ck), "-o", &ex, "--no-verify"]),
            1,
            &["NaN"],
        )
        .keep(&nan_ck),
        Case::new(
            "validate against a NaN reference",
            s(&[
                "--no-verify",
                "validate",
                &p(&f.onnx),
                "--reference",
                &p(&nan_ck),
                "--runtimes",
                "tract",
            ]),
            1,
            &["NaN"],
        )
        .keep(&nan_ck),
    ]);
    assert!(!d.path().join("export").join("generator.onnx").exists());
}

#[test]
fn damaged_onnx_files_are_refused() {
    use prost::Message;
    let f = fixture();
    let d = tempfile::tempdir().unwrap();
    let ck = p(&f.ckpt);
    let junit = d.path().join("junit.xml");
    let v = |name: &str, model: &Path, code: i32, needles: &[&str]| {
        Case::new(
            name,
            s(&[
                "validate",
                &p(model),
                "--reference",
                &ck,
                "--runtimes",
                "tract",
                "--junit",
                &p(&junit),
            ]),
            code,
            needles,
        )
        .keep(&f.root)
    };
    let garbage = d.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\xff\xff\xff\xffnot protobuf").unwrap();
    let truncated = d.path().join("truncated.onnx");
    let b = std::fs::read(&f.onnx).unwrap();
    std::fs::write(&truncated, &b[..b.len() / 3]).unwrap();
    let mut m = export::runtime::load_model(&f.onnx).unwrap();
    let huge = d.path().join("huge.onnx");
    let mut mh = m.clone();
    mh.graph
        .as_mut()
        .unwrap()
        .initializer
        .push(export::proto::TensorProto {
            name: "huge".into(),
            dims: vec![1 << 20, 1 << 20],
            data_type: 1,
            raw_data: vec![0; 16],
            ..Default::default()
        });
    std::fs::write(&huge, mh.encode_to_vec()).unwrap();
    let no_kind = d.path().join("no_kind.onnx");
    m.metadata_props.retain(|e| e.key != "kind");
    std::fs::write(&no_kind, m.encode_to_vec()).unwrap();
    assert_cases(vec![
        v("garbage bytes", &garbage, 1, &["garbage.onnx"]),
        v("truncated file", &truncated, 1, &["truncated.onnx"]),
        v(
            "huge declared initializer",
            &huge,
            1,
            &["huge", "holds 16 bytes"],
        ),
        v("model metadata without kind", &no_kind, 1, &["kind"]),
        v(
            "missing file",
            &d.path().join("nope.onnx"),
            1,
            &["nope.onnx"],
        ),
        v("over the memory budget", &f.onnx, 1, &["memory budget"])
            .env("DISTILL_ONNX_MEMORY_BUDGET", "1000"),
        v("a good export passes", &f.onnx, 0, &["PASS"]),
    ]);
    // The JUnit file is written for an error too (the last failing case above wrote one).
    let o = run(
        &s(&[
            "validate",
            &p(&huge),
            "--reference",
            &ck,
            "--runtimes",
            "tract",
            "--junit",
            &p(&junit),
        ]),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<error"), "{xml}");
}

#[test]
fn resume_refuses_changed_inputs() {
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let o = run(&tiny_teacher(&run_dir, 2), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let ck = run_dir.join("checkpoint");
    let other = write_idx(&d.path().join("other"), &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let r = |name: &str, steps: u32, extra: &[&str], code: i32, needles: &[&str]| {
        let mut a = tiny_teacher(&run_dir, steps);
        a.extend(s(extra));
        Case::new(name, a, code, needles).keep(&ck)
    };
    // Stale temp files of killed writes are cleaned by the next write.
    let stale = ck.join(".model.safetensors.tmp999999");
    assert_cases(vec![
        r(
            "lower step target",
            1,
            &["--resume"],
            1,
            &["already at step 2", "--steps 2"],
        ),
        r(
            "other data",
            3,
            &["--resume", "--data", &p(&other)],
            1,
            &["trained on", "--allow-resume-change"],
        ),
        r(
            "other lr",
            3,
            &["--resume", "--lr", "0.01"],
            1,
            &["optim.lr", "--allow-resume-change"],
        ),
        r("existing run without --resume", 3, &[], 1, &["--resume"]),
    ]);
    std::fs::write(&stale, b"partial").unwrap();
    let o = run(
        &[
            tiny_teacher(&run_dir, 3),
            s(&["--resume", "--lr", "0.01", "--allow-resume-change"]),
        ]
        .concat(),
        &[],
    );
    assert!(o.status.success(), "explicit override: {}", text(&o));
    assert!(!stale.exists(), "stale temp file not cleaned");
    let state = ck.join("train_state.safetensors");
    let b = std::fs::read(&state).unwrap();
    std::fs::write(&state, &b[..b.len() / 2]).unwrap();
    assert_cases(vec![r(
        "truncated training state",
        4,
        &["--resume"],
        1,
        &["train_state.safetensors"],
    )]);
}

/// `kill -9` at random points of a run that checkpoints every step: whatever is on disk loads,
/// and `--resume` finishes the run.
#[test]
fn kills_during_checkpoint_writes_lose_nothing() {
    use rand::{Rng, SeedableRng};
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let ck = run_dir.join("checkpoint");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let steps = 40;
    let mut kills = 0;
    for attempt in 0..4 {
        let mut a = tiny_teacher(&run_dir, steps);
        if attempt > 0 && ck.join("train_state.safetensors").exists() {
            a.push("--resume".into());
        }
        let mut child = bin()
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(700..2500)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        if ck.join("config.json").exists() {
            let o = run(
                &s(&[
                    "sample",
                    &p(&ck),
                    "-o",
                    &p(&d.path().join("k.png")),
                    "--per-class",
                    "1",
                ]),
                &[],
            );
            assert!(o.status.success(), "after kill {attempt}: {}", text(&o));
        }
    }
    let mut a = tiny_teacher(&run_dir, steps);
    if ck.join("train_state.safetensors").exists() {
        a.push("--resume".into());
    }
    let o = run(&a, &[]);
    assert!(o.status.success(), "final resume: {}", text(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], steps);
    assert!(
        lost(&Default::default(), std::slice::from_ref(&ck)).is_empty(),
        "temp files left"
    );
    eprintln!("{kills} kills");
}

/// A full disk: the write fails with a message, the previous checkpoint stays loadable.
#[test]
fn a_full_disk_keeps_the_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs", &p(&mnt)])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk case did not run"
        );
        return;
    }
    let run_dir = mnt.join("run");
    let res = std::panic::catch_unwind(|| {
        let o = run(&tiny_teacher(&run_dir, 1), &[]);
        assert!(o.status.success(), "{}", text(&o));
        let ck = run_dir.join("checkpoint");
        let before = snapshot(&ck);
        // Fill the disk.
        let _ = std::fs::write(mnt.join("filler"), vec![0u8; 3 << 20]);
        let o = run(&[tiny_teacher(&run_dir, 3), s(&["--resume"])].concat(), &[]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains("disk full") || out.contains("No space"),
            "{out}"
        );
        let l = lost(&before, std::slice::from_ref(&ck));
        assert!(l.is_empty(), "{l:?}");
        std::fs::remove_file(mnt.join("filler")).unwrap();
        let o = run(
            &s(&[
                "sample",
                &p(&ck),
                "-o",
                &p(&d.path().join("x.png")),
                "--per-class",
                "1",
            ]),
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}
