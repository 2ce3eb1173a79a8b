//! `train teacher`, `train dmd2`, `train tdm`: a method's config plus where the data and the run
//! folder are.

use crate::checks;
use crate::train::checks as train_checks;
use crate::train::distill::{self, DistillCommon, DistillOutcome, Method, RunSpec, Teacher};
use crate::train::dmd2::{Dmd2, Dmd2Config};
use crate::train::tdm::{Tdm, TdmConfig};
use crate::train::teacher::{self, TeacherConfig, TeacherOutcome};
use crate::train::{RunDir, TRAIN_STATE_FILE};
use anyhow::{Context, Result};
use candle_core::Device;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A config from a TOML file (any subset of its fields; the rest at their defaults), or the
/// defaults when there is no file.
pub fn read_config<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            for note in deprecated_keys(&text) {
                eprintln!("note: {}: {note}", p.display());
            }
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
        None => Ok(T::default()),
    }
}

/// Config keys renamed for one vocabulary: still read (serde aliases), with a note.
pub const RENAMED_KEYS: &[(&str, &str)] = &[
    ("real_guidance_scale", "cfg_scale"),
    // Training iterations (no config table has another `steps`: sampling is `sample_steps`).
    ("steps", "train_steps"),
];

/// A note per renamed key `text` still uses (at any table level).
pub fn deprecated_keys(text: &str) -> Vec<String> {
    fn walk(v: &toml::Value, path: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                if let Some((_, new)) = RENAMED_KEYS.iter().find(|(old, _)| old == k) {
                    out.push(format!("`{path}{k}` is deprecated, use `{path}{new}`"));
                }
                walk(v, &format!("{path}{k}."), out);
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = text.parse::<toml::Value>() {
        walk(&v, "", &mut out);
    }
    out
}

/// Loads the training data (default: embedded MNIST) and brings it to the model's resolution.
pub fn load_data(
    path: Option<&Path>,
    resolution: usize,
    limit: Option<usize>,
) -> Result<crate::data::Dataset> {
    if limit == Some(0) {
        anyhow::bail!("--limit 0 leaves no images to train on (use --limit 1 or more)");
    }
    let d = crate::data::load_at_resolution(path, Some(resolution))?;
    let d = if let Some(n) = limit { d.subset(n) } else { d };
    Ok(d.to_resolution(resolution)?)
}

/// `distill train teacher`.
#[derive(Clone, Debug)]
pub struct TeacherJob {
    pub config: TeacherConfig,
    /// Training data (default: the embedded 10k MNIST digits).
    pub data: Option<PathBuf>,
    /// Train on the first N images only.
    pub limit: Option<usize>,
    /// The run folder.
    pub out: PathBuf,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
    /// With `resume`: continue even though the config or the data differ from the run's start.
    pub allow_resume_change: bool,
    pub show_progress: bool,
}

impl TeacherJob {
    pub const DEFAULT_OUT: &'static str = "runs/teacher";
}

impl Default for TeacherJob {
    fn default() -> Self {
        Self {
            config: TeacherConfig::default(),
            data: None,
            limit: None,
            out: PathBuf::from(Self::DEFAULT_OUT),
            resume: false,
            allow_resume_change: false,
            show_progress: false,
        }
    }
}

impl TeacherJob {
    pub fn run(&self, dev: &Device) -> Result<TeacherOutcome> {
        let mut cfg = self.config.clone();
        train_checks::teacher(&cfg)?;
        let data = load_data(self.data.as_deref(), cfg.model.resolution, self.limit)?;
        checks::labels_fit(&data, cfg.model.num_classes)?;
        cfg.model.channels = data.channels;
        cfg.model.num_classes = data.num_classes;
        let run = RunDir::new(&self.out)?;
        let toml_cfg = toml::to_string(&cfg)?;
        let allow = self.allow_resume_change;
        train_checks::resume(
            &run,
            TRAIN_STATE_FILE,
            &toml_cfg,
            Some(&data),
            self.resume,
            allow,
        )?;
        eprintln!(
            "teacher: {} images ({}x{}x{}, {} classes) from {}; {} params; {} steps at batch {} -> {}",
            data.len(),
            data.channels,
            data.height,
            data.width,
            data.num_classes,
            data.source,
            {
                let (_, den, _) = teacher::init_trainable(&cfg.model_config()?, cfg.seed, dev)?;
                graphs::params::count(&den)
            },
            cfg.train_steps,
            cfg.batch_size,
            run.root.display()
        );
        let out = teacher::train(&cfg, &data, &run, self.resume, self.show_progress, dev)?;
        if !crate::parallel::is_rank0() {
            // Rank 0 reports the run (the others log no metrics: their final loss is unknown).
            return Ok(out);
        }
        eprintln!(
            "teacher: done, {} steps in {:.0}s, final loss {:.4}; checkpoint {}; samples {}",
            out.train_steps,
            out.seconds,
            out.final_loss,
            out.checkpoint.display(),
            run.samples().display()
        );
        Ok(out)
    }
}

/// The evaluator for in-training scores, when asked for and the data is MNIST-shaped.
fn maybe_evaluator(
    eval_every: u64,
    teacher: &Teacher,
    dev: &Device,
    show_progress: bool,
) -> Result<Option<crate::eval::Evaluator>> {
    let u = &teacher.meta.model;
    if eval_every == 0 {
        return Ok(None);
    }
    let (c, r, k) = (u.channels(), u.resolution(), u.num_classes());
    if (c, r, k) != (1, 32, 10) {
        eprintln!(
            "note: --eval-every ignored: the evaluation classifier scores 1x32x32 digits with 10 classes, the teacher makes {c}x{r}x{r} with {k} classes"
        );
        return Ok(None);
    }
    let dir = crate::eval::classifier::default_cache_dir();
    Ok(Some(crate::eval::Evaluator::new(&dir, dev, show_progress)?))
}

fn report(what: &str, out: &DistillOutcome, run: &RunDir) {
    if !crate::parallel::is_rank0() {
        // Rank 0 reports the run (the others log no metrics).
        return;
    }
    let last: Vec<String> = out
        .last
        .iter()
        .filter(|(k, _)| {
            k.starts_with("loss")
                || *k == "fd"
                || *k == "class_accuracy"
                || crate::eval::diversity::METRIC_NAMES.contains(&k.as_str())
        })
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    eprintln!(
        "{what}: done, {} iterations ({} student updates) in {:.0}s; {}; checkpoint {}; samples {}; metrics {}",
        out.train_steps,
        out.student_updates,
        out.seconds,
        last.join(", "),
        out.checkpoint.display(),
        run.samples().display(),
        run.metrics().display()
    );
}

/// `distill train dmd2`.
#[derive(Clone, Debug)]
pub struct Dmd2Job {
    pub config: Dmd2Config,
    /// Real images for the GAN head (default: the embedded MNIST digits).
    pub data: Option<PathBuf>,
    /// Use the first N real images only.
    pub limit: Option<usize>,
    /// A text-to-image pipeline teacher's prompts (one a line); `data` is then an image+caption
    /// folder (needed by the GAN term only).
    pub prompts: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    /// With `resume`: continue even though the config or the data differ from the run's start.
    pub allow_resume_change: bool,
    pub show_progress: bool,
}

impl Dmd2Job {
    pub const DEFAULT_OUT: &'static str = "runs/dmd2";
}

impl Default for Dmd2Job {
    fn default() -> Self {
        Self {
            config: Dmd2Config::default(),
            data: None,
            limit: None,
            prompts: None,
            out: PathBuf::from(Self::DEFAULT_OUT),
            resume: false,
            allow_resume_change: false,
            show_progress: false,
        }
    }
}

impl Dmd2Job {
    /// Trains; returns the checkpoint folder.
    pub fn run(&self, dev: &Device) -> Result<PathBuf> {
        let cfg = &self.config;
        train_checks::dmd2(cfg)?;
        let dir = &cfg.common.teacher;
        let (mut teacher, data, captions) = match &self.prompts {
            None => {
                let teacher = Teacher::load(dir, dev)?;
                let res = teacher.meta.model.resolution();
                let data = load_data(self.data.as_deref(), res, self.limit)?;
                (teacher, data, None)
            }
            Some(p) => {
                let teacher = Teacher::load_text(dir, p, dev)?;
                match (&self.data, cfg.gan) {
                    (Some(d), true) => {
                        let (data, caps) = teacher.encode_captioned(d, self.limit)?;
                        (teacher, data, Some(caps))
                    }
                    (None, true) => anyhow::bail!(
                        "DMD2's GAN term compares generated latents with real ones: with --prompts \
                         give --data an image+caption folder (NAME.png + NAME.txt), or turn the \
                         GAN term off (--no-gan)"
                    ),
                    (Some(_), false) => anyhow::bail!(
                        "--data: with --no-gan a text-to-image DMD2 run reads no real images"
                    ),
                    (None, false) => (teacher, crate::data::Dataset::empty(), None),
                }
            }
        };
        if let Some(g) = &cfg.common.autoguidance {
            teacher.load_guide(g, dev)?;
        }
        let mut m = Dmd2::new(cfg.clone(), &teacher, &data, dev)?;
        if let Some(c) = &captions {
            m = m.with_captions(c);
        }
        let about = format!(
            "{}-step student (sigmas {:?}) from {}; {} iterations at batch {}, student updated every {}; GAN {}",
            cfg.common.timesteps.len(),
            cfg.sigmas(&graphs::NoiseGrid::new(&teacher.meta.model.parameterisation))
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>(),
            teacher.dir.display(),
            cfg.common.run.train_steps,
            cfg.common.run.batch_size,
            cfg.dfake_gen_update_ratio,
            if cfg.gan { "on" } else { "off" },
        );
        let job = DistillRun {
            what: "dmd2",
            out: &self.out,
            resume: self.resume,
            allow_resume_change: self.allow_resume_change,
            show_progress: self.show_progress,
        };
        let rekey = |t: &str| toml::from_str::<Dmd2Config>(t)?.resume_key();
        let (toml_cfg, key) = (toml::to_string(cfg)?, cfg.resume_key()?);
        job.train(
            &mut m,
            &cfg.common,
            toml_cfg,
            key,
            &rekey,
            &teacher,
            Some(&data),
            &about,
            dev,
        )
    }
}

/// What [`Dmd2Job`] and [`TdmJob`] share besides their configs: the run folder and flags.
struct DistillRun<'a> {
    what: &'static str,
    out: &'a Path,
    resume: bool,
    allow_resume_change: bool,
    show_progress: bool,
}

