//! Pins the exported ONNX bytes of seeded tiny checkpoints (a teacher with a guided multi-step
//! sampler, and a multi-step student), so refactors cannot change what is exported. A change of
//! the exported sampler arithmetic on purpose re-pins these with a note in the commit message.

use candle_core::Device;
use distill::checkpoint::{self, CheckpointMeta, Role};
use graphs::{GeneratorSpec, ModelConfig, Parameterisation, SamplerKind, UNetConfig};
use std::path::{Path, PathBuf};

fn sha256(p: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// A checkpoint of the tiny UNet with seeded initial weights (no training: bit-stable).
fn seeded_checkpoint(
    dir: &Path,
    role: Role,
    param: Parameterisation,
    spec: GeneratorSpec,
) -> PathBuf {
    let cfg = ModelConfig::ours(UNetConfig::tiny(), param);
    let (_vm, _den, vars) = distill::train::teacher::init_trainable(&cfg, 7, &Device::Cpu).unwrap();
    let w = distill::train::vars_to_tensors(&vars);
    let ckpt = dir.join(role.name()).join("checkpoint");
    checkpoint::save(&ckpt, &CheckpointMeta::new(role, cfg, spec, 42), &w).unwrap();
    ckpt
}

fn export(ckpt: &Path, out: &Path, fp16: bool) -> PathBuf {
    let precision = if fp16 {
        export::Precision::Fp16
    } else {
        export::Precision::Fp32
    };
    distill::jobs::ExportJob::generator(ckpt, out, precision)
        .write_onnx()
        .unwrap()
}

#[test]
fn exported_onnx_bytes_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = seeded_checkpoint(
        dir.path(),
        Role::Teacher,
        Parameterisation::edm(),
        GeneratorSpec {
            sampler: SamplerKind::Heun,
            steps: 3,
            sigmas: vec![],
            fresh_noise: false,
            cfg_scale: 2.0,
        },
    );
    let student = seeded_checkpoint(
        dir.path(),
        Role::Dmd2,
        Parameterisation::edm(),
        GeneratorSpec {
            sampler: SamplerKind::Student,
            steps: 2,
            sigmas: vec![80.0, 1.5],
            fresh_noise: true,
            cfg_scale: 1.0,
        },
    );
    let got = [
        (
            "teacher heun-3 cfg 2 fp32",
            export(&teacher, &dir.path().join("t32"), false),
        ),
        (
            "teacher heun-3 cfg 2 fp16",
            export(&teacher, &dir.path().join("t16"), true),
        ),
        (
            "dmd2 2-step fp32",
            export(&student, &dir.path().join("s32"), false),
        ),
    ]
    .map(|(name, p)| (name, sha256(&p)));
    let want = [
        (
            "teacher heun-3 cfg 2 fp32",
            "4ff309f2b65587daaa0626f8773e83ae6fee86a4677599bf45ad80cdbef58151",
        ),
        (
            "teacher heun-3 cfg 2 fp16",
            "fa3bb8f3888867cf1d3bd4788f4e502ef7fa6cac2b01c4e93fb8b6855acf21e5",
        ),
        (
            "dmd2 2-step fp32",
            "e42b864da0408cac3951932d6ffc10aac647b64a9036c3625ab3ee2d2678a8c6",
        ),
    ];
    for (name, g) in &got {
        eprintln!("{name}: {g}");
    }
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert_eq!(g, w, "{name}: the exported ONNX bytes changed");
    }
}
