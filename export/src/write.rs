//! Writing models: atomically (temporary file + rename), with ONNX external data when the
//! initializers would push the protobuf past its 2 GB limit.

use crate::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use anyhow::{Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Initializer bytes above which [`write_model`] moves them to `<model>.data` (2 GB: protobuf's
/// message size limit).
pub const DEFAULT_EXTERNAL_THRESHOLD: u64 = 2_000_000_000;

/// Writes `model` to `path` atomically; initializers go to external data (`<path>.data`) when
/// their total size exceeds [`DEFAULT_EXTERNAL_THRESHOLD`].
pub fn write_model(model: &ModelProto, path: &Path) -> Result<()> {
    write_model_with(model, path, DEFAULT_EXTERNAL_THRESHOLD)
}

pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// [`write_model`] with a configurable external-data threshold (in bytes of initializer data).
///
/// External data follows the ONNX convention: each initializer keeps its name, type and dims,
/// `data_location = EXTERNAL`, and `external_data` entries `location` (the data file's name,
/// relative to the model), `offset` and `length`; offsets are 64-byte aligned. The data file is
/// written before the model, both atomically.
pub fn write_model_with(model: &ModelProto, path: &Path, external_threshold: u64) -> Result<()> {
    let total: u64 = model
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| t.raw_data.len() as u64).sum())
        .unwrap_or(0);
    if total <= external_threshold {
        return atomic_write(path, &model.encode_to_vec());
    }
    let mut model = model.clone();
    let data_path = PathBuf::from(format!("{}.data", path.display()));
    let location = data_path
        .file_name()
        .context("data file name")?
        .to_string_lossy()
        .to_string();
    let mut data = Vec::with_capacity(total as usize);
    for t in &mut model
        .graph
        .as_mut()
        .context("model without graph")?
        .initializer
    {
        while data.len() % 64 != 0 {
            data.push(0);
        }
        let offset = data.len();
        data.extend_from_slice(&t.raw_data);
        let length = t.raw_data.len();
        t.raw_data.clear();
        t.data_location = DataLocation::External as i32;
        t.external_data = vec![
            StringStringEntryProto {
                key: "location".into(),
                value: location.clone(),
            },
            StringStringEntryProto {
                key: "offset".into(),
                value: offset.to_string(),
            },
            StringStringEntryProto {
                key: "length".into(),
                value: length.to_string(),
            },
        ];
    }
    atomic_write(&data_path, &data)?;
    atomic_write(path, &model.encode_to_vec())
}
