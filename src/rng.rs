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
