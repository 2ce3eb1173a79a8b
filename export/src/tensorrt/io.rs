//! trtexec's data files: raw little-endian input files (`--loadInputs=name:file`, the tensor's
//! bytes in row-major order, nothing else) and the `--exportOutput` JSON.
//!
//! `--exportOutput` writes (TensorRT 10, `sampleReporting.cpp`):
//! ```text
//! [
//!   { "name" : "images"
//!   , "dimensions" : "2x1x16x16"
//!   , "values" : [ -0.998413, 0.0123901, ... ]
//!   }
//! ]
//! ```
//! Values are printed with `operator<<` at the stream's default precision (6 significant
//! digits: at most 5e-7 relative error, far inside the fp16 tolerances) and non-finite values as
//! `nan`/`-nan`/`inf`/`-inf`, which is not JSON: hence the small scanner below.

use super::TrtError;
use crate::runtime::TensorData;
use std::path::{Path, PathBuf};

/// Writes a tensor as trtexec reads it: raw little-endian f32 or int32.
pub fn write_raw(path: &Path, t: &TensorData) -> Result<(), TrtError> {
    let bytes: Vec<u8> = match t {
        TensorData::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorData::I32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    std::fs::write(path, bytes)
        .map_err(|e| TrtError::Io(format!("writing {}: {e}", path.display())))
}

/// Writes every input into `dir` as `<name>.bin`; returns (name, shape, file) in input order.
pub fn write_inputs(
    dir: &Path,
    inputs: &[(String, TensorData)],
) -> Result<Vec<(String, Vec<usize>, PathBuf)>, TrtError> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, (name, t))| {
            // File names from the index: tensor names may hold characters trtexec splits on.
            let path = dir.join(format!("input{i}.bin"));
            write_raw(&path, t)?;
            Ok((name.clone(), t.shape().to_vec(), path))
        })
        .collect()
}

/// One tensor of an `--exportOutput` file.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

fn bad(msg: impl Into<String>) -> TrtError {
    TrtError::OutputFormat(msg.into())
}

/// The quoted string value of `"key" : "..."` at or after `from`; returns it and the end offset.
fn string_field(text: &str, key: &str, from: usize) -> Result<(String, usize), TrtError> {
    let pat = format!("\"{key}\"");
    let k = text[from..]
        .find(&pat)
        .ok_or_else(|| bad(format!("no \"{key}\" field")))?
        + from
        + pat.len();
    let open = text[k..]
        .find('"')
        .ok_or_else(|| bad(format!("\"{key}\" has no string value")))?
        + k
        + 1;
    let close = text[open..]
        .find('"')
        .ok_or_else(|| bad(format!("unterminated \"{key}\" value")))?
        + open;
    Ok((text[open..close].to_string(), close + 1))
}

fn parse_value(tok: &str) -> Result<f32, TrtError> {
    let t = tok.trim();
    let lower = t.to_ascii_lowercase();
    let (neg, body) = match lower.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, lower.strip_prefix('+').unwrap_or(&lower)),
    };
    if body.starts_with("nan") {
        return Ok(f32::NAN);
    }
    if body.starts_with("inf") {
        return Ok(if neg {
            f32::NEG_INFINITY
        } else {
            f32::INFINITY
        });
    }
    t.parse::<f32>()
        .map_err(|_| bad(format!("value {t:?} is not a number")))
}

/// Parses a trtexec `--exportOutput` file.
pub fn parse_export_output(text: &str) -> Result<Vec<ExportedTensor>, TrtError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(k) = text[pos..].find("\"name\"") {
        let (name, p) = string_field(text, "name", pos + k)?;
        let (dims_s, p) = string_field(text, "dimensions", p)?;
        let dims = if dims_s.trim().is_empty() {
            Vec::new()
        } else {
            dims_s
                .split('x')
                .map(|d| {
                    d.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("{name}: bad dimensions {dims_s:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let v = text[p..]
            .find("\"values\"")
            .ok_or_else(|| bad(format!("{name}: no \"values\"")))?
            + p;
        let open = text[v..]
            .find('[')
            .ok_or_else(|| bad(format!("{name}: \"values\" is not a list")))?
            + v
            + 1;
        let close = text[open..]
            .find(']')
            .ok_or_else(|| bad(format!("{name}: unterminated \"values\"")))?
            + open;
        let body = text[open..close].trim();
        let values = if body.is_empty() {
            Vec::new()
        } else {
            body.split(',')
                .map(parse_value)
                .collect::<Result<Vec<_>, _>>()?
        };
        let n: usize = dims.iter().product();
        if n != values.len() {
            return Err(bad(format!(
                "{name}: dimensions {dims_s} hold {n} values but {} are listed",
                values.len()
            )));
        }
        out.push(ExportedTensor { name, dims, values });
        pos = close + 1;
    }
    if out.is_empty() {
        return Err(bad("no output tensors in the file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    /// Exactly what TensorRT 10's trtexec writes for a [2,1,2,2] output (separator `, `).
    const SAMPLE: &str = "[\n  { \"name\" : \"images\"\n  , \"dimensions\" : \"2x1x2x2\"\n  , \"values\" : [ -0.998413, 0.0123901, 1, -1, 0.5, 3.05176e-05, -nan, inf ]\n  }\n]\n";

    #[test]
    fn parses_trtexec_export_output() {
        let t = parse_export_output(SAMPLE).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "images");
        assert_eq!(t[0].dims, vec![2, 1, 2, 2]);
        assert_eq!(
            &t[0].values[..6],
            &[-0.998413, 0.0123901, 1.0, -1.0, 0.5, 3.05176e-05]
        );
        assert!(t[0].values[6].is_nan() && t[0].values[7] == f32::INFINITY);
    }

    #[test]
    fn parses_several_outputs() {
        let two = "[\n  { \"name\" : \"a\"\n  , \"dimensions\" : \"2\"\n  , \"values\" : [ 1, 2 ]\n  }\n, { \"name\" : \"b\"\n  , \"dimensions\" : \"1x3\"\n  , \"values\" : [ -inf, 0, 7.5e+10 ]\n  }\n]\n";
        let t = parse_export_output(two).unwrap();
        assert_eq!(
            t.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(t[1].values[0], f32::NEG_INFINITY);
        assert_eq!(t[1].values[2], 7.5e10);
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(parse_export_output("[]").is_err());
        let short = SAMPLE.replace("2x1x2x2", "2x1x2x3");
        assert!(parse_export_output(&short)
            .unwrap_err()
            .to_string()
            .contains("hold 12 values but 8"));
        let junk = SAMPLE.replace("0.5", "zebra");
        assert!(parse_export_output(&junk)
            .unwrap_err()
            .to_string()
            .contains("zebra"));
    }

    #[test]
    fn raw_inputs_are_little_endian_row_major() {
        let dir = tempfile::tempdir().unwrap();
        let noise =
            TensorData::F32(ArrayD::from_shape_vec(vec![1, 1, 1, 2], vec![1.5f32, -2.0]).unwrap());
        let labels = TensorData::I32(ArrayD::from_shape_vec(vec![1], vec![7]).unwrap());
        let files = write_inputs(
            dir.path(),
            &[("noise".into(), noise), ("class_labels".into(), labels)],
        )
        .unwrap();
        assert_eq!(files[0].0, "noise");
        assert_eq!(files[0].1, vec![1, 1, 1, 2]);
        let b = std::fs::read(&files[0].2).unwrap();
        assert_eq!(b, [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
        assert_eq!(std::fs::read(&files[1].2).unwrap(), 7i32.to_le_bytes());
    }
}
