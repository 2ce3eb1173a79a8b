//! diffusers `AutoencoderKL` and transformers `CLIPTextModel` + CLIP tokenizer parity: fixtures
//! made by diffusers / transformers themselves (`scripts/fixtures_vae_clip.py`), loaded from
//! their folders and run on candle (fast kernels and stock ops).

use candle_core::{DType, Device, Tensor};
use graphs::diffusers::vae::{load_vae, AutoencoderKLConfig};
use graphs::transformers::{load_prompt_embeds, load_text_encoder, ClipTextConfig, ClipTokenizer};
use graphs::CandleBackend;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

fn backends() -> [CandleBackend; 2] {
    let dev = Device::Cpu;
    [CandleBackend::new(&dev), CandleBackend::new(&dev).stock()]
}

fn vae_parity(name: &str) {
    let dir = fixtures().join("vae").join(name);
    let dev = Device::Cpu;
    let (vae, _) = load_vae(&dir, &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let (h, w) = (f["latents"].dim(2).unwrap(), f["latents"].dim(3).unwrap());
    let (ih, iw) = (f["image_in"].dim(2).unwrap(), f["image_in"].dim(3).unwrap());
    for b in backends() {
        let k = b.kernels;
        let checks: [(&str, Tensor); 4] = [
            (
                "images",
                vae.decode_latents(&b, &f["latents"], h, w).unwrap(),
            ),
            (
                "latent_mean",
                vae.encode_mean(&b, &f["image_in"], ih, iw).unwrap(),
            ),
            (
                "latents_enc",
                vae.encode_latents(&b, &f["image_in"], ih, iw).unwrap(),
            ),
            (
                "latents_sampled",
                vae.encode_latents_sampled(&b, &f["image_in"], ih, iw, &f["noise"])
                    .unwrap(),
            ),
        ];
        for (key, ours) in checks {
            let err = max_abs(&ours, &f[key]);
            eprintln!("{name} {key} (kernels {k}): max abs {err:.3e}");
            assert!(err <= 1e-4, "{name} {key} (kernels {k}): max abs {err:.3e}");
        }
    }
}

#[test]
fn vae_kl_sd_matches_diffusers() {
    vae_parity("kl_sd");
}

#[test]
fn vae_kl_sd3_matches_diffusers() {
    vae_parity("kl_sd3");
}

#[test]
fn vae_kl_noattn_matches_diffusers() {
    vae_parity("kl_noattn");
}

fn vae_config() -> serde_json::Value {
    let p = fixtures().join("vae/kl_sd3/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn vae_unsupported_and_unknown_keys_are_refused_by_name() {
    let base = vae_config();
    let parsed = AutoencoderKLConfig::from_json(&base).unwrap();
    assert_eq!(parsed.shift_factor, Some(0.0609));
    assert!(!parsed.use_quant_conv);
    for (key, value) in [
        ("act_fn", serde_json::json!("gelu")),
        (
            "down_block_types",
            serde_json::json!([
                "AttnDownEncoderBlock2D",
                "DownEncoderBlock2D",
                "DownEncoderBlock2D"
            ]),
        ),
        (
            "up_block_types",
            serde_json::json!([
                "UpDecoderBlock2D",
                "UpDecoderBlock2D",
                "AttnUpDecoderBlock2D"
            ]),
        ),
        (
            "latents_mean",
            serde_json::json!([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
        ),
        (
            "latents_std",
            serde_json::json!([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ),
        ("norm_num_groups", serde_json::json!(5)),
        ("block_out_channels", serde_json::json!([8, 16])),
        ("some_new_key", serde_json::json!(1)),
    ] {
        let mut c = base.clone();
        c[key] = value;
        let e = format!("{:#}", AutoencoderKLConfig::from_json(&c).unwrap_err());
        assert!(e.contains(key), "{key}: {e}");
    }
    let mut c = base.clone();
    c["_class_name"] = serde_json::json!("AutoencoderTiny");
    let e = format!("{:#}", AutoencoderKLConfig::from_json(&c).unwrap_err());
    assert!(e.contains("AutoencoderTiny"), "{e}");
    // diffusers' defaults when absent.
    assert_eq!(
        AutoencoderKLConfig::from_json(&serde_json::json!({})).unwrap(),
        AutoencoderKLConfig::default()
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn rewrite(p: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut w = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    f(&mut w);
    candle_core::safetensors::save(&w, p).unwrap();
}

#[test]
fn vae_bad_weights_are_errors_naming_the_tensor() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("vae/kl_sd"), t.path());
    let p = t.path().join("diffusion_pytorch_model.safetensors");
    // The fixture has the legacy attention names: the current name is what the error gives.
    let key = "decoder.mid_block.attentions.0.query.weight";
    rewrite(&p, |w| {
        w.remove(key).unwrap();
    });
    let e = format!("{:#}", load_vae(t.path(), &Device::Cpu).unwrap_err());
    assert!(
        e.contains("missing") && e.contains("decoder.mid_block.attentions.0.to_q.weight"),
        "{e}"
    );
    copy_dir(&fixtures().join("vae/kl_sd"), t.path());
    rewrite(&p, |w| {
        w.insert(
            "decoder.conv_out.weight".into(),
            Tensor::zeros((3, 12, 3, 2), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = format!("{:#}", load_vae(t.path(), &Device::Cpu).unwrap_err());
    assert!(
        e.contains("decoder.conv_out.weight") && e.contains("[3, 12, 3, 2]"),
        "{e}"
    );
    // A pipeline folder finds its vae/.
    let pipe = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("vae/kl_sd3"), &pipe.path().join("vae"));
    std::fs::write(pipe.path().join("model_index.json"), "{}").unwrap();
    let (v, _) = load_vae(pipe.path(), &Device::Cpu).unwrap();
    assert_eq!(v.cfg.block_out_channels, [8, 16, 16]);
    let e = format!(
        "{:#}",
        v.encode_mean(
            &CandleBackend::new(&Device::Cpu),
            &Tensor::zeros((1, 3, 6, 8), DType::F32, &Device::Cpu).unwrap(),
            6,
            8
        )
        .unwrap_err()
    );
    assert!(e.contains("6x8") && e.contains("divisible by 4"), "{e}");
}

#[test]
fn vae_gradients_reach_the_input() {
    // A frozen VAE inside a loss (DMD2's GAN term on decoded images): d(images)/d(latents).
    let dev = Device::Cpu;
    let (vae, _) = load_vae(&fixtures().join("vae/kl_sd"), &dev).unwrap();
    let z = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap())
        .unwrap();
    let y = vae
        .decode_latents(&CandleBackend::training(&dev), z.as_tensor(), 8, 8)
        .unwrap();
    let g = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let gz = g.get(z.as_tensor()).expect("gradient of the latents");
    assert!(
        gz.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

// --- CLIP -------------------------------------------------------------------------------------

fn prompts(name: &str) -> Vec<String> {
    let p = fixtures().join("clip").join(name).join("prompts.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn clip_parity(name: &str) {
    let dir = fixtures().join("clip").join(name);
    let dev = Device::Cpu;
    let (model, _) = load_text_encoder(&dir.join("text_encoder"), &dev).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &dev).unwrap();
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let l = ids.dim(1).unwrap();
    for b in backends() {
        let k = b.kernels;
        let o = model.forward(&b, &ids, l, 0, true).unwrap();
        let mut checks = vec![
            ("last_hidden_state", o.hidden),
            ("pooler_output", o.pooled.unwrap()),
        ];
        if let Some(t) = o.text_embeds {
            checks.push(("text_embeds", t));
        }
        let skip = model.forward(&b, &ids, l, 1, false).unwrap();
        checks.push(("clip_skip_1", skip.hidden));
        let n = model.layers.len();
        checks.push((
            "penultimate",
            model.hidden_states(&b, &ids, l, n - 1).unwrap(),
        ));
        for (key, ours) in checks {
            let err = max_abs(&ours, &f[key]);
            eprintln!("{name} {key} (kernels {k}): max abs {err:.3e}");
            assert!(err <= 1e-4, "{name} {key} (kernels {k}): max abs {err:.3e}");
        }
    }
    assert_eq!(
        f.contains_key("text_embeds"),
        model.text_projection.is_some()
    );
}

#[test]
fn clip_quick_gelu_matches_transformers() {
    clip_parity("clip_quick");
}

#[test]
fn clip_gelu_projection_matches_transformers() {
    clip_parity("clip_gelu_proj");
}

fn tokenizer_parity(name: &str, folder: &str) {
    let dir = fixtures().join("clip").join(name);
    let cfg = ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    let tok = ClipTokenizer::from_dir(&dir.join(folder), cfg.max_position_embeddings).unwrap();
    let f = candle_core::safetensors::load(dir.join("forward.safetensors"), &Device::Cpu).unwrap();
    let want = f["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let p = prompts(name);
    assert_eq!(p.len(), want.len());
    for (prompt, ids) in p.iter().zip(&want) {
        assert_eq!(&tok.encode(prompt).unwrap(), ids, "{name}: {prompt:?}");
    }
    let refs: Vec<&str> = p.iter().map(String::as_str).collect();
    let t = tok.encode_tensor(&refs, &Device::Cpu).unwrap();
    assert_eq!(t.to_vec2::<u32>().unwrap(), want);
}

#[test]
fn tokenizer_ids_equal_transformers_pad_eos() {
    tokenizer_parity("clip_quick", "tokenizer");
}

#[test]
fn tokenizer_ids_equal_transformers_pad_bang() {
    tokenizer_parity("clip_gelu_proj", "tokenizer");
}

/// Only vocab.json + merges.txt (as SD 1.x folders ship): assembled as transformers does.
#[test]
fn slow_tokenizer_files_give_transformers_ids() {
    tokenizer_parity("clip_quick", "tokenizer_slow");
    tokenizer_parity("clip_gelu_proj", "tokenizer_slow");
}

#[test]
fn clip_config_and_weights_are_checked_by_name() {
    let p = fixtures().join("clip/clip_quick/text_encoder/config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (key, value) in [
        ("hidden_act", serde_json::json!("gelu_new")),
        ("model_type", serde_json::json!("clip")),
        ("rope_theta", serde_json::json!(10000)),
        ("num_attention_heads", serde_json::json!(3)),
    ] {
        let mut c = base.clone();
        c[key] = value;
        let e = format!("{:#}", ClipTextConfig::from_json(&c).unwrap_err());
        assert!(e.contains(key), "{key}: {e}");
    }
    // transformers' CLIPTextConfig defaults when absent.
    let d = ClipTextConfig::from_json(&serde_json::json!({})).unwrap();
    assert_eq!(d, ClipTextConfig::default());
    assert_eq!((d.eos_token_id, d.max_position_embeddings), (49407, 77));
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/clip_quick/text_encoder"), t.path());
    let w = t.path().join("model.safetensors");
    let key = "text_model.encoder.layers.1.mlp.fc2.weight";
    rewrite(&w, |m| {
        m.remove(key).unwrap();
    });
    let e = format!(
        "{:#}",
        load_text_encoder(t.path(), &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("missing") && e.contains(key), "{e}");
    // Neither tokenizer.json nor vocab.json + merges.txt: named.
    let tk = tempfile::tempdir().unwrap();
    std::fs::write(tk.path().join("vocab.json"), "{}").unwrap();
    let e = format!(
        "{:#}",
        ClipTokenizer::from_dir(tk.path(), 77).err().unwrap()
    );
    assert!(
        e.contains("tokenizer.json") && e.contains("merges.txt"),
        "{e}"
    );
    // A vocabulary without the special tokens.
    std::fs::write(tk.path().join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    std::fs::write(tk.path().join("vocab.json"), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
    let e = format!(
        "{:#}",
        ClipTokenizer::from_dir(tk.path(), 77).err().unwrap()
    );
    assert!(
        e.contains("<|startoftext|>") && e.contains("vocab.json"),
        "{e}"
    );
}

#[test]
fn prompt_embeds_file_is_checked_and_named() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("embeds.safetensors");
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    m.insert(
        "prompt_embeds".to_string(),
        Tensor::ones((3, 16, 32), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&m, &p).unwrap();
    let (e, pooled) = load_prompt_embeds(&p, 16, 32, None, &dev).unwrap();
    assert_eq!(e.dims(), [3, 16, 32]);
    assert!(pooled.is_none());
    let err = format!(
        "{:#}",
        load_prompt_embeds(&p, 77, 768, None, &dev).unwrap_err()
    );
    assert!(
        err.contains("embeds.safetensors") && err.contains("[N, 77, 768]"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        load_prompt_embeds(&p, 16, 32, Some(8), &dev).unwrap_err()
    );
    assert!(
        err.contains("embeds.safetensors") && err.contains("pooled_prompt_embeds"),
        "{err}"
    );
    let q = t.path().join("other.safetensors");
    let mut m = HashMap::new();
    m.insert("x".to_string(), Tensor::ones(3, DType::F32, &dev).unwrap());
    candle_core::safetensors::save(&m, &q).unwrap();
    let err = format!(
        "{:#}",
        load_prompt_embeds(&q, 16, 32, None, &dev).unwrap_err()
    );
    assert!(
        err.contains("other.safetensors") && err.contains("prompt_embeds"),
        "{err}"
    );
}

#[test]
fn params_walk_every_weight_once() {
    let dev = Device::Cpu;
    let (vae, w) = load_vae(&fixtures().join("vae/kl_sd3"), &dev).unwrap();
    let mut names: Vec<String> = vae.params().into_iter().map(|p| p.name).collect();
    names.sort();
    let mut keys: Vec<String> = w.keys().cloned().collect();
    keys.sort();
    assert_eq!(names, keys);
    let (clip, w) =
        load_text_encoder(&fixtures().join("clip/clip_gelu_proj/text_encoder"), &dev).unwrap();
    let mut names: Vec<String> = clip.params().into_iter().map(|p| p.name).collect();
    names.sort();
    let mut keys: Vec<String> = w.keys().cloned().collect();
    keys.sort();
    assert_eq!(names, keys);
}

#[test]
fn prompt_encoder_of_a_pipeline_folder_gives_transformers_embeddings() {
    let t = tempfile::tempdir().unwrap();
    let src = fixtures().join("clip/clip_quick");
    copy_dir(&src.join("tokenizer_slow"), &t.path().join("tokenizer"));
    copy_dir(&src.join("text_encoder"), &t.path().join("text_encoder"));
    std::fs::write(t.path().join("model_index.json"), "{}").unwrap();
    let dev = Device::Cpu;
    let enc = graphs::transformers::PromptEncoder::from_pipeline(t.path(), &dev).unwrap();
    let p = prompts("clip_quick");
    let refs: Vec<&str> = p.iter().map(String::as_str).collect();
    let e = enc.encode(&CandleBackend::new(&dev), &refs).unwrap();
    let f = candle_core::safetensors::load(src.join("forward.safetensors"), &dev).unwrap();
    let err = max_abs(&e, &f["last_hidden_state"]);
    assert!(err <= 1e-4, "{err:.3e}");
    let e = format!(
        "{:#}",
        graphs::transformers::PromptEncoder::from_pipeline(&fixtures().join("vae"), &dev)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("prompt encoder") && e.contains("text_encoder"),
        "{e}"
    );
}

#[test]
fn sharded_text_encoder_loads_the_same() {
    let src = fixtures().join("clip/clip_quick/text_encoder");
    let dev = Device::Cpu;
    let (whole, w) = load_text_encoder(&src, &dev).unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), t.path().join("config.json")).unwrap();
    let mut keys: Vec<&String> = w.keys().collect();
    keys.sort();
    let (a, b) = keys.split_at(keys.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        let m: HashMap<String, Tensor> =
            part.iter().map(|k| ((*k).clone(), w[*k].clone())).collect();
        candle_core::safetensors::save(&m, t.path().join(file)).unwrap();
        for k in part {
            map.insert((*k).clone(), serde_json::json!(file));
        }
    }
    let index = t.path().join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({"weight_map": map}).to_string()).unwrap();
    let (sharded, _) = load_text_encoder(t.path(), &dev).unwrap();
    let ids = Tensor::new(&[[3u32, 5, 593, 593]], &dev).unwrap();
    let b = CandleBackend::new(&dev);
    let y0 = whole.forward(&b, &ids, 4, 0, true).unwrap();
    let y1 = sharded.forward(&b, &ids, 4, 0, true).unwrap();
    assert_eq!(max_abs(&y0.hidden, &y1.hidden), 0.0);
    // A key the index names but its shard lacks.
    let mut map2 = map.clone();
    map2.insert(
        "text_model.extra.weight".into(),
        serde_json::json!("model-00001-of-00002.safetensors"),
    );
    std::fs::write(&index, serde_json::json!({"weight_map": map2}).to_string()).unwrap();
    let e = format!("{:#}", load_text_encoder(t.path(), &dev).err().unwrap());
    assert!(
        e.contains("text_model.extra.weight") && e.contains("index"),
        "{e}"
    );
    std::fs::remove_file(&index).unwrap();
    let e = format!("{:#}", load_text_encoder(t.path(), &dev).err().unwrap());
    assert!(e.contains("no model.safetensors"), "{e}");
}
