//! The GPU an engine is built for: `nvidia-smi --query-gpu=name,compute_cap,driver_version
//! --format=csv,noheader` (one line per GPU; trtexec uses device 0) and the CUDA version the
//! driver supports, from plain `nvidia-smi`'s header ("CUDA Version: 12.4").

use super::TrtError;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const NVIDIA_SMI_MISSING: &str = "no NVIDIA GPU found: nvidia-smi is not on PATH. TensorRT engines are built for and run on a CUDA GPU: install the NVIDIA driver (it ships nvidia-smi) on a machine with an NVIDIA GPU";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    pub name: String,
    /// e.g. "9.0" (engines are specific to it).
    pub compute_capability: String,
    pub driver_version: String,
    /// Highest CUDA version the driver supports, when nvidia-smi reports it.
    pub cuda_version: Option<String>,
}

/// Parses `--query-gpu=name,compute_cap,driver_version --format=csv,noheader` output.
pub fn parse_query(csv: &str) -> Result<Vec<GpuInfo>, TrtError> {
    let gpus: Vec<GpuInfo> = csv
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            // The name may contain commas in principle: the last two fields are numeric.
            let parts: Vec<&str> = l.rsplitn(3, ',').map(str::trim).collect();
            match parts.as_slice() {
                [driver, cc, name] if !name.is_empty() && cc.contains('.') => Ok(GpuInfo {
                    name: name.to_string(),
                    compute_capability: cc.to_string(),
                    driver_version: driver.to_string(),
                    cuda_version: None,
                }),
                _ => Err(TrtError::NoGpu(format!(
                    "cannot read nvidia-smi's GPU line {l:?} (expected `name, compute_cap, driver_version`)"
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    if gpus.is_empty() {
        return Err(TrtError::NoGpu(
            "nvidia-smi lists no GPU (is one visible to this process? check CUDA_VISIBLE_DEVICES)"
                .into(),
        ));
    }
    Ok(gpus)
}

/// "CUDA Version: 12.4" in plain nvidia-smi output.
pub fn parse_cuda_version(smi: &str) -> Option<String> {
    let rest = smi.split("CUDA Version:").nth(1)?;
    let v = rest.split_whitespace().next()?.trim_end_matches('|');
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

/// Finds nvidia-smi on `path`.
pub fn locate(path: Option<std::ffi::OsString>) -> Result<PathBuf, TrtError> {
    super::trtexec::find_in_path("nvidia-smi", path)
        .ok_or_else(|| TrtError::NoGpu(NVIDIA_SMI_MISSING.into()))
}

/// Device 0 as nvidia-smi reports it; an error when the driver or GPU is not usable.
pub fn query(nvidia_smi: &Path) -> Result<GpuInfo, TrtError> {
    let out = Command::new(nvidia_smi)
        .args([
            "--query-gpu=name,compute_cap,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .map_err(|e| TrtError::NoGpu(format!("running {}: {e}", nvidia_smi.display())))?;
    if !out.status.success() {
        return Err(TrtError::NoGpu(format!(
            "{} failed ({}): {} (is the NVIDIA driver loaded and a GPU visible?)",
            nvidia_smi.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim().to_string()
                + String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut gpu = parse_query(&String::from_utf8_lossy(&out.stdout))?.remove(0);
    gpu.cuda_version = Command::new(nvidia_smi)
        .output()
        .ok()
        .and_then(|o| parse_cuda_version(&String::from_utf8_lossy(&o.stdout)));
    Ok(gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lines() {
        let g = parse_query("NVIDIA H100 80GB HBM3, 9.0, 550.54.15\nNVIDIA A10, 8.6, 535.104.05\n")
            .unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0],
            GpuInfo {
                name: "NVIDIA H100 80GB HBM3".into(),
                compute_capability: "9.0".into(),
                driver_version: "550.54.15".into(),
                cuda_version: None
            }
        );
        assert_eq!(g[1].compute_capability, "8.6");
        assert!(parse_query("")
            .unwrap_err()
            .to_string()
            .contains("lists no GPU"));
        assert!(parse_query("garbage").is_err());
    }

    #[test]
    fn cuda_version_from_the_header() {
        let smi = "+-----------------------------------------------------------------------------------------+\n\
                   | NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n";
        assert_eq!(parse_cuda_version(smi).as_deref(), Some("12.4"));
        assert_eq!(parse_cuda_version("NVIDIA-SMI has failed"), None);
    }

    #[test]
    fn missing_nvidia_smi_says_what_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let e = locate(Some(dir.path().into())).unwrap_err().to_string();
        assert!(
            e.contains("nvidia-smi") && e.contains("NVIDIA driver"),
            "{e}"
        );
    }

    #[test]
    fn failing_nvidia_smi_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("nvidia-smi");
        std::fs::write(&exe, "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = query(&exe).unwrap_err().to_string();
        assert!(
            e.contains("could not communicate with the NVIDIA driver"),
            "{e}"
        );
    }
}
