//! Teacher training: a tiny UNet overfits a handful of digits, checkpoints round-trip exactly,
//! a resumed run continues the same loss curve, NaN stops the run and keeps the checkpoint.

use candle_core::{Device, Tensor};
use distill::checkpoint;
use distill::data::Dataset;
use distill::train::teacher::{self, TeacherConfig};
use distill::train::RunDir;
use graphs::{CandleBackend, UNetConfig};

/// 16 synthetic 16x16 "digits": class k is a bright bar at row k, so they are easy to tell apart.
fn toy_data(n: usize) -> Dataset {
    let (h, w) = (16, 16);
    let mut images = vec![-1f32; n * h * w];
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    for (i, &l) in labels.iter().enumerate() {
        for x in 2..14 {
            images[i * h * w + (l as usize + 3) * w + x] = 1.0;
        }
    }
    Dataset {
        images,
        labels,
        channels: 1,
        height: h,
        width: w,
        num_classes: 10,
        class_names: (0..10).map(|i| i.to_string()).collect(),
        source: "toy".into(),
    }
}

fn tiny_cfg(steps: u64) -> TeacherConfig {
    let mut c = TeacherConfig {
        model: UNetConfig::tiny(),
        train_steps: steps,
        batch_size: 8,
        log_every: 1,
        checkpoint_every: 5,
        sample_every: 0,
        ..Default::default()
    };
    c.optim.warmup_steps = 5;
    c.optim.lr = 2e-3;
    c.sample_steps = 3;
    c
}

fn losses(run: &RunDir) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.metrics())
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn tiny_unet_overfits_a_handful_of_digits() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    let mut cfg = tiny_cfg(150);
    cfg.label_dropout = 0.0;
    cfg.log_every = 10;
    cfg.checkpoint_every = 150;
    teacher::train(&cfg, &toy_data(16), &run, false, false, &Device::Cpu).unwrap();
    let l = losses(&run);
    let (first, last) = (l[0].1, l.last().unwrap().1);
    assert!(last < first / 3.0, "loss fell only from {first} to {last}");
}

#[test]
fn checkpoint_save_load_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    teacher::train(
        &tiny_cfg(5),
        &toy_data(16),
        &run,
        false,
        false,
        &Device::Cpu,
    )
    .unwrap();
    let (den, meta) = checkpoint::load(&run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!(meta.step, 5);
    let (den2, _) =
        checkpoint::load(&run.checkpoint().join("model.safetensors"), &Device::Cpu).unwrap();
    let b = CandleBackend::new(&Device::Cpu);
    let x = Tensor::randn(0f32, 1.0, (3, 1, 16, 16), &Device::Cpu).unwrap();
    let l = Tensor::new(&[0u32, 5, 10], &Device::Cpu).unwrap();
    let lv = den.level_const(&b, &x, 2.0).unwrap();
    let a = den
        .forward(&b, &x, &lv, &l)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let c = den2
        .forward(&b, &x, &lv, &l)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, c);
    // Saved and reloaded once more: still bit-identical.
    let w: std::collections::HashMap<_, _> = graphs::params::collect(&den)
        .into_iter()
        .map(|p| (p.name, p.t))
        .collect();
    let d2 = dir.path().join("copy");
    checkpoint::save(&d2, &meta, &w).unwrap();
    let (den3, _) = checkpoint::load(&d2, &Device::Cpu).unwrap();
    let e = den3
        .forward(&b, &x, &lv, &l)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, e);
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let data = toy_data(16);
    let full_dir = tempfile::tempdir().unwrap();
    let full = RunDir::new(full_dir.path()).unwrap();
    teacher::train(&tiny_cfg(12), &data, &full, false, false, &Device::Cpu).unwrap();

    let part_dir = tempfile::tempdir().unwrap();
    let part = RunDir::new(part_dir.path()).unwrap();
    // "Interrupted" after step 5 (the last checkpoint), then resumed to 12.
    teacher::train(&tiny_cfg(5), &data, &part, false, false, &Device::Cpu).unwrap();
    assert!(
        teacher::train(&tiny_cfg(12), &data, &part, false, false, &Device::Cpu).is_err(),
        "refuses to overwrite a run without --resume"
    );
    teacher::train(&tiny_cfg(12), &data, &part, true, false, &Device::Cpu).unwrap();
    let (a, b) = (losses(&full), losses(&part));
    assert_eq!(a.len(), 12);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {s}: {x} vs {y}"
        );
    }
}

