//! Vectorised reductions shared by the kernels.

use super::simd::{dispatch, level, Simd};

/// Sum of `x` (4 x 8 partial sums, so the rounding differs from a sequential sum by round-off).
pub fn sum(x: &[f32]) -> f32 {
    // SAFETY: reads only within `x`.
    unsafe { sum_d(level(), x) }
}

dispatch!(unsafe fn sum_d(x: &[f32]) -> f32 => sum_imp);

#[inline(always)]
unsafe fn sum_imp<S: Simd>(x: &[f32]) -> f32 {
    let p = x.as_ptr();
    let n = x.len();
    let mut a = [S::zero(); 4];
    let mut i = 0;
    while i + 4 * S::LANES <= n {
        for (k, a) in a.iter_mut().enumerate() {
            *a = S::add(*a, S::load(p.add(i + k * S::LANES)));
        }
        i += 4 * S::LANES;
    }
    while i + S::LANES <= n {
        a[0] = S::add(a[0], S::load(p.add(i)));
        i += S::LANES;
    }
    if i < n {
        a[1] = S::add(a[1], S::load_part(p.add(i), n - i));
    }
    S::hsum(S::add(S::add(a[0], a[1]), S::add(a[2], a[3])))
}

/// Sum of squares of `x`, accumulated in f64 every 1024 values (a global gradient norm over
/// millions of values stays accurate).
pub fn sum_squares(x: &[f32]) -> f64 {
    x.chunks(1024)
        // SAFETY: reads only within each chunk.
        .map(|c| unsafe { sumsq_d(level(), c) } as f64)
        .sum()
}

dispatch!(unsafe fn sumsq_d(x: &[f32]) -> f32 => sumsq_imp);

#[inline(always)]
unsafe fn sumsq_imp<S: Simd>(x: &[f32]) -> f32 {
    let (p, n) = (x.as_ptr(), x.len());
    let mut a = [S::zero(); 2];
    let mut i = 0;
    while i + 2 * S::LANES <= n {
        for (k, a) in a.iter_mut().enumerate() {
            let v = S::load(p.add(i + k * S::LANES));
            *a = S::fma(v, v, *a);
        }
        i += 2 * S::LANES;
    }
    while i < n {
        let m = (n - i).min(S::LANES);
        let v = S::load_part(p.add(i), m);
        a[0] = S::fma(v, v, a[0]);
        i += m;
    }
    S::hsum(S::add(a[0], a[1]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_of_squares_matches_f64() {
        for n in [0, 1, 15, 16, 17, 33, 1000, 5000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let want: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            assert!(
                (super::sum_squares(&x) - want).abs() <= 1e-6 * want.max(1.0),
                "n {n}"
            );
        }
    }

    #[test]
    fn sum_matches_f64_sum() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((super::sum(&x) as f64 - want).abs() < 1e-3, "n {n}");
        }
    }
}
