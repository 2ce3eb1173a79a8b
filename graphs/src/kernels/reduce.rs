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

#[cfg(test)]
mod tests {
    #[test]
    fn sum_matches_f64_sum() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((super::sum(&x) as f64 - want).abs() < 1e-3, "n {n}");
        }
    }
}
