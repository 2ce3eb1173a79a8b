//! A text-to-image student checkpoint (`distill train tdm --prompts`): its UNet weights and
//! generator in the checkpoint folder, its pipeline (VAE, text encoder, tokenizer, scheduler)
//! named by the checkpoint's `text_to_image.json` (the teacher folder and its UNet's sha256).

use crate::train::distill::TEXT_TO_IMAGE_FILE;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use graphs::diffusers::TextToImage;
use graphs::GeneratorSpec;
use std::path::{Path, PathBuf};

/// What `text_to_image.json` records.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PipelineRef {
    pub pipeline: PathBuf,
    pub unet_sha256: String,
}

/// The record of a text-to-image student checkpoint folder, `None` for any other path.
pub fn pipeline_ref(ckpt: &Path) -> Result<Option<PipelineRef>> {
    let f = ckpt.join(TEXT_TO_IMAGE_FILE);
    if !f.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?,
    ))
}

/// The student's pipeline: the recorded teacher folder (its UNet checked against the recorded
/// sha256) with the student's UNet in place of the teacher's, and the student's generator.
pub fn load(ckpt: &Path, r: &PipelineRef, dev: &Device) -> Result<(TextToImage, GeneratorSpec)> {
    let unet = r.pipeline.join("unet");
    let sha = crate::train::distill::dir_weights_sha256(&unet).with_context(|| {
        format!(
            "{}: the student's pipeline {} (recorded in its {TEXT_TO_IMAGE_FILE})",
            ckpt.display(),
            r.pipeline.display()
        )
    })?;
    if sha != r.unet_sha256 {
        bail!(
            "{}: the pipeline {} recorded in {TEXT_TO_IMAGE_FILE} has another UNet than the \
             teacher the student was distilled from (sha256 {sha}, recorded {})",
            ckpt.display(),
            r.pipeline.display(),
            r.unet_sha256
        );
    }
    let mut pipe = TextToImage::load(&r.pipeline, dev)?;
    let (den, meta) = crate::checkpoint::load(ckpt, dev)?;
    pipe.den = den;
    Ok((pipe, meta.generator))
}
