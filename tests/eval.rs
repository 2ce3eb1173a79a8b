//! Sample-quality evaluation end to end: the MNIST classifier trains to >= 97% held-out accuracy,
//! real digits score like real data and noise like noise, and the classifier cache behaves.
//! The classifier is trained once per test binary (about a minute on 2 cores) plus once more by
//! the corrupt-cache test.

use candle_core::{Device, Tensor};
use distill::eval::classifier::{self, Classifier, TEST_IMAGES, TRAIN_IMAGES};
use distill::eval::{EvalReport, Evaluator};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

struct Fixture {
    dir: tempfile::TempDir,
    clf: Classifier,
    /// Held-out digits `[2000, 1, 32, 32]` and their labels.
    heldout: Tensor,
    heldout_labels: Vec<u32>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("distill-eval-test")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let t0 = Instant::now();
        let clf = classifier::load_or_train(dir.path(), &Device::Cpu, false).unwrap();
        eprintln!(
            "classifier: trained in {:.1}s (load_or_train total {:.1}s), held-out accuracy {:.2}%",
            clf.meta().train_seconds,
            t0.elapsed().as_secs_f64(),
            100.0 * clf.test_accuracy()
        );
        let data = distill::data::embedded_mnist()
            .unwrap()
            .to_resolution(32)
            .unwrap();
        assert_eq!((data.channels, data.height, data.width), (1, 32, 32));
        let idx: Vec<usize> = (TRAIN_IMAGES..TRAIN_IMAGES + TEST_IMAGES).collect();
        let (heldout, labels) = data.batch(&idx, &Device::Cpu).unwrap();
        let heldout_labels = labels.to_vec1::<u32>().unwrap();
        Fixture {
            dir,
            clf,
            heldout,
            heldout_labels,
        }
    })
}

fn evaluator() -> &'static Evaluator {
    static E: OnceLock<Evaluator> = OnceLock::new();
    E.get_or_init(|| {
        let t0 = Instant::now();
        let ev = Evaluator::new(fixture().dir.path(), &Device::Cpu, false).unwrap();
        eprintln!(
            "evaluator ready in {:.1}s: real vs real FD {:.3}, noise FD {:.1}",
            t0.elapsed().as_secs_f64(),
            ev.ref_real_fd,
            ev.ref_noise_fd
        );
        assert!(
            ev.classifier.from_cache(),
            "Evaluator::new should reuse the fixture's cached classifier"
        );
        ev
    })
}

fn accuracy(pred: &[u32], labels: &[u32]) -> f64 {
    pred.iter().zip(labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64
}

fn gaussian_images(n: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 32 * 32)
        .map(|_| {
            rng.sample::<f32, _>(rand_distr::StandardNormal)
                .clamp(-1.0, 1.0)
        })
        .collect();
    Tensor::from_vec(v, (n, 1, 32, 32), &Device::Cpu).unwrap()
}

#[test]
fn classifier_reaches_97_percent_on_heldout_digits() {
    let f = fixture();
    assert!(!f.clf.from_cache(), "a fresh cache dir must train");
    assert!(
        f.clf.test_accuracy() >= 0.97,
        "recorded held-out accuracy {:.4}",
        f.clf.test_accuracy()
    );
    // Measure it again independently of the training code's own bookkeeping.
    let acc = accuracy(&f.clf.predict(&f.heldout).unwrap(), &f.heldout_labels);
    println!(
        "held-out accuracy {:.2}% ({} digits)",
        100.0 * acc,
        TEST_IMAGES
    );
    assert!(acc >= 0.97, "held-out accuracy {acc:.4}");
    assert!((acc - f.clf.test_accuracy()).abs() < 1e-12);
    // Features are 128-d, logits 10-d; batching (256 at a time) is invisible.
    let feats = f
        .clf
        .features(&f.heldout.narrow(0, 0, 300).unwrap())
        .unwrap();
    assert_eq!(feats.dims(), &[300, 128]);
    let one = f
        .clf
        .features(&f.heldout.narrow(0, 299, 1).unwrap())
        .unwrap();
    let diff = (feats.narrow(0, 299, 1).unwrap() - one)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "batched vs single features differ by {diff}");
    assert_eq!(
        f.clf
            .logits(&f.heldout.narrow(0, 0, 3).unwrap())
            .unwrap()
            .dims(),
        &[3, 10]
    );
    for name in ["classifier.safetensors", "classifier.json"] {
        assert!(f.dir.path().join(name).is_file(), "{name} not cached");
    }
}

