//! LoRA students (`--lora-rank`): the adapters' maths against PEFT's unmerged form, the adapted
//! network equal to its base at init, training that changes only the adapters while student,
//! fake score and teacher share one copy of the base, resume byte-identical to an uninterrupted
//! run, unknown targets refused by name, the student exported to ONNX (no extra op) and validated
//! in tract and ONNX Runtime, and the LoRA file diffusers reads (keys, metadata, and diffusers'
//! own output for a LoRA we wrote: tests/fixtures/lora, made by scripts/lora_check.py).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use distill::checkpoint;
use distill::train::distill::{self as dist, Method, RunConfig, RunSpec, Teacher, LORA_FILE};
use distill::train::dmd2::{Dmd2, Dmd2Config};
use distill::train::tdm::{Tdm, TdmConfig};
use distill::train::teacher::{self, TeacherConfig};
use distill::train::RunDir;
use graphs::nn::lora::{self, LoraConfig};
use graphs::{CandleBackend, Denoiser, ModelConfig, Parameterisation, UNetConfig};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static CPU: Device = Device::Cpu;

fn diffusers_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/fixtures/diffusers")
}

fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn distill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .env("DISTILL_THREADS", "2")
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run distill")
}

fn ok(args: &[&str]) -> String {
    let o = distill(args);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "distill {args:?}:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Where a CPU tensor's data lives (equal for tensors sharing one allocation).
fn storage(t: &Tensor) -> usize {
    let (st, layout) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => {
            c.as_slice::<f32>().unwrap().as_ptr() as usize + 4 * layout.start_offset()
        }
        _ => panic!("CPU tensors only"),
    }
}

