//! Seeded randomness every stage shares (training, sampling): one RNG per (seed, step, purpose).

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// An RNG for one purpose (`stream`) at one step: runs are reproducible and a resumed run draws
/// exactly what the uninterrupted run would have.
pub fn step_rng(seed: u64, step: u64, stream: u64) -> rand::rngs::StdRng {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ stream.wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(mix)
}

/// Unit Gaussian noise of `shape`.
pub fn randn<R: Rng>(rng: &mut R, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The RNG of one sample of a global batch: sample `index` (0-based, over the whole global batch
/// of every rank) of `step` draws from its own stream, so a global batch is the same whatever the
/// number of ranks that share it (data-parallel training, [`crate::parallel`]).
pub fn sample_rng(seed: u64, step: u64, stream: u64, index: u64) -> rand::rngs::StdRng {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ stream.wrapping_mul(0x94D0_49BB_1331_11EB)
        ^ index.wrapping_add(1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    rand::rngs::StdRng::seed_from_u64(mix)
}

/// One RNG per sample of this rank's slice of a global batch ([`sample_rng`]): every per-sample
/// draw (labels, noise, noise levels, timesteps) comes from its sample's own stream, in order.
pub struct SampleRngs {
    rngs: Vec<rand::rngs::StdRng>,
}

impl SampleRngs {
    /// The RNGs of global samples `range` of `step`.
    pub fn new(seed: u64, step: u64, stream: u64, range: std::ops::Range<usize>) -> Self {
        Self {
            rngs: range
                .map(|i| sample_rng(seed, step, stream, i as u64))
                .collect(),
        }
    }
    pub fn len(&self) -> usize {
        self.rngs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rngs.is_empty()
    }
    /// One value per sample, each drawn from that sample's RNG.
    pub fn each<T>(&mut self, mut f: impl FnMut(&mut rand::rngs::StdRng) -> T) -> Vec<T> {
        self.rngs.iter_mut().map(|r| f(r)).collect()
    }
    /// Unit Gaussian noise `[N, per_sample...]`, row `n` from sample `n`'s RNG.
    pub fn randn(&mut self, per_sample: &[usize], device: &Device) -> Result<Tensor> {
        let k: usize = per_sample.iter().product();
        let mut v: Vec<f32> = Vec::with_capacity(k * self.rngs.len());
        for r in self.rngs.iter_mut() {
            v.extend((0..k).map(|_| r.sample::<f32, _>(StandardNormal)));
        }
        let mut shape = vec![self.rngs.len()];
        shape.extend_from_slice(per_sample);
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_draws_what_the_whole_batch_draws_for_it() {
        let dev = Device::Cpu;
        let whole = SampleRngs::new(3, 5, 7, 0..4).randn(&[2, 3], &dev).unwrap();
        let second_half = SampleRngs::new(3, 5, 7, 2..4).randn(&[2, 3], &dev).unwrap();
        let a = whole.narrow(0, 2, 2).unwrap().flatten_all().unwrap();
        let b = second_half.flatten_all().unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        // Different samples, steps and streams draw differently.
        let r = |s, st, i| sample_rng(1, s, st, i).gen::<u64>();
        assert_ne!(r(0, 0, 0), r(0, 0, 1));
        assert_ne!(r(0, 0, 0), r(1, 0, 0));
        assert_ne!(r(0, 0, 0), r(0, 1, 0));
    }
}
