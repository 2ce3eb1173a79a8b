//! Diversity of samples in feature space, on k-nearest-neighbour balls:
//! improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et
//! al. 2020), with the definitions of Naeem et al.'s `prdc` package:
//!
//! * `NND_k(x)`: distance from `x` to its k-th nearest neighbour in its own set, the point itself
//!   excluded; `B(x, r)` the open ball (`d < r`, strict as in `prdc`).
//! * precision = share of generated `Y_j` inside some real ball `B(X_i, NND_k(X_i))`;
//!   recall = share of real `X_i` inside some generated ball `B(Y_j, NND_k(Y_j))`;
//!   density = `(1/kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]`;
//!   coverage = `(1/N) sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]`.
//!
//! Distances come from one f32 GEMM per block of rows (candle matmul, features centred on the real
//! mean to keep `|x|^2 + |y|^2 - 2 x.y` well conditioned); only the pairs whose f32 distance is
//! within rounding of a ball's radius are recomputed exactly in f64, so every decision is the
//! exact one at GEMM speed.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

/// The k of the k-NN balls (both papers' recommendation).
pub const NEAREST_K: usize = 3;

/// The scores' metric names (metrics.jsonl keys, `diversity.png` curves, results columns).
pub const METRIC_NAMES: [&str; 4] = ["precision", "recall", "density", "coverage"];

/// Entries per distance block (`rows x columns`), 16 MiB of f32.
const BLOCK_ENTRIES: usize = 1 << 22;

/// Precision, recall, density and coverage of generated features against real ones.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Diversity {
    /// Share of generated samples inside the real manifold (fidelity).
    pub precision: f64,
    /// Share of real samples inside the generated manifold (diversity; mode dropping lowers it).
    pub recall: f64,
    /// Mean number of real balls holding a generated sample, over k (1 on average for matching
    /// distributions; above 1 where samples crowd the dense regions).
    pub density: f64,
    /// Share of real samples whose own ball holds a generated sample.
    pub coverage: f64,
}

/// A set of feature vectors with the squared k-NN radius of each (its manifold estimate).
pub struct Manifold {
    features: Vec<f32>,
    n: usize,
    d: usize,
    k: usize,
    radius2: Vec<f64>,
}

/// Exact squared distance in f64.
fn exact_d2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let t = x as f64 - y as f64;
            t * t
        })
        .sum()
}

/// Bound on the f32 GEMM's error in `|x|^2 + |y|^2 - 2 x.y` (centred features): generous against
/// the worst case `2 d eps |x| |y|` for d up to a few hundred.
fn tolerance(sq_x: f64, sq_y: f64) -> f64 {
    1e-4 * (sq_x + sq_y) + 1e-30
}

/// `d(x, y)^2 < r2`, decided from the approximate `a` unless it is within tolerance `t`.
fn inside(a: f64, r2: f64, t: f64, exact: &mut impl FnMut() -> f64) -> bool {
    if a < r2 - t {
        true
    } else if a >= r2 + t {
        false
    } else {
        exact() < r2
    }
}

/// Rows of `x` (`n x d`) centred on `mu`, as f32, and their squared norms in f64.
fn centred(x: &[f32], d: usize, mu: &[f64]) -> (Vec<f32>, Vec<f64>) {
    let c: Vec<f32> = x
        .chunks_exact(d)
        .flat_map(|r| r.iter().zip(mu).map(|(&v, &m)| (v as f64 - m) as f32))
        .collect();
    let sq = c
        .chunks_exact(d)
        .map(|r| r.iter().map(|&v| v as f64 * v as f64).sum())
        .collect();
    (c, sq)
}

fn mean(x: &[f32], d: usize) -> Vec<f64> {
    let n = (x.len() / d).max(1);
    let mut m = vec![0f64; d];
    for r in x.chunks_exact(d) {
        for (a, &v) in m.iter_mut().zip(r) {
            *a += v as f64;
        }
    }
    m.iter_mut().for_each(|a| *a /= n as f64);
    m
}

