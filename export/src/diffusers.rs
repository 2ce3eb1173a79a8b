//! The bare diffusers `UNet2DModel` with diffusers' own signature, the way optimum exports a
//! UNet: a drop-in for the PyTorch model in any ONNX runtime.

use crate::builder::{Dim, ElemType, OnnxBackend};
use crate::model::ExportOptions;
use crate::proto::ModelProto;
use anyhow::{Context, Result};
use graphs::diffusers::{ClassEmbed, UNet2DModel};

/// `sample` `[batch, C, side, side]` f32, `timestep` `[batch]` f32 (diffusers' timestep values),
/// plus `class_labels` `[batch]` int32 (a class table or `timestep` class embedding) or
/// `[batch, temb]` f32 (`identity`) where the model has them -> `out_sample`, the model's raw
/// prediction (eps, v or x0, as it was trained).
pub fn export_unet2d(model: &UNet2DModel, side: usize, opts: &ExportOptions) -> Result<ModelProto> {
    let cfg = &model.cfg;
    let b = OnnxBackend::new(opts.precision)?;
    let sample = b.input(
        "sample",
        ElemType::F32,
        &[
            Dim::Batch,
            Dim::Fixed(cfg.in_channels),
            Dim::Fixed(side),
            Dim::Fixed(side),
        ],
    )?;
    let timestep = b.input("timestep", ElemType::F32, &[Dim::Batch])?;
    let labels = match cfg.class_embed {
        ClassEmbed::None => None,
        ClassEmbed::Table(_) | ClassEmbed::Timestep => {
            Some(b.input("class_labels", ElemType::I32, &[Dim::Batch])?)
        }
        ClassEmbed::Identity => Some(b.input(
            "class_labels",
            ElemType::F32,
            &[Dim::Batch, Dim::Fixed(cfg.temb_dim())],
        )?),
    };
    let out = model
        .forward(&b, &sample, side, &timestep, labels.as_ref())
        .context("lowering the UNet2DModel")?;
    let meta = vec![
        ("method".to_string(), opts.method.clone()),
        ("precision".into(), opts.precision.name().into()),
    ];
    crate::model::finish_model(
        b,
        "diffusers_unet2d",
        &[("out_sample", out)],
        meta,
        opts,
        "the exported UNet2DModel",
    )
}
