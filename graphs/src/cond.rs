//! What a denoiser is conditioned on besides the noise level: class labels (our UNet, diffusers'
//! `UNet2DModel`) or text (diffusers' `UNet2DConditionModel`: prompt embeddings, plus SDXL's
//! pooled embeddings and time ids). One type, so the samplers, guidance and the export take
//! either without overloading labels.

pub use crate::diffusers::unet2d_condition::AddedCond;

/// A text condition for a batch: `prompt_embeds` `[N, S, cross_attention_dim]` (the text
/// encoder's hidden states, diffusers' `encoder_hidden_states`) and, for SDXL's
/// `addition_embed_type = "text_time"`, the pooled embeddings and time ids.
#[derive(Clone, Debug)]
pub struct TextCond<T> {
    pub prompt_embeds: T,
    pub added: Option<AddedCond<T>>,
}

/// The condition of a batch, with what classifier-free guidance contrasts it against.
#[derive(Clone, Debug)]
pub enum Cond<T> {
    /// Integer class labels `[N]`; the unconditional branch is the network's null class.
    Labels(T),
    /// Prompt embeddings; `uncond` is the empty (or negative) prompt's, needed when the guidance
    /// scale is not 1.
    Text {
        cond: TextCond<T>,
        uncond: Option<TextCond<T>>,
    },
}

/// One network call's condition (no guidance pair): what [`crate::Network::forward_with`] takes.
#[derive(Debug)]
pub enum NetCond<'a, T> {
    Labels(&'a T),
    Text(&'a TextCond<T>),
}

// By hand: derived impls would ask `T: Copy`, but only references are held.
impl<T> Clone for NetCond<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for NetCond<'_, T> {}

impl<T> Cond<T> {
    /// The conditional branch as one network call's condition.
    pub fn net(&self) -> NetCond<'_, T> {
        match self {
            Self::Labels(l) => NetCond::Labels(l),
            Self::Text { cond, .. } => NetCond::Text(cond),
        }
    }
}
