//! An SDXL pipeline folder (`StableDiffusionXLPipeline`: two CLIP text encoders, a `text_time`
//! UNet) as our text-to-image teacher, against diffusers' own `encode_prompt` and pipeline call
//! on the same folder (recorded by `scripts/fixtures_sdxl_pipeline.py`).

use candle_core::{Device, Tensor};
use graphs::cond::Cond;
use graphs::diffusers::TextToImage;
use graphs::{CandleBackend, SamplerKind};
use std::path::{Path, PathBuf};

fn fixtures() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/diffusers"
    ))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

struct Call {
    prompts: Vec<String>,
    steps: usize,
    guidance: f64,
    f: std::collections::HashMap<String, Tensor>,
}

fn call() -> Call {
    let dir = fixtures().join("teachers/sdxl_tiny_call");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    Call {
        prompts: meta["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance: meta["guidance_scale"].as_f64().unwrap(),
        f: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap(),
    }
}

#[test]
fn sdxl_encode_prompt_and_pipeline_call_match_diffusers() {
    let dev = Device::Cpu;
    let dir = fixtures().join("teachers/sdxl_tiny");
    assert!(graphs::diffusers::is_text_to_image(&dir));
    let mut t2i = TextToImage::load(&dir, &dev).unwrap();
    let s = t2i.sdxl.as_ref().expect("an SDXL pipeline");
    assert!(s.force_zeros_for_empty_prompt);
    assert_eq!(
        (t2i.seq_len(), t2i.embed_dim(), t2i.pooled_dim()),
        (16, 64, Some(24))
    );
    let c = call();
    let f = &c.f;
    let prompts: Vec<&str> = c.prompts.iter().map(String::as_str).collect();
    let b = CandleBackend::new(&dev);
    let cond = t2i.condition(&b, &prompts).unwrap();
    let Cond::Text { cond: pc, uncond } = &cond else {
        unreachable!()
    };
    let nc = uncond.as_ref().unwrap();
    let (pa, na) = (pc.added.as_ref().unwrap(), nc.added.as_ref().unwrap());
    let e_pe = diff(&pc.prompt_embeds, &f["prompt_embeds"]);
    let e_pool = diff(&pa.text_embeds, &f["pooled_prompt_embeds"]);
    let e_ne = diff(&nc.prompt_embeds, &f["negative_prompt_embeds"]);
    let e_npool = diff(&na.text_embeds, &f["negative_pooled_prompt_embeds"]);
    let ids = f["add_time_ids"].repeat((prompts.len(), 1)).unwrap();
    let e_ids = diff(&pa.time_ids, &ids).max(diff(&na.time_ids, &ids));
    // force_zeros_for_empty_prompt: diffusers' negative embeddings are exactly zero.
    assert_eq!(max_abs(&f["negative_prompt_embeds"]), 0.0);
    assert_eq!(max_abs(&nc.prompt_embeds), 0.0);
    let kind = t2i.default_sampler();
    assert_eq!(kind, SamplerKind::Euler);
    let lat = t2i
        .latents(&b, &f["noise"], &cond, kind, c.steps, c.guidance)
        .unwrap();
    let scale = max_abs(&f["latents"]).max(1.0);
    let e_lat = diff(&lat, &f["latents"]) / scale;
    let img = t2i
        .generate(&b, &prompts, &f["noise"], kind, c.steps, c.guidance)
        .unwrap();
    let e_img = diff(&img, &f["images"].permute((0, 3, 1, 2)).unwrap());
    // The other branch of encode_prompt: the empty prompt's embeddings as the negative ones.
    t2i.sdxl.as_mut().unwrap().force_zeros_for_empty_prompt = false;
    let cond2 = t2i.condition(&b, &prompts).unwrap();
    let Cond::Text { uncond: u2, .. } = &cond2 else {
        unreachable!()
    };
    let u2 = u2.as_ref().unwrap();
    let n = prompts.len();
    let e_empty = diff(
        &u2.prompt_embeds,
        &f["empty_prompt_embeds"].repeat((n, 1, 1)).unwrap(),
    )
    .max(diff(
        &u2.added.as_ref().unwrap().text_embeds,
        &f["empty_pooled_prompt_embeds"].repeat((n, 1)).unwrap(),
    ));
    let lat2 = t2i
        .latents(&b, &f["noise"], &cond2, kind, c.steps, c.guidance)
        .unwrap();
    let e_lat2 = diff(&lat2, &f["latents_empty"]) / max_abs(&f["latents_empty"]).max(1.0);
    eprintln!(
        "sdxl_tiny: prompt_embeds {e_pe:.2e}, pooled {e_pool:.2e}, negative {e_ne:.2e} / \
         {e_npool:.2e}, time ids {e_ids:.2e}, latents (scaled by {scale:.1}) {e_lat:.2e}, images \
         {e_img:.2e}; empty-prompt negative {e_empty:.2e}, its latents {e_lat2:.2e}"
    );
    for (what, e) in [
        ("prompt_embeds", e_pe),
        ("pooled_prompt_embeds", e_pool),
        ("negative_prompt_embeds", e_ne),
        ("negative_pooled_prompt_embeds", e_npool),
        ("add_time_ids", e_ids),
        ("empty prompt embeddings", e_empty),
        ("latents", e_lat),
        ("latents (empty-prompt negative)", e_lat2),
    ] {
        assert!(e <= 1e-4, "{what}: max abs {e:.3e} > 1e-4");
    }
    assert!(e_img <= 1e-4, "images: max abs {e_img:.3e}");
}

/// A copy of the SDXL fixture folder with `edit` applied to one JSON file.
fn edited(file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("sdxl");
    copy_dir(&fixtures().join("teachers/sdxl_tiny"), &dst);
    let p = dst.join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", TextToImage::load(dir, &Device::Cpu).unwrap_err())
}

#[test]
fn unsupported_pipelines_and_mismatched_sdxl_folders_are_refused_by_name() {
    for (class, word) in [
        ("StableDiffusion3Pipeline", "MMDiT"),
        ("PixArtSigmaPipeline", "T5"),
        ("PixArtAlphaPipeline", "T5"),
    ] {
        let (_t, d) = edited("model_index.json", |v| v["_class_name"] = class.into());
        assert!(graphs::diffusers::is_text_to_image(&d));
        let e = load_err(&d);
        assert!(e.contains(class) && e.contains(word), "{e}");
    }
    // An SDXL UNet in an SD pipeline: no second encoder for its pooled embeddings.
    let (_t, d) = edited("model_index.json", |v| {
        v["_class_name"] = "StableDiffusionPipeline".into()
    });
    let e = load_err(&d);
    assert!(e.contains("text_time"), "{e}");
    let (_t, d) = edited("model_index.json", |v| {
        v["requires_aesthetics_score"] = true.into()
    });
    assert!(load_err(&d).contains("requires_aesthetics_score"));
    let (_t, d) = edited("model_index.json", |v| {
        v["force_zeros_for_empty_prompt"] = "yes".into()
    });
    assert!(load_err(&d).contains("force_zeros_for_empty_prompt"));
    // A second encoder without text_projection.
    let (_t, d) = edited("text_encoder_2/config.json", |v| {
        v["architectures"] = serde_json::json!(["CLIPTextModel"]);
        v.as_object_mut().unwrap().remove("projection_dim");
    });
    let e = load_err(&d);
    assert!(
        e.contains("CLIPTextModelWithProjection") || e.contains("text_projection"),
        "{e}"
    );
}