/// Calls `f(i, row, sq_x_i, sq_y)` for every row `i` of `x`, `row[j]` the approximate squared
/// distance from `x_i` to `y_j`; one f32 GEMM per block of rows.
fn approx_sq_dists(
    x: &[f32],
    y: &[f32],
    d: usize,
    mu: &[f64],
    mut f: impl FnMut(usize, &[f64], f64, &[f64]),
) -> Result<()> {
    let (n, m) = (x.len() / d, y.len() / d);
    if n == 0 || m == 0 {
        return Ok(());
    }
    let (xc, sqx) = centred(x, d, mu);
    let (yc, sqy) = centred(y, d, mu);
    let dev = Device::Cpu;
    let yt = Tensor::from_vec(yc, (m, d), &dev)?.t()?.contiguous()?;
    let rows = (BLOCK_ENTRIES / m).clamp(1, n);
    let mut row = vec![0f64; m];
    for i0 in (0..n).step_by(rows) {
        let b = rows.min(n - i0);
        let xb = Tensor::from_slice(&xc[i0 * d..(i0 + b) * d], (b, d), &dev)?;
        let dots = xb.matmul(&yt)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, dot) in dots.chunks_exact(m).enumerate() {
            let i = i0 + r;
            for ((o, &p), &s) in row.iter_mut().zip(dot).zip(&sqy) {
                *o = (sqx[i] + s - 2.0 * p as f64).max(0.0);
            }
            f(i, &row, sqx[i], &sqy);
        }
    }
    Ok(())
}

impl Manifold {
    /// The manifold of `features` (`n x d` row-major, n > k): the k-th nearest-neighbour distance
    /// of every point among the others.
    pub fn new(features: Vec<f32>, d: usize, k: usize) -> Result<Manifold> {
        ensure!(d > 0 && k > 0, "manifold: d = {d}, k = {k}");
        ensure!(
            features.len().is_multiple_of(d),
            "manifold: {} values are not rows of {d}",
            features.len()
        );
        let n = features.len() / d;
        ensure!(
            n > k,
            "a k-NN manifold needs more than k = {k} points, got {n}"
        );
        ensure!(
            features.iter().all(|v| v.is_finite()),
            "manifold: features hold NaN/Inf"
        );
        let mu = mean(&features, d);
        let mut radius2 = vec![0f64; n];
        let mut approx: Vec<f64> = Vec::with_capacity(n);
        let mut cand: Vec<f64> = Vec::new();
        let row_of = |i: usize| &features[i * d..(i + 1) * d];
        let mut sq_max = None;
        approx_sq_dists(&features, &features, d, &mu, |i, row, sqi, sqy| {
            approx.clear();
            approx.extend(
                row.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, &a)| a),
            );
            let (_, kth, _) = approx.select_nth_unstable_by(k - 1, f64::total_cmp);
            let kth = *kth;
            // Every true k nearest has an approximate distance below kth + 2 * tolerance.
            let sq_max = *sq_max.get_or_insert_with(|| sqy.iter().copied().fold(0.0, f64::max));
            let thr = kth + 2.0 * tolerance(sqi, sq_max);
            cand.clear();
            cand.extend(
                row.iter()
                    .enumerate()
                    .filter(|&(j, &a)| j != i && a <= thr)
                    .map(|(j, _)| exact_d2(row_of(i), row_of(j))),
            );
            let (_, r2, _) = cand.select_nth_unstable_by(k - 1, f64::total_cmp);
            radius2[i] = *r2;
        })?;
        Ok(Manifold {
            features,
            n,
            d,
            k,
            radius2,
        })
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// `NND_k` of every point.
    pub fn radii(&self) -> Vec<f64> {
        self.radius2.iter().map(|r| r.sqrt()).collect()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.d..(i + 1) * self.d]
    }
}

