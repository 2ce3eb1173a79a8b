//! Accumulated differences between a reference and a runtime's output.

use super::Metrics;

#[derive(Default)]
pub(super) struct Acc {
    diffs: Vec<f64>,
    dot: f64,
    nr: f64,
    no: f64,
    max_rel: f64,
    nonfinite: usize,
    reference_nonfinite: usize,
}

impl Acc {
    pub(super) fn add(&mut self, reference: &[f32], out: &[f32]) {
        for (&r, &o) in reference.iter().zip(out) {
            let (r_bad, o_bad) = (!r.is_finite(), !o.is_finite());
            self.reference_nonfinite += r_bad as usize;
            self.nonfinite += o_bad as usize;
            if r_bad || o_bad {
                // Counted as an infinite error: max, mean and p99 all report it.
                self.diffs.push(f64::INFINITY);
                continue;
            }
            let d = (o as f64 - r as f64).abs();
            self.diffs.push(d);
            self.max_rel = nan_max(self.max_rel, d / (r.abs() as f64).max(1e-3));
            self.dot += r as f64 * o as f64;
            self.nr += (r as f64).powi(2);
            self.no += (o as f64).powi(2);
        }
    }
    pub(super) fn finish(
        mut self,
        runtime: &str,
        output: &str,
        max_tol: f64,
        mean_tol: Option<f64>,
    ) -> Metrics {
        let n = self.diffs.len();
        let max_abs = self.diffs.iter().copied().fold(0.0, nan_max);
        let mean_abs = if n > 0 {
            self.diffs.iter().sum::<f64>() / n as f64
        } else {
            0.0
        };
        self.diffs.sort_by(|a, b| a.total_cmp(b));
        let p99_abs = if n > 0 {
            self.diffs[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1]
        } else {
            0.0
        };
        let bad = self.nonfinite + self.reference_nonfinite;
        let cosine = if bad > 0 {
            f64::NAN
        } else if self.nr > 0.0 && self.no > 0.0 {
            self.dot / (self.nr.sqrt() * self.no.sqrt())
        } else if self.nr == self.no {
            1.0
        } else {
            0.0
        };
        // Written so that a NaN statistic fails (every comparison with NaN is false).
        let passed =
            n > 0 && bad == 0 && max_abs <= max_tol && mean_tol.is_none_or(|t| mean_abs <= t);
        Metrics {
            runtime: runtime.into(),
            output: output.into(),
            elements: n,
            max_abs,
            mean_abs,
            p99_abs,
            max_rel: self.max_rel,
            cosine,
            nonfinite: self.nonfinite,
            reference_nonfinite: self.reference_nonfinite,
            max_abs_tol: max_tol,
            mean_abs_tol: mean_tol,
            reference_roundoff: None,
            passed,
            seconds: 0.0,
        }
    }
}

/// `max` that propagates NaN (`f64::max` drops it, which let an all-NaN comparison report 0).
pub(super) fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::Acc;

    fn metrics(reference: &[f32], out: &[f32]) -> super::Metrics {
        let mut a = Acc::default();
        a.add(reference, out);
        a.finish("t", "images", 1e-4, Some(1e-3))
    }

    #[test]
    fn an_all_nan_reference_fails_and_is_counted() {
        let m = metrics(&[f32::NAN; 4], &[0.0; 4]);
        assert!(!m.passed);
        assert_eq!((m.reference_nonfinite, m.nonfinite), (4, 0));
        assert!(m.max_abs.is_infinite() && m.cosine.is_nan());
    }

    #[test]
    fn nan_on_both_sides_fails() {
        let m = metrics(&[1.0, f32::NAN], &[1.0, f32::NAN]);
        assert!(!m.passed);
        assert_eq!((m.reference_nonfinite, m.nonfinite), (1, 1));
    }

    #[test]
    fn inf_in_the_output_fails() {
        let m = metrics(&[1.0, 2.0], &[1.0, f32::INFINITY]);
        assert!(!m.passed);
        assert_eq!(m.nonfinite, 1);
    }

    #[test]
    fn finite_agreement_passes() {
        let m = metrics(&[1.0, -2.0, 0.5], &[1.0, -2.0, 0.50001]);
        assert!(m.passed, "{m:?}");
        assert_eq!(m.reference_nonfinite + m.nonfinite, 0);
        assert!((m.cosine - 1.0).abs() < 1e-9);
    }

    #[test]
    fn nan_max_propagates() {
        assert!(super::nan_max(0.0, f64::NAN).is_nan());
        assert!(super::nan_max(f64::NAN, 1.0).is_nan());
        assert_eq!(super::nan_max(1.0, 2.0), 2.0);
    }
}
