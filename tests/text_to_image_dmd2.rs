//! `distill train dmd2 --teacher DIR --prompts FILE [--data CAPTIONED | --no-gan]` on the tiny
//! Stable-Diffusion-like pipeline: the GAN term reads an image+caption folder encoded by the VAE
//! (its head on the UNet2DConditionModel's mid block), the student's weights change and stay
//! finite, its checkpoint names its pipeline; without real images the GAN term is refused by
//! name, and `--no-gan` trains on distribution matching alone; real images with `--no-gan`, a
//! caption that is not UTF-8 and an image without a caption are refused by name.

use distill::jobs::Dmd2Job;
use distill::train::dmd2::Dmd2Config;
use std::path::{Path, PathBuf};

fn sd_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/fixtures/diffusers/teachers/sd_tiny")
}

fn job(out: &Path, prompts: &Path, data: Option<&Path>, gan: bool) -> Dmd2Job {
    let mut c = Dmd2Config::default();
    c.common.teacher = sd_tiny();
    c.common.cfg_scale = 3.0;
    c.gan = gan;
    c.dfake_gen_update_ratio = 2;
    let r = &mut c.common.run;
    (r.train_steps, r.batch_size, r.seed) = (4, 2, 3);
    (r.log_every, r.sample_every, r.checkpoint_every) = (1, 0, 4);
    r.ema_decay = 0.0;
    for o in c.common.optims() {
        o.warmup_steps = 0;
        o.lr = 1e-3;
    }
    Dmd2Job {
        config: c,
        prompts: Some(prompts.to_path_buf()),
        data: data.map(Path::to_path_buf),
        out: out.to_path_buf(),
        ..Default::default()
    }
}

fn tensors(file: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// How many of the student's weights differ from the teacher UNet's (same names), of how many.
fn moved(ckpt: &Path) -> (usize, usize) {
    let s = tensors(&ckpt.join("model.safetensors"));
    assert!(s.values().flatten().all(|v| v.is_finite()));
    let t = tensors(&sd_tiny().join("unet/diffusion_pytorch_model.safetensors"));
    let (mut changed, mut total) = (0, 0);
    for (k, tv) in &t {
        let sv = s.get(k).unwrap_or_else(|| panic!("student lacks {k}"));
        total += tv.len();
        changed += sv.iter().zip(tv).filter(|(a, b)| a != b).count();
    }
    (changed, total)
}

#[test]
fn dmd2_on_a_pipeline_trains_with_its_gan_term_on_captioned_latents() {
    let d = tempfile::tempdir().unwrap();
    let prompts = d.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    let caps = d.path().join("captioned");
    std::fs::create_dir(&caps).unwrap();
    for (i, (v, c)) in [(200u8, "a light square"), (30, "a dark square")]
        .iter()
        .enumerate()
    {
        image::RgbImage::from_pixel(64, 64, image::Rgb([*v, 255 - *v, *v / 2]))
            .save(caps.join(format!("{i}.png")))
            .unwrap();
        std::fs::write(caps.join(format!("{i}.txt")), c).unwrap();
    }
    let ckpt = job(&d.path().join("gan"), &prompts, Some(&caps), true)
        .run(&candle_core::Device::Cpu)
        .unwrap();
    assert!(ckpt.join("text_to_image.json").is_file());
    let metrics = std::fs::read_to_string(d.path().join("gan/metrics.jsonl")).unwrap();
    assert!(metrics.contains("loss_gan_critic"), "{metrics}");
    assert!(metrics.contains("loss_dm"), "{metrics}");
    let (changed, total) = moved(&ckpt);
    assert!(changed > total / 2, "{changed} of {total} weights changed");

    // No real images: the GAN term is refused by name; --no-gan trains without them.
    let e = job(&d.path().join("x"), &prompts, None, true)
        .run(&candle_core::Device::Cpu)
        .unwrap_err();
    assert!(format!("{e:#}").contains("image+caption folder"), "{e:#}");
    let ckpt = job(&d.path().join("nogan"), &prompts, None, false)
        .run(&candle_core::Device::Cpu)
        .unwrap();
    let m = std::fs::read_to_string(d.path().join("nogan/metrics.jsonl")).unwrap();
    assert!(
        !m.contains("loss_gan_critic") && m.contains("loss_dm"),
        "{m}"
    );
    let (changed, total) = moved(&ckpt);
    assert!(changed > total / 2, "{changed} of {total} weights changed");

    // A projection GAN head needs class labels: refused by name on a text-to-image teacher.
    let mut pj = job(&d.path().join("proj"), &prompts, Some(&caps), true);
    pj.config.gan_projection = true;
    let e = pj.run(&candle_core::Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("gan_projection"), "{e:#}");
    // So does the GAN head's classifier.
    let mut cl = job(&d.path().join("cls"), &prompts, Some(&caps), true);
    cl.config.gan_classifier_weight = 0.1;
    let e = cl.run(&candle_core::Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("gan_classifier_weight"), "{e:#}");
    // Real images with the GAN term off would be read for nothing: refused by name.
    let e = job(&d.path().join("y"), &prompts, Some(&caps), false)
        .run(&candle_core::Device::Cpu)
        .unwrap_err();
    assert!(format!("{e:#}").contains("--data: with --no-gan"), "{e:#}");
    // A caption that is not UTF-8, and an image without its caption, are refused naming the file.
    std::fs::write(caps.join("1.txt"), [0xff, 0xfe, b'a']).unwrap();
    let e = job(&d.path().join("z"), &prompts, Some(&caps), true)
        .run(&candle_core::Device::Cpu)
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("1.txt") && e.contains("not UTF-8"), "{e}");
    std::fs::remove_file(caps.join("1.txt")).unwrap();
    let e = job(&d.path().join("z"), &prompts, Some(&caps), true)
        .run(&candle_core::Device::Cpu)
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("no caption") && e.contains("1.txt"), "{e}");
}
