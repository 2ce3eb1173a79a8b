//! The main job (`distill pipeline`): teacher -> DMD2 (1 and 4 steps) -> TDM (4 steps) ->
//! quality per NFE -> ONNX export (fp32, fp16) -> parity in tract and ONNX Runtime -> a results
//! table. Every stage is skipped when its output is complete and resumed when it was interrupted,
//! so running the command again after a crash continues where it stopped.

use super::{
    eval_checkpoint, Dmd2Job, ExportJob, SamplerOverride, TdmJob, TeacherJob, ValidateJob,
};
use crate::checkpoint;
use crate::train::distill::DistillCommon;
use crate::train::dmd2::Dmd2Config;
use crate::train::tdm::TdmConfig;
use crate::train::RunDir;
use anyhow::{Context, Result};
use candle_core::Device;
use graphs::SamplerKind;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Sizes of the main job's stages (the defaults are what the README's numbers come from).
#[derive(Clone, Debug)]
pub struct PipelineJob {
    pub out: PathBuf,
    pub data: Option<PathBuf>,
    pub teacher_steps: Option<u64>,
    /// The teacher's parameterisation (`edm`, `vp`, `flow`); `None`: the teacher's default.
    pub parameterisation: Option<String>,
    /// A VP teacher's prediction type; `None`: the teacher's default (epsilon).
    pub prediction: Option<graphs::schedulers::Prediction>,
    pub dmd2_steps: u64,
    pub tdm_steps: u64,
    /// Train the 4-step DMD2 student too.
    pub dmd2_four_step: bool,
    pub eval_n: usize,
    /// Export and validate the students (and the teacher's 35-NFE sampler).
    pub export: bool,
    pub quiet: bool,
}

impl PipelineJob {
    pub const DEFAULT_OUT: &'static str = "runs/pipeline";
    pub const DEFAULT_DMD2_STEPS: u64 = 1500;
    pub const DEFAULT_TDM_STEPS: u64 = 600;
    pub const DEFAULT_EVAL_N: usize = 1000;
}

impl Default for PipelineJob {
    fn default() -> Self {
        Self {
            out: PathBuf::from(Self::DEFAULT_OUT),
            data: None,
            teacher_steps: None,
            parameterisation: None,
            prediction: None,
            dmd2_steps: Self::DEFAULT_DMD2_STEPS,
            tdm_steps: Self::DEFAULT_TDM_STEPS,
            dmd2_four_step: true,
            eval_n: Self::DEFAULT_EVAL_N,
            export: true,
            quiet: false,
        }
    }
}

/// One row of the quality-per-NFE table.
#[derive(Serialize, Debug, Clone)]
pub struct QualityRow {
    pub model: String,
    pub sampler: String,
    pub nfe: usize,
    pub cfg_scale: f64,
    pub fd: f64,
    pub class_accuracy: Option<f64>,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    /// Recall per class 0..9 (real digits of the class vs samples drawn for it).
    pub per_class_recall: Option<Vec<f64>>,
    pub ms_per_image: f64,
    pub command: String,
}

/// One row of the parity table.
#[derive(Serialize, Debug, Clone)]
pub struct ParityRow {
    pub model: String,
    pub precision: String,
    pub runtime: String,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub cosine: f64,
    pub passed: bool,
    pub command: String,
}

#[derive(Serialize, Debug, Default)]
pub struct Results {
    pub quality: Vec<QualityRow>,
    pub parity: Vec<ParityRow>,
    pub ref_real_fd: f64,
    pub ref_noise_fd: f64,
    /// Diversity of a disjoint real set of the rows' size (every row scores the same N).
    pub ref_real_diversity: Option<crate::eval::Diversity>,
    /// Images per quality row.
    pub images: usize,
}

/// True when `ckpt` holds a finished run of `steps` iterations.
fn finished(ckpt: &Path, steps: u64) -> bool {
    checkpoint::load_meta(ckpt)
        .map(|m| m.step >= steps)
        .unwrap_or(false)
}