impl DistillRun<'_> {
    /// Checks a resume against the run folder, then trains `m` in it and reports; returns the
    /// checkpoint folder. `config_toml` is the method's full config, `about` a line describing it.
    #[allow(clippy::too_many_arguments)]
    fn train<M: Method>(
        &self,
        m: &mut M,
        common: &DistillCommon,
        config_toml: String,
        resume_key: String,
        rekey: &dyn Fn(&str) -> Result<String>,
        teacher: &Teacher,
        data: Option<&crate::data::Dataset>,
        about: &str,
        dev: &Device,
    ) -> Result<PathBuf> {
        let run = RunDir::new(self.out)?;
        let allow = self.allow_resume_change;
        train_checks::resume(
            &run,
            TRAIN_STATE_FILE,
            &config_toml,
            data,
            self.resume,
            allow,
        )?;
        let ev = maybe_evaluator(common.run.eval_every, teacher, dev, self.show_progress)?;
        let trainable: usize = m.student_vars().iter().map(|(_, v)| v.elem_count()).sum();
        eprintln!(
            "{}: {about}; student: {trainable} trainable parameters{} -> {}",
            self.what,
            if common.lora.is_off() {
                String::new()
            } else {
                format!(
                    " (LoRA rank {}, scale {})",
                    common.lora.rank,
                    common.lora.scale()
                )
            },
            run.root.display()
        );
        let rs = RunSpec {
            cfg: &common.run,
            config_toml,
            resume_key,
            rekey: Some(rekey),
            teacher: Some((&teacher.sha256, &teacher.dir)),
            resume: self.resume,
            show_progress: self.show_progress,
            evaluator: ev.as_ref(),
            device: dev,
        };
        let out = distill::run(m, &rs, &run)?;
        report(self.what, &out, &run);
        Ok(out.checkpoint)
    }
}

