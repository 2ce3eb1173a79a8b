//! diffusers `UNet2DConditionModel` parity: fixtures made by diffusers itself
//! (`scripts/fixtures_unet_condition.py`), loaded from their folders and run on candle.

use candle_core::{Device, Tensor};
use graphs::diffusers::{load_unet_condition, AddedCond, UNet2DConditionConfig, SDXL_TIME_IDS};
use graphs::CandleBackend;
use std::path::{Path, PathBuf};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers/models")
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
    let dir = models().join(name);
    let dev = Device::Cpu;
    let (model, _) = load_unet_condition(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let sample = &f["sample"];
    let side = sample.dim(3).unwrap();
    let added = f.get("text_embeds").map(|t| AddedCond {
        text_embeds: t.clone(),
        time_ids: f["time_ids"].clone(),
    });
    assert_eq!(added.is_some(), model.cfg.has_text_time(), "{name}");
    if let Some(a) = &added {
        assert_eq!(
            model.text_embeds_dim(SDXL_TIME_IDS),
            Some(a.text_embeds.dim(1).unwrap())
        );
    }
    let mut worst = 0f32;
    for b in [CandleBackend::new(&dev), CandleBackend::new(&dev).stock()] {
        let out = model
            .forward(
                &b,
                sample,
                side,
                &f["timestep"],
                &f["encoder_hidden_states"],
                added.as_ref(),
            )
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

parity!(cond_sd15, cond_linear, cond_sdxl, cond_misc, cond_nomid);

/// runwayml/stable-diffusion-v1-5's `unet/config.json`, as published.
fn sd15_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"
        ]
    })
}

#[test]
fn attention_head_dim_means_heads_as_in_diffusers() {
    // SD 1.5: "attention_head_dim": 8 is eight heads of 40, 80, 160, 160.
    let c = UNet2DConditionConfig::from_json(&sd15_config()).unwrap();
    let per: Vec<_> = (0..4).map(|i| c.heads_of(i)).collect();
    assert_eq!(per, [(8, 40), (8, 80), (8, 160), (8, 160)]);
    assert_eq!(c.cross_attention_dim, [768; 4]);
    assert_eq!(c.temb_dim(), 1280);
    // SD 2.1: per-block [5, 10, 20, 20] heads, all of width 64, linear projections.
    let mut v = sd15_config();
    v["attention_head_dim"] = serde_json::json!([5, 10, 20, 20]);
    v["use_linear_projection"] = serde_json::json!(true);
    v["cross_attention_dim"] = serde_json::json!(1024);
    v["upcast_attention"] = serde_json::json!(true);
    let c = UNet2DConditionConfig::from_json(&v).unwrap();
    let per: Vec<_> = (0..4).map(|i| c.heads_of(i)).collect();
    assert_eq!(per, [(5, 64), (10, 64), (20, 64), (20, 64)]);
    assert!(c.use_linear_projection && c.upcast_attention);
    // SDXL: three levels, transformer depth [1, 2, 10], text_time with 2816 = 1280 + 6 * 256.
    let mut v = sd15_config();
    v["block_out_channels"] = serde_json::json!([320, 640, 1280]);
    v["down_block_types"] = serde_json::json!([
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D"
    ]);
    v["up_block_types"] =
        serde_json::json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
    v["attention_head_dim"] = serde_json::json!([5, 10, 20]);
    v["transformer_layers_per_block"] = serde_json::json!([1, 2, 10]);
    v["addition_embed_type"] = serde_json::json!("text_time");
    v["addition_time_embed_dim"] = serde_json::json!(256);
    v["projection_class_embeddings_input_dim"] = serde_json::json!(2816);
    v["cross_attention_dim"] = serde_json::json!(2048);
    let c = UNet2DConditionConfig::from_json(&v).unwrap();
    assert_eq!(c.transformer_layers_per_block, [1, 2, 10]);
    assert_eq!(c.heads_of(2), (20, 64));
    let a = c.addition.unwrap();
    assert_eq!(
        a.projection_class_embeddings_input_dim - SDXL_TIME_IDS * a.addition_time_embed_dim,
        1280
    );
}