/// Checkpoint and log intervals that do not line up: the run stops at step 5 (a checkpoint, in
/// the middle of the window 5..8) and is resumed; the log lines at 8 and 12 average the same
/// steps as the uninterrupted run's (the open window is stored in the training state).
#[test]
fn a_resume_mid_log_window_logs_the_same_metrics() {
    let data = toy_data(16);
    let cfg = |steps| TeacherConfig {
        log_every: 4,
        checkpoint_every: 3,
        ..tiny_cfg(steps)
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = RunDir::new(full_dir.path()).unwrap();
    teacher::train(&cfg(12), &data, &full, false, false, &Device::Cpu).unwrap();
    let part_dir = tempfile::tempdir().unwrap();
    let part = RunDir::new(part_dir.path()).unwrap();
    teacher::train(&cfg(5), &data, &part, false, false, &Device::Cpu).unwrap();
    teacher::train(&cfg(12), &data, &part, true, false, &Device::Cpu).unwrap();
    let (a, b) = (losses(&full), losses(&part));
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), [4, 8, 12]);
    // The stopped run's own last line (step 5) stays; every line of the full run is matched.
    assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), [4, 5, 8, 12]);
    for (s, x) in &a {
        let y = b.iter().find(|p| p.0 == *s).unwrap().1;
        assert!(
            (x - y).abs() <= 1e-6 * x.abs().max(1.0),
            "step {s}: {x} (uninterrupted) vs {y} (resumed)"
        );
    }
    // The comparison tells the windows apart: the line at 8 is the mean of steps 5..8 (a run
    // logging every step gives them), not of 6..8 (what a resume with an empty window logged).
    let fine_dir = tempfile::tempdir().unwrap();
    let fine = RunDir::new(fine_dir.path()).unwrap();
    let c1 = TeacherConfig {
        log_every: 1,
        ..cfg(12)
    };
    teacher::train(&c1, &data, &fine, false, false, &Device::Cpu).unwrap();
    let per_step = losses(&fine);
    let mean = |from: u64| {
        let v: Vec<f64> = per_step
            .iter()
            .filter(|p| (from..=8).contains(&p.0))
            .map(|p| p.1)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let at8 = a[1].1;
    assert!((mean(5) - at8).abs() <= 1e-6 * at8.abs().max(1.0));
    assert!(
        (mean(6) - at8).abs() > 1e-4 * at8.abs().max(1.0),
        "{} vs {at8}",
        mean(6)
    );
}

#[test]
fn diverging_run_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    teacher::train(
        &tiny_cfg(5),
        &toy_data(16),
        &run,
        false,
        false,
        &Device::Cpu,
    )
    .unwrap();
    let before = std::fs::read(run.checkpoint().join("model.safetensors")).unwrap();
    let mut bad = toy_data(16);
    bad.images[3] = f32::NAN;
    let err = teacher::train(&tiny_cfg(10), &bad, &run, true, false, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("NaN") && msg.contains("checkpoint"), "{msg}");
    assert_eq!(
        before,
        std::fs::read(run.checkpoint().join("model.safetensors")).unwrap(),
        "the last good checkpoint is untouched"
    );
}