fn params(den: &Denoiser) -> HashMap<String, Tensor> {
    graphs::params::collect(den)
        .into_iter()
        .map(|p| (p.name, p.t))
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tiny EDM UNet with seeded random weights.
fn random_unet() -> Denoiser {
    let vm = VarMap::new();
    let cfg = ModelConfig::ours(UNetConfig::tiny(), Parameterisation::edm());
    let den = Denoiser::new(VarBuilder::from_varmap(&vm, DType::F32, &CPU), &cfg).unwrap();
    distill::train::seeded_init(&vm, 5, 1, &CPU).unwrap();
    // Detached: a frozen base, as a teacher is.
    graphs::params::detached(&den).unwrap()
}

/// Adapters on `layers` with random (nonzero) lora_B.
fn random_adapters(layers: &[lora::Adaptable], rank: usize) -> HashMap<String, Tensor> {
    let mut rng = distill::rng::step_rng(9, 0, 9);
    let mut a = lora::init_adapters(layers, rank, &mut rng, &CPU).unwrap();
    for l in layers {
        let k = lora::up_key(&l.path);
        let shape = a[&k].dims().to_vec();
        a.insert(k, distill::rng::randn(&mut rng, &shape, &CPU).unwrap());
    }
    a
}

fn forward(den: &Denoiser, seed: u64) -> Tensor {
    let b = CandleBackend::new(&CPU);
    let (c, r) = den.image_shape();
    let x =
        distill::rng::randn(&mut distill::rng::step_rng(seed, 0, 1), &[3, c, r, r], &CPU).unwrap();
    let labels = Tensor::new(&[1u32, 4, 10], &CPU).unwrap();
    let level = den.level_const(&b, &x, 2.5).unwrap();
    den.forward(&b, &x, &level, &labels).unwrap()
}

#[test]
fn adapters_start_at_the_base_and_merge_as_peft_computes_them_unmerged() {
    let base = random_unet();
    // The default targets are the attention projections.
    let cfg = LoraConfig {
        rank: 3,
        alpha: Some(6.0),
        targets: vec![],
    };
    let attn = lora::select(&base.net, &cfg).unwrap();
    assert!(!attn.is_empty());
    for l in &attn {
        let leaf = l.path.rsplit('.').next().unwrap();
        assert!(["q", "k", "v", "proj"].contains(&leaf), "{}", l.path);
        assert!(l.path.contains("attn."), "{}", l.path);
    }
    assert_eq!(attn.len() % 4, 0);
    // At init (lora_B = 0) the adapted network is its base, bit for bit.
    let mut rng = distill::rng::step_rng(1, 0, 1);
    let init = lora::init_adapters(&attn, 3, &mut rng, &CPU).unwrap();
    let at_init = lora::apply(&base, &init, cfg.scale()).unwrap();
    let (y0, y1) = (forward(&base, 2), forward(&at_init, 2));
    assert_eq!(
        y0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    // Linear, 1x1, 3x3 and strided 3x3 convs: the merged weight computes what PEFT's unmerged
    // layer does, base(x) + scale * B(A(x)) (A with the base conv's kernel, stride and padding,
    // B 1x1).
    let targets = ["emb_proj", "q", "conv1", "downsample"];
    let cfg = LoraConfig {
        rank: 2,
        alpha: Some(5.0),
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    let layers = lora::select(&base.net, &cfg).unwrap();
    let ad = random_adapters(&layers, 2);
    let adapted = lora::apply(&base, &ad, cfg.scale()).unwrap();
    let w = params(&adapted);
    let mut rng = distill::rng::step_rng(4, 0, 4);
    for t in targets {
        let l = layers.iter().find(|l| lora::matches(&l.path, t)).unwrap();
        let (a, b) = (&ad[&lora::down_key(&l.path)], &ad[&lora::up_key(&l.path)]);
        let merged = &w[&format!("{}.weight", l.path)];
        let (wb, scale) = (&l.weight.t, cfg.scale());
        let (ours, peft) = match l.kind {
            lora::LayerKind::Linear => {
                let x = distill::rng::randn(&mut rng, &[5, wb.dim(1).unwrap()], &CPU).unwrap();
                let base_y = x.matmul(&wb.t().unwrap()).unwrap();
                let low = x
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap();
                (
                    x.matmul(&merged.t().unwrap()).unwrap(),
                    (base_y + (low * scale).unwrap()).unwrap(),
                )
            }
            lora::LayerKind::Conv(k) => {
                let (stride, pad) = if t == "downsample" {
                    (2, 1)
                } else {
                    (1, k / 2)
                };
                let x =
                    distill::rng::randn(&mut rng, &[2, wb.dim(1).unwrap(), 8, 8], &CPU).unwrap();
                let conv = |x: &Tensor, w: &Tensor, p, s| x.conv2d(w, p, s, 1, 1).unwrap();
                let low = conv(&conv(&x, a, pad, stride), b, 0, 1);
                (
                    conv(&x, merged, pad, stride),
                    (conv(&x, wb, pad, stride) + (low * scale).unwrap()).unwrap(),
                )
            }
        };
        let d = max_abs(&ours, &peft);
        assert!(d < 1e-4, "{t} ({}): merged vs unmerged {d}", l.path);
        assert!(
            max_abs(merged, wb) > 1e-2,
            "{t}: the adapter changes nothing"
        );
    }
    // The adapted network's output moves away from the base.
    assert!(max_abs(&forward(&base, 3), &forward(&adapted, 3)) > 1e-3);

    // It lowers to ONNX as the merged network: the same graph as the base (no extra op), the
    // same bytes as a network built from the merged weights.
    let opts = export::ExportOptions {
        precision: graphs::Precision::Fp32,
        method: "dmd2".into(),
        weights_sha256: None,
        extra_metadata: vec![],
    };
    let dir = tmp("distill-lora-onnx");
    let write = |den: &Denoiser, name: &str| {
        let m = export::export_denoiser(den, &opts).unwrap();
        let p = dir.path().join(name);
        export::write_model(&m, &p).unwrap();
        (std::fs::read(&p).unwrap(), m.graph.unwrap().node.len())
    };
    let merged_den = checkpoint::denoiser_from_tensors(&base.config(), w, &CPU, "merged").unwrap();
    let (bytes_a, nodes_a) = write(&adapted, "adapted.onnx");
    let (bytes_m, _) = write(&merged_den, "merged.onnx");
    let (_, nodes_b) = write(&base, "base.onnx");
    assert_eq!(nodes_a, nodes_b, "the adapter adds no node");
    assert_eq!(bytes_a, bytes_m);
}

#[test]
fn an_unknown_target_is_refused_by_name_with_what_exists() {
    let base = random_unet();
    let cfg = LoraConfig {
        rank: 2,
        alpha: None,
        targets: vec!["q".into(), "nonexistent".into()],
    };
    let e = lora::select(&base.net, &cfg).unwrap_err().to_string();
    assert!(e.contains("\"nonexistent\""), "{e}");
    for name in ["q", "proj", "conv1", "emb_proj", "downsample"] {
        assert!(e.contains(name), "{name} not listed: {e}");
    }
    // diffusers names on a diffusers network.
    let (d, _) =
        distill::teacher_source::load(&diffusers_fixtures().join("teachers/digits32_ddim"), &CPU)
            .unwrap();
    let def = lora::select(
        &d.net,
        &LoraConfig {
            rank: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!def.is_empty());
    assert!(def.iter().all(|l| ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .any(|t| lora::matches(&l.path, t))));
    let e = lora::select(
        &d.net,
        &LoraConfig {
            rank: 2,
            targets: vec!["q".into()],
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"q\"") && e.contains("to_out.0") && e.contains("conv_shortcut"),
        "{e}"
    );
    // rank 0 with LoRA settings is a mistake, not silently full fine-tuning.
    let off = LoraConfig {
        rank: 0,
        alpha: Some(4.0),
        targets: vec![],
    };
    assert!(off
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--lora-rank"));
}

/// A tiny teacher trained for a few steps (once per test binary).
fn tiny_teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        let d = tmp("distill-lora-teacher");
        let mut c = TeacherConfig {
            model: UNetConfig::tiny(),
            train_steps: 6,
            batch_size: 16,
            log_every: 50,
            checkpoint_every: 6,
            sample_every: 0,
            sample_steps: 4,
            ..Default::default()
        };
        c.optim.lr = 2e-3;
        let run = RunDir::new(d.path()).unwrap();
        let data = distill::data::embedded_mnist()
            .unwrap()
            .to_resolution(16)
            .unwrap()
            .subset(64);
        teacher::train(&c, &data, &run, false, false, &CPU).unwrap();
        let p = d.path().join("checkpoint");
        (d, p)
    })
    .1
}

fn run_cfg(steps: u64) -> RunConfig {
    RunConfig {
        train_steps: steps,
        batch_size: 4,
        seed: 7,
        log_every: 1,
        sample_every: 0,
        checkpoint_every: 2,
        ema_decay: 0.9,
        ..Default::default()
    }
}

fn lora_cfg(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: Some(2.0 * rank as f64),
        targets: vec![
            "q".into(),
            "k".into(),
            "v".into(),
            "proj".into(),
            "conv1".into(),
        ],
    }
}

fn dmd2_cfg(steps: u64, rank: usize) -> Dmd2Config {
    let mut c = Dmd2Config::default();
    c.common.teacher = tiny_teacher().to_path_buf();
    c.common.run = run_cfg(steps);
    c.common.cfg_scale = 1.0;
    c.common.lora = lora_cfg(rank);
    for o in c.common.optims() {
        o.lr = 1e-2;
        o.warmup_steps = 0;
    }
    c.dfake_gen_update_ratio = 1;
    c
}

fn tdm_cfg(steps: u64, rank: usize) -> TdmConfig {
    let mut c = TdmConfig::default();
    c.common.teacher = tiny_teacher().to_path_buf();
    c.common.run = run_cfg(steps);
    c.common.timesteps = vec![999, 499];
    c.common.cfg_scale = 1.0;
    c.common.lora = lora_cfg(rank);
    for o in c.common.optims() {
        o.lr = 1e-2;
        o.warmup_steps = 0;
        // A fixed cosine length (by default it is the run's train_steps, which a resume to more
        // steps changes).
        o.decay_steps = 100;
    }
    c
}

fn spec<'a>(
    cfg: &'a RunConfig,
    toml: String,
    key: String,
    t: &'a Teacher,
    resume: bool,
) -> RunSpec<'a> {
    RunSpec {
        cfg,
        config_toml: toml,
        resume_key: key,
        rekey: None,
        teacher: Some((&t.sha256, &t.dir)),
        resume,
        show_progress: false,
        evaluator: None,
        device: &CPU,
    }
}