/// Precision, recall, density and coverage of the `fake` manifold against the `real` one
/// (same `d` and `k`).
pub fn compare(real: &Manifold, fake: &Manifold) -> Result<Diversity> {
    ensure!(
        real.d == fake.d && real.k == fake.k,
        "diversity: real features {}-d with k = {}, generated {}-d with k = {}",
        real.d,
        real.k,
        fake.d,
        fake.k
    );
    let (n, m, k) = (real.n, fake.n, real.k);
    let mu = mean(&real.features, real.d);
    let mut in_real_balls = vec![0usize; m];
    let (mut covered, mut recalled) = (vec![false; n], vec![false; n]);
    approx_sq_dists(
        &real.features,
        &fake.features,
        real.d,
        &mu,
        |i, row, sqi, sqy| {
            let ri = real.radius2[i];
            for (j, (&a, &sqj)) in row.iter().zip(sqy).enumerate() {
                let t = tolerance(sqi, sqj);
                let mut cache = None;
                let mut exact = || *cache.get_or_insert_with(|| exact_d2(real.row(i), fake.row(j)));
                if inside(a, ri, t, &mut exact) {
                    in_real_balls[j] += 1;
                    covered[i] = true;
                }
                if !recalled[i] && inside(a, fake.radius2[j], t, &mut exact) {
                    recalled[i] = true;
                }
            }
        },
    )?;
    let share = |v: &[bool]| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64;
    Ok(Diversity {
        precision: in_real_balls.iter().filter(|&&c| c > 0).count() as f64 / m as f64,
        recall: share(&recalled),
        density: in_real_balls.iter().sum::<usize>() as f64 / (k * m) as f64,
        coverage: share(&covered),
    })
}

/// [`compare`] on raw features (`n x d` and `m x d` row-major).
pub fn diversity(real: &[f32], fake: &[f32], d: usize, k: usize) -> Result<Diversity> {
    compare(
        &Manifold::new(real.to_vec(), d, k)?,
        &Manifold::new(fake.to_vec(), d, k)?,
    )
}

/// Rows `idx` of `features` (`d` columns).
pub fn gather(features: &[f32], d: usize, idx: impl IntoIterator<Item = usize>) -> Vec<f32> {
    idx.into_iter()
        .flat_map(|i| features[i * d..(i + 1) * d].iter().copied())
        .collect()
}

/// The real side of the diversity scores: the real features split into two disjoint halves, each
/// in a class-balanced order (round robin over the classes), so the first `n` of a half hold the
/// classes as evenly as generated class-balanced samples do.
pub struct RealReference {
    features: Vec<f32>,
    labels: Vec<u32>,
    d: usize,
    classes: usize,
    halves: [Vec<usize>; 2],
}

/// Diversity of one sample set, with the real vs real reference at the same size.
#[derive(Clone, Debug, Serialize)]
pub struct DiversityScores {
    /// The k of the k-NN balls.
    pub k: usize,
    /// Real images on the real side (`min(N, half of the real digits)`).
    pub n_real: usize,
    pub samples: Diversity,
    /// A disjoint real set of `n_real` images in place of the samples (the samples' own size up
    /// to 5,000 images).
    pub real_vs_real: Diversity,
    /// Recall per class (real digits of class c vs samples generated for c); NaN where a side has
    /// k or fewer points.
    pub per_class_recall: Option<Vec<f64>>,
    /// The same for the disjoint real set.
    pub real_vs_real_per_class_recall: Option<Vec<f64>>,
}

const NAN_DIVERSITY: Diversity = Diversity {
    precision: f64::NAN,
    recall: f64::NAN,
    density: f64::NAN,
    coverage: f64::NAN,
};

impl RealReference {
    /// `features` `n x d` row-major with a label in `0..classes` per row.
    pub fn new(features: Vec<f32>, labels: Vec<u32>, d: usize, classes: usize) -> Self {
        let mut by_class: Vec<[Vec<usize>; 2]> = vec![[Vec::new(), Vec::new()]; classes];
        let mut seen = vec![0usize; classes];
        for (i, &l) in labels.iter().enumerate() {
            let c = l as usize;
            by_class[c][seen[c] % 2].push(i);
            seen[c] += 1;
        }
        let halves = [0, 1].map(|h| {
            let longest = by_class.iter().map(|b| b[h].len()).max().unwrap_or(0);
            (0..longest)
                .flat_map(|r| by_class.iter().filter_map(move |b| b[h].get(r).copied()))
                .collect::<Vec<usize>>()
        });
        RealReference {
            features,
            labels,
            d,
            classes,
            halves,
        }
    }