#[test]
fn real_heldout_digits_score_like_real_data() {
    let f = fixture();
    let ev = evaluator();
    assert!(
        ev.ref_real_fd > 0.0 && ev.ref_real_fd < 0.05 * ev.ref_noise_fd,
        "real {} noise {}",
        ev.ref_real_fd,
        ev.ref_noise_fd
    );
    let r: EvalReport = ev.evaluate(&f.heldout, Some(&f.heldout_labels)).unwrap();
    println!("{r}");
    assert_eq!(r.n, TEST_IMAGES);
    let acc = r.class_accuracy.unwrap();
    assert!(acc >= 0.97, "class accuracy {acc}");
    let per = r.per_class_accuracy.as_ref().unwrap();
    assert_eq!(per.len(), 10);
    assert!(per.iter().all(|&a| a > 0.9), "per class {per:?}");
    assert!(
        r.fd < 0.25 * r.ref_noise_fd,
        "real digits FD {} vs noise {}",
        r.fd,
        r.ref_noise_fd
    );
    assert_eq!(
        (r.ref_real_fd, r.ref_noise_fd),
        (ev.ref_real_fd, ev.ref_noise_fd)
    );
    // Without labels there is no accuracy, and the FD is the same.
    let u = ev.evaluate(&f.heldout, None).unwrap();
    assert!(u.class_accuracy.is_none() && u.per_class_accuracy.is_none());
    assert_eq!(u.fd, r.fd);
    // Degrading the digits raises the FD step by step.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let noise: Vec<f32> = (0..TEST_IMAGES * 1024)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    let noise = Tensor::from_vec(noise, (TEST_IMAGES, 1, 32, 32), &Device::Cpu).unwrap();
    let mut last = r.fd;
    for sigma in [0.3f64, 0.8] {
        let x = (&f.heldout + (&noise * sigma).unwrap())
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        let fd = ev.evaluate(&x, None).unwrap().fd;
        println!("held-out digits + N(0, {sigma}^2): FD {fd:.3}");
        assert!(
            fd > last,
            "FD should grow with corruption: {fd} after {last}"
        );
        last = fd;
    }
}

