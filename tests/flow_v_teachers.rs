//! Our UNet as a rectified-flow or a v-prediction teacher: the flow loss falls on a handful of
//! digits, and flow / v teachers are distilled by DMD2 and TDM, their students and the teachers
//! exported and validated in tract and ONNX Runtime.

use candle_core::Device;
use distill::jobs::{Dmd2Job, ExportJob, TdmJob, ValidateJob};
use distill::train::distill::RunConfig;
use distill::train::dmd2::Dmd2Config;
use distill::train::tdm::TdmConfig;
use distill::train::teacher::{self, TeacherConfig};
use distill::train::RunDir;
use graphs::schedulers::Prediction;
use graphs::UNetConfig;
use std::path::Path;

fn digits(res: usize) -> distill::data::Dataset {
    distill::data::embedded_mnist()
        .unwrap()
        .to_resolution(res)
        .unwrap()
}

fn tiny_cfg(parameterisation: &str, prediction: Prediction, steps: u64) -> TeacherConfig {
    let mut c = TeacherConfig {
        model: UNetConfig::tiny(),
        parameterisation: parameterisation.into(),
        prediction,
        train_steps: steps,
        batch_size: 8,
        log_every: 1,
        checkpoint_every: steps,
        sample_every: 0,
        sample_steps: 3,
        ..Default::default()
    };
    c.optim.warmup_steps = 5;
    c.optim.lr = 2e-3;
    c
}

fn losses(run: &RunDir) -> Vec<f64> {
    std::fs::read_to_string(run.metrics())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn flow_training_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path()).unwrap();
    let mut cfg = tiny_cfg("flow", Prediction::Epsilon, 120);
    cfg.label_dropout = 0.0;
    let data = digits(16);
    let data = distill::data::Dataset {
        images: data.images[..16 * 16 * 16].to_vec(),
        labels: data.labels[..16].to_vec(),
        ..data
    };
    teacher::train(&cfg, &data, &run, false, false, &Device::Cpu).unwrap();
    let l = losses(&run);
    let head: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let tail: f64 = l[l.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(
        tail < 0.6 * head,
        "flow loss fell only from {head} to {tail}"
    );
}

fn export_validate(ckpt: &Path, out: &Path) {
    let path = ExportJob::generator(ckpt, out, export::Precision::Fp32)
        .write_onnx()
        .unwrap();
    let mut v = ValidateJob::new(&path, ckpt);
    v.cases = 2;
    v.batches = vec![2];
    let r = v.report().unwrap();
    assert!(r.passed(), "{}:\n{r}", path.display());
}

#[test]
fn flow_and_v_teachers_distil_export_and_validate() {
    let cpu = Device::Cpu;
    for (name, param, pred) in [
        ("flow", "flow", Prediction::Epsilon),
        ("v", "vp", Prediction::VPrediction),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let tdir = dir.path().join("teacher");
        let cfg = tiny_cfg(param, pred, 10);
        teacher::train(
            &cfg,
            &digits(16),
            &RunDir::new(&tdir).unwrap(),
            false,
            false,
            &cpu,
        )
        .unwrap();
        let t = tdir.join("checkpoint");
        let meta = distill::checkpoint::load_meta(&t).unwrap();
        assert_eq!(meta.model.parameterisation.name(), param, "{name}");
        export_validate(&t, &dir.path().join("teacher_export"));
        let e =
            distill::diffusers_io::export_folder(&t, &dir.path().join("as_diffusers")).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a diffusers UNet2DModel"),
            "{e:#}"
        );
        let run = RunConfig {
            train_steps: 2,
            batch_size: 4,
            log_every: 1,
            sample_every: 0,
            checkpoint_every: 2,
            ..Default::default()
        };
        let mut dmd2_cfg = Dmd2Config {
            dfake_gen_update_ratio: 1,
            ..Default::default()
        };
        dmd2_cfg.common.teacher = t.clone();
        dmd2_cfg.common.run = run.clone();
        dmd2_cfg.common.timesteps = vec![999, 499];
        let mut tdm_cfg = TdmConfig::default();
        tdm_cfg.common.teacher = t.clone();
        tdm_cfg.common.run = run;
        let dmd2 = Dmd2Job {
            config: dmd2_cfg,
            out: dir.path().join("dmd2"),
            ..Default::default()
        }
        .run(&cpu)
        .unwrap();
        let tdm = TdmJob {
            config: tdm_cfg,
            out: dir.path().join("tdm"),
            ..Default::default()
        }
        .run(&cpu)
        .unwrap();
        for (student, ckpt) in [("dmd2", dmd2), ("tdm", tdm)] {
            let m = distill::checkpoint::load_meta(&ckpt).unwrap();
            assert_eq!(m.model.parameterisation, meta.model.parameterisation);
            export_validate(&ckpt, &dir.path().join(format!("{student}_export")));
        }
    }
}

/// `distill pipeline` reuses a finished teacher in its folder: one of another parameterisation is
/// refused by name instead of being distilled as if it were the requested one.
#[test]
fn pipeline_refuses_a_finished_teacher_of_another_parameterisation() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(&dir.path().join("teacher")).unwrap();
    let data = digits(16);
    teacher::train(
        &tiny_cfg("flow", Prediction::Epsilon, 2),
        &data,
        &run,
        false,
        false,
        &Device::Cpu,
    )
    .unwrap();
    let job = distill::jobs::PipelineJob {
        out: dir.path().to_path_buf(),
        teacher_steps: Some(2),
        quiet: true,
        ..Default::default()
    };
    let e = distill::jobs::pipeline::run(&job, &Device::Cpu).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("finished flow teacher") && msg.contains("asks for edm"),
        "{msg}"
    );
}