/// The guidance interval (sigmas) of the DMD2 students' real score: guidance at the highest
/// noise levels is what costs the students their recall (the diversity ablation in the README).
/// A higher top buys class accuracy with recall; (0.3, 5] is the widest that keeps the 1-step
/// student's recall at 0.95x the teacher's (measured on two teachers).
pub const CFG_INTERVAL: [f64; 2] = [0.3, 5.0];

/// The TDM student's guidance interval: its recall has room to spare (1.16x the teacher's at
/// (0.3, 10]), so it guides up to sigma 10 for class accuracy (86.2% -> 88.5%) at the same FD,
/// still at its best at 4 steps (the ablation).
pub const TDM_CFG_INTERVAL: [f64; 2] = [0.3, 10.0];

/// The DMD2 students' GAN weights (student, head): 10x DMD2's published ImageNet weights
/// (3e-3, 1e-2). The GAN term on real digits lifts recall and FD in 1500 iterations (1-step: FD
/// 29.8 -> 26.8, recall 0.739 -> 0.763; the diversity ablation in the README).
pub const GAN_WEIGHTS: (f64, f64) = (3e-2, 1e-1);

/// The 4-step DMD2 student's GAN noise range: images reach the head noised only below grid
/// timestep 250 (sigma 0.17, the last step's own phase), so the head judges the fine detail the
/// last step adds; with the whole grid the student was at its best at 3 steps (the ablation).
pub const FOUR_STEP_GAN_MAX_TIMESTEP: usize = 250;

/// A finished stage is reused only when it was trained with the settings this pipeline would
/// train it with (older defaults, or a run of another command in the same folder, are not).
fn same_stage(out: &Path, name: &str, config_toml: &str) -> Result<()> {
    let changes = crate::train::checks::config_changes(&RunDir::new(out)?, config_toml)?;
    anyhow::ensure!(
        changes.is_empty(),
        "pipeline: {} holds a finished {name} trained with other settings than this pipeline's ({}); \
         use another --out, or move it away to train it again",
        out.display(),
        changes.join(", ")
    );
    Ok(())
}

fn resumable(ckpt: &Path) -> bool {
    ckpt.join(crate::train::TRAIN_STATE_FILE).exists()
}

/// The distillation stages' shared settings.
fn run_config(steps: u64) -> crate::train::distill::RunConfig {
    crate::train::distill::RunConfig {
        train_steps: steps,
        eval_every: (steps / 8).max(1),
        eval_n: 500,
        sample_every: (steps / 4).max(1),
        ..Default::default()
    }
}

fn write_results(out: &Path, res: &Results) -> Result<()> {
    checkpoint::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(res)?.as_bytes(),
    )?;
    checkpoint::write_atomic(&out.join("results.md"), markdown(res).as_bytes())
}

