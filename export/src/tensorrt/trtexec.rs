//! `trtexec`: finding it, building its command lines, running it, reading its log.
//!
//! trtexec is NVIDIA's maintained engine builder/runner: it ships with every TensorRT (the apt
//! package puts it in `/usr/src/tensorrt/bin`, the tar/zip packages in `bin/`), speaks every
//! TensorRT version's builder options, and needs no Rust bindings (the `tensorrt-rs` crate is
//! TensorRT-5-era; ONNX Runtime's TensorRT execution provider needs the onnxruntime-gpu build).
//! Validation runs the very `.plan` file a C++ application loads, through `--loadEngine`.

use super::TrtError;
use graphs::Precision;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the trtexec binary (overrides PATH).
pub const TRTEXEC_ENV: &str = "DISTILL_TRTEXEC";

/// Where TensorRT's Debian/Ubuntu packages put trtexec (not on PATH).
pub const APT_TRTEXEC: &str = "/usr/src/tensorrt/bin/trtexec";

/// Finds trtexec: `$DISTILL_TRTEXEC` (must exist), else `trtexec` on `path`, else `fallbacks`.
/// Pure in its inputs so the error paths are testable without touching the environment.
pub fn locate(
    env: Option<OsString>,
    path: Option<OsString>,
    fallbacks: &[&Path],
) -> Result<PathBuf, TrtError> {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(TrtError::TrtexecEnvInvalid(p))
        };
    }
    if let Some(p) = find_in_path("trtexec", path) {
        return Ok(p);
    }
    fallbacks
        .iter()
        .find(|p| is_executable(p))
        .map(|p| p.to_path_buf())
        .ok_or(TrtError::TrtexecMissing)
}

