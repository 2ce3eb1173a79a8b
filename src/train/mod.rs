//! Training loops. `teacher` trains the diffusion teacher; the machinery here (run folders,
//! deterministic data order and noise, metrics, progress) is shared by every trainer.

pub mod distill;
pub mod dmd2;
pub mod optim;
pub mod tdm;
pub mod teacher;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// An RNG for one purpose (`stream`) at one step: runs are reproducible and a resumed run draws
/// exactly what the uninterrupted run would have.
pub fn step_rng(seed: u64, step: u64, stream: u64) -> rand::rngs::StdRng {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ stream.wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(mix)
}

/// Unit Gaussian noise of `shape`.
pub fn randn<R: Rng>(rng: &mut R, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

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

/// Stops a run on a non-finite loss with an error that says what is kept.
pub fn check_finite(name: &str, value: f64, step: u64, ckpt: &Path) -> Result<()> {
    if !value.is_finite() {
        anyhow::bail!(
            "{name} is {value} at step {step}: training diverged and was stopped; the last good checkpoint is kept in {} (try a lower --lr or a smaller --grad-clip, then --resume)",
            ckpt.display()
        );
    }
    Ok(())
}