fn mnist16() -> distill::data::Dataset {
    distill::data::embedded_mnist()
        .unwrap()
        .to_resolution(16)
        .unwrap()
        .subset(64)
}

#[test]
fn lora_trains_only_adapters_on_one_shared_copy_of_the_base() {
    let t = Teacher::load(tiny_teacher(), &CPU).unwrap();
    let data = mnist16();
    let c = dmd2_cfg(3, 4);
    let mut m = Dmd2::new(c.clone(), &t, &data, &CPU).unwrap();
    let teacher_w = params(&t.den);
    let adapted: HashSet<String> = lora::select(&t.den.net, &c.common.lora)
        .unwrap()
        .into_iter()
        .map(|l| format!("{}.weight", l.path))
        .collect();
    assert!(adapted.len() >= 8, "{adapted:?}");
    // One copy of the base: every weight of student and fake score that is not adapted is the
    // teacher's own tensor; the distinct allocations of all three networks are the teacher's
    // plus one merged weight per adapted layer and network.
    let (student, fake) = m.networks().unwrap();
    let mut all = HashSet::new();
    for net in [&t.den, &student, &fake] {
        for (k, v) in params(net) {
            if !adapted.contains(&k) {
                assert_eq!(storage(&v), storage(&teacher_w[&k]), "{k} is a copy");
            }
            all.insert(storage(&v));
        }
    }
    assert_eq!(all.len(), teacher_w.len() + 2 * adapted.len());
    // At init both start as the teacher.
    assert_eq!(max_abs(&forward(&student, 1), &forward(&t.den, 1)), 0.0);
    // Only adapters are trained (the fake score's optimiser also has the GAN head).
    let trainable: usize = m.student_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert!(m
        .student_vars()
        .iter()
        .all(|(k, _)| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")));
    assert_eq!(m.student_vars().len(), 2 * adapted.len());
    let total: usize = teacher_w.values().map(|t| t.elem_count()).sum();
    assert!(trainable * 4 < total, "{trainable} of {total}");

    let dir = tmp("distill-lora-dmd2");
    let rs = spec(
        &c.common.run,
        toml::to_string(&c).unwrap(),
        c.resume_key().unwrap(),
        &t,
        false,
    );
    dist::run(&mut m, &rs, &RunDir::new(dir.path()).unwrap()).unwrap();
    // The teacher is untouched; the student's checkpoint is the base with only the adapted
    // weights changed.
    let (t2, _) = checkpoint::load(tiny_teacher(), &CPU).unwrap();
    for (k, v) in params(&t2) {
        assert_eq!(max_abs(&v, &teacher_w[&k]), 0.0, "teacher {k} changed");
    }
    let ckpt = dir.path().join("checkpoint");
    let w = checkpoint::load_tensors(&ckpt.join("model.safetensors"), &CPU).unwrap();
    assert_eq!(w.len(), teacher_w.len());
    for (k, v) in &w {
        let d = max_abs(v, &teacher_w[k]);
        if adapted.contains(k) {
            assert!(d > 0.0, "{k} did not train");
        } else {
            assert_eq!(d, 0.0, "{k} is frozen but changed");
        }
    }
    // The training state holds adapters (and the GAN head) with their optimiser moments only.
    let (state, _) =
        checkpoint::load_tensors_with_meta(&ckpt.join("train_state.safetensors"), &CPU).unwrap();
    for k in state.keys() {
        assert!(
            k.contains(".lora_A.weight") || k.contains(".lora_B.weight") || k.contains("gan_head"),
            "{k} in the training state"
        );
    }
    let lf = distill::lora_io::read_checkpoint_lora(&ckpt).unwrap();
    assert_eq!(lf.adapters.len(), 2 * adapted.len());
    assert_eq!((lf.rank, lf.alpha), (4, 8.0));
    assert_eq!(lf.meta["distill_base_sha256"], t.sha256);
    // The file's adapters merged into the teacher are the checkpoint's weights.
    let merged = lora::merge(&teacher_w, &lf.adapters, lf.scale()).unwrap();
    for (k, v) in &w {
        assert_eq!(max_abs(v, &merged[k]), 0.0, "{k}");
    }
}

#[test]
fn lora_runs_resume_byte_identical_to_uninterrupted_ones() {
    let t = Teacher::load(tiny_teacher(), &CPU).unwrap();
    let data = mnist16();
    let same = |a: &Path, b: &Path, what: &str| {
        for f in ["model.safetensors", LORA_FILE] {
            let (pa, pb) = (a.join("checkpoint").join(f), b.join("checkpoint").join(f));
            if std::fs::read(&pa).unwrap() != std::fs::read(&pb).unwrap() {
                let (ta, tb) = (
                    checkpoint::load_tensors(&pa, &CPU).unwrap(),
                    checkpoint::load_tensors(&pb, &CPU).unwrap(),
                );
                let diffs: Vec<String> = ta
                    .iter()
                    .map(|(k, v)| (k, max_abs(v, &tb[k])))
                    .filter(|(_, d)| *d > 0.0)
                    .map(|(k, d)| format!("{k} {d:e}"))
                    .collect();
                panic!("{what}: {f} differs after a resume: {diffs:?}");
            }
        }
    };
    // DMD2 (with its GAN head) and TDM.
    let run_dmd2 = |c: &Dmd2Config, out: &Path, resume: bool| {
        let mut m = Dmd2::new(c.clone(), &t, &data, &CPU).unwrap();
        let rs = spec(
            &c.common.run,
            toml::to_string(c).unwrap(),
            c.resume_key().unwrap(),
            &t,
            resume,
        );
        dist::run(&mut m, &rs, &RunDir::new(out).unwrap()).unwrap();
    };
    let (full, part) = (tmp("distill-lora-full"), tmp("distill-lora-part"));
    run_dmd2(&dmd2_cfg(4, 2), full.path(), false);
    run_dmd2(&dmd2_cfg(2, 2), part.path(), false);
    run_dmd2(&dmd2_cfg(4, 2), part.path(), true);
    same(full.path(), part.path(), "dmd2");
    // Another rank is another configuration.
    let mut m = Dmd2::new(dmd2_cfg(6, 3), &t, &data, &CPU).unwrap();
    let c = dmd2_cfg(6, 3);
    let rs = spec(
        &c.common.run,
        toml::to_string(&c).unwrap(),
        c.resume_key().unwrap(),
        &t,
        true,
    );
    let e = dist::run(&mut m, &rs, &RunDir::new(part.path()).unwrap()).unwrap_err();
    assert!(
        format!("{e:#}").contains("different configuration"),
        "{e:#}"
    );

    let run_tdm = |c: &TdmConfig, out: &Path, resume: bool| {
        let mut m = Tdm::new(c.clone(), &t, &CPU).unwrap();
        let c = m.cfg.clone();
        let rs = spec(
            &c.common.run,
            toml::to_string(&c).unwrap(),
            c.resume_key().unwrap(),
            &t,
            resume,
        );
        dist::run(&mut m, &rs, &RunDir::new(out).unwrap()).unwrap();
    };
    let (full, part) = (tmp("distill-lora-full"), tmp("distill-lora-part"));
    run_tdm(&tdm_cfg(4, 2), full.path(), false);
    run_tdm(&tdm_cfg(2, 2), part.path(), false);
    run_tdm(&tdm_cfg(4, 2), part.path(), true);
    same(full.path(), part.path(), "tdm");

    // Full fine-tuning's config is what it was before LoRA existed (no [lora] table).
    let plain = toml::to_string(&Dmd2Config::default()).unwrap();
    assert!(!plain.contains("lora"), "{plain}");
    let with = toml::to_string(&dmd2_cfg(4, 2)).unwrap();
    assert!(
        with.contains("[lora]") && with.contains("rank = 2"),
        "{with}"
    );
    let back: Dmd2Config = toml::from_str(&with).unwrap();
    assert_eq!(back.common.lora, lora_cfg(2));
    let e = toml::from_str::<Dmd2Config>("[lora]\nrank = 2\nranks = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ranks"), "{e}");
    // TDM's per-step label tables would be frozen copies under LoRA: refused.
    let mut c = tdm_cfg(2, 2);
    c.noise_mode = distill::train::tdm::NoiseMode::ToT;
    c.condition_on_step = true;
    let e = Tdm::new(c, &t, &CPU).err().unwrap().to_string();
    assert!(e.contains("condition_on_step"), "{e}");
}

/// A LoRA TDM student of the tiny teacher trained through the CLI (once per test binary).
fn cli_student() -> &'static Path {
    static S: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &S.get_or_init(|| {
        let d = tmp("distill-lora-cli");
        let run = d.path().join("tdm");
        ok(&[
            "train",
            "tdm",
            "--teacher",
            s(tiny_teacher()),
            "--timesteps",
            "999,499",
            "--train-steps",
            "2",
            "--batch-size",
            "4",
            "--cfg-scale",
            "1",
            "--lr",
            "0.01",
            "--warmup",
            "0",
            "--sample-every",
            "0",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "2",
            "--lora-targets",
            "q,k,v,proj,conv2",
            "-o",
            s(&run),
        ]);
        let p = run.join("checkpoint");
        (d, p)
    })
    .1
}

