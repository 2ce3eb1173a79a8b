//! The text-conditioned latent teacher as a `Denoiser` (diffusers' `UNet2DConditionModel` in
//! `graphs::Network::Condition`, the VP parameterisation from the pipeline's scheduler) sampled
//! by our ODE sampler with classifier-free guidance against the negative prompt's embeddings,
//! against diffusers' own `StableDiffusionPipeline` / `StableDiffusionXLPipeline` calls
//! (recorded by `scripts/fixtures_unet_condition.py`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use graphs::cond::{AddedCond, Cond, NetCond, TextCond};
use graphs::diffusers::unet2d_condition::load_unet_condition;
use graphs::schedulers::Scheduler;
use graphs::{CandleBackend, Denoiser, Network, NetworkConfig, SamplerKind};
use std::path::Path;

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

fn teacher(model: &str, sched: &Scheduler, dev: &Device) -> Denoiser {
    let (unet, w) = load_unet_condition(&fixtures().join("models").join(model), dev).unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, dev);
    let net = Network::new(vb, &NetworkConfig::DiffusersUnet2dCondition(unet.cfg)).unwrap();
    Denoiser {
        net,
        param: graphs::diffusers::teacher::parameterisation(sched).unwrap(),
    }
}

/// Our guided ODE sample on the scheduler's grid vs the pipeline's final latents (scaled error).
fn pipeline(name: &str, model: &str, kind: SamplerKind) -> f32 {
    let dev = Device::Cpu;
    let dir = fixtures().join("pipelines").join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.json")).unwrap()).unwrap();
    let sched = Scheduler::from_file(&dir.join("scheduler_config.json")).unwrap();
    let den = teacher(model, &sched, &dev);
    assert!(den.net.config().is_text_conditional());
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let g = meta["guidance_scale"].as_f64().unwrap();
    let f = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let n = f["noise"].dim(0).unwrap();
    let added = |pooled: &str, half: usize| {
        f.get("time_ids").map(|ids| AddedCond {
            text_embeds: f[pooled].clone(),
            time_ids: ids.narrow(0, half * n, n).unwrap(),
        })
    };
    let cond = Cond::Text {
        cond: TextCond {
            prompt_embeds: f["prompt_embeds"].clone(),
            added: added("pooled_prompt_embeds", 1),
        },
        uncond: Some(TextCond {
            prompt_embeds: f["negative_prompt_embeds"].clone(),
            added: added("negative_pooled_prompt_embeds", 0),
        }),
    };
    let (grid, last) = graphs::diffusers::teacher::scheduler_grid(&sched, steps).unwrap();
    let b = CandleBackend::new(&dev);
    let (x, nfe) =
        graphs::sampler::sample_ode_grid(&b, &den, kind, &f["noise"], &cond, &grid, last, g)
            .unwrap();
    assert_eq!(nfe, steps);
    // Back to the scheduler's space: DDIM's latents are x_t = x / sqrt(1 + sigma^2); Euler's are
    // sigma-space already.
    let x = match sched {
        Scheduler::Ddim(_) => x.affine(1.0 / (1.0 + last * last).sqrt(), 0.0).unwrap(),
        _ => x,
    };
    let want = &f["latents"];
    let err = max_abs(&(&x - want).unwrap()) / max_abs(want).max(1.0);
    eprintln!(
        "{name}: final latents scaled max abs {err:.3e} (max abs {:.1})",
        max_abs(want)
    );
    err
}

