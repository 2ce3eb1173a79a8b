//! The VAE decoder and the CLIP text encoder of a text-to-image pipeline as ONNX graphs of their
//! own, lowered from the same `graphs` definitions candle runs.

use crate::builder::{Dim, ElemType, OnnxBackend};
use crate::model::ExportOptions;
use crate::proto::ModelProto;
use anyhow::{Context, Result};
use graphs::diffusers::vae::AutoencoderKL;
use graphs::transformers::ClipTextModel;

fn finish(
    b: OnnxBackend,
    kind: &str,
    outputs: &[(&str, String)],
    mut meta: Vec<(String, String)>,
    opts: &ExportOptions,
    what: &str,
) -> Result<ModelProto> {
    let mut head = vec![("precision".to_string(), opts.precision.name().to_string())];
    head.append(&mut meta);
    crate::model::finish_model(b, kind, outputs, head, opts, what)
}

/// `latents` `[batch, latent_channels, h, w]` f32 (scaled, as a sampler has them) -> `images`
/// `[batch, out_channels, h * f, w * f]`: `vae.decode(latents / scaling_factor + shift_factor)`
/// (not clamped, as diffusers' decode). fp16 is refused for a VAE whose config sets
/// `force_upcast` (SD 1.x / SDXL / SD3 VAEs overflow in half precision; diffusers runs them in
/// f32 too): export those fp32.
pub fn export_vae_decoder(
    vae: &AutoencoderKL,
    h: usize,
    w: usize,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let cfg = &vae.cfg;
    anyhow::ensure!(
        !(cfg.force_upcast && opts.precision == graphs::Precision::Fp16),
        "the VAE's config.json sets force_upcast = true (it overflows in half precision; diffusers \
         upcasts it to f32): export the decoder in fp32"
    );
    let b = OnnxBackend::new(opts.precision)?;
    let latents = b.input(
        "latents",
        ElemType::F32,
        &[
            Dim::Batch,
            Dim::Fixed(cfg.latent_channels),
            Dim::Fixed(h),
            Dim::Fixed(w),
        ],
    )?;
    let images = vae
        .decode_latents(&b, &latents, h, w)
        .context("lowering the AutoencoderKL decoder")?;
    let meta = vec![
        ("scaling_factor".into(), cfg.scaling_factor.to_string()),
        (
            "shift_factor".into(),
            cfg.shift_factor.unwrap_or(0.0).to_string(),
        ),
    ];
    finish(
        b,
        "vae_decoder",
        &[("images", images)],
        meta,
        opts,
        "the exported VAE decoder",
    )
}

/// `input_ids` `[batch, seq_len]` int32 (the tokenizer's padded ids) -> `last_hidden_state`
/// `[batch, seq_len, hidden]` (the prompt embeddings SD 1.5 conditions on; with `clip_skip` the
/// final LayerNorm of an earlier layer, as diffusers' pipelines) and, with `pooled`,
/// `pooler_output` `[batch, hidden]` (+ `text_embeds` `[batch, projection_dim]` for a
/// `CLIPTextModelWithProjection`).
pub fn export_text_encoder(
    model: &ClipTextModel,
    seq_len: usize,
    clip_skip: usize,
    pooled: bool,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let b = OnnxBackend::new(opts.precision)?;
    let ids = b.input(
        "input_ids",
        ElemType::I32,
        &[Dim::Batch, Dim::Fixed(seq_len)],
    )?;
    let o = model
        .forward(&b, &ids, seq_len, clip_skip, pooled)
        .context("lowering the CLIP text encoder")?;
    let mut outs = vec![("last_hidden_state", o.hidden)];
    if let Some(p) = o.pooled {
        outs.push(("pooler_output", p));
    }
    if let Some(t) = o.text_embeds {
        outs.push(("text_embeds", t));
    }
    let meta = vec![
        ("seq_len".into(), seq_len.to_string()),
        ("clip_skip".into(), clip_skip.to_string()),
    ];
    finish(
        b,
        "clip_text_encoder",
        &outs,
        meta,
        opts,
        "the exported CLIP text encoder",
    )
}