/// Runs every stage; returns the results (also written to `results.json` and `results.md`).
pub fn run(o: &PipelineJob, dev: &Device) -> Result<Results> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let show = !o.quiet && {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal()
    };
    // 1. Teacher.
    let mut tjob = TeacherJob {
        data: o.data.clone(),
        out: o.out.join("teacher"),
        show_progress: show,
        ..Default::default()
    };
    if let Some(s) = o.teacher_steps {
        tjob.config.train_steps = s;
    }
    if let Some(p) = &o.parameterisation {
        tjob.config.parameterisation = p.clone();
    }
    if let Some(p) = o.prediction {
        tjob.config.prediction = p;
    }
    let tcfg = tjob.config.clone();
    let teacher = RunDir::new(&tjob.out)?.checkpoint();
    if finished(&teacher, tcfg.train_steps) {
        // A finished teacher of another parameterisation must not be reused silently.
        let have = checkpoint::load_meta(&teacher)?.model.parameterisation;
        anyhow::ensure!(
            have.name() == tcfg.parameterisation,
            "{} is a finished {} teacher, but this pipeline asks for {}: use another --out",
            teacher.display(),
            have.name(),
            tcfg.parameterisation
        );
        eprintln!("pipeline: teacher done ({}), skipping", teacher.display());
    } else {
        tjob.resume = resumable(&teacher);
        tjob.run(dev)?;
    }
    // 2. Students.
    let mut students: Vec<(&str, PathBuf)> = Vec::new();
    let stage = |name: &str| o.out.join(name);
    // The students learn the teacher's guided distribution at the teacher's own scale.
    let common = |defaults: DistillCommon, steps: u64, timesteps: Vec<usize>| DistillCommon {
        teacher: teacher.clone(),
        run: run_config(steps),
        timesteps,
        cfg_scale: tcfg.cfg_scale,
        ..defaults
    };
    let dmd2 = |name: &str, ts: Vec<usize>, ratio: u64, interval, gan_top| -> Result<PathBuf> {
        let out = stage(name);
        let config = Dmd2Config {
            common: DistillCommon {
                cfg_interval: interval,
                ..common(Dmd2Config::default().common, o.dmd2_steps, ts)
            },
            dfake_gen_update_ratio: ratio,
            gan_generator_weight: GAN_WEIGHTS.0,
            gan_critic_weight: GAN_WEIGHTS.1,
            gan_max_timestep: gan_top,
            ..Default::default()
        };
        if finished(&out.join("checkpoint"), o.dmd2_steps) {
            same_stage(&out, name, &toml::to_string(&config)?)?;
            eprintln!("pipeline: {name} done, skipping");
            return Ok(out.join("checkpoint"));
        }
        let job = Dmd2Job {
            config,
            data: o.data.clone(),
            limit: None,
            prompts: None,
            resume: resumable(&out.join("checkpoint")),
            allow_resume_change: false,
            out,
            show_progress: show,
        };
        job.run(dev)
    };
    let four = vec![999, 749, 499, 249];
    let interval = Some(CFG_INTERVAL);
    let whole = Dmd2Config::default().gan_max_timestep;
    students.push((
        "dmd2_1step",
        dmd2("dmd2_1step", vec![999], 5, interval, whole)?,
    ));
    if o.dmd2_four_step {
        let top = FOUR_STEP_GAN_MAX_TIMESTEP;
        students.push((
            "dmd2_4step",
            dmd2("dmd2_4step", four.clone(), 5, interval, top)?,
        ));
    }
    let out = stage("tdm_4step");
    let config = TdmConfig {
        common: DistillCommon {
            cfg_interval: Some(TDM_CFG_INTERVAL),
            ..common(TdmConfig::default().common, o.tdm_steps, four)
        },
        ..Default::default()
    };
    let tdm_ckpt = if finished(&out.join("checkpoint"), o.tdm_steps) {
        same_stage(&out, "tdm_4step", &toml::to_string(&config)?)?;
        eprintln!("pipeline: tdm_4step done, skipping");
        out.join("checkpoint")
    } else {
        let job = TdmJob {
            config,
            prompts: None,
            resume: resumable(&out.join("checkpoint")),
            allow_resume_change: false,
            out: out.clone(),
            show_progress: show,
        };
        job.run(dev)?
    };
    students.push(("tdm_4step", tdm_ckpt));
    // 3. Quality per NFE.
    let cache = crate::eval::classifier::default_cache_dir();
    let ev = crate::eval::Evaluator::new(&cache, dev, show)?;
    let mut res = Results {
        ref_real_fd: ev.ref_real_fd,
        ref_noise_fd: ev.ref_noise_fd,
        images: o.eval_n,
        ..Default::default()
    };
    let cfg = tcfg.cfg_scale;
    // The teacher at its own 35 NFE, then its few-step samplers for comparison.
    let teacher_samplers = [
        (SamplerKind::Heun, 18),
        (SamplerKind::Heun, 3),
        (SamplerKind::Euler, 4),
        (SamplerKind::Euler, 2),
        (SamplerKind::Euler, 1),
    ];
    let mut evals: Vec<(String, PathBuf, Option<SamplerKind>, Option<usize>, f64)> =
        teacher_samplers
            .iter()
            .map(|&(s, n)| ("teacher".into(), teacher.clone(), Some(s), Some(n), cfg))
            .collect();
    for (name, ckpt) in &students {
        let steps = checkpoint::load_meta(ckpt)?.generator.steps;
        for k in (1..=steps).rev().filter(|k| *k == steps || *k <= 2) {
            evals.push((name.to_string(), ckpt.clone(), None, Some(k), 1.0));
        }
    }
    for (name, ckpt, sampler, steps, cfg) in evals {
        let ov = SamplerOverride {
            sampler,
            sample_steps: steps,
            cfg_scale: Some(cfg),
        };
        let (r, spec, ms) = eval_checkpoint(&ev, &ckpt, &ov, o.eval_n, 1, dev)?;
        let sname = format!("{:?}", spec.sampler).to_lowercase();
        res.ref_real_diversity = Some(r.diversity.real_vs_real);
        let dv = &r.diversity.samples;
        let row = QualityRow {
            model: name,
            sampler: sname.clone(),
            nfe: spec.nfe(),
            cfg_scale: spec.cfg_scale,
            fd: r.fd,
            class_accuracy: r.class_accuracy,
            precision: dv.precision,
            recall: dv.recall,
            density: dv.density,
            coverage: dv.coverage,
            per_class_recall: r.diversity.per_class_recall.clone(),
            ms_per_image: ms,
            command: match sampler {
                Some(_) => format!(
                    "distill eval {} --sampler {sname} --sample-steps {} --cfg-scale {} --n {}",
                    ckpt.display(),
                    spec.steps,
                    spec.cfg_scale,
                    o.eval_n
                ),
                None => format!(
                    "distill eval {} --sample-steps {} --n {}",
                    ckpt.display(),
                    spec.steps,
                    o.eval_n
                ),
            },
        };
        eprintln!(
            "{:>10} {:>7} NFE {:>2} cfg {:.1}: FD {:7.2}, class accuracy {:5.1}%, precision {:.3}, recall {:.3}, density {:.3}, coverage {:.3}, {:.2} ms/image",
            row.model,
            row.sampler,
            row.nfe,
            row.cfg_scale,
            row.fd,
            100.0 * row.class_accuracy.unwrap_or(f64::NAN),
            row.precision,
            row.recall,
            row.density,
            row.coverage,
            row.ms_per_image
        );
        res.quality.push(row);
    }
    // Quality first on disk: the export stage below is long.
    write_results(&o.out, &res)?;
    // 4. Export + parity.
    if o.export {
        let mut targets: Vec<(String, PathBuf)> = students
            .iter()
            .map(|(n, c)| (n.to_string(), c.clone()))
            .collect();
        targets.push(("teacher".into(), teacher.clone()));
        for (name, ckpt) in targets {
            for precision in [export::Precision::Fp32, export::Precision::Fp16] {
                let dir = o.out.join("export").join(&name);
                let path = ExportJob::generator(&ckpt, &dir, precision).write_onnx()?;
                // tract's f16 kernels are scalar and the teacher's generator is 35 NFE unrolled:
                // those get fewer (still seeded, all batch sizes) cases.
                let cases = if name == "teacher" || precision == export::Precision::Fp16 {
                    8
                } else {
                    32
                };
                let mut v = ValidateJob::new(&path, &ckpt);
                v.cases = cases;
                // tract spends over 9 minutes (2 cores) preparing the teacher's unrolled 70-call
                // graph before its first run: the teacher is checked in ONNX Runtime only.
                let ort_only = name == "teacher";
                if ort_only {
                    v.runtimes = Some(vec!["onnxruntime".into()]);
                }
                let runtimes = if ort_only {
                    " --runtimes onnxruntime"
                } else {
                    ""
                };
                let r = v.report()?;
                eprintln!("{r}");
                for m in &r.metrics {
                    res.parity.push(ParityRow {
                        model: name.clone(),
                        precision: precision.name().to_string(),
                        runtime: m.runtime.clone(),
                        max_abs: m.max_abs,
                        mean_abs: m.mean_abs,
                        cosine: m.cosine,
                        passed: m.passed,
                        command: format!(
                            "distill export {} -o {} --precision {} && distill validate {} --reference {} --cases {cases}{runtimes}",
                            ckpt.display(),
                            path.parent().unwrap_or(Path::new(".")).display(),
                            precision.name(),
                            path.display(),
                            ckpt.display()
                        ),
                    });
                }
            }
        }
    }
    write_results(&o.out, &res)?;
    crate::sample::class_grid(
        &checkpoint::load(&teacher, dev)?.0,
        &checkpoint::load_meta(&teacher)?.generator,
        10,
        0,
        dev,
        &o.out.join("teacher_samples.png"),
    )?;
    for (name, ckpt) in &students {
        crate::sample::class_grid(
            &checkpoint::load(ckpt, dev)?.0,
            &checkpoint::load_meta(ckpt)?.generator,
            10,
            0,
            dev,
            &o.out.join(format!("{name}_samples.png")),
        )?;
    }
    eprintln!(
        "pipeline: results in {} and {}",
        o.out.join("results.md").display(),
        o.out.join("results.json").display()
    );
    for f in parity_failures(&res) {
        eprintln!("pipeline: warning: parity FAILED: {f}");
    }
    Ok(res)
}

