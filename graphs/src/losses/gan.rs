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

/// Per-sample cross-entropy `-log softmax(logits)[label]`: logits `[N, K]`, labels `[N]` (u32)
/// -> `[N]`; the GAN head's classifier loss (averaged or masked by the caller).
pub fn cross_entropy_each(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, 1)?;
    Ok(lsm.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

/// The student's classifier term: the per-sample cross-entropy of its images' class logits
/// against their labels, averaged over the batch, counting (with `misclassified_only`) only the
/// images whose top class is another one: a correct image keeps its variety instead of being
/// pulled towards its class's prototype. Returns the loss, the plain mean cross-entropy and the
/// fraction classified as their label (for the metrics).
pub fn classifier_generator_loss(
    logits: &Tensor,
    labels: &Tensor,
    misclassified_only: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ce = cross_entropy_each(logits, labels)?;
    let hit = logits.argmax(1)?.eq(labels)?.to_dtype(logits.dtype())?;
    let loss = if misclassified_only {
        (&ce * (1.0 - &hit)?)?.mean_all()?
    } else {
        ce.mean_all()?
    };
    Ok((loss, ce.mean_all()?, hit.mean_all()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_each_is_the_per_sample_term_of_candles_mean() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.0, 0.0, 0.0]], &d).unwrap();
        let y = Tensor::new(&[0u32, 2], &d).unwrap();
        let each: Vec<f32> = cross_entropy_each(&logits, &y).unwrap().to_vec1().unwrap();
        // Uniform logits over 3 classes: ln 3.
        assert!((each[1] - 3f32.ln()).abs() < 1e-6, "{each:?}");
        let z = 2f32.exp() + 1.0 + (-1f32).exp();
        assert!((each[0] - (z.ln() - 2.0)).abs() < 1e-6, "{each:?}");
        let mean: f32 = candle_nn::loss::cross_entropy(&logits, &y)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((mean - (each[0] + each[1]) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn the_classifier_term_leaves_correctly_classified_images_alone_when_asked() {
        let d = Device::Cpu;
        // Sample 0 is classified as its label (0), sample 1 as class 0 instead of its label 1.
        let logits = Tensor::new(&[[3.0f32, 0.0], [1.0, 0.0]], &d).unwrap();
        let y = Tensor::new(&[0u32, 1], &d).unwrap();
        let ce: Vec<f32> = cross_entropy_each(&logits, &y).unwrap().to_vec1().unwrap();
        let v = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let (only, mean, acc) = classifier_generator_loss(&logits, &y, true).unwrap();
        assert!((v(only) - ce[1] / 2.0).abs() < 1e-6);
        assert!((v(mean) - (ce[0] + ce[1]) / 2.0).abs() < 1e-6);
        assert_eq!(v(acc), 0.5);
        let (all, _, _) = classifier_generator_loss(&logits, &y, false).unwrap();
        assert!((v(all) - (ce[0] + ce[1]) / 2.0).abs() < 1e-6);
        // Only the misclassified image gets a gradient.
        let var = candle_core::Var::from_tensor(&logits).unwrap();
        let (l, _, _) = classifier_generator_loss(var.as_tensor(), &y, true).unwrap();
        let g: Vec<Vec<f32>> = l.backward().unwrap().get(&var).unwrap().to_vec2().unwrap();
        assert_eq!(g[0], vec![0.0, 0.0]);
        assert!(g[1][1] < 0.0, "{g:?}");
    }
}
