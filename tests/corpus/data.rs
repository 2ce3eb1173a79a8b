//! Bad training data.

use super::*;

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
