//! Sample quality: a small MNIST classifier, Frechet distance in its feature space, class accuracy.
//!
//! [`Evaluator::evaluate`] scores `N` generated images (`[N, 1, 32, 32]` in `[-1, 1]`) by
//! * the Frechet distance between Gaussians fitted to the classifier's 128-d penultimate features
//!   of the samples and of all 10,000 embedded real digits (the FID recipe with an MNIST network in
//!   place of Inception), and
//! * with the labels the samples were conditioned on, the fraction the classifier recognises as
//!   that label (overall and per class), and
//! * diversity on k-NN balls in the same features ([`diversity`]): precision, recall, density and
//!   coverage against as many real digits as there are samples (class-balanced, at most 5,000),
//!   and with labels the recall per class (mode dropping inside a class).
//!
//! Reference points come with every score: real vs real (two disjoint halves of the real digits,
//! 5,000 vs 5,000, for FD; two disjoint real sets of the samples' size for the diversity scores)
//! and Gaussian noise vs real. FD is biased upward for small N (the
//! sample covariance of few images is noisy, which only adds distance), so compare scores at the
//! same N; the report states N.

pub mod classifier;
pub mod diversity;
pub mod frechet;

pub use classifier::{default_cache_dir, load_or_train, Classifier};
pub use diversity::{Diversity, DiversityScores};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use classifier::{EvalData, FEATURE_DIM, IMAGE_SIZE, NUM_CLASSES};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// Number of Gaussian-noise images behind [`Evaluator::ref_noise_fd`].
pub const NOISE_REFERENCE_N: usize = 5000;
const NOISE_SEED: u64 = 0x0153_EEDF;

/// Scores of one set of samples.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Number of images scored (FD depends on it: compare at equal N).
    pub n: usize,
    /// Frechet distance between the samples' classifier features and the real digits' (all 10k).
    pub fd: f64,
    /// Fraction of samples classified as their label (when labels were given).
    pub class_accuracy: Option<f64>,
    /// Reference: FD between two disjoint halves (5,000 vs 5,000) of the real digits.
    pub ref_real_fd: f64,
    /// Reference: FD of N(0,1) noise clamped to [-1,1] (5,000 images) vs the real digits.
    pub ref_noise_fd: f64,
    /// Accuracy per label 0..9 (NaN, serialised as `null`, for a label with no samples).
    pub per_class_accuracy: Option<Vec<f64>>,
    /// Precision, recall, density, coverage (k = 3) with the real vs real reference at the same
    /// size, and per-class recall when labels were given (NaN/`null` where undefined).
    pub diversity: DiversityScores,
}

impl EvalReport {
    /// The scalar scores under their metric names (`fd`, `class_accuracy`, `precision`, `recall`,
    /// `density`, `coverage`), as logged by the trainers' `--eval-every`.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let d = &self.diversity.samples;
        let mut m = vec![("fd", self.fd)];
        if let Some(a) = self.class_accuracy {
            m.push(("class_accuracy", a));
        }
        m.extend([
            ("precision", d.precision),
            ("recall", d.recall),
            ("density", d.density),
            ("coverage", d.coverage),
        ]);
        m
    }
}

