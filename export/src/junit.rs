//! JUnit XML of a parity gate run (`distill validate --junit FILE`), so CI systems show one test
//! per runtime x output: metrics in `system-out`, a `failure` past tolerance, `skipped` for a
//! runtime that is not installed (`--allow-missing`), plus one test for the TensorRT lint and an
//! `error` test when the run itself failed (exit code 1).

use crate::tensorrt::Violation;
use crate::validate::ValidateReport;
use std::fmt::Write;

/// XML-escapes text and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Characters XML 1.0 cannot hold at all.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

struct Case {
    class: String,
    name: String,
    seconds: f64,
    out: String,
    failure: Option<(String, String)>,
    error: Option<String>,
    skipped: Option<String>,
}

/// The JUnit document for a run: `lint` is `Some(violations)` when the lint ran, `report` when
/// the parity check ran, `error` when the run failed before a report. `suite` names the test
/// suite (e.g. the model file).
pub fn to_junit(
    suite: &str,
    lint: Option<&[Violation]>,
    report: Option<&ValidateReport>,
    error: Option<&str>,
) -> String {
    let mut cases = Vec::new();
    if let Some(v) = lint {
        let details = v
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        cases.push(Case {
            class: "distill.lint".into(),
            name: "tensorrt_compatibility".into(),
            seconds: 0.0,
            out: if v.is_empty() {
                "no TensorRT compatibility problems".into()
            } else {
                details.clone()
            },
            failure: (!v.is_empty()).then(|| {
                (
                    format!("{} TensorRT compatibility problem(s)", v.len()),
                    details,
                )
            }),
            error: None,
            skipped: None,
        });
    }
    if let Some(e) = error {
        cases.push(Case {
            class: "distill.validate".into(),
            name: "run".into(),
            seconds: 0.0,
            out: String::new(),
            failure: None,
            error: Some(e.to_string()),
            skipped: None,
        });
    }
    if let Some(r) = report {
        for m in &r.metrics {
            let tol = match m.mean_abs_tol {
                Some(t) => format!("max abs <= {:.1e}, mean abs <= {:.1e}", m.max_abs_tol, t),
                None => format!("max abs <= {:.1e}", m.max_abs_tol),
            };
            let metrics = format!(
                "{} vs candle on {} cases (batches {:?}, seed {}), {} elements: max_abs {:.3e}, mean_abs {:.3e}, p99_abs {:.3e}, max_rel {:.3e}, cosine {:.7}, nonfinite {} (reference {}); tolerance {tol}",
                m.runtime, r.cases, r.batches, r.seed, m.elements, m.max_abs, m.mean_abs, m.p99_abs, m.max_rel, m.cosine, m.nonfinite, m.reference_nonfinite
            );
            cases.push(Case {
                class: format!("distill.parity.{}", m.runtime),
                name: m.output.clone(),
                seconds: m.seconds,
                out: metrics.clone(),
                failure: (!m.passed).then(|| {
                    (
                        format!(
                            "{} {} past tolerance: max_abs {:.3e}, mean_abs {:.3e}, nonfinite {} (reference {}) ({tol})",
                            m.runtime, m.output, m.max_abs, m.mean_abs, m.nonfinite, m.reference_nonfinite
                        ),
                        metrics,
                    )
                }),
                error: None,
                skipped: None,
            });
        }
        for u in &r.unavailable {
            cases.push(Case {
                class: format!("distill.parity.{}", u.runtime),
                name: "unavailable".into(),
                seconds: 0.0,
                out: String::new(),
                failure: None,
                error: None,
                skipped: Some(u.reason.clone()),
            });
        }
    }
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let errors = cases.iter().filter(|c| c.error.is_some()).count();
    let skipped = cases.iter().filter(|c| c.skipped.is_some()).count();
    let total: f64 = cases.iter().map(|c| c.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"distill validate\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
        cases.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
        escape(suite),
        cases.len()
    );
    for c in &cases {
        let _ = writeln!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
            escape(&c.class),
            escape(&c.name),
            c.seconds
        );
        if let Some((msg, body)) = &c.failure {
            let _ = writeln!(
                x,
                "      <failure message=\"{}\" type=\"{}\">{}</failure>",
                escape(msg),
                if c.class == "distill.lint" {
                    "lint"
                } else {
                    "tolerance"
                },
                escape(body)
            );
        }
        if let Some(e) = &c.error {
            let first = e.lines().next().unwrap_or_default();
            let _ = writeln!(
                x,
                "      <error message=\"{}\" type=\"error\">{}</error>",
                escape(first),
                escape(e)
            );
        }
        if let Some(reason) = &c.skipped {
            let _ = writeln!(x, "      <skipped message=\"{}\"/>", escape(reason));
        }
        if !c.out.is_empty() {
            let _ = writeln!(x, "      <system-out>{}</system-out>", escape(&c.out));
        }
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("a<b & \"c\" 'd'>"),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"
        );
        assert_eq!(escape("bell\u{7}"), "bell?");
    }
}
