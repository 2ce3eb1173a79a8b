//! Data loaders and the PNG grid writer: the embedded digits are the real MNIST subset, each format
//! round-trips synthetic files bit-exactly, every malformed input is an error naming the file
//! (never a panic), and grids decode back to the expected layout and pixel values.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use distill::data::*;
use distill::grid::*;
use tempfile::TempDir;

// ---------------------------------------------------------------- helpers

fn idx_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x803, n, rows, cols] {
        b.extend(u32::to_be_bytes(v));
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x801, labels.len() as u32] {
        b.extend(u32::to_be_bytes(v));
    }
    b.extend_from_slice(labels);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The error message of `r`, asserting that it failed and that the message names `file`.
fn err_naming<T: std::fmt::Debug>(r: Result<T, DataError>, file: &str) -> String {
    let e = r.expect_err("expected an error").to_string();
    assert!(e.contains(file), "error does not name {file:?}: {e}");
    e
}

fn scaled(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// 5 synthetic 3x4 images whose pixel (i, y, x) is distinct, with labels 0..5.
fn synthetic_mnist() -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..5 * 12).map(|k| (k * 4 + 1) as u8).collect();
    (pixels, vec![3, 1, 4, 1, 5])
}

fn write_mnist(dir: &Path, prefix: &str, gzip: bool) -> (PathBuf, PathBuf) {
    let (px, lab) = synthetic_mnist();
    let (img, lb) = (idx_images(5, 3, 4, &px), idx_labels(&lab));
    let sfx = if gzip { ".gz" } else { "" };
    let f = |b: &[u8]| if gzip { gz(b) } else { b.to_vec() };
    (
        put(dir, &format!("{prefix}-images-idx3-ubyte{sfx}"), &f(&img)),
        put(dir, &format!("{prefix}-labels-idx1-ubyte{sfx}"), &f(&lb)),
    )
}

fn check_synthetic_mnist(d: &Dataset) {
    let (px, lab) = synthetic_mnist();
    assert_eq!((d.len(), d.channels, d.height, d.width), (5, 1, 3, 4));
    assert_eq!(d.labels, lab.iter().map(|&l| l as u32).collect::<Vec<_>>());
    assert_eq!(d.images, px.iter().map(|&v| scaled(v)).collect::<Vec<_>>());
    assert_eq!(d.num_classes, 10);
    assert_eq!(
        d.class_names,
        (0..10).map(|k| k.to_string()).collect::<Vec<_>>()
    );
}

/// `n` CIFAR records: label `labels[k]`, pixel (k, c, i) = (k*7 + c*3 + i) % 256.
fn cifar_records(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, &l) in labels.iter().enumerate() {
        b.push(l);
        for c in 0..3 {
            for i in 0..1024 {
                b.push(((k * 7 + c * 3 + i) % 256) as u8);
            }
        }
    }
    b
}

