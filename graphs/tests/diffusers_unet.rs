//! diffusers `UNet2DModel` parity: fixtures made by diffusers itself
//! (`scripts/make-diffusers-fixtures.py`), loaded from their folders and run on candle.

use candle_core::{DType, Device, Tensor};
use graphs::diffusers::{load_unet, UNet2DConfig};
use graphs::CandleBackend;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
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

/// Loads model `name`, runs diffusers' recorded inputs on both candle paths (fast kernels and
/// stock ops); returns the worst max abs error against diffusers' output.
fn forward_parity(name: &str) -> f32 {
    let dir = fixtures().join("models").join(name);
    let dev = Device::Cpu;
    let (model, _) = load_unet(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let sample = &f["sample"];
    let side = sample.dim(3).unwrap();
    let labels = f.get("class_labels").map(|l| {
        if l.dtype() == DType::F32 {
            l.clone()
        } else {
            l.to_dtype(DType::U32).unwrap()
        }
    });
    assert_eq!(labels.is_some(), model.is_class_conditional(), "{name}");
    let mut worst = 0f32;
    for b in [CandleBackend::new(&dev), CandleBackend::new(&dev).stock()] {
        let out = model
            .forward(&b, sample, side, &f["timestep"], labels.as_ref())
            .unwrap();
        assert_eq!(out.dims(), f["expected"].dims());
        let err = max_abs(&out, &f["expected"]);
        eprintln!("{name} (kernels {}): max abs {err:.3e}", b.kernels);
        worst = worst.max(err);
    }
    worst
}

macro_rules! parity {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let err = forward_parity(stringify!($name));
            assert!(err <= 1e-4, "{}: max abs {err:.3e} > 1e-4", stringify!($name));
        }
    )*};
}

parity!(
    uncond,
    class_scale_shift,
    timestep_class,
    identity_nomid,
    scale_shift_mid
);

fn config_json(name: &str) -> serde_json::Value {
    let p = fixtures().join("models").join(name).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn parse_err(v: &serde_json::Value) -> String {
    format!("{:#}", UNet2DConfig::from_json(v).unwrap_err())
}

#[test]
fn unsupported_and_unknown_keys_are_refused_by_name() {
    let base = config_json("uncond");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    for (key, value) in [
        ("time_embedding_type", serde_json::json!("fourier")),
        ("resnet_time_scale_shift", serde_json::json!("spatial")),
        ("act_fn", serde_json::json!("gelu")),
        ("class_embed_type", serde_json::json!("projection")),
        ("downsample_type", serde_json::json!("resnet")),
        ("upsample_type", serde_json::json!("resnet")),
        (
            "mid_block_type",
            serde_json::json!("UNetMidBlock2DCrossAttn"),
        ),
        ("downsample_padding", serde_json::json!(2)),
    ] {
        let e = parse_err(&with(key, value.clone()));
        assert!(
            e.contains(key) && e.contains(&value.to_string()),
            "{key}: {e}"
        );
    }
    let e = parse_err(&with(
        "down_block_types",
        serde_json::json!(["SkipDownBlock2D", "AttnDownBlock2D"]),
    ));
    assert!(
        e.contains("down_block_types") && e.contains("SkipDownBlock2D"),
        "{e}"
    );
    let e = parse_err(&with(
        "up_block_types",
        serde_json::json!(["AttnUpBlock2D", "KUpBlock2D"]),
    ));
    assert!(
        e.contains("KUpBlock2D") && e.contains("not implemented"),
        "{e}"
    );
    let e = parse_err(&with("cross_attention_dim", serde_json::json!(768)));
    assert!(
        e.contains("unknown") && e.contains("cross_attention_dim"),
        "{e}"
    );
    let mut c = base.clone();
    c["_class_name"] = serde_json::json!("UNet2DConditionModel");
    assert!(parse_err(&c).contains("UNet2DConditionModel"));
}

#[test]
fn absent_keys_take_diffusers_defaults() {
    let c = UNet2DConfig::from_json(&serde_json::json!({})).unwrap();
    assert_eq!(c, UNet2DConfig::default());
    assert_eq!(c.block_out_channels, [224, 448, 672, 896]);
    assert_eq!(c.temb_dim(), 896);
    assert_eq!(c.heads(448), (56, 8));
    let full = UNet2DConfig::from_json(&config_json("uncond")).unwrap();
    assert!(!full.flip_sin_to_cos);
    assert_eq!(full.freq_shift, 1.0);
    assert_eq!(full.downsample_padding, 0);
}

/// Copies a fixture folder into a temp dir so it can be damaged.
fn copy_model(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
    }
    t
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_unet(dir, &Device::Cpu).unwrap_err())
}

fn rewrite(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut w);
    candle_core::safetensors::save(&w, &p).unwrap();
}