/// A text-to-image pipeline's prompt encoder(s) as one graph. SD: [`export_text_encoder`]
/// (`input_ids` -> `last_hidden_state`). SDXL: `input_ids` (`tokenizer`) and `input_ids_2`
/// (`tokenizer_2`), `[batch, seq_len]` int32 -> `prompt_embeds` `[batch, seq_len, dim_1 + dim_2]`
/// (both encoders' `hidden_states[-2]`, concatenated) and `pooled_prompt_embeds`
/// `[batch, projection_dim]` (`text_encoder_2`'s `text_embeds`): exactly the generator's inputs,
/// with diffusers' `encode_prompt` (which layer, the concatenation, which encoder pools) in the
/// graph rather than in every caller.
pub fn export_prompt_encoder(
    t2i: &graphs::diffusers::TextToImage,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let seq = t2i.seq_len();
    if t2i.sdxl.is_none() {
        return export_text_encoder(&t2i.prompts.model, seq, t2i.prompts.clip_skip, false, opts);
    }
    let b = OnnxBackend::new(opts.precision)?;
    let ids = b.input("input_ids", ElemType::I32, &[Dim::Batch, Dim::Fixed(seq)])?;
    let ids_2 = b.input("input_ids_2", ElemType::I32, &[Dim::Batch, Dim::Fixed(seq)])?;
    let (pe, pooled) = t2i
        .embed_ids(&b, &ids, Some(&ids_2))
        .context("lowering SDXL's two CLIP text encoders")?;
    let pooled = pooled.context("SDXL's second encoder gives the pooled embeddings")?;
    let meta = vec![
        ("seq_len".into(), seq.to_string()),
        ("clip_skip".into(), t2i.prompts.clip_skip.to_string()),
        ("pipeline".into(), t2i.class.clone()),
    ];
    finish(
        b,
        "clip_text_encoder",
        &[("prompt_embeds", pe), ("pooled_prompt_embeds", pooled)],
        meta,
        opts,
        "the exported SDXL text encoders",
    )
}

/// The text-to-image graphs' inputs on a fresh backend: `noise` `[batch, C, h, w]`,
/// `prompt_embeds` `[batch, tokens, dim]` and for SDXL `pooled_prompt_embeds` `[batch, pooled]`
/// with `time_ids` `[batch, 6]` (as diffusers and optimum name them) in the condition.
fn text_to_image_inputs(
    t2i: &graphs::diffusers::TextToImage,
    opts: &ExportOptions,
) -> Result<(OnnxBackend, String, graphs::TextCond<String>)> {
    let (c, side) = t2i.latent_shape();
    let (seq, dim) = (t2i.seq_len(), t2i.embed_dim());
    let b = OnnxBackend::new(opts.precision)?;
    let noise = b.input(
        "noise",
        ElemType::F32,
        &[
            Dim::Batch,
            Dim::Fixed(c),
            Dim::Fixed(side),
            Dim::Fixed(side),
        ],
    )?;
    let pe = b.input(
        "prompt_embeds",
        ElemType::F32,
        &[Dim::Batch, Dim::Fixed(seq), Dim::Fixed(dim)],
    )?;
    let added = match t2i.pooled_dim() {
        Some(p) => Some(graphs::cond::AddedCond {
            text_embeds: b.input(
                "pooled_prompt_embeds",
                ElemType::F32,
                &[Dim::Batch, Dim::Fixed(p)],
            )?,
            time_ids: b.input(
                "time_ids",
                ElemType::F32,
                &[Dim::Batch, Dim::Fixed(graphs::diffusers::SDXL_TIME_IDS)],
            )?,
        }),
        None => None,
    };
    Ok((
        b,
        noise,
        graphs::TextCond {
            prompt_embeds: pe,
            added,
        },
    ))
}

/// The `vae_precision` metadata entry: fp32 for a `force_upcast` VAE in an fp16 graph.
fn vae_precision(t2i: &graphs::diffusers::TextToImage, opts: &ExportOptions) -> (String, String) {
    let p = if t2i.vae.cfg.force_upcast {
        graphs::Precision::Fp32
    } else {
        opts.precision
    };
    ("vae_precision".into(), p.name().into())
}

/// Latents -> the VAE decoder -> `images` in [0, 1] (diffusers' `output_type="np"` values). A
/// `force_upcast` VAE (SD 1.x, SDXL) runs in fp32 inside an fp16 graph, as in diffusers.
fn decode_to_images(
    t2i: &graphs::diffusers::TextToImage,
    b: &OnnxBackend,
    lat: &String,
    side: usize,
) -> Result<String> {
    use graphs::Backend;
    let decode = || t2i.vae.decode_latents(b, lat, side, side);
    let img = if t2i.vae.cfg.force_upcast {
        b.upcast(decode)
    } else {
        decode()
    }
    .context("lowering the AutoencoderKL decoder")?;
    b.clamp(&b.affine(&img, 0.5, 0.5)?, 0.0, 1.0)
}