fn per_class_line(v: &[f64]) -> String {
    v.iter()
        .enumerate()
        .map(|(c, a)| {
            if a.is_nan() {
                format!("{c}: -")
            } else {
                format!("{c}: {a:.2}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "N = {} images", self.n)?;
        write!(
            f,
            "Frechet distance (classifier features): {:.2}   [reference: real vs real {:.2} (5000 vs 5000), Gaussian noise {:.2}]",
            self.fd, self.ref_real_fd, self.ref_noise_fd
        )?;
        if let Some(acc) = self.class_accuracy {
            write!(f, "\nclass accuracy: {:.1}%", 100.0 * acc)?;
            if let Some(per) = &self.per_class_accuracy {
                let parts: Vec<String> = per
                    .iter()
                    .enumerate()
                    .map(|(c, a)| {
                        if a.is_nan() {
                            format!("{c}: -")
                        } else {
                            format!("{c}: {:.1}", 100.0 * a)
                        }
                    })
                    .collect();
                write!(f, " (per class %: {})", parts.join(", "))?;
            }
        }
        let dv = &self.diversity;
        let (s, r) = (&dv.samples, &dv.real_vs_real);
        write!(
            f,
            "\nprecision {:.3}, recall {:.3}, density {:.3}, coverage {:.3} (k = {}, vs {} real digits)   [reference: real vs real {:.3}, {:.3}, {:.3}, {:.3}]",
            s.precision, s.recall, s.density, s.coverage, dv.k, dv.n_real,
            r.precision, r.recall, r.density, r.coverage
        )?;
        if let (Some(p), Some(q)) = (&dv.per_class_recall, &dv.real_vs_real_per_class_recall) {
            write!(
                f,
                "\nrecall per class: {}   [real vs real: {}]",
                per_class_line(p),
                per_class_line(q)
            )?;
        }
        Ok(())
    }
}

/// Holds the classifier and the real digits' feature statistics; build once, evaluate many times.
pub struct Evaluator {
    pub classifier: Classifier,
    /// Mean of the real digits' features (all 10k, padded to 32x32).
    pub real_mean: Vec<f64>,
    /// Covariance (`128 x 128`, row-major) of the real digits' features.
    pub real_cov: Vec<f64>,
    /// FD between two disjoint halves of the real digits (even vs odd index, 5,000 each).
    pub ref_real_fd: f64,
    /// FD of 5,000 N(0,1) noise images (clamped to [-1, 1]) vs all real digits.
    pub ref_noise_fd: f64,
    /// The real digits' features, the real side of the diversity scores.
    pub real: diversity::RealReference,
}

/// Features `[N, 128]` as one row-major f32 buffer.
fn feature_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl Evaluator {
    /// Loads (or trains and caches, see [`classifier::load_or_train`]) the classifier in
    /// `cache_dir`, then computes the real digits' statistics and the two reference FDs (a few
    /// seconds on CPU).
    pub fn new(cache_dir: &Path, device: &Device, progress: bool) -> Result<Evaluator> {
        let data = EvalData::load()?;
        let classifier = classifier::load_or_train_with(cache_dir, device, progress, &data)?;
        let n = data.len();
        let feats = feature_rows(&classifier.features(&data.tensor(0..n, device)?)?)?;
        let d = FEATURE_DIM;
        let (real_mean, real_cov) = frechet::stats(&feats, n, d);
        // Real vs real: even vs odd indices (both halves mix training and held-out digits alike).
        let (mut even, mut odd) = (Vec::with_capacity(n / 2 * d), Vec::with_capacity(n / 2 * d));
        let half = n / 2;
        for i in 0..2 * half {
            let row = &feats[i * d..(i + 1) * d];
            if i % 2 == 0 {
                even.extend_from_slice(row)
            } else {
                odd.extend_from_slice(row)
            }
        }
        let (m1, c1) = frechet::stats(&even, half, d);
        let (m2, c2) = frechet::stats(&odd, half, d);
        let ref_real_fd = frechet::frechet_distance(&m1, &c1, &m2, &c2, d);
        // Gaussian noise images.
        let mut rng = rand::rngs::StdRng::seed_from_u64(NOISE_SEED);
        let numel = NOISE_REFERENCE_N * IMAGE_SIZE * IMAGE_SIZE;
        let noise: Vec<f32> = (0..numel)
            .map(|_| {
                rng.sample::<f32, _>(rand_distr::StandardNormal)
                    .clamp(-1.0, 1.0)
            })
            .collect();
        let noise = Tensor::from_vec(
            noise,
            (NOISE_REFERENCE_N, 1, IMAGE_SIZE, IMAGE_SIZE),
            device,
        )?;
        let nf = feature_rows(&classifier.features(&noise)?)?;
        let (mn, cn) = frechet::stats(&nf, NOISE_REFERENCE_N, d);
        let ref_noise_fd = frechet::frechet_distance(&mn, &cn, &real_mean, &real_cov, d);
        let real = diversity::RealReference::new(feats, data.labels.clone(), d, NUM_CLASSES);
        Ok(Evaluator {
            classifier,
            real_mean,
            real_cov,
            ref_real_fd,
            ref_noise_fd,
            real,
        })
    }

    /// Scores `images` (`[N, 1, 32, 32]`, values in `[-1, 1]`; values outside are clamped as they
    /// would be when saved as pictures), optionally with the class label each was generated for.
    ///
    /// FD is biased upward for small N: compare scores computed at the same N (the report has it;
    /// the real-vs-real reference uses 5,000 vs 5,000). Needs N >= 2; a few thousand images give a
    /// stable score.
    pub fn evaluate(&self, images: &Tensor, labels: Option<&[u32]>) -> Result<EvalReport> {
        classifier::check_image_shape(images)?;
        let n = images.dim(0)?;
        ensure!(
            n >= 2,
            "eval needs at least 2 images for a covariance, got {n}"
        );
        let images = images.to_dtype(DType::F32)?;
        let values = images
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            anyhow::bail!(
                "eval: images contain {bad} NaN/Inf values (first {} in image {}); the generator diverged",
                values[i],
                i / (IMAGE_SIZE * IMAGE_SIZE)
            );
        }
        if let Some(l) = labels {
            ensure!(l.len() == n, "eval: {} labels for {n} images", l.len());
            if let Some(bad) = l.iter().find(|&&c| c as usize >= NUM_CLASSES) {
                anyhow::bail!(
                    "eval: label {bad} out of range (the classifier knows digits 0..{})",
                    NUM_CLASSES - 1
                );
            }
        }
        let images = images.clamp(-1f32, 1f32)?;
        let (feats, logits) = self.classifier.features_and_logits(&images)?;
        let feats = feature_rows(&feats)?;
        let (m, c) = frechet::stats(&feats, n, FEATURE_DIM);
        let fd = frechet::frechet_distance(&m, &c, &self.real_mean, &self.real_cov, FEATURE_DIM);
        let (class_accuracy, per_class_accuracy) = match labels {
            None => (None, None),
            Some(l) => {
                let pred = classifier::argmax_rows(&logits)?;
                let mut hit = [0usize; NUM_CLASSES];
                let mut tot = [0usize; NUM_CLASSES];
                for (&p, &y) in pred.iter().zip(l) {
                    tot[y as usize] += 1;
                    hit[y as usize] += (p == y) as usize;
                }
                let acc = hit.iter().sum::<usize>() as f64 / n as f64;
                let per = (0..NUM_CLASSES)
                    .map(|c| {
                        if tot[c] == 0 {
                            f64::NAN
                        } else {
                            hit[c] as f64 / tot[c] as f64
                        }
                    })
                    .collect();
                (Some(acc), Some(per))
            }
        };
        let diversity = self.real.score(&feats, labels, diversity::NEAREST_K)?;
        Ok(EvalReport {
            n,
            fd,
            class_accuracy,
            ref_real_fd: self.ref_real_fd,
            ref_noise_fd: self.ref_noise_fd,
            per_class_accuracy,
            diversity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_display_and_json() {
        let r = EvalReport {
            n: 1000,
            fd: 12.345,
            class_accuracy: Some(0.975),
            ref_real_fd: 2.1,
            ref_noise_fd: 480.2,
            per_class_accuracy: Some(
                (0..10)
                    .map(|c| {
                        if c == 3 {
                            f64::NAN
                        } else {
                            0.9 + c as f64 / 100.0
                        }
                    })
                    .collect(),
            ),
            diversity: DiversityScores {
                k: 3,
                n_real: 1000,
                samples: Diversity {
                    precision: 0.8351,
                    recall: 0.75,
                    density: 1.02,
                    coverage: 0.9,
                },
                real_vs_real: Diversity {
                    precision: 0.9,
                    recall: 0.91,
                    density: 1.0,
                    coverage: 0.95,
                },
                per_class_recall: Some((0..10).map(|c| 0.5 + c as f64 / 100.0).collect()),
                real_vs_real_per_class_recall: Some(vec![f64::NAN; 10]),
            },
        };
        let s = r.to_string();
        assert!(
            s.contains("precision 0.835, recall 0.750, density 1.020, coverage 0.900 (k = 3, vs 1000 real digits)")
                && s.contains("real vs real 0.900, 0.910, 1.000, 0.950"),
            "{s}"
        );
        assert!(
            s.contains("recall per class: 0: 0.50") && s.contains("9: 0.59"),
            "{s}"
        );
        let keys: Vec<&str> = r.metrics().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "fd",
                "class_accuracy",
                "precision",
                "recall",
                "density",
                "coverage"
            ]
        );
        assert_eq!(r.metrics()[3].1, 0.75);
        assert!(s.contains("N = 1000"), "{s}");
        assert!(
            s.contains("Frechet distance (classifier features): 12.35"),
            "{s}"
        );
        assert!(
            s.contains("real vs real 2.10") && s.contains("Gaussian noise 480.20"),
            "{s}"
        );
        assert!(
            s.contains("class accuracy: 97.5%") && s.contains("3: -") && s.contains("9: 99.0"),
            "{s}"
        );
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["n"], 1000);
        assert!(j["per_class_accuracy"][3].is_null());
        assert_eq!(j["diversity"]["samples"]["recall"], 0.75);
        assert_eq!(j["diversity"]["real_vs_real"]["precision"], 0.9);
        assert!(j["diversity"]["real_vs_real_per_class_recall"][0].is_null());
        let unlabeled = EvalReport {
            class_accuracy: None,
            per_class_accuracy: None,
            ..r
        };
        assert!(!unlabeled.to_string().contains("class accuracy"));
    }
}