/// The parity rows past their tolerance, one line each (model, precision, runtime, error, and the
/// command that reruns it): the last lines a user sees, so a FAIL in the table is not missed.
pub fn parity_failures(res: &Results) -> Vec<String> {
    res.parity
        .iter()
        .filter(|p| !p.passed)
        .map(|p| {
            format!(
                "{} {} in {} (max abs {:.3e}, mean abs {:.3e}): {}",
                p.model, p.precision, p.runtime, p.max_abs, p.mean_abs, p.command
            )
        })
        .collect()
}

/// An error naming every failed parity row, after the results are written: a pipeline whose
/// export does not match its students must not exit 0 (CI runs it as a gate).
/// It is [`super::Failure::ValidationFailed`] (exit 3, as `distill validate`).
pub fn check_parity(res: &Results, out: &Path) -> Result<()> {
    let f = parity_failures(res);
    if f.is_empty() {
        return Ok(());
    }
    Err(super::Failure::ValidationFailed(format!(
        "pipeline: {} of {} parity rows FAILED (results kept in {}): {}",
        f.len(),
        res.parity.len(),
        out.display(),
        f.join("; ")
    ))
    .into())
}

/// `0.41 (8)`: the lowest per-class recall and its class.
fn lowest_class_recall(per: Option<&[f64]>) -> String {
    per.and_then(|p| {
        p.iter()
            .enumerate()
            .filter(|(_, r)| !r.is_nan())
            .min_by(|a, b| a.1.total_cmp(b.1))
    })
    .map(|(c, r)| format!("{r:.2} ({c})"))
    .unwrap_or_default()
}

