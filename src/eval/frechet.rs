//! Frechet distance between two Gaussians fitted to feature vectors (the FID formula, here on the
//! features of our own MNIST classifier), with a cyclic Jacobi eigensolver for the matrix square
//! roots. Everything is f64; `d` is small (128), so the O(d^3) Jacobi sweeps take milliseconds.

/// Mean and unbiased covariance (`d x d`, row-major) of `n` feature vectors of length `d` stored
/// row-major in `features`. Panics if `n < 2` or `features.len() != n * d`.
pub fn stats(features: &[f32], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    assert!(n >= 2, "covariance needs at least 2 samples, got {n}");
    assert_eq!(
        features.len(),
        n * d,
        "features: expected {n} x {d} = {} values, got {}",
        n * d,
        features.len()
    );
    let mut mean = vec![0f64; d];
    for row in features.chunks_exact(d) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    // Upper triangle of sum (x - mean)(x - mean)^T, mirrored at the end.
    let mut cov = vec![0f64; d * d];
    let mut c = vec![0f64; d];
    for row in features.chunks_exact(d) {
        for ((ci, &x), m) in c.iter_mut().zip(row).zip(&mean) {
            *ci = x as f64 - m;
        }
        for i in 0..d {
            let ci = c[i];
            if ci == 0.0 {
                continue;
            }
            let dst = &mut cov[i * d + i..(i + 1) * d];
            for (o, &cj) in dst.iter_mut().zip(&c[i..]) {
                *o += ci * cj;
            }
        }
    }
    let denom = (n - 1) as f64;
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / denom;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    (mean, cov)
}

/// Frechet distance between `N(mu1, cov1)` and `N(mu2, cov2)`:
/// `|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr(sqrt(sqrt(C1) C2 sqrt(C1)))`.
///
/// The covariances must be symmetric positive semi-definite `d x d` (row-major); tiny negative
/// eigenvalues from rounding are clamped to 0. The result is clamped at 0 (it is a squared distance).
pub fn frechet_distance(mu1: &[f64], cov1: &[f64], mu2: &[f64], cov2: &[f64], d: usize) -> f64 {
    assert!(
        mu1.len() == d && mu2.len() == d,
        "means must have length {d}"
    );
    assert!(
        cov1.len() == d * d && cov2.len() == d * d,
        "covariances must be {d} x {d}"
    );
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let tr1: f64 = (0..d).map(|i| cov1[i * d + i]).sum();
    let tr2: f64 = (0..d).map(|i| cov2[i * d + i]).sum();
    let s1 = sqrtm_psd(cov1, d);
    let m = matmul(&matmul(&s1, cov2, d), &s1, d);
    let (evals, _) = symmetric_eigen(&m, d);
    let tr_sqrt: f64 = evals.iter().map(|&l| l.max(0.0).sqrt()).sum();
    (diff + tr1 + tr2 - 2.0 * tr_sqrt).max(0.0)
}

/// Principal square root of a symmetric PSD matrix (`d x d`, row-major): `V diag(sqrt(max(l, 0))) V^T`.
pub fn sqrtm_psd(a: &[f64], d: usize) -> Vec<f64> {
    let (evals, v) = symmetric_eigen(a, d);
    let s: Vec<f64> = evals.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for j in i..d {
            let x: f64 = (0..d).map(|k| v[i * d + k] * s[k] * v[j * d + k]).sum();
            out[i * d + j] = x;
            out[j * d + i] = x;
        }
    }
    out
}

/// Eigen-decomposition of a symmetric matrix (`d x d`, row-major; only its symmetric part is used)
/// by cyclic Jacobi rotations. Returns `(eigenvalues, V)` with `A = V diag(eigenvalues) V^T`, the
/// eigenvectors in the columns of `V` (row-major).
pub fn symmetric_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), d * d, "symmetric_eigen: expected {d} x {d}");
    let mut m = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            m[i * d + j] = 0.5 * (a[i * d + j] + a[j * d + i]);
        }
    }
    let mut v = vec![0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let frob2: f64 = m.iter().map(|x| x * x).sum();
    if frob2 == 0.0 || !frob2.is_finite() {
        return ((0..d).map(|i| m[i * d + i]).collect(), v);
    }
    for _sweep in 0..100 {
        let off2: f64 = (0..d)
            .flat_map(|i| (i + 1..d).map(move |j| (i, j)))
            .map(|(i, j)| 2.0 * m[i * d + j] * m[i * d + j])
            .sum();
        if off2 <= 1e-30 * frob2 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = m[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * d + p], m[q * d + q]);
                // Skip rotations that would not change the diagonal in f64.
                if apq.abs() < 1e-300
                    || (apq.abs() * 1e18 < app.abs() && apq.abs() * 1e18 < aqq.abs())
                {
                    m[p * d + q] = 0.0;
                    m[q * d + p] = 0.0;
                    continue;
                }
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- A J (columns p, q), then A <- J^T A (rows p, q), V <- V J.
                for k in 0..d {
                    let (akp, akq) = (m[k * d + p], m[k * d + q]);
                    m[k * d + p] = c * akp - s * akq;
                    m[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (m[p * d + k], m[q * d + k]);
                    m[p * d + k] = c * apk - s * aqk;
                    m[q * d + k] = s * apk + c * aqk;
                }
                m[p * d + q] = 0.0;
                m[q * d + p] = 0.0;
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| m[i * d + i]).collect(), v)
}

