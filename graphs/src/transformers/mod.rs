//! Hugging Face transformers models a text-to-image pipeline needs: the CLIP text encoder
//! (`CLIPTextModel` / `CLIPTextModelWithProjection`, written against [`crate::Backend`] with
//! transformers' parameter names) and its tokenizer (`tokenizer.json` through the `tokenizers`
//! crate).

pub mod clip;
pub mod tokenizer;

pub use clip::{
    load_prompt_embeds, load_text_encoder, ClipTextConfig, ClipTextModel, ClipTextOutput, HiddenAct,
};
pub use tokenizer::{read_prompts, ClipTokenizer};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Prompts to prompt embeddings: a pipeline's (or any folder pair's) tokenizer and text encoder.
pub struct PromptEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    /// diffusers' `clip_skip` (0: `last_hidden_state`).
    pub clip_skip: usize,
}

impl std::fmt::Debug for PromptEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PromptEncoder(max_length {}, hidden {}, clip_skip {})",
            self.tokenizer.max_length, self.model.cfg.hidden_size, self.clip_skip
        )
    }
}

impl PromptEncoder {
    /// `tokenizer_dir` (`tokenizer.json`, or `vocab.json` + `merges.txt`) and `text_encoder_dir`
    /// (a `CLIPTextModel` folder).
    pub fn new(tokenizer_dir: &Path, text_encoder_dir: &Path, device: &Device) -> Result<Self> {
        Self::new_as(tokenizer_dir, text_encoder_dir, device, None)
    }

    /// [`Self::new`] with the encoder's parameters named under `prefix`
    /// ([`clip::load_text_encoder_as`]).
    pub fn new_as(
        tokenizer_dir: &Path,
        text_encoder_dir: &Path,
        device: &Device,
        prefix: Option<&str>,
    ) -> Result<Self> {
        let (model, _) = clip::load_text_encoder_as(text_encoder_dir, device, prefix)?;
        let tokenizer = ClipTokenizer::from_dir(tokenizer_dir, model.cfg.max_position_embeddings)?;
        Ok(Self {
            tokenizer,
            model,
            clip_skip: 0,
        })
    }

    /// A diffusers pipeline folder's `tokenizer/` and `text_encoder/`.
    pub fn from_pipeline(dir: &Path, device: &Device) -> Result<Self> {
        Self::new(&dir.join("tokenizer"), &dir.join("text_encoder"), device)
            .with_context(|| format!("the prompt encoder of {}", dir.display()))
    }

    /// `[N, max_length, hidden]` embeddings of the prompts (the empty prompt `""` is the
    /// unconditional one of classifier-free guidance), as the pipelines' `encode_prompt` gives.
    pub fn encode(&self, b: &crate::CandleBackend, prompts: &[&str]) -> Result<Tensor> {
        let ids = self.tokenizer.encode_tensor(prompts, &b.device)?;
        let l = self.tokenizer.max_length;
        Ok(self
            .model
            .forward(b, &ids, l, self.clip_skip, false)?
            .hidden)
    }
}