fn gray_png(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn rgba_png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(f(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Decodes a PNG into (width, height, color type, pixels).
fn decode_png(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

// ---------------------------------------------------------------- embedded MNIST

#[test]
fn embedded_mnist_is_the_first_10k_training_digits() {
    let d = embedded_mnist().unwrap();
    assert_eq!(
        (d.len(), d.channels, d.height, d.width, d.num_classes),
        (10_000, 1, 28, 28, 10)
    );
    assert_eq!(d.images.len(), 10_000 * 784);
    let mut counts = [0usize; 10];
    for &l in &d.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    assert!(d.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Real digits: black background and saturated strokes both occur.
    assert_eq!(d.images.iter().cloned().fold(f32::INFINITY, f32::min), -1.0);
    assert_eq!(
        d.images.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
        1.0
    );
    // `load(None)` is the same data.
    let l = load(None).unwrap();
    assert_eq!((l.labels.len(), &l.labels[..20]), (10_000, &d.labels[..20]));
}

#[test]
fn embedded_mnist_pads_to_32_with_background_border() {
    let d = embedded_mnist().unwrap().subset(200);
    let p = d.clone().to_resolution(32).unwrap();
    assert_eq!((p.len(), p.channels, p.height, p.width), (200, 1, 32, 32));
    for i in 0..200 {
        let img = &p.images[i * 1024..(i + 1) * 1024];
        for y in 0..32 {
            for x in 0..32 {
                let v = img[y * 32 + x];
                if !(2..30).contains(&y) || !(2..30).contains(&x) {
                    assert_eq!(v, -1.0, "border pixel ({y},{x}) of image {i}");
                } else {
                    assert_eq!(v, d.images[i * 784 + (y - 2) * 28 + (x - 2)]);
                }
            }
        }
    }
    assert_eq!(p.labels, d.labels);
}

// ---------------------------------------------------------------- MNIST IDX

#[test]
fn mnist_raw_and_gz_round_trip() {
    let t = TempDir::new().unwrap();
    let raw = t.path().join("raw");
    let zip = t.path().join("zip");
    let (ri, _) = write_mnist(&raw, "train", false);
    let (zi, zl) = write_mnist(&zip, "train", true);
    for d in [
        load_mnist(&raw).unwrap(),
        load_mnist(&ri).unwrap(),
        load(Some(&raw)).unwrap(),
        load(Some(&ri)).unwrap(),
    ] {
        check_synthetic_mnist(&d);
    }
    for d in [
        load_mnist(&zip).unwrap(),
        load_mnist(&zi).unwrap(),
        load(Some(&zip)).unwrap(),
        load(Some(&zl)).unwrap(),
    ] {
        check_synthetic_mnist(&d);
    }
}

#[test]
fn mnist_gzip_is_detected_by_magic_not_extension() {
    let t = TempDir::new().unwrap();
    let (px, lab) = synthetic_mnist();
    // gzip content under raw names, and raw content under a .gz name.
    put(
        t.path(),
        "t10k-images-idx3-ubyte",
        &gz(&idx_images(5, 3, 4, &px)),
    );
    put(t.path(), "t10k-labels-idx1-ubyte", &gz(&idx_labels(&lab)));
    check_synthetic_mnist(&load(Some(t.path())).unwrap());
    let u = TempDir::new().unwrap();
    put(
        u.path(),
        "x-images-idx3-ubyte.gz",
        &idx_images(5, 3, 4, &px),
    );
    put(u.path(), "x-labels-idx1-ubyte.gz", &idx_labels(&lab));
    check_synthetic_mnist(&load(Some(u.path())).unwrap());
}

#[test]
fn mnist_directory_prefers_the_training_split() {
    let t = TempDir::new().unwrap();
    let (px, lab) = synthetic_mnist();
    put(
        t.path(),
        "t10k-images-idx3-ubyte",
        &idx_images(1, 3, 4, &px[..12]),
    );
    put(t.path(), "t10k-labels-idx1-ubyte", &idx_labels(&lab[..1]));
    write_mnist(t.path(), "train", true);
    check_synthetic_mnist(&load(Some(t.path())).unwrap());
}

#[test]
fn mnist_errors_name_the_file() {
    let t = TempDir::new().unwrap();
    let (px, lab) = synthetic_mnist();
    let case = |name: &str, images: Vec<u8>, labels: Vec<u8>| {
        let dir = t.path().join(name);
        let ip = put(&dir, "bad-images-idx3-ubyte", &images);
        put(&dir, "bad-labels-idx1-ubyte", &labels);
        load(Some(&ip))
    };
    let good_img = idx_images(5, 3, 4, &px);
    let good_lab = idx_labels(&lab);

    let mut wrong = good_img.clone();
    wrong[3] = 0x01;
    let e = err_naming(
        case("magic", wrong, good_lab.clone()),
        "bad-images-idx3-ubyte",
    );
    assert!(e.contains("0x00000803") && e.contains("0x00000801"), "{e}");

    let mut wrong = good_lab.clone();
    wrong[2] = 0x09;
    let e = err_naming(
        case("lmagic", good_img.clone(), wrong),
        "bad-labels-idx1-ubyte",
    );
    assert!(e.contains("0x00000801") && e.contains("0x00000901"), "{e}");

    let e = err_naming(
        case(
            "trunc_img",
            good_img[..good_img.len() - 7].to_vec(),
            good_lab.clone(),
        ),
        "bad-images-idx3-ubyte",
    );
    assert!(
        e.contains("truncated")
            && e.contains(&format!("expected {}", good_img.len()))
            && e.contains(&format!("{}", good_img.len() - 7)),
        "{e}"
    );

    let e = err_naming(
        case("trunc_hdr", good_img[..10].to_vec(), good_lab.clone()),
        "bad-images-idx3-ubyte",
    );
    assert!(e.contains("truncated") && e.contains("expected 16"), "{e}");

    let e = err_naming(
        case(
            "trunc_lab",
            good_img.clone(),
            good_lab[..good_lab.len() - 1].to_vec(),
        ),
        "bad-labels-idx1-ubyte",
    );
    assert!(e.contains("truncated"), "{e}");

    let e = err_naming(
        case("count", good_img.clone(), idx_labels(&lab[..4])),
        "bad-images-idx3-ubyte",
    );
    assert!(
        e.contains("bad-labels-idx1-ubyte") && e.contains("5 images") && e.contains("4 labels"),
        "{e}"
    );

    let mut extra = good_img.clone();
    extra.extend([0, 0, 0]);
    let e = err_naming(
        case("trailing", extra, good_lab.clone()),
        "bad-images-idx3-ubyte",
    );
    assert!(e.contains("trailing"), "{e}");

    let e = err_naming(
        case(
            "huge",
            idx_images(200_000_000, 28, 28, &[]),
            good_lab.clone(),
        ),
        "bad-images-idx3-ubyte",
    );
    assert!(e.contains("200000000"), "{e}");

    err_naming(
        case("zero_dim", idx_images(5, 0, 4, &[]), good_lab.clone()),
        "bad-images-idx3-ubyte",
    );
    err_naming(
        case("zero_count", idx_images(0, 3, 4, &[]), idx_labels(&[])),
        "bad-images-idx3-ubyte",
    );

    let mut broken = gz(&good_img);
    let n = broken.len();
    broken.truncate(n / 2);
    let e = err_naming(
        case("bad_gz", broken, good_lab.clone()),
        "bad-images-idx3-ubyte",
    );
    assert!(e.contains("gzip"), "{e}");

    // An images file alone: the error lists where the labels were looked for.
    let lone = put(&t.path().join("lone"), "solo-images-idx3-ubyte", &good_img);
    let e = err_naming(load(Some(&lone)), "solo-labels-idx1-ubyte");
    assert!(e.contains("solo-images-idx3-ubyte"), "{e}");
}

#[test]
fn mnist_every_truncation_is_an_error_not_a_panic() {
    let (px, lab) = synthetic_mnist();
    let img = idx_images(5, 3, 4, &px);
    let lb = idx_labels(&lab);
    let p = Path::new("cut-images-idx3-ubyte");
    for k in 0..img.len() {
        assert!(mnist::parse_images(&img[..k], p).is_err(), "prefix {k}");
    }
    for k in 0..lb.len() {
        assert!(mnist::parse_labels(&lb[..k], p).is_err(), "prefix {k}");
    }
    // Truncated gzip streams too, through the file loader.
    let t = TempDir::new().unwrap();
    put(t.path(), "z-labels-idx1-ubyte.gz", &gz(&lb));
    let zipped = gz(&img);
    for k in 0..zipped.len() {
        let ip = put(t.path(), "z-images-idx3-ubyte.gz", &zipped[..k]);
        err_naming(load_mnist(&ip), "z-images-idx3-ubyte.gz");
    }
}

// ---------------------------------------------------------------- CIFAR-10

fn check_cifar(d: &Dataset, labels: &[u8], first_k: usize) {
    assert_eq!(
        (d.len(), d.channels, d.height, d.width, d.num_classes),
        (labels.len(), 3, 32, 32, 10)
    );
    assert_eq!(
        d.labels,
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );
    for (j, k) in (first_k..first_k + labels.len()).enumerate() {
        for c in 0..3 {
            for i in [0, 1, 31, 32, 500, 1023] {
                assert_eq!(
                    d.images[j * 3072 + c * 1024 + i],
                    scaled(((k * 7 + c * 3 + i) % 256) as u8),
                    "record {k} channel {c} pixel {i}"
                );
            }
        }
    }
}

#[test]
fn cifar_round_trips_three_records() {
    let t = TempDir::new().unwrap();
    let f = put(t.path(), "test_batch.bin", &cifar_records(&[3, 0, 9]));
    let d = load_cifar(&f).unwrap();
    check_cifar(&d, &[3, 0, 9], 0);
    assert_eq!(
        d.class_names,
        (0..10).map(|k| k.to_string()).collect::<Vec<_>>()
    );
    // Directory without training batches falls back to test_batch.bin; auto-detected.
    check_cifar(&load(Some(t.path())).unwrap(), &[3, 0, 9], 0);
    check_cifar(&load(Some(&f)).unwrap(), &[3, 0, 9], 0);
}

#[test]
fn cifar_directory_reads_training_batches_in_order_with_class_names() {
    let t = TempDir::new().unwrap();
    let all = cifar_records(&[1, 2, 3, 4, 5]);
    // Batch 10 must come after batch 2 (numeric, not lexicographic, order).
    put(t.path(), "data_batch_10.bin", &all[3 * 3073..]);
    put(t.path(), "data_batch_1.bin", &all[..2 * 3073]);
    put(t.path(), "data_batch_2.bin", &all[2 * 3073..3 * 3073]);
    put(t.path(), "test_batch.bin", &cifar_records(&[7]));
    let names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    put(
        t.path(),
        "batches.meta.txt",
        format!("{}\n\n", names.join("\n")).as_bytes(),
    );
    let d = load(Some(t.path())).unwrap();
    check_cifar(&d, &[1, 2, 3, 4, 5], 0);
    assert_eq!(d.class_names, names);
}

#[test]
fn cifar_errors_name_the_file() {
    let t = TempDir::new().unwrap();
    let mut rec = cifar_records(&[1, 2, 3]);
    rec.truncate(2 * 3073 + 100);
    let f = put(t.path(), "short/data_batch_1.bin", &rec);
    let e = err_naming(load(Some(&f)), "data_batch_1.bin");
    assert!(
        e.contains("truncated")
            && e.contains(&format!("expected {}", 3 * 3073))
            && e.contains(&format!("{}", 2 * 3073 + 100)),
        "{e}"
    );
    // Through the directory, too.
    err_naming(load(Some(&t.path().join("short"))), "data_batch_1.bin");

    let f = put(
        t.path(),
        "label/data_batch_1.bin",
        &cifar_records(&[1, 10, 3]),
    );
    let e = err_naming(load_cifar(&f), "data_batch_1.bin");
    assert!(e.contains("record 1") && e.contains("label 10"), "{e}");

    let f = put(t.path(), "empty/test_batch.bin", &[]);
    err_naming(load_cifar(&f), "test_batch.bin");

    err_naming(
        load_cifar(&t.path().join("label").join("missing.bin")),
        "missing.bin",
    );
}

// ---------------------------------------------------------------- image folder

#[test]
fn image_folder_loads_sorted_classes_and_files() {
    let t = TempDir::new().unwrap();
    // Created out of order; classes and files must come back sorted.
    put(
        t.path(),
        "zebra/b.png",
        &gray_png(3, 2, |x, y| (10 * x + 100 * y) as u8),
    );
    put(t.path(), "zebra/a.PNG", &gray_png(3, 2, |_, _| 255));
    put(t.path(), "ant/only.png", &gray_png(3, 2, |_, _| 0));
    put(t.path(), "ant/readme.txt", b"not an image");
    let d = load(Some(t.path())).unwrap();
    assert_eq!(d.class_names, ["ant", "zebra"]);
    assert_eq!(d.num_classes, 2);
    assert_eq!(d.labels, [0, 1, 1]);
    assert_eq!((d.channels, d.height, d.width), (1, 2, 3));
    assert!(d.images[..6].iter().all(|&v| v == -1.0));
    assert!(d.images[6..12].iter().all(|&v| v == 1.0));
    let expect: Vec<f32> = [0u8, 10, 20, 100, 110, 120]
        .iter()
        .map(|&v| scaled(v))
        .collect();
    assert_eq!(&d.images[12..], &expect[..]);
}

#[test]
fn image_folder_rgba_becomes_rgb_chw() {
    let t = TempDir::new().unwrap();
    put(
        t.path(),
        "c/x.png",
        &rgba_png(2, 2, |x, y| [(x * 50) as u8, (y * 60) as u8, 200, 7]),
    );
    let d = load_folder(t.path(), None).unwrap();
    assert_eq!((d.channels, d.height, d.width), (3, 2, 2));
    let expect: Vec<f32> = [0u8, 50, 0, 50, 0, 0, 60, 60, 200, 200, 200, 200]
        .iter()
        .map(|&v| scaled(v))
        .collect();
    assert_eq!(d.images, expect);
}

#[test]
fn image_folder_resizes_mixed_sizes_when_asked() {
    let t = TempDir::new().unwrap();
    put(t.path(), "a/1.png", &gray_png(8, 8, |_, _| 255));
    put(t.path(), "b/2.png", &gray_png(5, 3, |_, _| 0));
    let d = load_at_resolution(Some(t.path()), Some(4)).unwrap();
    assert_eq!((d.len(), d.channels, d.height, d.width), (2, 1, 4, 4));
    assert!(d.images[..16].iter().all(|&v| v == 1.0));
    assert!(d.images[16..].iter().all(|&v| v == -1.0));
}

#[test]
fn image_folder_errors_name_the_file() {
    let t = TempDir::new().unwrap();

    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    err_naming(load_folder(&empty, None), "empty");

    let root = t.path().join("noimg");
    put(&root, "cls/notes.txt", b"hello");
    let e = err_naming(load_folder(&root, None), "cls");
    assert!(e.contains("no .png"), "{e}");

    let root = t.path().join("mixed");
    put(&root, "a/1.png", &gray_png(4, 4, |_, _| 1));
    put(&root, "a/2.png", &gray_png(4, 4, |_, _| 2));
    put(&root, "b/3.png", &gray_png(5, 4, |_, _| 3));
    let e = err_naming(load(Some(&root)), "3.png");
    assert!(
        e.contains("1.png") && e.contains("1x4x4") && e.contains("1x4x5"),
        "{e}"
    );

    let root = t.path().join("channels");
    put(&root, "a/1.png", &gray_png(2, 2, |_, _| 1));
    put(&root, "a/2.png", &rgba_png(2, 2, |_, _| [1, 2, 3, 255]));
    let e = err_naming(load_folder(&root, None), "2.png");
    assert!(e.contains("3x2x2"), "{e}");

    let root = t.path().join("corrupt");
    put(&root, "a/1.png", &gray_png(2, 2, |_, _| 1));
    let mut bad = gray_png(2, 2, |_, _| 1);
    bad.truncate(bad.len() / 2);
    put(&root, "a/broken.png", &bad);
    put(
        &root,
        "a/garbage.jpg",
        b"\xff\xd8\xff definitely not a jpeg",
    );
    let e = err_naming(load_folder(&root, None), "broken.png");
    assert!(e.contains("decode"), "{e}");
    // Also when the bad file is not the first one decoded in parallel: order is deterministic.
    std::fs::remove_file(root.join("a/broken.png")).unwrap();
    err_naming(load_folder(&root, None), "garbage.jpg");
}

// ---------------------------------------------------------------- detection

#[test]
fn unknown_formats_list_the_supported_ones() {
    let t = TempDir::new().unwrap();
    let f = put(t.path(), "notes.txt", b"hello world");
    let e = err_naming(load(Some(&f)), "notes.txt");
    assert!(
        e.contains("MNIST") && e.contains("CIFAR") && e.contains("image folder"),
        "{e}"
    );

    let d = t.path().join("hollow");
    std::fs::create_dir_all(&d).unwrap();
    put(&d, "readme.md", b"#");
    err_naming(load(Some(&d)), "hollow");

    err_naming(load(Some(&t.path().join("nowhere"))), "nowhere");

    // A file with no telling name but an IDX magic inside gzip is still MNIST.
    let (px, _) = synthetic_mnist();
    let img = put(t.path(), "digits", &gz(&idx_images(5, 3, 4, &px)));
    assert_eq!(detect(&img).unwrap(), Format::Mnist);
}

// ---------------------------------------------------------------- resolution, subset, split

fn toy(n: usize, c: usize, h: usize, w: usize) -> Dataset {
    Dataset {
        images: (0..n * c * h * w).map(|v| v as f32).collect(),
        labels: (0..n as u32).collect(),
        channels: c,
        height: h,
        width: w,
        num_classes: n,
        class_names: (0..n).map(|k| k.to_string()).collect(),
        source: "toy".into(),
    }
}

#[test]
fn to_resolution_downscales_by_area_and_rejects_bad_requests() {
    let d = toy(2, 1, 4, 4).to_resolution(2).unwrap();
    assert_eq!((d.height, d.width), (2, 2));
    assert_eq!(d.images, [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5]);
    assert_eq!(
        toy(1, 3, 5, 5).to_resolution(5).unwrap().images,
        toy(1, 3, 5, 5).images
    );
    // Odd padding: 3 -> 6 puts one pixel left/top, two right/bottom.
    let p = toy(1, 1, 3, 3).to_resolution(6).unwrap();
    assert_eq!(&p.images[6..12], &[-1.0, 0.0, 1.0, 2.0, -1.0, -1.0]);
    assert!(p.images[..6]
        .iter()
        .chain(&p.images[24..])
        .all(|&v| v == -1.0));
    // Non-square pads fine when it fits; shrinking it is refused, as is 0.
    let r = toy(1, 1, 2, 3).to_resolution(4).unwrap();
    assert_eq!(r.images.len(), 16);
    let e = toy(1, 1, 6, 4).to_resolution(4).unwrap_err().to_string();
    assert!(e.contains("toy") && e.contains("6x4"), "{e}");
    assert!(toy(1, 1, 4, 4).to_resolution(0).is_err());
}

#[test]
fn subset_and_split_keep_images_with_their_labels() {
    let d = toy(5, 1, 2, 2);
    let s = d.subset(2);
    assert_eq!((s.labels.clone(), s.images.len()), (vec![0, 1], 8));
    let (a, b) = d.split(3);
    assert_eq!(a.labels, [0, 1, 2]);
    assert_eq!(b.labels, [3, 4]);
    assert_eq!(b.images[0], 12.0);
    assert_eq!(d.subset(99).len(), 5);
    let (all, none) = d.split(10);
    assert_eq!((all.len(), none.len(), none.images.len()), (5, 0, 0));
    // The batch view agrees with the split.
    let (x, y) = b.batch(&[1], &Device::Cpu).unwrap();
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [16.0, 17.0, 18.0, 19.0]
    );
    assert_eq!(y.to_vec1::<u32>().unwrap(), [4]);
}

// ---------------------------------------------------------------- PNG grid

#[test]
fn grid_png_has_expected_layout_and_pixels() {
    let t = TempDir::new().unwrap();
    let (n, h, w) = (5, 3, 4);
    // Image i is uniformly (i / 2 - 1): -1, -0.5, 0, 0.5, 1.
    let images: Vec<f32> = (0..n)
        .flat_map(|i| std::iter::repeat_n(i as f32 / 2.0 - 1.0, h * w))
        .collect();
    let path = t.path().join("g.png");
    save_grid_png(&path, &images, n, 1, h, w, 2).unwrap();
    let (gw, gh, ct, px) = decode_png(&path);
    assert_eq!(
        (gw, gh, ct),
        (2 * (4 + 2) + 2, 3 * (3 + 2) + 2, png::ColorType::Grayscale)
    );
    let at = |x: usize, y: usize| px[y * gw as usize + x];
    let expect = [0u8, 64, 128, 191, 255];
    for (i, &e) in expect.iter().enumerate() {
        let (ox, oy) = (2 + (i % 2) * 6, 2 + (i / 2) * 5);
        for y in 0..h {
            for x in 0..w {
                assert_eq!(at(ox + x, oy + y), e, "image {i}");
            }
        }
    }
    // Padding and the empty sixth slot are black.
    assert_eq!((at(0, 0), at(1, 5), at(6, 2), at(10, 13)), (0, 0, 0, 0));
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
}

#[test]
fn grid_png_rgb_clamps_and_round_trips_dataset_pixels() {
    let t = TempDir::new().unwrap();
    // One 3x1x2 image: channel 0 out of range both ways, channel 1 NaN/in range, channel 2 data.
    let images = [-5.0, 7.0, f32::NAN, 0.0, scaled(33), scaled(200)];
    let path = t.path().join("rgb.png");
    save_grid_png(&path, &images, 1, 3, 1, 2, 8).unwrap();
    let (gw, gh, ct, px) = decode_png(&path);
    assert_eq!((gw, gh, ct), (2 + 4, 1 + 4, png::ColorType::Rgb));
    let p = |x: usize| &px[((2 * gw as usize) + 2 + x) * 3..((2 * gw as usize) + 3 + x) * 3];
    assert_eq!(p(0), [0, 0, 33]);
    assert_eq!(p(1), [255, 128, 200]);
}

#[test]
fn tensor_grid_matches_slice_grid_and_checks_shapes() {
    let t = TempDir::new().unwrap();
    let d = embedded_mnist().unwrap().subset(6);
    let (x, _) = d.batch(&[0, 1, 2, 3, 4, 5], &Device::Cpu).unwrap();
    let a = t.path().join("sub/a.png");
    tensor_grid_png(&a, &x, 3).unwrap();
    let b = t.path().join("b.png");
    save_grid_png(&b, &d.images, 6, 1, 28, 28, 3).unwrap();
    let (wa, ha, _, pa) = decode_png(&a);
    let (wb, hb, _, pb) = decode_png(&b);
    assert_eq!((wa, ha), (3 * 30 + 2, 2 * 30 + 2));
    assert_eq!((wa, ha, &pa), (wb, hb, &pb));
    // The first digit comes back as its original bytes.
    for y in 0..28 {
        for x in 0..28 {
            let orig = ((d.images[y * 28 + x] + 1.0) * 127.5).round() as u8;
            assert_eq!(pa[(2 + y) * wa as usize + 2 + x], orig);
        }
    }
    assert!(save_grid_png(&b, &d.images, 7, 1, 28, 28, 3).is_err());
    assert!(save_grid_png(&b, &d.images[..6 * 784 / 2], 3, 2, 28, 28, 3).is_err());
    assert!(tensor_grid_png(
        &b,
        &Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        1
    )
    .is_err());
}