/// The results as the README's markdown tables.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let diversity_ref = r
        .ref_real_diversity
        .map(|d| {
            format!(
                "; precision / recall / density / coverage (k = 3) of real vs real at the same N: {:.3} / {:.3} / {:.3} / {:.3}",
                d.precision, d.recall, d.density, d.coverage
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "Quality per NFE ({} images each; FD references: real vs real {:.2}, Gaussian noise {:.1}{diversity_ref})\n",
        r.images,
        r.ref_real_fd,
        r.ref_noise_fd
    );
    let _ = writeln!(
        s,
        "| model | sampler | NFE | CFG | FD | class accuracy | precision | recall | density | coverage | lowest class recall | ms/image (candle CPU) | command |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for q in &r.quality {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.2} | `{}` |",
            q.model,
            q.sampler,
            q.nfe,
            q.cfg_scale,
            q.fd,
            q.class_accuracy
                .map(|a| format!("{:.1}%", 100.0 * a))
                .unwrap_or_default(),
            q.precision,
            q.recall,
            q.density,
            q.coverage,
            lowest_class_recall(q.per_class_recall.as_deref()),
            q.ms_per_image,
            q.command
        );
    }
    if !r.parity.is_empty() {
        let _ = writeln!(
            s,
            "\nParity of the exported generators vs candle (seeded input sets, batches 1/7/4/2; cases per row in its command)\n\n| model | precision | runtime | max abs | mean abs | cosine | result | command |\n|---|---|---|---|---|---|---|---|"
        );
        for p in &r.parity {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2e} | {:.2e} | {:.7} | {} | `{}` |",
                p.model,
                p.precision,
                p.runtime,
                p.max_abs,
                p.mean_abs,
                p.cosine,
                if p.passed { "PASS" } else { "FAIL" },
                p.command
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_the_diversity_columns_and_reference() {
        let row = QualityRow {
            model: "dmd2_1step".into(),
            sampler: "student".into(),
            nfe: 1,
            cfg_scale: 1.0,
            fd: 29.1,
            class_accuracy: Some(0.97),
            precision: 0.862,
            recall: 0.568,
            density: 1.1,
            coverage: 0.7,
            per_class_recall: Some((0..10).map(|c| if c == 8 { 0.41 } else { 0.6 }).collect()),
            ms_per_image: 1.74,
            command: "distill eval x --steps 1 --n 1000".into(),
        };
        let r = Results {
            quality: vec![row],
            ref_real_fd: 2.04,
            ref_noise_fd: 2100.7,
            ref_real_diversity: Some(crate::eval::Diversity {
                precision: 0.9,
                recall: 0.91,
                density: 1.0,
                coverage: 0.95,
            }),
            images: 1000,
            ..Default::default()
        };
        let md = markdown(&r);
        assert!(md.contains("| FD | class accuracy | precision | recall | density | coverage | lowest class recall |"), "{md}");
        assert!(
            md.contains("| 29.10 | 97.0% | 0.862 | 0.568 | 1.100 | 0.700 | 0.41 (8) | 1.74 |"),
            "{md}"
        );
        assert!(
            md.contains("real vs real at the same N: 0.900 / 0.910 / 1.000 / 0.950"),
            "{md}"
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["quality"][0]["recall"], 0.568);
        assert_eq!(j["ref_real_diversity"]["coverage"], 0.95);
    }

    #[test]
    fn parity_failures_name_only_the_failed_rows() {
        let row = |runtime: &str, passed: bool| ParityRow {
            model: "dmd2_4step".into(),
            precision: "fp16".into(),
            runtime: runtime.into(),
            max_abs: if passed { 6.6e-3 } else { 0.133 },
            mean_abs: 7e-4,
            cosine: 0.99999,
            passed,
            command: "distill validate g.onnx --reference c".into(),
        };
        let mut r = Results::default();
        assert!(parity_failures(&r).is_empty());
        r.parity = vec![row("tract", false), row("onnxruntime", true)];
        let f = parity_failures(&r);
        assert_eq!(f.len(), 1, "{f:?}");
        let e = check_parity(&r, Path::new("runs/p")).unwrap_err();
        assert_eq!(crate::jobs::exit_code(&e), 3);
        let e = e.to_string();
        assert!(
            e.contains("1 of 2 parity rows FAILED") && e.contains("runs/p"),
            "{e}"
        );
        assert!(e.contains("dmd2_4step fp16 in tract"), "{e}");
        r.parity = vec![row("onnxruntime", true)];
        check_parity(&r, Path::new("runs/p")).unwrap();
        assert!(
            f[0].starts_with("dmd2_4step fp16 in tract (max abs 1.330e-1"),
            "{}",
            f[0]
        );
        assert!(
            f[0].ends_with("distill validate g.onnx --reference c"),
            "{}",
            f[0]
        );
    }
}