    /// Scores `fake` (`m x d`), optionally labelled per row, against the first `min(m, half)`
    /// real features of the first half; the reference row puts as many of the second half in
    /// place of the samples. NaN scores where a side has k or fewer points.
    pub fn score(&self, fake: &[f32], labels: Option<&[u32]>, k: usize) -> Result<DiversityScores> {
        let d = self.d;
        let m = fake.len() / d;
        let n_real = m.min(self.halves[0].len()).min(self.halves[1].len());
        let real_idx = &self.halves[0][..n_real];
        let ref_idx = &self.halves[1][..n_real];
        let score = |real: Option<&Manifold>, f: Vec<f32>| -> Result<Diversity> {
            match real {
                Some(rm) if f.len() / d > k => compare(rm, &Manifold::new(f, d, k)?),
                _ => Ok(NAN_DIVERSITY),
            }
        };
        let real = if n_real > k {
            Some(Manifold::new(
                gather(&self.features, d, real_idx.iter().copied()),
                d,
                k,
            )?)
        } else {
            None
        };
        let samples = score(real.as_ref(), fake.to_vec())?;
        let ref_feats = gather(&self.features, d, ref_idx.iter().copied());
        let real_vs_real = score(real.as_ref(), ref_feats)?;
        let (mut per, mut per_ref) = (None, None);
        if let Some(l) = labels {
            ensure!(
                l.len() == m,
                "diversity: {} labels for {m} samples",
                l.len()
            );
            let of_class = |idx: &[usize], c: usize| -> Vec<usize> {
                idx.iter()
                    .copied()
                    .filter(|&i| self.labels[i] as usize == c)
                    .collect()
            };
            let (mut p, mut q) = (Vec::new(), Vec::new());
            for c in 0..self.classes {
                let rc = of_class(real_idx, c);
                if rc.len() <= k {
                    p.push(f64::NAN);
                    q.push(f64::NAN);
                    continue;
                }
                let rm = Manifold::new(gather(&self.features, d, rc.iter().copied()), d, k)?;
                let fc = gather(fake, d, (0..m).filter(|&j| l[j] as usize == c));
                p.push(score(Some(&rm), fc)?.recall);
                let bc = gather(&self.features, d, of_class(ref_idx, c));
                q.push(score(Some(&rm), bc)?.recall);
            }
            (per, per_ref) = (Some(p), Some(q));
        }
        Ok(DiversityScores {
            k,
            n_real,
            samples,
            real_vs_real,
            per_class_recall: per,
            real_vs_real_per_class_recall: per_ref,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(n: usize, d: usize, shift: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * d)
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) + shift)
            .collect()
    }

    /// The definitions evaluated on the full distance matrix in f64, no blocking, no GEMM.
    fn brute(real: &[f32], fake: &[f32], d: usize, k: usize) -> (Diversity, Vec<f64>) {
        let (n, m) = (real.len() / d, fake.len() / d);
        let r = |i: usize| &real[i * d..(i + 1) * d];
        let f = |j: usize| &fake[j * d..(j + 1) * d];
        let kth = |pts: &[f32], i: usize| {
            let row = |j: usize| &pts[j * d..(j + 1) * d];
            let mut v: Vec<f64> = (0..pts.len() / d)
                .filter(|&j| j != i)
                .map(|j| exact_d2(row(i), row(j)).sqrt())
                .collect();
            v.sort_by(f64::total_cmp);
            v[k - 1]
        };
        let rr: Vec<f64> = (0..n).map(|i| kth(real, i)).collect();
        let fr: Vec<f64> = (0..m).map(|j| kth(fake, j)).collect();
        let dist = |i: usize, j: usize| exact_d2(r(i), f(j)).sqrt();
        let cnt: Vec<usize> = (0..m)
            .map(|j| (0..n).filter(|&i| dist(i, j) < rr[i]).count())
            .collect();
        let div = Diversity {
            precision: cnt.iter().filter(|&&c| c > 0).count() as f64 / m as f64,
            recall: (0..n)
                .filter(|&i| (0..m).any(|j| dist(i, j) < fr[j]))
                .count() as f64
                / n as f64,
            density: cnt.iter().sum::<usize>() as f64 / (k * m) as f64,
            coverage: (0..n)
                .filter(|&i| (0..m).any(|j| dist(i, j) < rr[i]))
                .count() as f64
                / n as f64,
        };
        (div, rr)
    }

