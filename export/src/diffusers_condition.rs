//! The bare diffusers `UNet2DConditionModel` with diffusers' own signature, the way optimum
//! exports a Stable Diffusion UNet: `sample`, `timestep`, `encoder_hidden_states` (+ SDXL's
//! `text_embeds`, `time_ids`) -> `out_sample`.

use crate::builder::{Dim, ElemType, OnnxBackend};
use crate::model::ExportOptions;
use crate::proto::ModelProto;
use anyhow::{Context, Result};
use graphs::diffusers::{AddedCond, UNet2DConditionModel, SDXL_TIME_IDS};

/// `sample` `[batch, C, height, width]` f32, `timestep` `[batch]` f32, `encoder_hidden_states`
/// `[batch, seq_len, cross_attention_dim]` f32 (the prompt embeddings; `seq_len` is static, 77
/// for CLIP), plus `text_embeds` `[batch, pooled]` and `time_ids` `[batch, 6]` f32 for
/// `addition_embed_type = "text_time"` -> `out_sample`, the raw prediction.
pub fn export_unet2d_condition(
    model: &UNet2DConditionModel,
    (height, width): (usize, usize),
    seq_len: usize,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let cfg = &model.cfg;
    let b = OnnxBackend::new(opts.precision)?;
    let sample = b.input(
        "sample",
        ElemType::F32,
        &[
            Dim::Batch,
            Dim::Fixed(cfg.in_channels),
            Dim::Fixed(height),
            Dim::Fixed(width),
        ],
    )?;
    let timestep = b.input("timestep", ElemType::F32, &[Dim::Batch])?;
    // Every block attends to the same states: per-block cross_attention_dim entries must agree.
    let cross = cfg.cross_attention_dim[0];
    anyhow::ensure!(
        cfg.cross_attention_dim.iter().all(|&c| c == cross),
        "UNet2DConditionModel: cross_attention_dim = {:?} differs between blocks: one \
         encoder_hidden_states input cannot feed them",
        cfg.cross_attention_dim
    );
    let ehs = b.input(
        "encoder_hidden_states",
        ElemType::F32,
        &[Dim::Batch, Dim::Fixed(seq_len), Dim::Fixed(cross)],
    )?;
    let added = match model.text_embeds_dim(SDXL_TIME_IDS) {
        None if cfg.has_text_time() => anyhow::bail!(
            "UNet2DConditionModel: projection_class_embeddings_input_dim is smaller than \
             {SDXL_TIME_IDS} x addition_time_embed_dim: no text_embeds width fits"
        ),
        None => None,
        Some(pooled) => Some(AddedCond {
            text_embeds: b.input(
                "text_embeds",
                ElemType::F32,
                &[Dim::Batch, Dim::Fixed(pooled)],
            )?,
            time_ids: b.input(
                "time_ids",
                ElemType::F32,
                &[Dim::Batch, Dim::Fixed(SDXL_TIME_IDS)],
            )?,
        }),
    };
    let out = model
        .forward_hw(
            &b,
            &sample,
            (height, width),
            &timestep,
            &ehs,
            added.as_ref(),
        )
        .context("lowering the UNet2DConditionModel")?;
    let meta = vec![
        ("method".to_string(), opts.method.clone()),
        ("precision".into(), opts.precision.name().into()),
    ];
    crate::model::finish_model(
        b,
        "diffusers_unet2d_condition",
        &[("out_sample", out)],
        meta,
        opts,
        "the exported UNet2DConditionModel",
    )
}
