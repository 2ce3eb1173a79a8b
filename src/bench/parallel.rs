//! `distill bench --what parallel`: data-parallel teacher training on this machine, N ranks x 1
//! thread (`mpirun -np N distill train teacher`) against 1 process x N threads at the same global
//! batch: images/s of each, and the gradient all-reduce's time and bytes per step (from the
//! ranks' `allreduce_s` / `allreduce_mb` metrics); then the N ranks again with `--zero1`, and the
//! optimiser-moment bytes rank 0 holds in each (`optim_moments_mb`).
//!
//! Each configuration is a real training run in a temporary folder, `2 * iters` iterations with a
//! metrics line every `iters`: the first window is the warm-up, the second is timed.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to run.
#[derive(Clone, Debug)]
pub struct ParallelBenchOptions {
    /// UNet preset of `distill train teacher --preset` (`tiny`, `small`, `bench`).
    pub preset: String,
    /// Global batch (images per step over all ranks).
    pub batch: usize,
    /// Timed iterations (after as many untimed ones).
    pub iters: usize,
    /// Ranks (and threads of the one-process run).
    pub ranks: usize,
    /// The distill binary (default: this executable).
    pub exe: Option<PathBuf>,
}

/// One configuration's timed window.
#[derive(Clone, Debug, Serialize)]
pub struct ParallelRun {
    pub ranks: usize,
    pub threads_per_rank: usize,
    pub it_per_s: f64,
    pub images_per_s: f64,
    /// Gradient all-reduce per iteration, seconds (rank 0's, including waiting for the others).
    pub allreduce_s: Option<f64>,
    /// Gradient bytes all-reduced per iteration, MB (under ZeRO-1: the reduce-scatter's gradients
    /// plus the all-gather's parameters).
    pub allreduce_mb: Option<f64>,
    /// Whether the moments were sharded (`--zero1`).
    pub zero1: bool,
    /// AdamW moments held by rank 0, MB (multi-rank runs).
    pub optim_moments_mb: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ParallelReport {
    pub preset: String,
    pub batch: usize,
    pub iters: usize,
    pub single: ParallelRun,
    pub ranks: ParallelRun,
    /// The N ranks with ZeRO-1.
    pub zero1: ParallelRun,
    pub engine: String,
}

impl fmt::Display for ParallelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "data-parallel teacher training, preset {}, global batch {}, {} timed iterations ({})",
            self.preset, self.batch, self.iters, self.engine
        )?;
        for r in [&self.single, &self.ranks, &self.zero1] {
            write!(
                f,
                "  {} rank(s) x {} thread(s){}: {:8.1} images/s ({:.2} it/s)",
                r.ranks,
                r.threads_per_rank,
                if r.zero1 { " --zero1" } else { "" },
                r.images_per_s,
                r.it_per_s
            )?;
            if let (Some(s), Some(mb)) = (r.allreduce_s, r.allreduce_mb) {
                let what = if r.zero1 {
                    "reduce-scatter + all-gather"
                } else {
                    "all-reduce"
                };
                write!(
                    f,
                    "; {what} {:.2} ms and {:.2} MB per iteration ({:.0}% of it)",
                    s * 1e3,
                    mb,
                    100.0 * s * r.it_per_s
                )?;
            }
            if let Some(mb) = r.optim_moments_mb {
                write!(f, "; AdamW moments {mb:.3} MB on rank 0")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "  speed-up of {} ranks over {} threads: {:.2}x",
            self.ranks.ranks,
            self.single.threads_per_rank,
            self.ranks.images_per_s / self.single.images_per_s
        )
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// The second metrics window of a finished run.
fn timed_window(
    run: &Path,
    ranks: usize,
    threads: usize,
    batch: usize,
    zero1: bool,
) -> Result<ParallelRun> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let last: serde_json::Value = serde_json::from_str(
        text.lines()
            .last()
            .with_context(|| format!("{} is empty", path.display()))?,
    )?;
    let it = last["it_per_s"]
        .as_f64()
        .with_context(|| format!("{}: no it_per_s", path.display()))?;
    Ok(ParallelRun {
        ranks,
        threads_per_rank: threads,
        it_per_s: it,
        images_per_s: it * batch as f64,
        allreduce_s: last["allreduce_s"].as_f64(),
        allreduce_mb: last["allreduce_mb"].as_f64(),
        zero1,
        optim_moments_mb: last["optim_moments_mb"].as_f64(),
    })
}

pub fn run(o: &ParallelBenchOptions) -> Result<ParallelReport> {
    if o.ranks < 2 || o.iters == 0 {
        bail!("--what parallel needs at least 2 ranks and 1 iteration");
    }
    if o.batch % o.ranks != 0 {
        bail!("--batch {} is not divisible by {} ranks", o.batch, o.ranks);
    }
    let mpirun = find_on_path("mpirun").context(
        "mpirun not found on PATH: install the Debian package openmpi-bin (scripts/setup.sh does)",
    )?;
    let exe = match &o.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("locating the distill binary")?,
    };
    let dir = tempfile_dir()?;
    let args = |out: &Path| -> Vec<String> {
        [
            "--quiet",
            "train",
            "teacher",
            "--preset",
            &o.preset,
            "--batch-size",
            &o.batch.to_string(),
            "--train-steps",
            &(2 * o.iters).to_string(),
            "--log-every",
            &o.iters.to_string(),
            "--checkpoint-every",
            &(2 * o.iters).to_string(),
            "--sample-every",
            "0",
            "--out",
            out.to_str().expect("utf-8 temp path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let check = |out: std::process::Output, what: &str| -> Result<()> {
        if !out.status.success() {
            bail!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let one = dir.join("single");
    let out = Command::new(&exe)
        .env("DISTILL_THREADS", o.ranks.to_string())
        .args(args(&one))
        .output()
        .context("running distill")?;
    check(out, "the one-process run")?;
    let on_ranks = |out: &Path, zero1: bool| -> Result<()> {
        let mut a = args(out);
        if zero1 {
            a.push("--zero1".into());
        }
        let o = Command::new(&mpirun)
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-np", &o.ranks.to_string(), "-x", "DISTILL_THREADS=1"])
            .arg(&exe)
            .args(a)
            // Containers often forbid the shared-memory transport's single-copy (CMA) mechanism.
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .output()
            .context("running mpirun")?;
        check(o, "the mpirun run")
    };
    let (many, sharded) = (dir.join("ranks"), dir.join("zero1"));
    on_ranks(&many, false)?;
    on_ranks(&sharded, true)?;
    let report = ParallelReport {
        preset: o.preset.clone(),
        batch: o.batch,
        iters: o.iters,
        single: timed_window(&one, 1, o.ranks, o.batch, false)?,
        ranks: timed_window(&many, o.ranks, 1, o.batch, false)?,
        zero1: timed_window(&sharded, o.ranks, 1, o.batch, true)?,
        engine: "OpenMPI via mpirun".into(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("distill-bench-parallel-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
