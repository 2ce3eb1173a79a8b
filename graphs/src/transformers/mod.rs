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