fn parse_err(v: &serde_json::Value) -> String {
    format!("{:#}", UNet2DConditionConfig::from_json(v).unwrap_err())
}

#[test]
fn unsupported_and_unknown_keys_are_refused_by_name() {
    let base = sd15_config();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    for (key, value) in [
        ("only_cross_attention", serde_json::json!(true)),
        ("num_attention_heads", serde_json::json!(8)),
        ("addition_embed_type", serde_json::json!("text")),
        ("class_embed_type", serde_json::json!("timestep")),
        ("num_class_embeds", serde_json::json!(10)),
        ("attention_type", serde_json::json!("gated")),
        ("encoder_hid_dim", serde_json::json!(768)),
        ("time_cond_proj_dim", serde_json::json!(256)),
        ("time_embedding_type", serde_json::json!("fourier")),
        ("dual_cross_attention", serde_json::json!(true)),
        ("act_fn", serde_json::json!("gelu")),
        ("resnet_time_scale_shift", serde_json::json!("spatial")),
        (
            "mid_block_type",
            serde_json::json!("UNetMidBlock2DSimpleCrossAttn"),
        ),
        (
            "transformer_layers_per_block",
            serde_json::json!([[1], [1], [1], [1]]),
        ),
        ("downsample_padding", serde_json::json!(2)),
    ] {
        let e = parse_err(&with(key, value.clone()));
        assert!(e.contains(key) && e.contains("unsupported"), "{key}: {e}");
    }
    let e = parse_err(&with(
        "down_block_types",
        serde_json::json!([
            "SimpleCrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D"
        ]),
    ));
    assert!(
        e.contains("down_block_types")
            && e.contains("SimpleCrossAttnDownBlock2D")
            && e.contains("not implemented"),
        "{e}"
    );
    let e = parse_err(&with("attention_head_dim", serde_json::json!([8, 8])));
    assert!(e.contains("attention_head_dim"), "{e}");
    let e = parse_err(&with("attention_head_dim", serde_json::json!(7)));
    assert!(e.contains("attention_head_dim") && e.contains("320"), "{e}");
    let e = parse_err(&with("text_encoder_dim", serde_json::json!(768)));
    assert!(
        e.contains("unknown") && e.contains("text_encoder_dim"),
        "{e}"
    );
    let e = parse_err(&with("addition_embed_type", serde_json::json!("text_time")));
    assert!(e.contains("addition_time_embed_dim"), "{e}");
    let e = parse_err(&with("_class_name", serde_json::json!("UNet2DModel")));
    assert!(e.contains("UNet2DModel"), "{e}");
    // Keys diffusers hands only to block families refused above are read, whatever they hold.
    let c =
        UNet2DConditionConfig::from_json(&with("resnet_out_scale_factor", serde_json::json!(2.0)))
            .unwrap();
    assert_eq!(c, UNet2DConditionConfig::from_json(&base).unwrap());
}

/// Copies a fixture folder into a temp dir so it can be damaged.
fn copy_model(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(models().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
    }
    t
}

#[test]
fn missing_or_misshaped_weights_are_named() {
    let dev = Device::Cpu;
    let t = copy_model("cond_sd15");
    let p = t.path().join("diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(&p, &dev).unwrap();
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let k = w
        .remove(key)
        .expect("diffusers' key for the first cross-attention");
    candle_core::safetensors::save(&w, &p).unwrap();
    let e = format!("{:#}", load_unet_condition(t.path(), &dev).unwrap_err());
    assert!(e.contains("missing weight") && e.contains(key), "{e}");
    w.insert(key.to_string(), k.narrow(1, 0, 16).unwrap());
    candle_core::safetensors::save(&w, &p).unwrap();
    let e = format!("{:#}", load_unet_condition(t.path(), &dev).unwrap_err());
    assert!(e.contains(key) && e.contains("shape"), "{e}");
}

#[test]
fn text_time_inputs_are_required_and_refused_by_name() {
    let dev = Device::Cpu;
    let b = CandleBackend::new(&dev);
    let (xl, _) = load_unet_condition(&models().join("cond_sdxl"), &dev).unwrap();
    let f = candle_core::safetensors::load(models().join("cond_sdxl/forward.safetensors"), &dev)
        .unwrap();
    let e = xl
        .forward(
            &b,
            &f["sample"],
            8,
            &f["timestep"],
            &f["encoder_hidden_states"],
            None,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("text_embeds"), "{e:#}");
    let (sd, _) = load_unet_condition(&models().join("cond_sd15"), &dev).unwrap();
    let added = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: f["time_ids"].clone(),
    };
    let e = sd
        .forward(
            &b,
            &f["sample"],
            8,
            &f["timestep"],
            &f["encoder_hidden_states"],
            Some(&added),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("text_time"), "{e:#}");
}