    #[test]
    fn matches_brute_force_across_blocks() {
        // Offset features (|x| >> distances) stress the GEMM's cancellation; more rows than one
        // block holds exercises the blocking.
        let d = 24;
        let real = gaussian(700, d, 30.0, 1);
        let mut fake = gaussian(650, d, 0.0, 2);
        fake.iter_mut().for_each(|v| *v = 1.1 * *v + 30.2);
        let (want, want_r) = brute(&real, &fake, d, NEAREST_K);
        let rm = Manifold::new(real.clone(), d, NEAREST_K).unwrap();
        for (a, b) in rm.radii().iter().zip(&want_r) {
            assert!((a - b).abs() <= 1e-12 * b, "radius {a} vs {b}");
        }
        let fm = Manifold::new(fake.clone(), d, NEAREST_K).unwrap();
        assert_eq!(compare(&rm, &fm).unwrap(), want);
        println!("offset clusters: {want:?}");
        assert!(want.precision > 0.1 && want.precision < 0.95, "{want:?}");
    }

    /// Naeem et al.'s own `prdc` on seeded features (tests/fixtures/prdc_k3.json, written by
    /// scripts/prdc_fixture.py, which also checks no pair sits on a ball's boundary).
    #[test]
    fn matches_the_prdc_package() {
        let j: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/prdc_k3.json"
        )))
        .unwrap();
        let d = j["d"].as_u64().unwrap() as usize;
        let k = j["nearest_k"].as_u64().unwrap() as usize;
        let rows = |key: &str| -> Vec<f32> {
            j[key]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter())
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        let (real, fake) = (rows("real"), rows("fake"));
        let rm = Manifold::new(real, d, k).unwrap();
        let fm = Manifold::new(fake, d, k).unwrap();
        assert_eq!((rm.len(), fm.len()), (300, 250));
        for (m, key) in [(&rm, "real_radii"), (&fm, "fake_radii")] {
            for (a, b) in m.radii().iter().zip(j[key].as_array().unwrap()) {
                let b = b.as_f64().unwrap();
                assert!((a - b).abs() <= 1e-9 * b, "{key}: {a} vs prdc {b}");
            }
        }
        let got = compare(&rm, &fm).unwrap();
        let want = |key: &str| j[key].as_f64().unwrap();
        for (name, g) in [
            ("precision", got.precision),
            ("recall", got.recall),
            ("density", got.density),
            ("coverage", got.coverage),
        ] {
            assert!(
                (g - want(name)).abs() < 1e-12,
                "{name}: {g} vs prdc {}",
                want(name)
            );
        }
    }

    #[test]
    fn real_reference_is_class_balanced_and_disjoint() {
        let d = 2;
        // 10 classes of unequal size, labels in a scrambled order.
        let labels: Vec<u32> = (0..400u32).map(|i| (i * 7 + i / 13) % 10).collect();
        let feats: Vec<f32> = (0..800).map(|i| i as f32).collect();
        let r = RealReference::new(feats, labels.clone(), d, 10);
        let [a, b] = &r.halves;
        assert!(a.iter().all(|i| !b.contains(i)));
        assert_eq!(a.len() + b.len(), 400);
        for half in [a, b] {
            let first: Vec<u32> = half[..30].iter().map(|&i| labels[i]).collect();
            for c in 0..10 {
                assert_eq!(first.iter().filter(|&&l| l == c).count(), 3, "{first:?}");
            }
        }
        // Scores: the sample set's size picks the real set's; few points give NaN, not an error.
        let s = r.score(&gaussian(3, d, 0.0, 1), None, NEAREST_K).unwrap();
        assert!(s.samples.recall.is_nan() && s.n_real == 3);
        let fake = gather(&r.features, d, b[..100].iter().copied());
        let lab: Vec<u32> = b[..100].iter().map(|&i| labels[i]).collect();
        let s = r.score(&fake, Some(&lab), NEAREST_K).unwrap();
        assert_eq!(s.n_real, 100);
        assert_eq!(
            s.samples, s.real_vs_real,
            "the second half as samples is the reference"
        );
        assert_eq!(s.per_class_recall, s.real_vs_real_per_class_recall);
        assert_eq!(s.per_class_recall.as_ref().unwrap().len(), 10);
        assert!(r.score(&fake, Some(&lab[..5]), NEAREST_K).is_err());
    }

    #[test]
    fn known_cases() {
        // Low dimension: k = 3 balls cover a same-distribution set nearly fully (in 16-d they
        // reach only ~0.8, the papers' known small-k bias).
        let d = 6;
        let real = gaussian(1000, d, 0.0, 3);
        // Same distribution: precision and recall near 1, density and coverage near 1.
        let same = diversity(&real, &gaussian(1000, d, 0.0, 4), d, NEAREST_K).unwrap();
        println!("same distribution: {same:?}");
        assert!(same.precision > 0.85 && same.recall > 0.85, "{same:?}");
        assert!(
            (same.density - 1.0).abs() < 0.2 && same.coverage > 0.85,
            "{same:?}"
        );
        // A set against itself: every point sits in its own ball.
        let own = diversity(&real, &real, d, NEAREST_K).unwrap();
        assert_eq!((own.precision, own.recall, own.coverage), (1.0, 1.0, 1.0));
        // One image repeated: its ball has radius 0, so nothing real is recalled.
        let one = gather(&real, d, std::iter::repeat_n(5, 1000));
        let rep = diversity(&real, &one, d, NEAREST_K).unwrap();
        assert_eq!(rep.recall, 0.0, "{rep:?}");
        assert_eq!(rep.precision, 1.0, "a real point lies in the real manifold");
        assert!(rep.coverage <= 4.0 / 1000.0, "{rep:?}");
        // Disjoint clusters: all four are 0.
        let far = diversity(&real, &gaussian(800, d, 50.0, 5), d, NEAREST_K).unwrap();
        assert_eq!(
            far,
            Diversity {
                precision: 0.0,
                recall: 0.0,
                density: 0.0,
                coverage: 0.0
            }
        );
        // Half the modes dropped: precision stays, recall and coverage halve.
        let two = |n: usize, seed: u64, both: bool| {
            let mut v = gaussian(n, d, 0.0, seed);
            for (r, row) in v.chunks_exact_mut(d).enumerate() {
                if both && r % 2 == 1 {
                    row.iter_mut().for_each(|x| *x += 40.0);
                }
            }
            v
        };
        let dropped = diversity(&two(1000, 6, true), &two(500, 7, false), d, NEAREST_K).unwrap();
        assert!(dropped.precision > 0.85, "{dropped:?}");
        assert!(dropped.recall < 0.5 && dropped.recall > 0.35, "{dropped:?}");
        assert!(dropped.coverage < 0.5, "{dropped:?}");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Manifold::new(vec![0.0; 3 * 4], 4, 3).is_err(), "n = k");
        assert!(Manifold::new(vec![0.0; 10], 4, 3).is_err(), "ragged");
        let mut v = vec![0.0; 40];
        v[7] = f32::NAN;
        assert!(Manifold::new(v, 4, 3).is_err(), "NaN");
        let a = Manifold::new(vec![0.0; 40], 4, 3).unwrap();
        let b = Manifold::new(vec![0.0; 50], 5, 3).unwrap();
        assert!(compare(&a, &b).is_err(), "dimension mismatch");
    }
}