#[test]
fn corrupt_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    teacher::train(
        &tiny_cfg(5),
        &toy_data(16),
        &run,
        false,
        false,
        &Device::Cpu,
    )
    .unwrap();
    let w = run.checkpoint().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load(&run.checkpoint(), &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
    let err = checkpoint::load(dir.path().join("nope").as_path(), &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"));
}

#[test]
fn ema_weights_are_detached_from_the_trained_variables() {
    // A copy of a Var keeps an autograd edge; a model built on such weights would record and
    // keep alive every activation of its forward passes (it once took sampling to 8 GB).
    use distill::train::optim::Ema;
    let v = candle_core::Var::from_tensor(
        &Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let vars = vec![("w".to_string(), v.clone())];
    let mut ema = Ema::new(&vars, 0.9).unwrap();
    ema.update(&vars, 5).unwrap();
    let w = ema.tensors()["w"].clone();
    let g = (w * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&v).is_none(), "the EMA must not reach the variable");
}

/// Every weight of a checkpoint folder, flattened.
fn weights(run: &RunDir) -> Vec<f32> {
    let w = checkpoint::load_tensors(&run.checkpoint().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut names: Vec<_> = w.keys().cloned().collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| w[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn a_destructive_update_never_replaces_the_last_good_checkpoint() {
    // `train teacher --lr 1e6 --checkpoint-every 1 --resume` on a finished run: the update of
    // step 6 wrecks the weights; the step-5 checkpoint must survive and the message must say so.
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    let data = toy_data(16);
    teacher::train(&tiny_cfg(5), &data, &run, false, false, &Device::Cpu).unwrap();
    let before = std::fs::read(run.checkpoint().join("model.safetensors")).unwrap();
    let state_before = std::fs::read(run.checkpoint().join("train_state.safetensors")).unwrap();
    let mut bad = tiny_cfg(20);
    bad.optim.lr = 1e6;
    bad.optim.warmup_steps = 0;
    bad.checkpoint_every = 1;
    let err = teacher::train(&bad, &data, &run, true, false, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("diverged"), "{msg}");
    let meta = checkpoint::load_meta(&run.checkpoint()).unwrap();
    assert!(
        msg.contains(&format!("checkpoint (step {})", meta.step)),
        "the message names the step kept ({}): {msg}",
        meta.step
    );
    assert!(weights(&run).iter().all(|v| v.is_finite()));
    if meta.step == 5 {
        assert_eq!(
            before,
            std::fs::read(run.checkpoint().join("model.safetensors")).unwrap()
        );
        assert_eq!(
            state_before,
            std::fs::read(run.checkpoint().join("train_state.safetensors")).unwrap()
        );
    }
    // What is kept samples to finite images and resumes.
    let (den, meta) = checkpoint::load(&run.checkpoint(), &Device::Cpu).unwrap();
    let imgs = {
        let inp = distill::sample::seeded_noise(&den, &meta.generator, 4, 0, &Device::Cpu).unwrap();
        let l = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
        distill::sample::generate(&den, &meta.generator, &inp, &l, 4, &Device::Cpu).unwrap()
    };
    let v = imgs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "the kept checkpoint samples NaN"
    );
    teacher::train(&tiny_cfg(8), &data, &run, true, false, &Device::Cpu).unwrap();
    assert_eq!(checkpoint::load_meta(&run.checkpoint()).unwrap().step, 8);
}

#[test]
fn divergence_before_the_first_checkpoint_says_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    let mut bad = toy_data(16);
    bad.images[3] = f32::NAN;
    let err = teacher::train(&tiny_cfg(10), &bad, &run, false, false, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no checkpoint was written yet"), "{msg}");
    assert!(!run.checkpoint().join("config.json").exists());
}

#[test]
fn a_teacher_state_of_the_old_layout_resumes_on_the_same_curve() {
    // Layout 1 (before the runners were merged): moments as adam.{m,v}.*, metadata adam_t, no
    // state_version or resume_key.
    let data = toy_data(16);
    let full_dir = tempfile::tempdir().unwrap();
    let full = RunDir::new(full_dir.path()).unwrap();
    teacher::train(&tiny_cfg(8), &data, &full, false, false, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    teacher::train(&tiny_cfg(5), &data, &run, false, false, &Device::Cpu).unwrap();
    let p = run.checkpoint().join("train_state.safetensors");
    let (t, mut meta) = checkpoint::load_tensors_with_meta(&p, &Device::Cpu).unwrap();
    let old: std::collections::HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k.replacen("adam.model.", "adam.", 1), v))
        .collect();
    let at = meta.remove("adam_t.model").unwrap();
    meta.insert("adam_t".into(), at);
    meta.remove("state_version");
    meta.remove("resume_key");
    let bytes = checkpoint::safetensors_bytes_with_meta(&old, Some(meta.clone())).unwrap();
    std::fs::write(&p, bytes).unwrap();
    teacher::train(&tiny_cfg(8), &data, &run, true, false, &Device::Cpu).unwrap();
    let (a, b) = (losses(&full), losses(&run));
    assert_eq!(a.len(), b.len());
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {s}: {x} vs {y}"
        );
    }
    // A layout from the future is refused with the reason.
    meta.insert("state_version".into(), "99".into());
    let bytes = checkpoint::safetensors_bytes_with_meta(&old, Some(meta)).unwrap();
    std::fs::write(&p, bytes).unwrap();
    let err = teacher::train(&tiny_cfg(9), &data, &run, true, false, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("newer distill"), "{err:#}");
}
