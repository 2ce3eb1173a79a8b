//! `reshape` -> `Reshape` with a constant int64 shape using ONNX's `0` (copy) / `-1` (infer)
//! semantics, so the batch is never baked in; `permute` -> `Transpose`; `concat` -> `Concat`;
//! `narrow` -> `Slice` with constant starts/ends/axes.

use crate::builder::{attr_int, attr_ints, Dim, OnnxBackend, ValueInfo};
use anyhow::{bail, ensure, Result};

/// Output dims of an ONNX Reshape of `dims` to `shape` (allowzero = 0).
pub fn reshape_dims(dims: &[Dim], shape: &[i64]) -> Result<Vec<Dim>> {
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        out.push(match s {
            0 => match dims.get(i) {
                Some(d) => *d,
                None => bail!("Reshape: dim {i} of {dims:?} does not exist"),
            },
            -1 => {
                ensure!(infer.is_none(), "Reshape: more than one -1 in {shape:?}");
                infer = Some(i);
                Dim::Fixed(1)
            }
            s if s > 0 => Dim::Fixed(s as usize),
            _ => bail!("Reshape: invalid dim {s} in {shape:?}"),
        });
    }
    let summary = |d: &[Dim]| {
        let unknown = d.contains(&Dim::Unknown);
        let batches = d.iter().filter(|x| **x == Dim::Batch).count();
        let fixed: usize = d
            .iter()
            .map(|x| if let Dim::Fixed(n) = x { *n } else { 1 })
            .product();
        (unknown, batches, fixed)
    };
    let (ui, bi, fi) = summary(dims);
    let (uo, bo, fo) = summary(&out);
    match infer {
        Some(i) => {
            out[i] = if ui || uo {
                Dim::Unknown
            } else if bi == bo {
                ensure!(
                    fo > 0 && fi % fo == 0,
                    "Reshape: cannot reshape {dims:?} into {shape:?}"
                );
                Dim::Fixed(fi / fo)
            } else if bi == bo + 1 && fi == fo {
                Dim::Batch
            } else {
                Dim::Unknown
            };
        }
        None => {
            if !ui && !uo && bi == bo {
                ensure!(fi == fo, "Reshape: cannot reshape {dims:?} into {shape:?}");
            }
        }
    }
    Ok(out)
}

pub fn reshape(b: &OnnxBackend, x: &str, shape: &[i64]) -> Result<String> {
    let xi = b.info(x)?;
    let dims = reshape_dims(&xi.dims, shape)?;
    let s = b.const_i64(shape, &[shape.len()])?;
    b.node("Reshape", &[x, &s], vec![], ValueInfo::new(xi.elem, dims))
}

pub fn transpose(b: &OnnxBackend, x: &str, perm: &[usize]) -> Result<String> {
    let xi = b.info(x)?;
    ensure!(
        perm.len() == xi.rank(),
        "Transpose: perm {perm:?} for rank {}",
        xi.rank()
    );
    let mut seen = vec![false; perm.len()];
    for &p in perm {
        ensure!(
            p < perm.len() && !seen[p],
            "Transpose: invalid perm {perm:?}"
        );
        seen[p] = true;
    }
    let dims = perm.iter().map(|&p| xi.dims[p]).collect();
    let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
    b.node(
        "Transpose",
        &[x],
        vec![attr_ints("perm", &perm)],
        ValueInfo::new(xi.elem, dims),
    )
}

pub fn concat(b: &OnnxBackend, xs: &[&String], axis: usize) -> Result<String> {
    ensure!(!xs.is_empty(), "Concat of nothing");
    let infos = xs.iter().map(|x| b.info(x)).collect::<Result<Vec<_>>>()?;
    let first = &infos[0];
    ensure!(
        axis < first.rank(),
        "Concat: axis {axis} for rank {}",
        first.rank()
    );
    let mut dims = first.dims.clone();
    for (x, i) in xs.iter().zip(&infos).skip(1) {
        ensure!(
            i.elem == first.elem && i.rank() == first.rank(),
            "Concat: {x} {:?} does not match {:?}",
            i,
            first
        );
        dims[axis] = match (dims[axis], i.dims[axis]) {
            (Dim::Fixed(a), Dim::Fixed(c)) => Dim::Fixed(a + c),
            _ => Dim::Unknown,
        };
        for (k, (d, e)) in first.dims.iter().zip(&i.dims).enumerate() {
            ensure!(
                k == axis || d == e || *d == Dim::Unknown || *e == Dim::Unknown,
                "Concat: {x} {:?} vs {:?} on axis {k}",
                i.dims,
                first.dims
            );
        }
    }
    let refs: Vec<&str> = xs.iter().map(|s| s.as_str()).collect();
    b.node(
        "Concat",
        &refs,
        vec![attr_int("axis", axis as i64)],
        ValueInfo::new(first.elem, dims),
    )
}

pub fn narrow(b: &OnnxBackend, x: &str, axis: usize, start: usize, len: usize) -> Result<String> {
    let xi = b.info(x)?;
    ensure!(axis < xi.rank(), "Slice: axis {axis} of rank {}", xi.rank());
    if let Dim::Fixed(n) = xi.dims[axis] {
        ensure!(
            start + len <= n,
            "Slice: [{start}, {}) of axis {axis} of size {n}",
            start + len
        );
    }
    let starts = b.const_i64(&[start as i64], &[1])?;
    let ends = b.const_i64(&[(start + len) as i64], &[1])?;
    let axes = b.const_i64(&[axis as i64], &[1])?;
    let mut dims = xi.dims.clone();
    dims[axis] = Dim::Fixed(len);
    b.node(
        "Slice",
        &[x, &starts, &ends, &axes],
        vec![],
        ValueInfo::new(xi.elem, dims),
    )
}