/// stabilityai/stable-diffusion-xl-base-1.0's UNet layout (its config's architecture keys).
fn sdxl_config() -> serde_json::Value {
    let mut xl = sd15_config();
    xl["block_out_channels"] = serde_json::json!([320, 640, 1280]);
    xl["down_block_types"] = serde_json::json!([
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D"
    ]);
    xl["up_block_types"] =
        serde_json::json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
    xl["attention_head_dim"] = serde_json::json!([5, 10, 20]);
    xl["transformer_layers_per_block"] = serde_json::json!([1, 2, 10]);
    xl["addition_embed_type"] = serde_json::json!("text_time");
    xl["addition_time_embed_dim"] = serde_json::json!(256);
    xl["projection_class_embeddings_input_dim"] = serde_json::json!(2816);
    xl["cross_attention_dim"] = serde_json::json!(2048);
    xl["use_linear_projection"] = serde_json::json!(true);
    xl["sample_size"] = serde_json::json!(128);
    xl
}

#[test]
fn real_size_parameter_counts_match_diffusers() {
    // diffusers 0.42.1's counts for the same configs (UNet2DConditionModel(**config) on the meta
    // device, sum of numel): SD 1.5, SD 2.1 (per-block heads, linear projections), SDXL base
    // (three levels, transformer depth [1, 2, 10], text_time).
    let sd15 = sd15_config();
    let mut sd21 = sd15_config();
    sd21["attention_head_dim"] = serde_json::json!([5, 10, 20, 20]);
    sd21["use_linear_projection"] = serde_json::json!(true);
    sd21["cross_attention_dim"] = serde_json::json!(1024);
    let xl = sdxl_config();
    for (name, v, want) in [
        ("sd15", sd15, 859_520_964usize),
        ("sd21", sd21, 865_910_724),
        ("sdxl", xl, 2_567_463_684),
    ] {
        let c = UNet2DConditionConfig::from_json(&v).unwrap();
        assert_eq!(
            graphs::diffusers::parameter_count(&c).unwrap(),
            want,
            "{name}"
        );
    }
}

/// `cond_sdxl` with its weights as trainable variables, and `loss = mean((out - expected)^2)`.
fn sdxl_loss_setup() -> (
    candle_nn::VarMap,
    graphs::diffusers::UNet2DConditionModel,
    std::collections::HashMap<String, Tensor>,
) {
    let dev = Device::Cpu;
    let dir = models().join("cond_sdxl");
    let (model, weights) = load_unet_condition(&dir, &dev).unwrap();
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
    let trainable = graphs::diffusers::UNet2DConditionModel::new(vb, &model.cfg).unwrap();
    for (k, v) in vm.data().lock().unwrap().iter() {
        v.set(&weights[k]).unwrap();
    }
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    (vm, trainable, f)
}