/// `distill train tdm`.
#[derive(Clone, Debug)]
pub struct TdmJob {
    pub config: TdmConfig,
    /// A text-to-image pipeline teacher's prompts (one a line): each sample is conditioned on
    /// one of them, drawn from its own stream.
    pub prompts: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    /// With `resume`: continue even though the config or the data differ from the run's start.
    pub allow_resume_change: bool,
    pub show_progress: bool,
}

impl TdmJob {
    pub const DEFAULT_OUT: &'static str = "runs/tdm";
}

impl Default for TdmJob {
    fn default() -> Self {
        Self {
            config: TdmConfig::default(),
            prompts: None,
            out: PathBuf::from(Self::DEFAULT_OUT),
            resume: false,
            allow_resume_change: false,
            show_progress: false,
        }
    }
}

impl TdmJob {
    /// Trains; returns the checkpoint folder.
    pub fn run(&self, dev: &Device) -> Result<PathBuf> {
        train_checks::tdm(&self.config)?;
        let dir = &self.config.common.teacher;
        let mut teacher = match &self.prompts {
            None => Teacher::load(dir, dev)?,
            Some(p) => Teacher::load_text(dir, p, dev)?,
        };
        if let Some(g) = &self.config.common.autoguidance {
            teacher.load_guide(g, dev)?;
        }
        let mut m = Tdm::new(self.config.clone(), &teacher, dev)?;
        // `Tdm::new` completes the config (the cosine decay length): store that one.
        let cfg = m.cfg.clone();
        let about = format!(
            "{}-step student (timesteps {:?}) from {}; {} iterations at batch {} x {}; noise mode {:?}",
            cfg.common.timesteps.len(),
            cfg.common.timesteps,
            teacher.dir.display(),
            cfg.common.run.train_steps,
            cfg.common.run.batch_size,
            cfg.grad_accum,
            cfg.noise_mode,
        );
        let job = DistillRun {
            what: "tdm",
            out: &self.out,
            resume: self.resume,
            allow_resume_change: self.allow_resume_change,
            show_progress: self.show_progress,
        };
        let rekey = |t: &str| toml::from_str::<TdmConfig>(t)?.resume_key();
        let (toml_cfg, key) = (toml::to_string(&cfg)?, cfg.resume_key()?);
        job.train(
            &mut m,
            &cfg.common,
            toml_cfg,
            key,
            &rekey,
            &teacher,
            None,
            &about,
            dev,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_keys_are_read_with_a_note() {
        let old = "steps = 7\n";
        assert_eq!(
            deprecated_keys(old),
            ["`steps` is deprecated, use `train_steps`"]
        );
        assert_eq!(toml::from_str::<TeacherConfig>(old).unwrap().train_steps, 7);
        let old = "cfg_scale = 2.0\n[run]\nsteps = 9\n";
        assert_eq!(
            deprecated_keys(old),
            ["`run.steps` is deprecated, use `run.train_steps`"]
        );
        assert_eq!(
            toml::from_str::<Dmd2Config>(old)
                .unwrap()
                .common
                .run
                .train_steps,
            9
        );
        assert_eq!(
            toml::from_str::<TdmConfig>(old)
                .unwrap()
                .common
                .run
                .train_steps,
            9
        );
        // What a run writes uses the new name only.
        let new = toml::to_string(&Dmd2Config::default()).unwrap();
        assert!(deprecated_keys(&new).is_empty(), "{new}");
        assert!(new.contains("train_steps = "), "{new}");
    }
}