/// A text-to-image pipeline's whole sampler as one graph: `noise` `[batch, C, h, w]` (unit
/// Gaussian latents, diffusers' `latents` argument) + `prompt_embeds` `[batch, seq_len, dim]` (the
/// text encoder's output: `export_text_encoder`) -> `kind`'s `steps` on the scheduler's grid with
/// classifier-free guidance at `scale` against the empty prompt's embeddings (computed here by
/// candle and stored as a constant) -> the VAE decoder -> `images` `[batch, 3, H, W]` in [0, 1]
/// (diffusers' `output_type="np"` values, NCHW). The same `graphs` code as
/// [`graphs::diffusers::TextToImage::generate`].
pub fn export_text_to_image(
    t2i: &graphs::diffusers::TextToImage,
    kind: graphs::SamplerKind,
    steps: usize,
    scale: f64,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    use graphs::cond::{Cond, TextCond};
    use graphs::Backend;
    let (b, noise, cond) = text_to_image_inputs(t2i, opts)?;
    let side = t2i.latent_shape().1;
    let empty = {
        let cb = graphs::CandleBackend::new(&candle_core::Device::Cpu);
        t2i.uncond(&cb, 1)?
    };
    // The unconditional branch broadcast to the batch: 0 * input + constant (the empty
    // prompt's embeddings, or SDXL's zeros); the time ids are the conditional branch's.
    let like = |x: &String, c: &candle_core::Tensor| -> Result<String> {
        let zero = b.affine(x, 0.0, 0.0)?;
        let v = c.flatten_all()?.to_vec1::<f32>()?;
        if v.iter().all(|&v| v == 0.0) {
            return Ok(zero);
        }
        let mut dims = c.dims().to_vec();
        dims[0] = 1;
        b.add(&zero, &b.constant(&v, &dims)?)
    };
    let uncond = TextCond {
        prompt_embeds: like(&cond.prompt_embeds, &empty.prompt_embeds)?,
        added: match (&cond.added, &empty.added) {
            (Some(a), Some(e)) => Some(graphs::cond::AddedCond {
                text_embeds: like(&a.text_embeds, &e.text_embeds)?,
                time_ids: a.time_ids.clone(),
            }),
            _ => None,
        },
    };
    let cond = Cond::Text {
        cond,
        uncond: Some(uncond),
    };
    let (grid, last) = match &t2i.scheduler {
        graphs::schedulers::Scheduler::DpmMultistep(_) => {
            (graphs::sampler::sampling_sigmas(&t2i.den.param, steps), 0.0)
        }
        s => graphs::diffusers::teacher::scheduler_grid(s, steps)?,
    };
    let (x, nfe) =
        graphs::sampler::sample_ode_grid(&b, &t2i.den, kind, &noise, &cond, &grid, last, scale)
            .context("lowering the text-to-image sampler")?;
    let k = match &t2i.den.param {
        graphs::Parameterisation::Flow(_) => 1.0 / (1.0 + last),
        _ => 1.0 / (1.0 + last * last).sqrt(),
    };
    let lat = b.affine(&x, k, 0.0)?;
    let images = decode_to_images(t2i, &b, &lat, side)?;
    let meta = vec![
        ("sampler".into(), format!("{kind:?}").to_lowercase()),
        ("steps".into(), steps.to_string()),
        // Two UNet calls per evaluation under guidance.
        (
            "unet_calls".into(),
            (if scale != 1.0 { 2 * nfe } else { nfe }).to_string(),
        ),
        ("cfg_scale".into(), scale.to_string()),
        (
            "uncond".into(),
            if t2i
                .sdxl
                .as_ref()
                .is_some_and(|s| s.force_zeros_for_empty_prompt)
            {
                "zeros (force_zeros_for_empty_prompt)".into()
            } else {
                "empty prompt".into()
            },
        ),
        ("images_range".into(), "0,1".into()),
        vae_precision(t2i, opts),
    ];
    finish(
        b,
        "text_to_image_generator",
        &[("images", images)],
        meta,
        opts,
        "the exported text-to-image generator",
    )
}

/// A distilled text-to-image student's sampler as one graph (the pipeline `t2i` with the
/// student's UNet in its `den`): `noise` `[batch, C, h, w]` + `prompt_embeds` -> the student's
/// deterministic steps over its `sigmas` (no guidance: it is distilled in) -> the last step's
/// latents -> the VAE decoder -> `images` in [0, 1]. Metadata `sampler = student`.
pub fn export_text_to_image_student(
    t2i: &graphs::diffusers::TextToImage,
    sigmas: &[f64],
    opts: &ExportOptions,
) -> Result<ModelProto> {
    use graphs::cond::NetCond;
    let (b, noise, tc) = text_to_image_inputs(t2i, opts)?;
    let side = t2i.latent_shape().1;
    let lat = graphs::sampler::student_x0(&b, &t2i.den, &noise, NetCond::Text(&tc), sigmas)
        .context("lowering the text-to-image student")?;
    let images = decode_to_images(t2i, &b, &lat, side)?;
    let meta = vec![
        ("sampler".into(), "student".into()),
        ("steps".into(), sigmas.len().to_string()),
        ("unet_calls".into(), sigmas.len().to_string()),
        ("cfg_scale".into(), "1".into()),
        ("images_range".into(), "0,1".into()),
        vae_precision(t2i, opts),
    ];
    finish(
        b,
        "text_to_image_generator",
        &[("images", images)],
        meta,
        opts,
        "the exported text-to-image student",
    )
}