fn sdxl_loss(
    m: &graphs::diffusers::UNet2DConditionModel,
    f: &std::collections::HashMap<String, Tensor>,
) -> Tensor {
    let b = CandleBackend::training(&Device::Cpu);
    let added = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: f["time_ids"].clone(),
    };
    let out = m
        .forward(
            &b,
            &f["sample"],
            8,
            &f["timestep"],
            &f["encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    // A target away from the output, so the loss has a gradient everywhere.
    let target = f["expected"].affine(0.5, 0.1).unwrap();
    (out - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

#[test]
fn gradients_reach_every_weight_and_match_finite_differences() {
    let (vm, model, f) = sdxl_loss_setup();
    let loss = sdxl_loss(&model, &f);
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap().clone();
    for (k, v) in &data {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{k}: |grad| sum {n}");
    }
    // Directional derivative along each weight's own gradient, against central differences:
    // the cross-attention keys, a LayerNorm, GEGLU's projection, the SDXL added embedding.
    for k in [
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight",
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
        "add_embedding.linear_1.weight",
    ] {
        let v = &data[k];
        let w0 = v.as_tensor().copy().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().detach();
        let gn = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let d = g.affine(1.0 / gn.sqrt(), 0.0).unwrap(); // unit direction
        let eps = 1e-2;
        let at = |s: f64| {
            v.set(&(&w0 + d.affine(s, 0.0).unwrap()).unwrap()).unwrap();
            sdxl_loss(&model, &f).to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        v.set(&w0).unwrap();
        let analytic = gn.sqrt();
        let rel = (fd - analytic).abs() / analytic;
        eprintln!("{k}: analytic {analytic:.6e}, central difference {fd:.6e}, rel {rel:.2e}");
        assert!(rel < 2e-3, "{k}: analytic {analytic:.6e} vs {fd:.6e}");
    }
}

#[test]
fn non_square_latents_match_diffusers() {
    // cond_nomid (three levels) on an 8x12 sample: 8x12 -> 4x6 -> 2x3 and back.
    let dev = Device::Cpu;
    let dir = models().join("cond_nomid");
    let (model, _) = load_unet_condition(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward_wide.safetensors"), &dev).unwrap();
    let (h, w) = (f["sample"].dim(2).unwrap(), f["sample"].dim(3).unwrap());
    assert_ne!(h, w);
    for b in [CandleBackend::new(&dev), CandleBackend::new(&dev).stock()] {
        let out = model
            .forward_hw(
                &b,
                &f["sample"],
                (h, w),
                &f["timestep"],
                &f["encoder_hidden_states"],
                None,
            )
            .unwrap();
        let err = max_abs(&out, &f["expected"]);
        eprintln!(
            "cond_nomid {h}x{w} (kernels {}): max abs {err:.3e}",
            b.kernels
        );
        assert!(err <= 1e-4, "{h}x{w}: max abs {err:.3e}");
    }
    let e = model
        .forward_hw(
            &CandleBackend::new(&dev),
            &f["sample"],
            (h, 10),
            &f["timestep"],
            &f["encoder_hidden_states"],
            None,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("8x10"), "{e:#}");
}

/// `max |a - b| / max(1, max |b|)`.
fn scaled_err(a: &Tensor, b: &Tensor) -> f32 {
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max_abs(a, b) / m(b).max(1.0)
}

/// Replays a diffusers pipeline call recorded in `pipelines/<name>` (given latents and prompt
/// embeddings, classifier-free guidance, `output_type="latent"`) on our UNet and scheduler:
/// cat([x, x]) with cat([negative, prompt]) embeddings (and pooled embeddings / the pipeline's
/// time_ids for SDXL), `uncond + g (text - uncond)`, step. Returns the worst scaled error over
/// the steps.
fn pipeline_loop(name: &str, model: &str) -> f32 {
    use graphs::schedulers::{Scheduler, StepState};
    let dev = Device::Cpu;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/diffusers/pipelines")
        .join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.json")).unwrap()).unwrap();
    let (unet, _) = load_unet_condition(&models().join(model), &dev).unwrap();
    let mut s = Scheduler::from_file(&dir.join("scheduler_config.json")).unwrap();
    s.set_timesteps(meta["steps"].as_u64().unwrap() as usize)
        .unwrap();
    let want: Vec<f64> = meta["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(
        s.timesteps().iter().map(|t| *t as f64).collect::<Vec<_>>(),
        want
    );
    let g = meta["guidance_scale"].as_f64().unwrap();
    let f = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let b = CandleBackend::new(&dev);
    let n = f["noise"].dim(0).unwrap();
    let side = f["noise"].dim(3).unwrap();
    let both = |neg: &str, pos: &str| Tensor::cat(&[&f[neg], &f[pos]], 0).unwrap();
    let ehs = both("negative_prompt_embeds", "prompt_embeds");
    let added = f.get("time_ids").map(|ids| AddedCond {
        text_embeds: both("negative_pooled_prompt_embeds", "pooled_prompt_embeds"),
        time_ids: ids.clone(),
    });
    let mut x = f["noise"].affine(s.init_noise_sigma(), 0.0).unwrap();
    let mut state = StepState::default();
    let mut worst = 0f32;
    for (i, t) in s.timesteps().into_iter().enumerate() {
        let xin = s
            .scale_model_input(&b, &Tensor::cat(&[&x, &x], 0).unwrap(), i)
            .unwrap();
        let tt = Tensor::full(t, 2 * n, &dev).unwrap();
        let out = unet
            .forward(&b, &xin, side, &tt, &ehs, added.as_ref())
            .unwrap();
        let (uncond, text) = (out.narrow(0, 0, n).unwrap(), out.narrow(0, n, n).unwrap());
        let eps = graphs::guidance::combine(&b, &text, &uncond, g).unwrap();
        x = s.step(&b, &mut state, i, &eps, &x, None).unwrap();
        let err = scaled_err(&x, &f[&format!("latents_{i}")]);
        eprintln!("{name} step {i} (t = {t}): latents scaled max abs {err:.3e}");
        worst = worst.max(err);
    }
    worst.max(scaled_err(&x, &f["latents"]))
}

#[test]
fn stable_diffusion_pipeline_loop_matches_diffusers() {
    // StableDiffusionPipeline: SD 1.5's DDIM config, 4 steps, guidance 7.5.
    let err = pipeline_loop("cond_sd15_ddim_cfg", "cond_sd15");
    assert!(err <= 1e-4, "scaled max abs {err:.3e} > 1e-4");
}

#[test]
fn stable_diffusion_xl_pipeline_loop_matches_diffusers() {
    // StableDiffusionXLPipeline: Euler, 4 steps, guidance 5, pooled embeddings and the time_ids
    // the pipeline built (original size, crop, target size).
    let err = pipeline_loop("cond_sdxl_euler_cfg", "cond_sdxl");
    assert!(err <= 1e-4, "scaled max abs {err:.3e} > 1e-4");
}

#[test]
fn real_size_flops_match_pytorchs_counter() {
    // torch.utils.flop_counter.FlopCounterMode on diffusers 0.42.1's UNet2DConditionModel (meta
    // device, batch 1, 77 tokens): SD 1.5 at 64x64 latents (512 px), SDXL at 128x128 (1024 px).
    // PyTorch's convolution / addmm + mm / bmm are our conv / linear / attention matmul.
    use graphs::diffusers::unet2d_condition::shapes_only;
    use graphs::flops::FlopCounter;
    for (name, v, side, cross, want) in [
        (
            "sd15",
            sd15_config(),
            64,
            768,
            (
                443_946_106_880u64,
                179_152_486_400 + 54_122_577_920,
                126_052_270_080u64,
            ),
        ),
        (
            "sdxl",
            sdxl_config(),
            128,
            2048,
            (
                1_623_111_761_920,
                3_325_294_018_560 + 1_028_915_200_000,
                783_915_417_600,
            ),
        ),
    ] {
        let c = UNet2DConditionConfig::from_json(&v).unwrap();
        let (m, _) = shapes_only(&c).unwrap();
        let fc = FlopCounter::new();
        let added = c.has_text_time().then(|| AddedCond {
            text_embeds: vec![1, 1280],
            time_ids: vec![1, 6],
        });
        let out = m
            .forward(
                &fc,
                &vec![1, 4, side, side],
                side,
                &vec![1],
                &vec![1, 77, cross],
                added.as_ref(),
            )
            .unwrap();
        assert_eq!(out, vec![1, 4, side, side]);
        let n = fc.count();
        eprintln!("{name}: {n}");
        assert_eq!((n.conv, n.linear, n.matmul), want, "{name}");
    }
}

#[test]
fn saves_diffusers_folders_that_reload() {
    // Each fixture's weights moved (as a fine-tuned / LoRA-merged student's would be), written by
    // save_unet_condition, read back: same config, same outputs. With DISTILL_DIFFUSERS_OUT=DIR
    // the folders stay there with forward.safetensors (our output as `expected`) for
    // `scripts/fixtures_unet_condition.py --check DIR` (diffusers' from_pretrained).
    let keep = std::env::var_os("DISTILL_DIFFUSERS_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let dev = Device::Cpu;
    for name in [
        "cond_sd15",
        "cond_linear",
        "cond_sdxl",
        "cond_misc",
        "cond_nomid",
    ] {
        let src = models().join(name);
        let (model, weights) = load_unet_condition(&src, &dev).unwrap();
        let back = UNet2DConditionConfig::from_json(&model.cfg.to_json()).unwrap();
        assert_eq!(back, model.cfg, "{name}: config round trip");
        let moved: std::collections::HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, t)| (k.clone(), t.affine(1.01, 0.001).unwrap()))
            .collect();
        let out = root.join(name);
        graphs::diffusers::save_unet_condition(&out, &model.cfg, &moved).unwrap();
        let (again, w2) = load_unet_condition(&out, &dev).unwrap();
        assert_eq!(w2.len(), weights.len());
        let f = candle_core::safetensors::load(src.join("forward.safetensors"), &dev).unwrap();
        let added = f.get("text_embeds").map(|t| AddedCond {
            text_embeds: t.clone(),
            time_ids: f["time_ids"].clone(),
        });
        let b = CandleBackend::new(&dev);
        let vb = candle_nn::VarBuilder::from_tensors(moved, candle_core::DType::F32, &dev);
        let direct = graphs::diffusers::UNet2DConditionModel::new(vb, &model.cfg).unwrap();
        let run = |m: &graphs::diffusers::UNet2DConditionModel| {
            m.forward(
                &b,
                &f["sample"],
                8,
                &f["timestep"],
                &f["encoder_hidden_states"],
                added.as_ref(),
            )
            .unwrap()
        };
        let (y0, y1) = (run(&direct), run(&again));
        assert_eq!(max_abs(&y0, &y1), 0.0, "{name}");
        assert!(
            max_abs(&y1, &f["expected"]) > 1e-3,
            "{name}: weights did not move"
        );
        if keep.is_some() {
            let mut t: std::collections::HashMap<String, Tensor> = f
                .iter()
                .filter(|(k, _)| k.as_str() != "expected")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            t.insert("expected".to_string(), y1);
            candle_core::safetensors::save(&t, out.join("forward.safetensors")).unwrap();
        }
    }
}

/// LoRA's layer listing covers the text-conditioned UNet: the default targets (diffusers'
/// `to_q,to_k,to_v,to_out.0`) select exactly the four projections of every attention module,
/// self- and cross-attention, with their weights' shapes.
#[test]
fn lora_default_targets_are_every_attention_projection() {
    let dev = Device::Cpu;
    let (model, weights) = load_unet_condition(&models().join("cond_sd15"), &dev).unwrap();
    let mut params: Vec<graphs::Param> = weights
        .iter()
        .map(|(k, t)| graphs::Param {
            name: k.clone(),
            t: t.clone(),
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    let net = graphs::Network::Condition(graphs::network::ConditionNet { model, params });
    let cfg = graphs::nn::lora::LoraConfig {
        rank: 4,
        alpha: None,
        targets: vec![],
    };
    let sel = graphs::nn::lora::select(&net, &cfg).unwrap();
    let expected: Vec<&String> = weights
        .keys()
        .filter(|k| {
            ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .any(|t| k.ends_with(&format!(".{t}.weight")))
        })
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(sel.len(), expected.len());
    for l in &sel {
        assert_eq!(l.kind, graphs::nn::lora::LayerKind::Linear, "{}", l.path);
        assert_eq!(
            l.weight.dims(),
            weights[&format!("{}.weight", l.path)].dims()
        );
    }
    assert!(
        sel.iter().any(|l| l.path.ends_with("attn2.to_k")),
        "no cross-attention"
    );
    let bad = graphs::nn::lora::LoraConfig {
        targets: vec!["nonexistent".into()],
        ..cfg
    };
    let e = format!("{:#}", graphs::nn::lora::select(&net, &bad).unwrap_err());
    assert!(e.contains("nonexistent") && e.contains("to_q"), "{e}");
}
