//! Damaged checkpoints and ONNX files.

use super::*;

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
                "--cases",
                "1",
                "--batches",
                "2",
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
                // tract plans the 14-call graph once per batch size (~30 s each): one of each.
                "--cases",
                "1",
                "--batches",
                "2",
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