#[test]
fn stable_diffusion_pipeline_matches_our_ddim_sampler_with_text_guidance() {
    // DDIM, SD 1.5's config (leading spacing, set_alpha_to_one false: the last step ends at
    // alphas_cumprod[0]), 4 steps, guidance 7.5 against the negative prompt's embeddings.
    let err = pipeline("cond_sd15_ddim_cfg", "cond_sd15", SamplerKind::Ddim);
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn stable_diffusion_xl_pipeline_matches_our_euler_sampler_with_pooled_embeddings() {
    let err = pipeline("cond_sdxl_euler_cfg", "cond_sdxl", SamplerKind::Euler);
    assert!(err <= 1e-4, "{err:.3e}");
}

#[test]
fn conditions_are_refused_by_the_wrong_network_and_guidance_needs_the_empty_prompt() {
    let dev = Device::Cpu;
    let sched = Scheduler::from_file(
        &fixtures().join("pipelines/cond_sd15_ddim_cfg/scheduler_config.json"),
    )
    .unwrap();
    let den = teacher("cond_sd15", &sched, &dev);
    let b = CandleBackend::new(&dev);
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let labels = Tensor::new(&[0u32], &dev).unwrap();
    let e = den.net.forward(&b, &x, &t, &labels).unwrap_err();
    assert!(format!("{e:#}").contains("prompt embeddings"), "{e:#}");
    let text = TextCond {
        prompt_embeds: Tensor::zeros((1, 5, 32), DType::F32, &dev).unwrap(),
        added: None,
    };
    let out = den
        .net
        .forward_with(&b, &x, &t, NetCond::Text(&text))
        .unwrap();
    assert_eq!(out.dims(), &[1, 4, 8, 8]);
    let cond = Cond::Text {
        cond: text,
        uncond: None,
    };
    let e = graphs::sampler::sample_ode_cond(&b, &den, SamplerKind::Ddim, &x, &cond, 2, 7.5)
        .unwrap_err();
    assert!(format!("{e:#}").contains("empty prompt"), "{e:#}");
    // Scale 1 needs no unconditional branch.
    graphs::sampler::sample_ode_cond(&b, &den, SamplerKind::Ddim, &x, &cond, 2, 1.0).unwrap();
}

#[test]
fn stable_diffusion_pipeline_folder_call_matches_diffusers_images() {
    // teachers/sd_tiny: a StableDiffusionPipeline folder diffusers saved (UNet, VAE, CLIP text
    // encoder, tokenizer, SD 1.5's DDIM config); sd_tiny_call: its pipe(prompts, latents=noise,
    // 4 steps, guidance 7.5, output_type="np") with the empty negative prompt.
    use graphs::diffusers::TextToImage;
    let dev = Device::Cpu;
    let dir = fixtures().join("teachers/sd_tiny");
    assert!(graphs::diffusers::is_text_to_image(&dir));
    let t2i = TextToImage::load(&dir, &dev).unwrap();
    let call = fixtures().join("teachers/sd_tiny_call");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(call.join("prompts.json")).unwrap()).unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let g = meta["guidance_scale"].as_f64().unwrap();
    let f = candle_core::safetensors::load(call.join("expected.safetensors"), &dev).unwrap();
    let b = CandleBackend::new(&dev);
    let cond = t2i.condition(&b, &prompts).unwrap();
    let Cond::Text { cond: c, uncond } = &cond else {
        unreachable!()
    };
    let e_embeds = max_abs(&(&c.prompt_embeds - &f["prompt_embeds"]).unwrap());
    let e_neg =
        max_abs(&(&uncond.as_ref().unwrap().prompt_embeds - &f["negative_prompt_embeds"]).unwrap());
    let kind = t2i.default_sampler();
    assert_eq!(kind, SamplerKind::Ddim);
    let lat = t2i.latents(&b, &f["noise"], &cond, kind, steps, g).unwrap();
    let e_lat = max_abs(&(&lat - &f["latents"]).unwrap()) / max_abs(&f["latents"]).max(1.0);
    let img = t2i
        .generate(&b, &prompts, &f["noise"], kind, steps, g)
        .unwrap();
    let want = f["images"].permute((0, 3, 1, 2)).unwrap();
    assert_eq!(img.dims(), want.dims());
    let e_img = max_abs(&(&img - &want).unwrap());
    eprintln!(
        "sd_tiny: prompt embeds {e_embeds:.2e}, empty prompt {e_neg:.2e}, latents (scaled) \
         {e_lat:.2e}, images {e_img:.2e}"
    );
    assert!(e_embeds <= 1e-4 && e_neg <= 1e-4, "{e_embeds} {e_neg}");
    assert!(e_lat <= 1e-4, "{e_lat}");
    assert!(e_img <= 1e-3, "{e_img}");
}