#[test]
fn bad_weights_are_errors_naming_the_tensor() {
    let key = "down_blocks.1.attentions.0.to_q.weight";
    let t = copy_model("uncond");
    rewrite(t.path(), |w| {
        w.remove(key);
    });
    let e = load_err(t.path());
    assert!(e.contains("missing") && e.contains(key), "{e}");

    let t = copy_model("uncond");
    rewrite(t.path(), |w| {
        w.insert(
            "extra.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(t.path());
    assert!(
        e.contains("unexpected") && e.contains("extra.weight"),
        "{e}"
    );

    let t = copy_model("uncond");
    rewrite(t.path(), |w| {
        w.insert(
            key.into(),
            Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(t.path());
    assert!(e.contains(key) && e.contains("[32, 31]"), "{e}");

    let t = copy_model("uncond");
    let p = t.path().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(t.path());
    assert!(e.contains("truncated") && e.contains("tensor "), "{e}");
}

#[test]
fn pipeline_folder_finds_unet_and_scheduler() {
    let t = tempfile::tempdir().unwrap();
    let unet = t.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    for e in std::fs::read_dir(fixtures().join("models/uncond")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), unet.join(e.file_name())).unwrap();
    }
    std::fs::create_dir(t.path().join("scheduler")).unwrap();
    std::fs::write(
        t.path().join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "DDPMScheduler"}"#,
    )
    .unwrap();
    std::fs::write(t.path().join("model_index.json"), "{}").unwrap();
    let f = graphs::diffusers::DiffusersFolder::resolve(t.path()).unwrap();
    assert_eq!(f.unet, unet);
    assert_eq!(
        f.scheduler_config.unwrap(),
        t.path().join("scheduler/scheduler_config.json")
    );
    assert!(graphs::diffusers::DiffusersFolder::is_diffusers(t.path()));
    // The model folder on its own finds its pipeline's scheduler too.
    let f = graphs::diffusers::DiffusersFolder::resolve(&unet).unwrap();
    assert!(f.scheduler_config.is_some());
    let (m, _) = load_unet(t.path(), &Device::Cpu).unwrap();
    assert_eq!(m.cfg.block_out_channels, [16, 32]);
}

#[test]
fn trains_gradients_reach_every_weight() {
    let dev = Device::Cpu;
    let dir = fixtures().join("models/class_scale_shift");
    let (_, weights) = load_unet(&dir, &dev).unwrap();
    let vm = candle_nn::VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (k, t) in &weights {
            data.insert(k.clone(), candle_core::Var::from_tensor(t).unwrap());
        }
    }
    let cfg = UNet2DConfig::from_file(&dir.join("config.json")).unwrap();
    let model = graphs::diffusers::UNet2DModel::new(
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let b = CandleBackend::training(&dev);
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[10f32, 500.0], &dev).unwrap();
    let l = Tensor::new(&[1u32, 4], &dev).unwrap();
    let y = model.forward(&b, &x, 8, &t, Some(&l)).unwrap();
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    for (k, v) in data.iter() {
        let g = grads.get(v.as_tensor());
        assert!(g.is_some(), "no gradient for {k}");
    }
}

/// Saves each fixture model back as a diffusers folder and reloads it: same config, bit-equal
/// output. With `DISTILL_DIFFUSERS_OUT=DIR` the folders (plus our inputs and output as
/// `forward.safetensors`) stay in DIR for `scripts/make-diffusers-fixtures.py --check DIR`,
/// which loads them in diffusers itself.
#[test]
fn saves_diffusers_folders_that_reload() {
    let keep = std::env::var_os("DISTILL_DIFFUSERS_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let dev = Device::Cpu;
    for name in [
        "uncond",
        "class_scale_shift",
        "timestep_class",
        "identity_nomid",
        "scale_shift_mid",
    ] {
        let src = fixtures().join("models").join(name);
        let (model, weights) = load_unet(&src, &dev).unwrap();
        let cfg_back = UNet2DConfig::from_json(&model.cfg.to_json()).unwrap();
        assert_eq!(cfg_back, model.cfg, "{name}: config round trip");
        let out = root.join(name);
        graphs::diffusers::save_unet(&out, &model.cfg, &weights).unwrap();
        let (again, _) = load_unet(&out, &dev).unwrap();
        let f = candle_core::safetensors::load(src.join("forward.safetensors"), &dev).unwrap();
        let labels = f.get("class_labels").map(|l| {
            if l.dtype() == DType::F32 {
                l.clone()
            } else {
                l.to_dtype(DType::U32).unwrap()
            }
        });
        let b = CandleBackend::new(&dev);
        let side = f["sample"].dim(3).unwrap();
        let y0 = model
            .forward(&b, &f["sample"], side, &f["timestep"], labels.as_ref())
            .unwrap();
        let y1 = again
            .forward(&b, &f["sample"], side, &f["timestep"], labels.as_ref())
            .unwrap();
        assert_eq!(max_abs(&y0, &y1), 0.0, "{name}");
        if keep.is_some() {
            let mut t = std::collections::HashMap::new();
            for k in ["sample", "timestep", "class_labels"] {
                if let Some(v) = f.get(k) {
                    t.insert(k.to_string(), v.clone());
                }
            }
            t.insert("expected".to_string(), y1);
            candle_core::safetensors::save(&t, out.join("forward.safetensors")).unwrap();
        }
    }
}