#[test]
fn cli_refuses_an_unknown_target_and_exports_and_validates_a_lora_student() {
    let d = tmp("distill-lora-cli-bad");
    let out = d.path().join("bad");
    let o = distill(&[
        "train",
        "dmd2",
        "--teacher",
        s(tiny_teacher()),
        "--train-steps",
        "1",
        "--lora-rank",
        "2",
        "--lora-targets",
        "to_q,nonexistent",
        "-o",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("\"to_q\"") && err.contains("conv1"), "{err}");
    assert!(!out.join("checkpoint/config.json").exists());

    let ckpt = cli_student();
    let cfg = std::fs::read_to_string(ckpt.parent().unwrap().join("config.toml")).unwrap();
    assert!(cfg.contains("[lora]") && cfg.contains("rank = 4"), "{cfg}");
    // Sample, ONNX export and validation read it unchanged.
    ok(&[
        "sample",
        s(ckpt),
        "--per-class",
        "1",
        "-o",
        s(&d.path().join("s.png")),
    ]);
    let ex = d.path().join("export");
    ok(&["export", s(ckpt), "-o", s(&ex)]);
    let text = ok(&[
        "validate",
        s(&ex.join("generator.onnx")),
        "--reference",
        s(ckpt),
        "--runtimes",
        "tract,ort",
        "--cases",
        "2",
    ]);
    assert!(text.contains("tract") && text.contains("ort"), "{text}");
    // The bare network: the teacher's graph, node for node.
    let nodes = |ck: &Path, name: &str| {
        let o = d.path().join(name);
        ok(&["export", s(ck), "--what", "denoiser", "-o", s(&o)]);
        let m = export::runtime::load_model(&o.join("denoiser.onnx")).unwrap();
        m.graph.unwrap().node.len()
    };
    assert_eq!(
        nodes(ckpt, "den_student"),
        nodes(tiny_teacher(), "den_teacher")
    );
    // --format lora, and its refusal for a model without an adapter.
    let f = d.path().join("lora/student.safetensors");
    let text = ok(&["export", s(ckpt), "--format", "lora", "-o", s(&f)]);
    assert!(
        text.contains("0.5"),
        "the scale alpha / rank is printed: {text}"
    );
    let o = distill(&["export", s(tiny_teacher()), "--format", "lora", "-o", s(&f)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("lora.safetensors"),
        "{err}"
    );
}

/// diffusers' LoRA file of a student distilled from a diffusers UNet2DModel.
#[test]
fn the_lora_file_has_diffusers_keys_and_config() {
    let d = tmp("distill-lora-diffusers");
    let teacher = diffusers_fixtures().join("teachers/digits32_ddim");
    let run = d.path().join("dmd2");
    ok(&[
        "train",
        "dmd2",
        "--teacher",
        s(&teacher),
        "--train-steps",
        "2",
        "--batch-size",
        "2",
        "--cfg-scale",
        "1",
        "--no-gan",
        "--dfake-gen-update-ratio",
        "1",
        "--lr",
        "0.01",
        "--warmup",
        "0",
        "--sample-every",
        "0",
        "--lora-rank",
        "2",
        "--lora-targets",
        "to_q,to_k,to_v,to_out.0,conv1,conv_shortcut",
        "-o",
        s(&run),
    ]);
    let ckpt = run.join("checkpoint");
    let out = d.path().join("lora");
    ok(&["export", s(&ckpt), "--format", "lora", "-o", s(&out)]);
    let file = out.join(distill::lora_io::DEFAULT_FILE);
    let (t, meta) = checkpoint::load_tensors_with_meta(&file, &CPU).unwrap();
    let (base, _) = distill::teacher_source::load(&teacher, &CPU).unwrap();
    let base_w = params(&base);
    for (k, v) in &t {
        let m = k
            .strip_prefix("unet.")
            .and_then(|k| {
                k.strip_suffix(".lora_A.weight")
                    .or_else(|| k.strip_suffix(".lora_B.weight"))
            })
            .unwrap_or_else(|| panic!("{k}: not a diffusers UNet LoRA key"));
        let w = &base_w[&format!("{m}.weight")];
        if k.ends_with("lora_A.weight") {
            assert_eq!(v.dim(0).unwrap(), 2);
            assert_eq!(v.dim(1).unwrap(), w.dim(1).unwrap(), "{k}");
        } else {
            assert_eq!(v.dims()[..2], [w.dim(0).unwrap(), 2], "{k}");
        }
    }
    assert!(t.keys().any(|k| k.contains("to_out.0.lora_B")));
    assert!(t.keys().any(|k| k.contains("conv_shortcut.lora_A")));
    let cfg: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    assert_eq!(cfg["unet.r"], 2);
    assert_eq!(cfg["unet.lora_alpha"], 2.0);
    assert_eq!(cfg["unet.target_modules"][5], "conv_shortcut");
    assert_eq!(meta["lora_scale"], "1");
    assert_eq!(meta["format"], "pt");
    // Read back: the teacher with the file's adapters is the student's checkpoint.
    let lf = distill::lora_io::read_diffusers_lora(&file, &CPU).unwrap();
    let adapted = lora::apply(&base, &lf.adapters, lf.scale()).unwrap();
    let (student, _) = checkpoint::load(&ckpt, &CPU).unwrap();
    let sw = params(&student);
    for (k, v) in params(&adapted) {
        assert_eq!(max_abs(&v, &sw[&k]), 0.0, "{k}");
    }
    // The merged full diffusers folder.
    let merged = d.path().join("merged");
    ok(&[
        "export",
        s(&ckpt),
        "--format",
        "diffusers",
        "-o",
        s(&merged),
    ]);
    assert!(merged
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());
}

/// diffusers + peft's output for a LoRA distill wrote (scripts/lora_check.py): our adapted
/// network reproduces it.
#[test]
fn diffusers_computes_our_lora_students_output() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/digits32_ddim");
    let (base, _) =
        distill::teacher_source::load(&diffusers_fixtures().join("teachers/digits32_ddim"), &CPU)
            .unwrap();
    let lf =
        distill::lora_io::read_diffusers_lora(&fx.join("pytorch_lora_weights.safetensors"), &CPU)
            .unwrap();
    let student = lora::apply(&base, &lf.adapters, lf.scale()).unwrap();
    let f = checkpoint::load_tensors(&fx.join("forward.safetensors"), &CPU).unwrap();
    let b = CandleBackend::new(&CPU);
    let labels = f["class_labels"].to_dtype(DType::U32).unwrap();
    let run = |den: &Denoiser| {
        den.net
            .forward(&b, &f["sample"], &f["timestep"], &labels)
            .unwrap()
    };
    let ours = run(&student);
    let d = max_abs(&ours, &f["expected"]);
    assert!(d <= 1e-4, "ours vs diffusers + peft: {d}");
    // The adapter matters: without it the output is diffusers' base output, far from the LoRA's.
    let plain = run(&base);
    assert!(max_abs(&plain, &f["base"]) <= 1e-4);
    assert!(
        max_abs(&plain, &f["expected"]) > 1e-2,
        "the LoRA barely changes the output"
    );
}

/// diffusers' `StableDiffusionPipeline` with `load_lora_weights` of a text-to-image LoRA student
/// distill wrote (scripts/text_lora_check.py, tests/fixtures/lora/sd_tiny): distill's own
/// pipeline with that file applied (the student's trailing DDIM steps, unguided, then the VAE)
/// reproduces diffusers' images.
#[test]
fn diffusers_runs_our_text_lora_student_as_we_do() {
    use graphs::diffusers::TextToImage;
    use graphs::schedulers::betas::{int_timesteps, Spacing};
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/sd_tiny");
    let pipe = TextToImage::load(&diffusers_fixtures().join("teachers/sd_tiny"), &CPU).unwrap();
    let lf =
        distill::lora_io::read_diffusers_lora(&fx.join("pytorch_lora_weights.safetensors"), &CPU)
            .unwrap();
    let f = checkpoint::load_tensors(&fx.join("pipeline_call.safetensors"), &CPU).unwrap();
    let steps = f["steps"].to_vec1::<i64>().unwrap()[0] as usize;
    let Parameterisation::Vp(vp) = &pipe.den.param else {
        panic!("sd_tiny is a VP model")
    };
    let all = vp.sigmas();
    let sigmas: Vec<f64> = int_timesteps(Spacing::Trailing, vp.num_timesteps, steps, 0)
        .into_iter()
        .map(|t| all[t as usize])
        .collect();
    let b = CandleBackend::new(&CPU);
    let text = graphs::TextCond {
        prompt_embeds: f["prompt_embeds"].clone(),
        added: None,
    };
    let images = |den: &Denoiser| {
        let last = graphs::sampler::student_x0(
            &b,
            den,
            &f["noise"],
            graphs::NetCond::Text(&text),
            &sigmas,
        )
        .unwrap();
        pipe.decode(&b, &last).unwrap()
    };
    let base = images(&pipe.den);
    assert!(
        max_abs(&base, &f["base"]) <= 1e-3,
        "{}",
        max_abs(&base, &f["base"])
    );
    let student = lora::apply(&pipe.den, &lf.adapters, lf.scale()).unwrap();
    let ours = images(&student);
    let d = max_abs(&ours, &f["images"]);
    eprintln!("text LoRA student: ours vs diffusers' load_lora_weights pipeline call: {d:.2e}");
    assert!(d <= 1e-3, "ours vs diffusers: {d}");
    assert!(
        max_abs(&base, &f["images"]) > 1e-2,
        "the LoRA barely changes the images"
    );
}
