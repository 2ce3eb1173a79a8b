//! The boundary around the foreign runtimes: a panic inside tract or ONNX Runtime's bindings
//! becomes an error for that runtime (so `validate` still reports and writes its JUnit file),
//! and the tensor sizes an ONNX file declares are checked against a memory budget before any
//! runtime allocates them (an allocation failure aborts the process; it is not a panic).

use crate::proto::{ModelProto, TensorProto};
use anyhow::{bail, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic into an error naming `runtime` and what it was doing.
pub fn catch<T>(runtime: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let hook = std::panic::take_hook();
    // The message goes into the error; the default hook would print a backtrace hint too.
    std::panic::set_hook(Box::new(|_| {}));
    let r = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            bail!("{runtime} panicked while {what}: {msg} (reported as an error of {runtime})")
        }
    }
}

/// Bytes per element of an ONNX `TensorProto.DataType` (unknown types count 8).
fn elem_bytes(data_type: i32) -> u128 {
    match data_type {
        2 | 3 | 9 => 1,
        4 | 5 | 10 | 16 => 2,
        1 | 6 | 12 => 4,
        _ => 8,
    }
}

/// Bytes a tensor declares (`dims` product x element size); negative dims are an error.
pub fn declared_bytes(t: &TensorProto) -> Result<u128> {
    let mut n: u128 = 1;
    for &d in &t.dims {
        if d < 0 {
            bail!("tensor {:?} declares a negative dimension {d}", t.name);
        }
        n = n.saturating_mul(d as u128);
    }
    Ok(n.saturating_mul(elem_bytes(t.data_type)))
}

fn check_tensor(t: &TensorProto, where_: &str) -> Result<u128> {
    let bytes = declared_bytes(t)?;
    if !t.raw_data.is_empty() && t.raw_data.len() as u128 != bytes {
        bail!(
            "{where_} tensor {:?} declares dims {:?} ({bytes} bytes) but holds {} bytes",
            t.name,
            t.dims,
            t.raw_data.len()
        );
    }
    Ok(bytes)
}

/// Sum of the bytes the model's initializers and Constant tensors declare, checking that every
/// inline tensor holds exactly what it declares.
pub fn model_bytes(model: &ModelProto) -> Result<u128> {
    let Some(g) = &model.graph else {
        bail!("model has no graph")
    };
    let mut total: u128 = 0;
    for t in &g.initializer {
        total = total.saturating_add(check_tensor(t, "initializer")?);
    }
    for n in &g.node {
        for a in &n.attribute {
            if let Some(t) = &a.t {
                let where_ = format!("node {:?} attribute {:?}:", n.name, a.name);
                total = total.saturating_add(check_tensor(t, &where_)?);
            }
            for t in &a.tensors {
                total = total.saturating_add(check_tensor(t, "node attribute")?);
            }
        }
    }
    Ok(total)
}

/// The budget for a model's declared tensors: `DISTILL_ONNX_MEMORY_BUDGET` bytes, else half of
/// `MemAvailable`, else 8 GiB.
pub fn default_budget() -> u128 {
    if let Some(b) = std::env::var("DISTILL_ONNX_MEMORY_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return b;
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<u128>().ok()
        })
        .map(|kib| kib * 1024 / 2)
        .unwrap_or(8 << 30)
}

/// Refuses a model whose declared tensors exceed `budget` bytes, before any runtime loads it.
pub fn check_budget(model: &ModelProto, label: &str, budget: u128) -> Result<()> {
    let bytes = model_bytes(model).map_err(|e| e.context(format!("{label}: malformed")))?;
    if bytes > budget {
        bail!(
            "{label}: its tensors declare {}, over the memory budget of {} (DISTILL_ONNX_MEMORY_BUDGET); refusing to run it",
            human(bytes),
            human(budget)
        );
    }
    Ok(())
}

fn human(b: u128) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error() {
        let e = catch::<()>("tract", "running", || panic!("boom")).unwrap_err();
        assert!(
            e.to_string().contains("tract panicked while running: boom"),
            "{e}"
        );
        assert_eq!(catch("x", "y", || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn declared_sizes_are_checked() {
        let t = TensorProto {
            name: "huge".into(),
            dims: vec![1 << 20, 1 << 20],
            data_type: 1,
            raw_data: vec![0; 16],
            ..Default::default()
        };
        assert_eq!(declared_bytes(&t).unwrap(), 4u128 << 40);
        let m = ModelProto {
            graph: Some(crate::proto::GraphProto {
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = check_budget(&m, "m.onnx", 1 << 30).unwrap_err();
        assert!(format!("{e:#}").contains("holds 16 bytes"), "{e:#}");
    }
}
