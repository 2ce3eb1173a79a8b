//! DMD2's GAN losses (non-saturating, on realism logits of the GAN head).

use anyhow::Result;
use candle_core::Tensor;

/// `log(1 + exp(x))`, computed stably as `relu(x) + log(1 + exp(-|x|))`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
}

/// The head's (critic's) loss: `mean(softplus(fake) + softplus(-real))`: real images should get a
/// high logit, generated ones a low one.
pub fn critic_loss(real_logits: &Tensor, fake_logits: &Tensor) -> Result<Tensor> {
    Ok((softplus(fake_logits)?.mean_all()? + softplus(&real_logits.neg()?)?.mean_all()?)?)
}

/// The generator's loss: `mean(softplus(-fake))`: make generated images look real to the head.
pub fn generator_loss(fake_logits: &Tensor) -> Result<Tensor> {
    Ok(softplus(&fake_logits.neg()?)?.mean_all()?)
}
