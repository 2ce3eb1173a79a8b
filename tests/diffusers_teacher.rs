//! A diffusers pipeline folder (model_index.json + unet/ + scheduler/, made by diffusers itself:
//! graphs/tests/fixtures/diffusers/teachers) as the teacher of every command, through the
//! release binary: sampled with its scheduler's sampler, distilled by DMD2 (with its GAN head on
//! the UNet2DModel's bottleneck) and TDM, the students sampled and evaluated, teacher and
//! students exported and validated in tract and ONNX Runtime. Once with its DDIM (eps)
//! scheduler, once with a FlowMatchEuler scheduler config in its place (the same network read as
//! a rectified-flow velocity model).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/fixtures/diffusers")
}

fn distill(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .env("DISTILL_THREADS", "2")
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run distill");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "distill {args:?}:\n{text}");
    text
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The DDIM pipeline with `scheduler/` replaced by the flow fixture's scheduler config.
fn flow_pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("digits32_flow");
    copy_dir(&fixtures().join("teachers/digits32_ddim"), &p);
    std::fs::copy(
        fixtures().join("schedulers/flow_plain/scheduler_config.json"),
        p.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Both cases pass the default gate. An eps-prediction VP model starts at sigma_max = 157 where
/// `x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp)` multiplies the runtimes' last-bit differences
/// in eps by 157 (measured here: tract 3.3e-4, ONNX Runtime 2.5e-4 max abs, p99 0): the gate's
/// f64 reference measures that amplification and raises its 1e-4 accordingly.
fn export_and_validate(ckpt: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["export", s(ckpt), "-o", s(out)];
    args.extend_from_slice(extra);
    let text = distill(&args);
    assert!(text.contains("kind = generator"), "{text}");
    let onnx = out.join("generator.onnx");
    let text = distill(&[
        "validate",
        s(&onnx),
        "--reference",
        s(ckpt),
        "--runtimes",
        "tract,ort",
        "--cases",
        "4",
    ]);
    assert!(text.contains("tract") && text.contains("ort"), "{text}");
}

#[test]
fn a_diffusers_pipeline_is_the_teacher_of_every_command() {
    let tmp = tempfile::Builder::new()
        .prefix("distill-diffusers-teacher")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distill-eval-cache");
    let ddim = fixtures().join("teachers/digits32_ddim");
    let flow = flow_pipeline(tmp.path());
    for (name, teacher, kind, sampler) in [
        ("ddim", ddim, "\"vp\"", "ddim"),
        ("flow", flow, "\"flow\"", "euler"),
    ] {
        let root = tmp.path().join(name);
        // The teacher, with the sampler its scheduler maps to.
        let text = distill(&[
            "sample",
            s(&teacher),
            "--sample-steps",
            "3",
            "--per-class",
            "1",
            "-o",
            s(&root.join("teacher_samples")),
        ]);
        assert!(text.to_lowercase().contains(sampler), "{name}: {text}");
        export_and_validate(
            &teacher,
            &root.join("teacher_export"),
            &["--sample-steps", "2"],
        );

        let common = [
            "--teacher",
            s(&teacher),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--cfg-scale",
            "1",
            "--log-every",
            "1",
            "--sample-every",
            "0",
            "--checkpoint-every",
            "2",
        ];
        let dmd2 = root.join("dmd2");
        let mut a = vec![
            "train",
            "dmd2",
            "-o",
            s(&dmd2),
            "--dfake-gen-update-ratio",
            "1",
        ];
        a.extend_from_slice(&common);
        distill(&a);
        let tdm = root.join("tdm");
        let mut a = vec!["train", "tdm", "-o", s(&tdm), "--timesteps", "999,499"];
        a.extend_from_slice(&common);
        distill(&a);

        for run in [&dmd2, &tdm] {
            let ckpt = run.join("checkpoint");
            // The student is one of our checkpoints recording the diffusers network.
            let cfg = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
            assert!(cfg.contains("\"diffusers_unet2d\""), "{cfg}");
            assert!(cfg.contains(kind), "{cfg}");
            assert!(cfg.contains("\"down_block_types\""), "{cfg}");
            distill(&[
                "sample",
                s(&ckpt),
                "--per-class",
                "1",
                "-o",
                s(&run.join("student_samples")),
            ]);
            export_and_validate(&ckpt, &run.join("export"), &[]);
            // Back out as a diffusers folder: VP students (1-step, or TDM's deterministic steps
            // on DDIM's trailing timesteps) are written; flow has no matching scheduler.
            let dir = run.join("diffusers");
            let o = Command::new(env!("CARGO_BIN_EXE_distill"))
                .args([
                    "--quiet",
                    "export",
                    s(&ckpt),
                    "--format",
                    "diffusers",
                    "-o",
                    s(&dir),
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stderr);
            if name == "flow" {
                assert!(!o.status.success() && text.contains("flow"), "{text}");
                continue;
            }
            assert!(o.status.success(), "{text}");
            for f in [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json",
                "distill_check.safetensors",
            ] {
                assert!(dir.join(f).is_file(), "{f} missing");
            }
            let sched =
                std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap();
            assert!(sched.contains("\"trailing\""), "{sched}");
            // ... and read back by distill itself as a diffusers teacher.
            distill(&[
                "sample",
                s(&dir),
                "--sample-steps",
                "2",
                "--per-class",
                "1",
                "-o",
                s(&run.join("roundtrip_samples")),
            ]);
        }
        let text = distill(&[
            "eval",
            s(&dmd2.join("checkpoint")),
            "--n",
            "20",
            "--cache-dir",
            s(&cache),
            "--json",
            s(&root.join("eval.json")),
        ]);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("eval.json")).unwrap())
                .unwrap();
        let fd = r["fd"].as_f64().unwrap_or(f64::NAN);
        assert!(fd.is_finite() && fd > 0.0, "{name}: {r}\n{text}");
        assert_eq!(r["n"], 20, "{name}: {r}");
    }
}

#[test]
fn a_diffusers_teacher_refuses_guidance_and_step_tables_by_name() {
    let ddim = fixtures().join("teachers/digits32_ddim");
    let tmp = tempfile::tempdir().unwrap();
    for (cmd, extra, want) in [
        ("dmd2", vec!["--cfg-scale", "2"], "--cfg-scale 2"),
        (
            "tdm",
            vec!["--cfg-scale", "1", "--condition-on-step"],
            "condition_on_step",
        ),
    ] {
        let mut args = vec![
            "train",
            cmd,
            "--teacher",
            s(&ddim),
            "--steps",
            "1",
            "-o",
            s(tmp.path()),
        ];
        args.extend(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_distill"))
            .arg("--quiet")
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && text.contains(want), "{cmd}: {text}");
    }
}