/// [`locate`] with the process environment and the apt location as fallback.
pub fn locate_from_env() -> Result<PathBuf, TrtError> {
    locate(
        std::env::var_os(TRTEXEC_ENV),
        std::env::var_os("PATH"),
        &[Path::new(APT_TRTEXEC)],
    )
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` in the directories of a PATH-style list.
pub fn find_in_path(name: &str, path: Option<OsString>) -> Option<PathBuf> {
    std::env::split_paths(&path?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The optimisation profile over the batch axis (one profile; every input shares the batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchProfile {
    pub min_batch: usize,
    pub opt_batch: usize,
    pub max_batch: usize,
}

impl BatchProfile {
    pub fn new(min_batch: usize, opt_batch: usize, max_batch: usize) -> Result<Self, TrtError> {
        if min_batch == 0 || min_batch > opt_batch || opt_batch > max_batch {
            return Err(TrtError::BadProfile(format!(
                "need 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}/{opt_batch}/{max_batch}"
            )));
        }
        Ok(Self {
            min_batch,
            opt_batch,
            max_batch,
        })
    }
    pub fn contains(&self, batch: usize) -> bool {
        (self.min_batch..=self.max_batch).contains(&batch)
    }
}

/// An engine input or output: name, ONNX dims with `-1` for the batch, element type name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
}

impl TensorDesc {
    /// The shape at a concrete batch.
    pub fn at_batch(&self, batch: usize) -> Vec<usize> {
        self.shape
            .iter()
            .map(|&d| if d < 0 { batch } else { d as usize })
            .collect()
    }
}

/// trtexec's tensor name syntax: names with `:` or `,` are single-quoted.
fn quote_name(name: &str) -> String {
    if name.contains([':', ',', '\'']) {
        format!("'{name}'")
    } else {
        name.to_string()
    }
}

/// `name:AxBxC,...` for `--shapes`/`--minShapes`/... at `batch`.
pub fn shapes_arg(inputs: &[TensorDesc], batch: usize) -> String {
    inputs
        .iter()
        .map(|t| {
            let dims: Vec<String> = t.at_batch(batch).iter().map(|d| d.to_string()).collect();
            format!("{}:{}", quote_name(&t.name), dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Arguments that build `plan` from `onnx` with one batch profile over every input.
pub fn build_args(
    onnx: &Path,
    plan: &Path,
    inputs: &[TensorDesc],
    profile: &BatchProfile,
    precision: Precision,
) -> Vec<String> {
    let mut a = vec![
        format!("--onnx={}", onnx.display()),
        format!("--saveEngine={}", plan.display()),
        format!("--minShapes={}", shapes_arg(inputs, profile.min_batch)),
        format!("--optShapes={}", shapes_arg(inputs, profile.opt_batch)),
        format!("--maxShapes={}", shapes_arg(inputs, profile.max_batch)),
    ];
    a.push(
        match precision {
            Precision::Fp16 => "--fp16",
            Precision::Fp32 => "--noTF32",
            Precision::Bf16 => "--bf16",
        }
        .to_string(),
    );
    // Build only: validation runs the saved plan separately, exactly as an application would.
    a.push("--skipInference".into());
    a
}

/// Arguments that run `plan` once on raw input files and export the outputs as JSON.
/// `inputs` are (name, concrete shape, raw little-endian file).
pub fn infer_args(
    plan: &Path,
    inputs: &[(String, Vec<usize>, PathBuf)],
    export_output: &Path,
) -> Vec<String> {
    let shapes = inputs
        .iter()
        .map(|(n, s, _)| {
            let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
            format!("{}:{}", quote_name(n), dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(",");
    let files = inputs
        .iter()
        .map(|(n, _, f)| format!("{}:{}", quote_name(n), f.display()))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        format!("--loadEngine={}", plan.display()),
        format!("--shapes={shapes}"),
        format!("--loadInputs={files}"),
        format!("--exportOutput={}", export_output.display()),
        // One inference: the defaults (200 ms warm-up, 3 s of timing) only cost time here.
        "--iterations=1".into(),
        "--warmUp=0".into(),
        "--duration=0".into(),
        "--avgRuns=1".into(),
    ]
}

/// The TensorRT version trtexec reports: `[I] TensorRT version: 10.3.0`, else the banner's
/// `[TensorRT v100300]` (major*10000 + minor*100 + patch; TensorRT 8: `v8601`).
pub fn parse_version(log: &str) -> Option<String> {
    for line in log.lines() {
        if let Some(rest) = line.split("TensorRT version: ").nth(1) {
            let v = rest.split_whitespace().next()?;
            if v.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                return Some(v.to_string());
            }
        }
    }
    let start = log.find("[TensorRT v")? + "[TensorRT v".len();
    let digits: String = log[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let n: u64 = digits.parse().ok()?;
    Some(if digits.len() >= 6 {
        format!("{}.{}.{}", n / 10000, n / 100 % 100, n % 100)
    } else {
        format!("{}.{}.{}", n / 1000, n / 100 % 10, n % 100)
    })
}

/// trtexec ends every run with `&&&& PASSED TensorRT.trtexec ...` or `&&&& FAILED ...`.
pub fn passed(log: &str) -> bool {
    log.lines().any(|l| l.starts_with("&&&& PASSED"))
}

/// The last `n` lines of a log (what an error shows).
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs trtexec with `args`; returns stdout+stderr, or an error with the command and log tail
/// unless it exited 0 and reported `&&&& PASSED`.
pub fn run(trtexec: &Path, args: &[String]) -> Result<String, TrtError> {
    let command = format!("{} {}", trtexec.display(), args.join(" "));
    let out = Command::new(trtexec)
        .args(args)
        .output()
        .map_err(|e| TrtError::TrtexecFailed {
            command: command.clone(),
            status: format!("could not start: {e}"),
            log_tail: String::new(),
        })?;
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !passed(&log) {
        return Err(TrtError::TrtexecFailed {
            command,
            status: out.status.to_string(),
            log_tail: tail(&log, 30),
        });
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start and end of a real TensorRT 10.3 trtexec build log (device lines shortened).
    pub(crate) const BANNER: &str = "\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=generator.onnx --saveEngine=generator.plan --fp16
[11/14/2024-09:12:01] [I] === Model Options ===
[11/14/2024-09:12:01] [I] Format: ONNX
[11/14/2024-09:12:01] [I] Model: generator.onnx
[11/14/2024-09:12:01] [I] === Device Information ===
[11/14/2024-09:12:02] [I] Selected Device: NVIDIA A100-SXM4-80GB
[11/14/2024-09:12:02] [I] Compute Capability: 8.0
[11/14/2024-09:12:02] [I] 
[11/14/2024-09:12:02] [I] TensorRT version: 10.3.0
[11/14/2024-09:12:02] [I] Loading standard plugins
[11/14/2024-09:12:40] [I] Engine built in 37.9 sec.
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=generator.onnx --saveEngine=generator.plan --fp16
";

    fn descs() -> Vec<TensorDesc> {
        vec![
            TensorDesc {
                name: "noise".into(),
                shape: vec![-1, 1, 32, 32],
                dtype: "float32".into(),
            },
            TensorDesc {
                name: "class_labels".into(),
                shape: vec![-1],
                dtype: "int32".into(),
            },
            TensorDesc {
                name: "noise_1".into(),
                shape: vec![-1, 1, 32, 32],
                dtype: "float32".into(),
            },
        ]
    }

    #[test]
    fn version_from_the_log_line_and_from_the_banner() {
        assert_eq!(parse_version(BANNER).as_deref(), Some("10.3.0"));
        let banner_only = BANNER
            .lines()
            .filter(|l| !l.contains("TensorRT version"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_version(&banner_only).as_deref(), Some("10.3.0"));
        assert_eq!(
            parse_version("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec").as_deref(),
            Some("8.6.1")
        );
        assert_eq!(
            parse_version("[I] TensorRT version: 10.13.2\n").as_deref(),
            Some("10.13.2")
        );
        assert_eq!(parse_version("no version here"), None);
        assert!(passed(BANNER));
        assert!(!passed(&BANNER.replace("&&&& PASSED", "&&&& FAILED")));
        assert_eq!(tail(BANNER, 1).lines().count(), 1);
    }

    #[test]
    fn build_command_has_a_profile_for_every_input() {
        let p = BatchProfile::new(1, 8, 32).unwrap();
        let a = build_args(
            Path::new("out/generator.onnx"),
            Path::new("out/generator.plan"),
            &descs(),
            &p,
            Precision::Fp16,
        );
        assert_eq!(
            a,
            vec![
                "--onnx=out/generator.onnx",
                "--saveEngine=out/generator.plan",
                "--minShapes=noise:1x1x32x32,class_labels:1,noise_1:1x1x32x32",
                "--optShapes=noise:8x1x32x32,class_labels:8,noise_1:8x1x32x32",
                "--maxShapes=noise:32x1x32x32,class_labels:32,noise_1:32x1x32x32",
                "--fp16",
                "--skipInference",
            ]
        );
        let a32 = build_args(
            Path::new("m.onnx"),
            Path::new("m.plan"),
            &descs()[..2],
            &p,
            Precision::Fp32,
        );
        assert!(a32.contains(&"--noTF32".to_string()) && !a32.contains(&"--fp16".to_string()));
    }

    #[test]
    fn profile_must_be_ordered() {
        assert!(BatchProfile::new(0, 1, 1).is_err());
        assert!(BatchProfile::new(4, 2, 8).is_err());
        let p = BatchProfile::new(2, 2, 8).unwrap();
        assert!(p.contains(2) && p.contains(8) && !p.contains(1) && !p.contains(9));
    }

    #[test]
    fn infer_command_loads_raw_inputs_and_exports_json() {
        let a = infer_args(
            Path::new("g.plan"),
            &[
                (
                    "noise".into(),
                    vec![2, 1, 16, 16],
                    PathBuf::from("/t/noise.bin"),
                ),
                (
                    "class_labels".into(),
                    vec![2],
                    PathBuf::from("/t/class_labels.bin"),
                ),
            ],
            Path::new("/t/out.json"),
        );
        assert_eq!(a[0], "--loadEngine=g.plan");
        assert_eq!(a[1], "--shapes=noise:2x1x16x16,class_labels:2");
        assert_eq!(
            a[2],
            "--loadInputs=noise:/t/noise.bin,class_labels:/t/class_labels.bin"
        );
        assert_eq!(a[3], "--exportOutput=/t/out.json");
        assert!(a.contains(&"--iterations=1".to_string()));
        assert_eq!(
            shapes_arg(
                &[TensorDesc {
                    name: "a:b".into(),
                    shape: vec![-1],
                    dtype: "int32".into()
                }],
                3
            ),
            "'a:b':3"
        );
    }

    #[test]
    fn locating_trtexec() {
        let dir = tempfile::tempdir().unwrap();
        // Missing everywhere: the message says what to install.
        let e = locate(None, Some(dir.path().into()), &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("trtexec not found on PATH")
                && msg.contains("TensorRT 10")
                && msg.contains("DISTILL_TRTEXEC"),
            "{msg}"
        );
        // A DISTILL_TRTEXEC that is not there is an error naming it (never a silent PATH fallback).
        let e = locate(Some("/nope/trtexec".into()), Some(dir.path().into()), &[]).unwrap_err();
        assert!(e.to_string().contains("/nope/trtexec"), "{e}");
        // Found on PATH only when executable.
        let exe = dir.path().join("trtexec");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        assert!(locate(None, Some(dir.path().into()), &[]).is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(locate(None, Some(dir.path().into()), &[]).unwrap(), exe);
        assert_eq!(locate(None, None, &[exe.as_path()]).unwrap(), exe);
        assert_eq!(locate(Some(exe.clone().into()), None, &[]).unwrap(), exe);
    }

    #[test]
    fn a_failing_trtexec_reports_its_command_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("trtexec");
        std::fs::write(
            &exe,
            "#!/bin/sh\necho '[E] Error[4]: ITensor::getDimensions: Error Code 4'\necho '&&&& FAILED TensorRT.trtexec [TensorRT v100300]'\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = run(&exe, &["--onnx=x.onnx".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--onnx=x.onnx")
                && e.contains("Error Code 4")
                && e.contains("exit status: 1"),
            "{e}"
        );
    }
}
