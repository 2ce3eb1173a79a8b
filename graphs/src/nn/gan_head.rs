use super::{Conv2d, Embedding, GroupNorm};
use crate::backend::Backend;
use candle_nn::VarBuilder;

/// DMD2's GAN classifier on the fake score's bottleneck features: strided 4x4 convs + GroupNorm +
/// SiLU halve the side down to 4, a conv with kernel = side reduces to 1x1, GroupNorm + SiLU, and a
/// 1x1 conv gives one realism logit per image. (DMD2's ImageNet head is exactly this for 8x8.)
///
/// With `classes`, a projection discriminator (Miyato & Koyama 2018): the logit also gets
/// `<proj[y], h>`, the class's learned embedding dotted with the pooled features, so the head
/// judges an image against its own class, not only against real images of any class.
///
/// With a classifier ([`GanHead::with_classifier`]), an auxiliary class output on the same pooled
/// features (AC-GAN, Odena et al. 2017): [`GanHead::classify`] gives class logits, learned on
/// real images, whose cross-entropy on generated images pushes each towards its own class.
#[derive(Clone, Debug)]
pub struct GanHead {
    pub blocks: Vec<(Conv2d, GroupNorm)>,
    pub out: Conv2d,
    pub proj: Option<Embedding>,
    /// 1x1 conv from the pooled features to class logits.
    pub classifier: Option<Conv2d>,
    channels: usize,
}