/// Precision/recall/density/coverage on known cases in the classifier's features: real digits
/// score like the real vs real reference, one repeated digit has no recall, dropping half the
/// classes halves recall (and shows per class), noise has no precision.
#[test]
fn diversity_on_known_cases() {
    let f = fixture();
    let ev = evaluator();
    let n = 1000;
    let (x, labels) = (
        f.heldout.narrow(0, 0, n).unwrap(),
        f.heldout_labels[..n].to_vec(),
    );
    let r = ev.evaluate(&x, Some(&labels)).unwrap();
    println!("{r}");
    let (s, rr) = (r.diversity.samples, r.diversity.real_vs_real);
    assert_eq!((r.diversity.k, r.diversity.n_real), (3, n));
    for (name, a, b) in [
        ("precision", s.precision, rr.precision),
        ("recall", s.recall, rr.recall),
        ("coverage", s.coverage, rr.coverage),
    ] {
        assert!(a > 0.8 && b > 0.8, "{name}: held-out {a}, real vs real {b}");
        assert!(
            (a - b).abs() < 0.06,
            "{name}: held-out {a} vs real vs real {b}"
        );
    }
    assert!((s.density - 1.0).abs() < 0.25, "density {}", s.density);
    let per = r.diversity.per_class_recall.as_ref().unwrap();
    assert!(per.iter().all(|&p| p > 0.6), "per-class recall {per:?}");
    // One digit repeated n times: a single point, no recall, no coverage to speak of.
    let one = x.narrow(0, 7, 1).unwrap().repeat((n, 1, 1, 1)).unwrap();
    let d = ev.evaluate(&one, None).unwrap().diversity.samples;
    println!("one repeated digit: {d:?}");
    assert!(d.recall < 0.01 && d.coverage < 0.02, "{d:?}");
    // Only the digits 0-4 (truly labelled): recall about halves, the dropped classes have none.
    let keep: Vec<u32> = (0..f.heldout_labels.len() as u32)
        .filter(|&i| f.heldout_labels[i as usize] < 5)
        .take(n)
        .collect();
    let kept = f
        .heldout
        .index_select(&Tensor::new(keep.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let kl: Vec<u32> = keep.iter().map(|&i| f.heldout_labels[i as usize]).collect();
    let h = ev.evaluate(&kept, Some(&kl)).unwrap();
    println!("digits 0-4 only: {h}");
    let hs = h.diversity.samples;
    assert!(hs.precision > 0.8, "{hs:?}");
    assert!(hs.recall < 0.65 && hs.coverage < 0.6, "{hs:?}");
    let hp = h.diversity.per_class_recall.unwrap();
    assert!(hp[..5].iter().all(|&p| p > 0.6), "{hp:?}");
    assert!(hp[5..].iter().all(|p| p.is_nan()), "{hp:?}");
    // Faint pixel noise (the size a last denoising step might leave) raises FD but leaves which
    // digits are drawn, so precision and recall stay (README, Evaluation).
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let noise: Vec<f32> = (0..n * 1024)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    let noise = Tensor::from_vec(noise, (n, 1, 32, 32), &Device::Cpu).unwrap();
    let mut last_fd = r.fd;
    for sigma in [0.02f64, 0.05, 0.1, 0.167] {
        let y = (&x + (&noise * sigma).unwrap()).unwrap();
        let q = ev.evaluate(&y, Some(&labels)).unwrap();
        let d = q.diversity.samples;
        println!(
            "held-out + N(0, {sigma}^2): FD {:.2}, precision {:.3}, recall {:.3}, density {:.3}, coverage {:.3}",
            q.fd, d.precision, d.recall, d.density, d.coverage
        );
        assert!(q.fd > last_fd, "FD {} after {last_fd}", q.fd);
        assert!(
            (d.precision - s.precision).abs() < 0.05 && s.recall - d.recall < 0.06,
            "{d:?}"
        );
        last_fd = q.fd;
    }
    // Noise: nothing inside the real manifold.
    let g = ev
        .evaluate(&gaussian_images(n, 5), None)
        .unwrap()
        .diversity
        .samples;
    println!("Gaussian noise: {g:?}");
    assert!(g.precision < 0.02 && g.density < 0.02, "{g:?}");
}

#[test]
fn gaussian_noise_scores_badly() {
    let ev = evaluator();
    let n = 1000;
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    let r = ev.evaluate(&gaussian_images(n, 77), Some(&labels)).unwrap();
    println!("{r}");
    assert!(
        r.class_accuracy.unwrap() < 0.3,
        "noise classified as its label {:?}",
        r.class_accuracy
    );
    assert!(
        r.fd > 0.5 * ev.ref_noise_fd,
        "noise FD {} vs reference {}",
        r.fd,
        ev.ref_noise_fd
    );
    assert!(r.fd > 20.0 * ev.ref_real_fd);
}

#[test]
fn second_load_hits_the_cache_with_identical_predictions() {
    let f = fixture();
    let t0 = Instant::now();
    let again = classifier::load_or_train(f.dir.path(), &Device::Cpu, false).unwrap();
    assert!(again.from_cache(), "second load retrained");
    assert!(
        t0.elapsed().as_secs_f64() < 20.0,
        "cache load took {:?}",
        t0.elapsed()
    );
    assert_eq!(again.meta(), f.clf.meta());
    assert_eq!(
        again.predict(&f.heldout).unwrap(),
        f.clf.predict(&f.heldout).unwrap()
    );
    let a = again
        .features(&f.heldout.narrow(0, 0, 64).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = f
        .clf
        .features(&f.heldout.narrow(0, 0, 64).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
    assert!(classifier::load_cached(f.dir.path(), &Device::Cpu)
        .unwrap()
        .from_cache());
}

fn copy_cache(from: &Path, to: &Path) {
    for name in ["classifier.safetensors", "classifier.json"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn corrupt_or_stale_cache_is_rejected_and_retrained() {
    let f = fixture();
    let dir = tempfile::Builder::new()
        .prefix("distill-eval-corrupt")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let (w, j) = (
        dir.path().join("classifier.safetensors"),
        dir.path().join("classifier.json"),
    );
    let dev = Device::Cpu;

    // Missing cache.
    let e = classifier::load_cached(dir.path(), &dev)
        .err()
        .expect("empty dir must miss");
    assert!(format!("{e:#}").contains("classifier.json"), "{e:#}");

    // Garbage metadata.
    copy_cache(f.dir.path(), dir.path());
    std::fs::write(&j, b"{ not json").unwrap();
    assert!(format!(
        "{:#}",
        classifier::load_cached(dir.path(), &dev).err().unwrap()
    )
    .contains("parsing"));

    // Another architecture version / other training data.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.path().join("classifier.json")).unwrap())
            .unwrap();
    let mut stale = meta.clone();
    stale["version"] = serde_json::json!(999);
    std::fs::write(&j, serde_json::to_vec(&stale).unwrap()).unwrap();
    assert!(format!(
        "{:#}",
        classifier::load_cached(dir.path(), &dev).err().unwrap()
    )
    .contains("version 999"));
    let mut other = meta.clone();
    other["data_sha256"] = serde_json::json!("00");
    std::fs::write(&j, serde_json::to_vec(&other).unwrap()).unwrap();
    assert!(format!(
        "{:#}",
        classifier::load_cached(dir.path(), &dev).err().unwrap()
    )
    .contains("other data"));

    // Truncated weights, and flipped bytes with the length kept.
    copy_cache(f.dir.path(), dir.path());
    let good = std::fs::read(&w).unwrap();
    std::fs::write(&w, &good[..good.len() / 2]).unwrap();
    assert!(format!(
        "{:#}",
        classifier::load_cached(dir.path(), &dev).err().unwrap()
    )
    .contains("sha256"));
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    for b in &mut flipped[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&w, &flipped).unwrap();
    assert!(format!(
        "{:#}",
        classifier::load_cached(dir.path(), &dev).err().unwrap()
    )
    .contains("sha256"));

    // load_or_train on the corrupt cache retrains (no panic) and repairs it.
    let clf = classifier::load_or_train(dir.path(), &dev, false).unwrap();
    assert!(!clf.from_cache(), "corrupt cache was used");
    assert!(
        clf.test_accuracy() >= 0.97,
        "retrained accuracy {}",
        clf.test_accuracy()
    );
    let acc = accuracy(&clf.predict(&f.heldout).unwrap(), &f.heldout_labels);
    assert!(acc >= 0.97, "retrained held-out accuracy {acc}");
    let repaired = classifier::load_cached(dir.path(), &dev).unwrap();
    assert!(repaired.from_cache());
    assert_eq!(
        repaired.predict(&f.heldout).unwrap(),
        clf.predict(&f.heldout).unwrap()
    );
    // No temp files left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let ev = evaluator();
    let dev = Device::Cpu;
    for shape in [
        vec![4, 3, 32, 32],
        vec![4, 1, 28, 28],
        vec![1, 32, 32],
        vec![4, 1, 64, 64],
    ] {
        let x = Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &dev).unwrap();
        let e = ev
            .evaluate(&x, None)
            .expect_err("wrong shape accepted")
            .to_string();
        assert!(
            e.contains("1x32x32") && e.contains(&format!("{shape:?}")),
            "{e}"
        );
        assert!(ev.classifier.features(&x).is_err());
    }
    let mut v = vec![0f32; 4 * 1024];
    v[1024 + 5] = f32::NAN;
    let x = Tensor::from_vec(v.clone(), (4, 1, 32, 32), &dev).unwrap();
    let e = ev.evaluate(&x, None).expect_err("NaN accepted").to_string();
    assert!(e.contains("NaN"), "{e}");
    v[1024 + 5] = f32::INFINITY;
    let x = Tensor::from_vec(v.clone(), (4, 1, 32, 32), &dev).unwrap();
    assert!(ev.evaluate(&x, None).is_err(), "Inf accepted");
    v[1024 + 5] = 0.0;
    let x = Tensor::from_vec(v, (4, 1, 32, 32), &dev).unwrap();
    assert!(ev.evaluate(&x, None).is_ok());
    assert!(ev
        .evaluate(&x, Some(&[1, 2, 3]))
        .err()
        .unwrap()
        .to_string()
        .contains("3 labels for 4 images"));
    assert!(ev
        .evaluate(&x, Some(&[1, 2, 3, 10]))
        .err()
        .unwrap()
        .to_string()
        .contains("label 10"));
    assert!(
        ev.evaluate(&x.narrow(0, 0, 1).unwrap(), None).is_err(),
        "one image has no covariance"
    );
}