/// `a * b` for `d x d` row-major matrices.
fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        let orow = &mut out[i * d..(i + 1) * d];
        for k in 0..d {
            let aik = a[i * d + k];
            if aik == 0.0 {
                continue;
            }
            for (o, &bkj) in orow.iter_mut().zip(&b[k * d..(k + 1) * d]) {
                *o += aik * bkj;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_spd(d: usize, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
        // B B^T / d + 0.1 I, B with entries in [-1, 1].
        let b: Vec<f64> = (0..d * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut a = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum::<f64>() / d as f64;
            }
            a[i * d + i] += 0.1;
        }
        a
    }

    fn random_features(n: usize, d: usize, shift: f32, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Correlated features: x_j = scale * (z_j + 0.5 z_{j-1}) + shift.
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let z: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            for j in 0..d {
                let prev = if j > 0 { z[j - 1] } else { 0.0 };
                out.push(scale * (z[j] + 0.5 * prev) + shift);
            }
        }
        out
    }

    #[test]
    fn stats_match_hand_computation() {
        // Two features, three samples.
        let f = [1.0f32, 2.0, 3.0, 6.0, 5.0, 4.0];
        let (m, c) = stats(&f, 3, 2);
        assert_eq!(m, vec![3.0, 4.0]);
        // var(1,3,5) = 4, var(2,6,4) = 4, cov = ((-2)(-2) + 0*2 + 2*0) / 2 = 2
        assert_eq!(c, vec![4.0, 2.0, 2.0, 4.0]);
    }

    #[test]
    fn identical_stats_give_zero() {
        let d = 32;
        let f = random_features(500, d, 0.3, 1.5, 1);
        let (m, c) = stats(&f, 500, d);
        let fd = frechet_distance(&m, &c, &m, &c, d);
        assert!(fd.abs() < 1e-8, "FD of identical stats = {fd}");
        // And at d = 128 with a random SPD covariance.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let c = random_spd(128, &mut rng);
        let m = vec![0.5; 128];
        let fd = frechet_distance(&m, &c, &m, &c, 128);
        assert!(fd.abs() < 1e-8, "FD of identical 128-d stats = {fd}");
    }

    #[test]
    fn one_dimensional_closed_form() {
        for &(m1, s1, m2, s2) in &[
            (0.0, 1.0, 0.0, 2.0),
            (1.5, 0.3, -2.0, 4.0),
            (3.0, 2.0, 3.0, 2.0),
            (0.0, 0.0, 1.0, 1.0),
        ] {
            let fd = frechet_distance(&[m1], &[s1 * s1], &[m2], &[s2 * s2], 1);
            let want: f64 = (m1 - m2) * (m1 - m2) + (s1 - s2) * (s1 - s2);
            assert!((fd - want).abs() < 1e-12, "1-D FD {fd} != {want}");
        }
    }

    #[test]
    fn diagonal_closed_form() {
        let d = 16;
        let a: Vec<f64> = (0..d).map(|i| 0.5 + i as f64).collect();
        let b: Vec<f64> = (0..d).map(|i| 3.0 / (1.0 + i as f64)).collect();
        let mut c1 = vec![0f64; d * d];
        let mut c2 = vec![0f64; d * d];
        for i in 0..d {
            c1[i * d + i] = a[i];
            c2[i * d + i] = b[i];
        }
        let mu1: Vec<f64> = (0..d).map(|i| i as f64 * 0.1).collect();
        let mu2 = vec![0.2; d];
        let fd = frechet_distance(&mu1, &c1, &mu2, &c2, d);
        let want: f64 = (0..d)
            .map(|i| (mu1[i] - mu2[i]).powi(2) + (a[i].sqrt() - b[i].sqrt()).powi(2))
            .sum();
        assert!(
            (fd - want).abs() < 1e-9 * want.max(1.0),
            "diagonal FD {fd} != {want}"
        );
    }

    #[test]
    fn commuting_full_covariances_closed_form() {
        // C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T share eigenvectors: FD = sum (sqrt a - sqrt b)^2.
        let d = 24;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (_, q) = symmetric_eigen(&random_spd(d, &mut rng), d);
        let a: Vec<f64> = (0..d).map(|_| rng.gen_range(0.0..4.0)).collect();
        let b: Vec<f64> = (0..d).map(|_| rng.gen_range(0.0..4.0)).collect();
        let build = |l: &[f64]| {
            let mut c = vec![0f64; d * d];
            for i in 0..d {
                for j in 0..d {
                    c[i * d + j] = (0..d).map(|k| q[i * d + k] * l[k] * q[j * d + k]).sum();
                }
            }
            c
        };
        let zero = vec![0f64; d];
        let fd = frechet_distance(&zero, &build(&a), &zero, &build(&b), d);
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum();
        assert!(
            (fd - want).abs() < 1e-8 * want.max(1.0),
            "FD {fd} != {want}"
        );
    }

    #[test]
    fn symmetric_in_its_arguments() {
        let d = 20;
        let (m1, c1) = stats(&random_features(400, d, 0.0, 1.0, 2), 400, d);
        let (m2, c2) = stats(&random_features(300, d, 0.4, 0.6, 3), 300, d);
        let ab = frechet_distance(&m1, &c1, &m2, &c2, d);
        let ba = frechet_distance(&m2, &c2, &m1, &c1, d);
        assert!(
            ab > 1.0,
            "distinct distributions should be far apart, FD {ab}"
        );
        assert!((ab - ba).abs() < 1e-9 * ab, "FD(a,b) {ab} != FD(b,a) {ba}");
    }

    #[test]
    fn sqrt_of_random_spd_squares_back() {
        for &d in &[1usize, 5, 64, 128] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(d as u64);
            let a = random_spd(d, &mut rng);
            let s = sqrtm_psd(&a, d);
            let s2 = matmul(&s, &s, d);
            let err = a
                .iter()
                .zip(&s2)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let scale = a.iter().map(|x| x.abs()).fold(0.0, f64::max);
            assert!(err < 1e-10 * scale, "d={d}: |sqrt(A)^2 - A|_max = {err}");
            // The root is symmetric.
            for i in 0..d {
                for j in 0..d {
                    assert!((s[i * d + j] - s[j * d + i]).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn eigen_decomposition_reconstructs_and_is_orthonormal() {
        let d = 40;
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        // Symmetric but indefinite.
        let mut a = random_spd(d, &mut rng);
        for i in 0..d {
            a[i * d + i] -= 1.0;
        }
        let (l, v) = symmetric_eigen(&a, d);
        assert!(l.iter().any(|&x| x < 0.0) && l.iter().any(|&x| x > 0.0));
        for i in 0..d {
            for j in 0..d {
                let rec: f64 = (0..d).map(|k| v[i * d + k] * l[k] * v[j * d + k]).sum();
                assert!(
                    (rec - a[i * d + j]).abs() < 1e-11,
                    "reconstruction off at ({i},{j})"
                );
                let dot: f64 = (0..d).map(|k| v[k * d + i] * v[k * d + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-11, "V not orthonormal at ({i},{j})");
            }
        }
    }

    #[test]
    fn singular_covariances_are_handled() {
        // Rank-deficient covariances (n < d) must give a finite, symmetric FD.
        let d = 16;
        let (m1, c1) = stats(&random_features(6, d, 0.0, 1.0, 4), 6, d);
        let (m2, c2) = stats(&random_features(5, d, 0.1, 1.0, 5), 5, d);
        let ab = frechet_distance(&m1, &c1, &m2, &c2, d);
        let ba = frechet_distance(&m2, &c2, &m1, &c1, d);
        assert!(ab.is_finite() && ab > 0.0);
        assert!((ab - ba).abs() < 1e-8 * ab.max(1.0), "{ab} vs {ba}");
        assert!(frechet_distance(&m1, &c1, &m1, &c1, d) < 1e-8);
    }
}
