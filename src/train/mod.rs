//! Training. Every method (`teacher`, `dmd2`, `tdm`) is a [`runner::Method`] driven by the one
//! loop in [`runner`]; `distill` holds what the distillation methods share; the machinery here
//! (run folders, deterministic data order and noise, metrics, progress) is shared by all;
//! [`zero`] shards the optimiser moments over data-parallel ranks (ZeRO-1, `--zero1`).

pub mod checks;
pub mod distill;
pub mod distill_config;
pub mod dmd2;
pub mod optim;
pub mod runner;
pub mod tdm;
pub mod teacher;
pub mod zero;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The resume state beside a run's checkpoint (weights, optimiser moments, EMA, step).
pub const TRAIN_STATE_FILE: &str = "train_state.safetensors";

/// A training run's folder: `checkpoint/` (the latest checkpoint + training state),
/// `metrics.jsonl` (one JSON object per logged step), `samples/` (PNG grids), `config.toml`.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root.join("samples"))
            .with_context(|| format!("creating run folder {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
}

pub use crate::rng::{randn, step_rng};

/// Which dataset items make up each step's batch: epoch-wise shuffles seeded by (seed, epoch), so
/// step `s` always sees the same items, with or without a resume in between.
pub struct DataOrder {
    n: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            cached: None,
        }
    }

    fn perm(&mut self, epoch: u64) -> &[usize] {
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut p: Vec<usize> = (0..self.n).collect();
            p.shuffle(&mut step_rng(self.seed, epoch, 0xDA7A));
            self.cached = Some((epoch, p));
        }
        &self.cached.as_ref().expect("just set").1
    }

    pub fn batch(&mut self, step: u64, batch: usize) -> Vec<usize> {
        (0..batch as u64)
            .map(|i| {
                let g = step * batch as u64 + i;
                let (epoch, pos) = (g / self.n as u64, (g % self.n as u64) as usize);
                self.perm(epoch)[pos]
            })
            .collect()
    }
}

/// Appends one JSON object per line; on resume, drops lines past the resumed step so the file
/// holds exactly one curve.
pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let Some(step) = resume_step {
            if let Ok(text) = std::fs::read_to_string(path) {
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step")?.as_u64())
                            .is_some_and(|s| s <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                crate::checkpoint::write_atomic(path, kept.as_bytes())?;
            }
        } else {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.file, "{line}").context("writing metrics (disk full?)")?;
        self.file.flush()?;
        Ok(())
    }
}

/// A progress bar with rate and ETA (hidden when `show` is false, e.g. in tests).
pub fn progress_bar(total: u64, start: u64, show: bool, what: &str) -> ProgressBar {
    let pb = if show {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}, {{per_sec}}] {{msg}}"))
            .expect("valid template"),
    );
    pb.set_position(start);
    pb
}

/// The variables of `varmap`, sorted by name (a deterministic order for init and optimisers).
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let mut vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Seeded PyTorch-default init of every variable in `varmap` (sorted by name; uniform
/// `+-1/sqrt(fan_in)`, label embeddings N(0, 1), norm layers 1 and 0). Candle's own initialisers
/// draw from an unseeded RNG; `stream` keeps different networks' draws apart.
pub fn seeded_init(
    varmap: &candle_nn::VarMap,
    seed: u64,
    stream: u64,
    device: &Device,
) -> Result<Vec<(String, candle_core::Var)>> {
    seeded_init_with(varmap, &mut step_rng(seed, 0, stream), device)
}

/// [`seeded_init`] drawing from `rng`.
pub fn seeded_init_with<R: Rng>(
    varmap: &candle_nn::VarMap,
    rng: &mut R,
    device: &Device,
) -> Result<Vec<(String, candle_core::Var)>> {
    let vars = sorted_vars(varmap);
    let shapes: std::collections::HashMap<String, Vec<usize>> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let is_norm = parent
            .rsplit('.')
            .next()
            .is_some_and(|p| p.starts_with("norm"));
        let values: Vec<f32> = if parent.ends_with("label_emb") {
            (0..n)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        } else if is_norm {
            vec![if leaf == "weight" { 1.0 } else { 0.0 }; n]
        } else {
            let wdims = if leaf == "bias" {
                shapes
                    .get(&format!("{parent}.weight"))
                    .cloned()
                    .unwrap_or(dims.clone())
            } else {
                dims.clone()
            };
            let fan_in: usize = wdims.iter().skip(1).product::<usize>().max(1);
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-b..b)).collect()
        };
        var.set(&Tensor::from_vec(values, dims, device)?)?;
    }
    Ok(vars)
}

/// Detached copies of variables, by name (what checkpoints store).
pub fn vars_to_tensors(
    vars: &[(String, candle_core::Var)],
) -> std::collections::HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Builds a denoiser for inference from a tensor map (EMA weights).
pub fn denoiser_from(
    cfg: &graphs::ModelConfig,
    w: std::collections::HashMap<String, Tensor>,
    device: &Device,
) -> Result<graphs::Denoiser> {
    crate::checkpoint::denoiser_from_tensors(cfg, w, device, "in-memory weights")
}

/// `curves.png` (the losses, log scale) and, when evaluated, `fd.png` in the run folder.
pub fn write_curves(run: &RunDir) -> Result<()> {
    let all = crate::plot::read_metrics(&run.metrics(), &[])?;
    let title = run.metrics().display().to_string();
    let losses: Vec<_> = all
        .iter()
        .filter(|s| s.name.starts_with("loss"))
        .cloned()
        .collect();
    if !losses.is_empty() {
        crate::plot::plot_png(&run.root.join("curves.png"), &title, &losses, true)?;
    }
    let fd: Vec<_> = all.iter().filter(|s| s.name == "fd").cloned().collect();
    if !fd.is_empty() {
        crate::plot::plot_png(&run.root.join("fd.png"), &title, &fd, false)?;
    }
    let div: Vec<_> = all
        .iter()
        .filter(|s| crate::eval::diversity::METRIC_NAMES.contains(&s.name.as_str()))
        .cloned()
        .collect();
    if !div.is_empty() {
        crate::plot::plot_png(&run.root.join("diversity.png"), &title, &div, false)?;
    }
    Ok(())
}