impl GanHead {
    /// `channels` x `side` x `side` input features; `groups` for the GroupNorms.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        side: usize,
        groups: usize,
        classes: Option<usize>,
    ) -> candle_core::Result<Self> {
        if side == 0 {
            candle_core::bail!("GAN head: bottleneck side must be positive");
        }
        let mut blocks = Vec::new();
        let mut r = side;
        while r > 4 {
            if !r.is_multiple_of(2) {
                candle_core::bail!("GAN head: bottleneck side {side} does not halve down to 4");
            }
            let vbi = vb.pp(blocks.len().to_string());
            blocks.push((
                Conv2d::new(vbi.pp("conv"), channels, channels, 4, 2, 1)?,
                GroupNorm::new(vbi.pp("norm"), groups, channels)?,
            ));
            r /= 2;
        }
        let vbi = vb.pp(blocks.len().to_string());
        blocks.push((
            Conv2d::new(vbi.pp("conv"), channels, channels, r, r, 0)?,
            GroupNorm::new(vbi.pp("norm"), groups, channels)?,
        ));
        let proj = match classes {
            Some(n) if n > 0 => Some(Embedding::new(vb.pp("proj"), n, channels)?),
            _ => None,
        };
        Ok(Self {
            blocks,
            out: Conv2d::new(vb.pp("out"), channels, 1, 1, 1, 0)?,
            proj,
            classifier: None,
            channels,
        })
    }

    /// Adds the auxiliary classifier over `classes` classes (parameters under `vb`).
    pub fn with_classifier(mut self, vb: VarBuilder, classes: usize) -> candle_core::Result<Self> {
        if classes < 2 {
            candle_core::bail!("GAN head: a classifier needs at least 2 classes, got {classes}");
        }
        self.classifier = Some(Conv2d::new(vb, self.channels, classes, 1, 1, 0)?);
        Ok(self)
    }

    /// The shared blocks: features `[N, C, side, side]` -> pooled `[N, C, 1, 1]`.
    fn pooled<B: Backend>(&self, b: &B, feats: &B::T) -> anyhow::Result<B::T> {
        let mut h = feats.clone();
        for (conv, norm) in &self.blocks {
            h = norm.forward_silu(b, &conv.forward(b, &h)?)?;
        }
        Ok(h)
    }

    /// Features `[N, C, side, side]` -> class logits `[N, classes]` (needs the classifier).
    pub fn classify<B: Backend>(&self, b: &B, feats: &B::T) -> anyhow::Result<B::T> {
        let Some(cls) = &self.classifier else {
            anyhow::bail!("GAN head: built without a classifier");
        };
        let n = cls.weight.t.dims()[0] as i64;
        b.reshape(&cls.forward(b, &self.pooled(b, feats)?)?, &[-1, n])
    }

    /// Features `[N, C, side, side]` (and, for a projection head, class labels `[N]`) -> logits
    /// `[N]`.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        feats: &B::T,
        labels: Option<&B::T>,
    ) -> anyhow::Result<B::T> {
        let h = self.pooled(b, feats)?;
        let logit = b.reshape(&self.out.forward(b, &h)?, &[-1])?;
        let (Some(proj), Some(labels)) = (&self.proj, labels) else {
            anyhow::ensure!(
                self.proj.is_none(),
                "GAN head: a projection head needs the samples' class labels"
            );
            return Ok(logit);
        };
        let c = self.channels as i64;
        let hv = b.reshape(&h, &[-1, c])?;
        let e = proj.forward(b, labels)?;
        let ones = b.constant(&vec![1.0; self.channels], &[self.channels, 1])?;
        let dot = b.reshape(&b.matmul(&b.mul(&hv, &e)?, &ones)?, &[-1])?;
        b.add(&logit, &dot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CandleBackend;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;

    fn head(classes: Option<usize>) -> (GanHead, VarMap) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let h = GanHead::new(vb.pp("gan_head"), 8, 8, 4, classes).unwrap();
        (h, vm)
    }

    fn feats() -> Tensor {
        Tensor::randn(0f32, 1.0, (3, 8, 8, 8), &Device::Cpu).unwrap()
    }

    #[test]
    fn projection_scores_each_image_against_its_class() {
        let (h, vm) = head(Some(10));
        // The projection table is a trainable variable named under the head.
        assert!(vm
            .data()
            .lock()
            .unwrap()
            .contains_key("gan_head.proj.weight"));
        let b = CandleBackend::new(&Device::Cpu);
        let x = feats();
        let ya = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let yb = Tensor::new(&[0u32, 7, 2], &Device::Cpu).unwrap();
        let la: Vec<f32> = h.forward(&b, &x, Some(&ya)).unwrap().to_vec1().unwrap();
        let lb: Vec<f32> = h.forward(&b, &x, Some(&yb)).unwrap().to_vec1().unwrap();
        assert_eq!(la.len(), 3);
        // Same image and class: same logit; another class: another logit.
        assert_eq!(la[0], lb[0]);
        assert_eq!(la[2], lb[2]);
        assert!((la[1] - lb[1]).abs() > 1e-6, "{la:?} vs {lb:?}");
        // The logit is the plain head's plus <proj[y], pooled features>: a zero table leaves it.
        let plain: Vec<f32> = {
            let mut p = h.clone();
            p.proj = None;
            p.forward(&b, &x, None).unwrap().to_vec1().unwrap()
        };
        let table = &h.proj.as_ref().unwrap().table.t;
        vm.data().lock().unwrap()["gan_head.proj.weight"]
            .set(&table.zeros_like().unwrap())
            .unwrap();
        let zeroed: Vec<f32> = h.forward(&b, &x, Some(&ya)).unwrap().to_vec1().unwrap();
        for (z, p) in zeroed.iter().zip(&plain) {
            assert!((z - p).abs() < 1e-6, "{zeroed:?} vs {plain:?}");
        }
        // Its gradient reaches the table rows of the classes in the batch only.
        vm.data().lock().unwrap()["gan_head.proj.weight"]
            .set(&Tensor::ones((10, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let loss = h.forward(&b, &x, Some(&ya)).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gt: Vec<Vec<f32>> = g.get(table).unwrap().to_vec2().unwrap();
        assert!(gt[0].iter().any(|v| *v != 0.0));
        assert!(gt[5].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn projection_head_refuses_missing_labels_and_plain_head_ignores_them() {
        let b = CandleBackend::new(&Device::Cpu);
        let x = feats();
        let (p, _vm) = head(Some(10));
        let err = p.forward(&b, &x, None).unwrap_err().to_string();
        assert!(err.contains("class labels"), "{err}");
        let (h, _vm2) = head(None);
        assert!(h.proj.is_none());
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let a: Vec<f32> = h.forward(&b, &x, Some(&y)).unwrap().to_vec1().unwrap();
        let c: Vec<f32> = h.forward(&b, &x, None).unwrap().to_vec1().unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn classifier_gives_class_logits_from_the_shared_blocks_and_learns_on_its_own_weights() {
        let b = CandleBackend::new(&Device::Cpu);
        let x = feats();
        let (plain, _vm0) = head(None);
        let err = plain.classify(&b, &x).unwrap_err().to_string();
        assert!(err.contains("without a classifier"), "{err}");
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("gan_head");
        let h = GanHead::new(vb.clone(), 8, 8, 4, None)
            .unwrap()
            .with_classifier(vb.pp("classifier"), 10)
            .unwrap();
        assert!(GanHead::new(vb.clone(), 8, 8, 4, None)
            .unwrap()
            .with_classifier(vb.pp("c1"), 1)
            .is_err());
        let logits = h.classify(&b, &x).unwrap();
        assert_eq!(logits.dims(), &[3, 10]);
        // The realism logit is untouched by the classifier.
        let with: Vec<f32> = h.forward(&b, &x, None).unwrap().to_vec1().unwrap();
        let mut without = h.clone();
        without.classifier = None;
        let wo: Vec<f32> = without.forward(&b, &x, None).unwrap().to_vec1().unwrap();
        assert_eq!(with, wo);
        // Cross-entropy against labels reaches the classifier and the shared blocks, not `out`.
        let y = Tensor::new(&[0u32, 4, 9], &Device::Cpu).unwrap();
        let ce = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let g = ce.backward().unwrap();
        let cls = h.classifier.as_ref().unwrap();
        assert!(g.get(&cls.weight.t).is_some());
        assert!(g.get(&h.blocks[0].0.weight.t).is_some());
        assert!(g.get(&h.out.weight.t).is_none());
        // Its weights are named under the head (saved with the fake score).
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(
            names.contains(&"gan_head.classifier.weight".to_string()),
            "{names:?}"
        );
    }
}
