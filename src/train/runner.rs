//! The one training loop every method runs in (teacher, DMD2, TDM): resume, cadence, metrics,
//! EMA, sample grids, in-training evaluation, checkpoints and the divergence guarantee.
//!
//! Divergence never costs the last good state: a checkpoint is first serialised in memory, its
//! tensors checked finite and its inference weights probed with one forward pass; it is written
//! only once the next iteration has run with finite losses (the final one: after the checks).
//! Until then the previous checkpoint stays on disk, and a stop names the step really kept.

use super::distill::Trainable;
use super::optim::{Ema, LossScaleConfig, Precision};
use super::{denoiser_from, progress_bar, vars_to_tensors, MetricsLog, RunDir, TRAIN_STATE_FILE};
use crate::checkpoint::{self, CheckpointMeta, Role};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use graphs::{CandleBackend, Denoiser, GeneratorSpec, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Layout version of `train_state.safetensors` (metadata `state_version`). 1 (no field): the
/// teacher's own layout before the runners were merged; distillation states of version 1 are
/// already in the current layout. 2: every network as a [`super::distill::Trainable`].
pub const STATE_VERSION: u32 = 2;

/// Run-loop settings every trainer shares (`[run]` in the distillation TOML; the teacher's
/// top-level fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Training iterations in total (a resumed run stops at the same total). (`steps` before;
    /// still read, with a deprecation note.)
    #[serde(alias = "steps")]
    pub train_steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    pub log_every: u64,
    /// PNG grid of the model every N iterations and at the end (0 = never).
    pub sample_every: u64,
    pub checkpoint_every: u64,
    /// Frechet distance, class accuracy and diversity of the student every N iterations (0 = off);
    /// needs 1x32x32 data with 10 classes (the evaluation classifier is an MNIST model).
    pub eval_every: u64,
    /// Images per in-training evaluation.
    pub eval_n: usize,
    /// EMA decay of the trained weights over their updates (0 = use the raw weights).
    pub ema_decay: f64,
    /// `fp32`, `fp16` (autocast + dynamic loss scaling) or `bf16` (autocast); weights, optimiser
    /// state and checkpoints stay f32, so a run may resume in another precision.
    pub precision: Precision,
    pub loss_scale: LossScaleConfig,
    /// Data-parallel runs: shard the AdamW moments over the ranks (ZeRO-1, [`super::zero`]);
    /// checkpoints keep the unsharded format, so it may change on resume.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub zero1: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            train_steps: 2000,
            batch_size: 32,
            seed: 0,
            log_every: 25,
            sample_every: 500,
            checkpoint_every: 100,
            eval_every: 0,
            eval_n: 500,
            ema_decay: 0.99,
            precision: Precision::Fp32,
            loss_scale: LossScaleConfig::default(),
            zero1: false,
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.train_steps > 0 && self.batch_size > 0,
            "train_steps and batch_size must be positive"
        );
        ensure!(
            self.log_every > 0 && self.checkpoint_every > 0,
            "log_every and checkpoint_every must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "ema_decay must be in [0, 1)"
        );
        ensure!(
            self.eval_every == 0 || self.eval_n >= 10,
            "eval_n must be at least 10"
        );
        Ok(())
    }

    /// Clears what may change on resume (totals, cadence, precision), for resume keys.
    pub fn clear_resumable(&mut self) {
        self.train_steps = 0;
        (self.log_every, self.sample_every, self.checkpoint_every) = (0, 0, 0);
        (self.eval_every, self.eval_n) = (0, 0);
        // Precision may change on resume (everything is stored in f32), and so may ZeRO-1 (the
        // moments are stored unsharded).
        (self.precision, self.loss_scale) = (Default::default(), Default::default());
        self.zero1 = false;
    }
}

/// Numbers one iteration reports for the metrics log (averaged over the log window).
pub type StepMetrics = BTreeMap<String, f64>;

/// A training method, driven by [`run`].
pub trait Method {
    const ROLE: Role;
    /// What the progress bar and messages call it.
    fn name(&self) -> &'static str;
    /// One training iteration (`step` is 0-based); every randomness derives from (seed, step).
    /// A non-finite loss is an error (before the update it would have caused).
    fn step(&mut self, step: u64) -> Result<StepMetrics>;
    /// Values logged as they are at a log line (not averaged), e.g. the latest learning rate.
    fn gauges(&self) -> StepMetrics;
    /// The variables of the network the checkpoint holds (the EMA follows them).
    fn student_vars(&self) -> &[(String, Var)];
    /// How many times that network has been updated.
    fn student_updates(&self) -> u64;
    /// Every trainable network with its optimiser (ZeRO-1 shards their moments).
    fn trainables(&mut self) -> Vec<&mut Trainable>;
    /// The EMA position of iteration `step`'s update, or `None` when it made none
    /// (`updates_before`: [`Self::student_updates`] before the iteration).
    fn ema_step(&self, _step: u64, updates_before: u64) -> Option<u64> {
        let u = self.student_updates();
        (u > updates_before).then(|| u - 1)
    }
    /// Every trainable network and optimiser, for the training state.
    fn save_state(&self, tensors: &mut HashMap<String, Tensor>, meta: &mut HashMap<String, String>);
    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &HashMap<String, String>,
    ) -> Result<()>;
    /// Brings a training state of an older layout (`state_version` < [`STATE_VERSION`]) to the
    /// current one, or refuses it with a reason.
    fn upgrade_state(
        &self,
        _version: u32,
        _tensors: &mut HashMap<String, Tensor>,
        _meta: &mut HashMap<String, String>,
    ) -> Result<()> {
        Ok(())
    }
    /// The sampler stored in the checkpoint.
    fn spec(&self) -> GeneratorSpec;
    /// A text-to-image method's condition of `n` samples under the empty prompt (the checks'
    /// forward pass of a checkpoint); `None`: the network takes class labels.
    fn text_probe(&self, _n: usize) -> Result<Option<graphs::TextCond<Tensor>>> {
        Ok(None)
    }
    fn model_config(&self) -> ModelConfig;
    /// Writes the sample grid of the model `den` (the EMA's or the raw weights) to `png`: a
    /// class-conditional model's classes, 10 per class; a text-to-image student's prompts.
    fn sample_grid(&self, den: &Denoiser, seed: u64, device: &Device, png: &Path) -> Result<()> {
        crate::sample::class_grid(den, &self.spec(), 10, seed, device, png)
    }
    /// The model's full weights from its trained variables' values `trained` (the EMA or the raw
    /// weights): themselves, or for a LoRA student the base with the adapters merged.
    fn inference_weights(
        &self,
        trained: HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        Ok(trained)
    }
    /// Extra files of the checkpoint of `step` (name, bytes) from the same `trained` values, e.g.
    /// a LoRA student's adapter file; written with the checkpoint, before its weights.
    fn checkpoint_files(
        &self,
        _trained: &HashMap<String, Tensor>,
        _step: u64,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }
}

/// Everything [`run`] needs besides the method.
pub struct RunSpec<'a> {
    pub cfg: &'a RunConfig,
    /// The method's full config as TOML (written to `config.toml` and into the training state).
    pub config_toml: String,
    /// The part of the config a resumed run must agree with (everything but cadence and totals).
    pub resume_key: String,
    /// Recomputes the resume key from a stored config (runs written before a field was renamed
    /// stored their key with the old name).
    pub rekey: Option<&'a dyn Fn(&str) -> Result<String>>,
    /// sha256 of the teacher's weights, for methods distilled from one (a resumed run must see
    /// the same teacher) and its folder for messages.
    pub teacher: Option<(&'a str, &'a Path)>,
    pub resume: bool,
    pub show_progress: bool,
    /// Scores the model during training (`eval_every`), when the data suits the classifier.
    pub evaluator: Option<&'a crate::eval::Evaluator>,
    pub device: &'a Device,
}

/// Result of a finished run.
#[derive(Debug)]
pub struct RunOutcome {
    pub checkpoint: PathBuf,
    pub train_steps: u64,
    pub seconds: f64,
    /// The last log window's averages (and gauges).
    pub last: BTreeMap<String, f64>,
    pub student_updates: u64,
}

/// The model's inference weights: the EMA when enabled, else the raw weights.
fn student_weights(ema: &Option<Ema>, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    match ema {
        Some(e) => e.tensors(),
        None => vars_to_tensors(vars),
    }
}

/// A checkpoint serialised in memory, written once proven good.
struct Pending {
    step: u64,
    state: Vec<u8>,
    /// The method's extra files ([`Method::checkpoint_files`]).
    files: Vec<(String, Vec<u8>)>,
    weights: Vec<u8>,
    config: Vec<u8>,
}

/// True when every element of every tensor is finite.
fn all_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for n in names {
        let t = &tensors[n];
        if !t.dtype().is_float() {
            continue;
        }
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            return Ok(Some(format!("{n} holds {bad}")));
        }
    }
    Ok(None)
}

/// One forward pass of the inference weights on seeded noise: finite or the reason it is not.
fn probe(
    den: &Denoiser,
    text: Option<graphs::TextCond<Tensor>>,
    device: &Device,
) -> Result<Option<String>> {
    let (c, r) = den.image_shape();
    let n = 2;
    let z = super::randn(&mut super::step_rng(0, 0, 0x9A0B), &[n, c, r, r], device)?;
    let b = CandleBackend::new(device);
    let sigma = 1.0;
    let labels = Tensor::from_vec(vec![0u32; n], n, device)?;
    let level = den.level_const(&b, &z, sigma)?;
    let y = match &text {
        None => den.forward(&b, &z, &level, &labels)?,
        Some(t) => den.forward_with(&b, &z, &level, graphs::NetCond::Text(t))?,
    };
    let v = y.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter()
        .find(|x| !x.is_finite())
        .map(|bad| format!("a forward pass of the inference weights gives {bad}")))
}

/// Serialises the checkpoint of `step` after checking it.
fn snapshot<M: Method>(
    m: &M,
    rs: &RunSpec,
    step: u64,
    ema: &Option<Ema>,
    window: &Window,
) -> Result<std::result::Result<Pending, String>> {
    let mut tensors = HashMap::new();
    let mut meta = HashMap::from([
        ("state_version".to_string(), STATE_VERSION.to_string()),
        ("step".to_string(), step.to_string()),
        ("config".to_string(), rs.config_toml.clone()),
        ("resume_key".to_string(), rs.resume_key.clone()),
        (WINDOW_KEY.to_string(), window_to_json(window)?),
    ]);
    if let Some((sha, _)) = rs.teacher {
        meta.insert("teacher_sha256".to_string(), sha.to_string());
    }
    m.save_state(&mut tensors, &mut meta);
    let trained = student_weights(ema, m.student_vars());
    let files = m.checkpoint_files(&trained, step)?;
    let weights = m.inference_weights(trained)?;
    if let Some(e) = ema {
        tensors.extend(
            e.tensors()
                .into_iter()
                .map(|(k, v)| (format!("ema.{k}"), v)),
        );
    }
    if let Some(why) = all_finite(&tensors)? {
        return Ok(Err(why));
    }
    let den = denoiser_from(&m.model_config(), weights.clone(), rs.device)?;
    if let Some(why) = probe(&den, m.text_probe(2)?, rs.device)? {
        return Ok(Err(why));
    }
    let cm = CheckpointMeta::new(M::ROLE, m.model_config(), m.spec(), step);
    let (weights, config) = checkpoint::serialise(&cm, &weights)?;
    Ok(Ok(Pending {
        step,
        state: checkpoint::safetensors_bytes_with_meta(&tensors, Some(meta))?,
        files,
        weights,
        config,
    }))
}

/// Writes a proven checkpoint: training state, weights, then the config (whose presence marks
/// the checkpoint complete).
fn commit(p: &Pending, run: &RunDir) -> Result<u64> {
    let dir = run.checkpoint();
    checkpoint::write_atomic(&dir.join(TRAIN_STATE_FILE), &p.state)?;
    for (name, bytes) in &p.files {
        checkpoint::write_atomic(&dir.join(name), bytes)?;
    }
    checkpoint::write_atomic(&dir.join(checkpoint::WEIGHTS_FILE), &p.weights)?;
    checkpoint::write_atomic(&dir.join(checkpoint::CONFIG_FILE), &p.config)?;
    Ok(p.step)
}

/// What a stop keeps, for its message.
fn kept(run: &RunDir, committed: Option<u64>) -> String {
    if !crate::parallel::is_rank0() {
        return format!(
            "rank 0 writes the checkpoints in {} (the last good one is kept)",
            run.checkpoint().display()
        );
    }
    match committed {
        Some(s) => format!(
            "the last good checkpoint (step {s}) is kept in {}",
            run.checkpoint().display()
        ),
        None => format!(
            "no checkpoint was written yet, nothing is kept in {}",
            run.checkpoint().display()
        ),
    }
}

/// Reads a training state for `--resume`, upgraded to the current layout.
fn load_state<M: Method>(
    m: &M,
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (mut tensors, mut meta) = checkpoint::load_tensors_with_meta(path, device)
        .with_context(|| format!("--resume: no usable training state {}", path.display()))?;
    let version: u32 = match meta.get("state_version") {
        None => 1,
        Some(v) => v
            .parse()
            .with_context(|| format!("{}: bad state_version {v:?}", path.display()))?,
    };
    if version > STATE_VERSION {
        bail!(
            "--resume: {} has training-state layout {version}, written by a newer distill (this one reads up to {STATE_VERSION})",
            path.display()
        );
    }
    if version < STATE_VERSION {
        m.upgrade_state(version, &mut tensors, &mut meta)
            .with_context(|| format!("--resume: {}", path.display()))?;
    }
    Ok((tensors, meta))
}

/// The open metrics window: per metric, the sum and count of the values since the last log line.
type Window = BTreeMap<String, (f64, u64)>;

/// Training-state metadata holding the open metrics window at the checkpoint, so that the first
/// log line after `--resume` averages the same steps as an uninterrupted run (states written
/// before it existed resume with an empty window).
const WINDOW_KEY: &str = "metrics_window";

/// The window as JSON, sums as their f64 bit patterns (a decimal round trip may lose the last bit).
fn window_to_json(w: &Window) -> Result<String> {
    let bits: BTreeMap<&String, (u64, u64)> =
        w.iter().map(|(k, (s, n))| (k, (s.to_bits(), *n))).collect();
    Ok(serde_json::to_string(&bits)?)
}

fn window_from_json(text: &str) -> Result<Window> {
    let bits: BTreeMap<String, (u64, u64)> = serde_json::from_str(text)?;
    Ok(bits
        .into_iter()
        .map(|(k, (s, n))| (k, (f64::from_bits(s), n)))
        .collect())
}

/// Metrics that count things (written as JSON integers).
const COUNTERS: &[&str] = &["skipped_steps", "student_updates"];

/// Trains (or resumes) `m` in `run`: the loop every method shares.
pub fn run<M: Method>(m: &mut M, rs: &RunSpec, run: &RunDir) -> Result<RunOutcome> {
    let cfg = rs.cfg;
    cfg.validate()?;
    // Data-parallel training: every rank runs this loop on its slice of each global batch.
    let world = crate::parallel::world();
    let rank0 = world.rank() == 0;
    crate::parallel::shard(cfg.batch_size)?;
    check_ranks_agree(rs)?;
    let state_path = run.checkpoint().join(TRAIN_STATE_FILE);
    // The EMA, metrics, sample grids and checkpoints are rank 0's alone.
    let mut ema = (cfg.ema_decay > 0.0 && rank0)
        .then(|| Ema::new(m.student_vars(), cfg.ema_decay))
        .transpose()?;
    let mut start = 0;
    let mut window = Window::new();
    let mut prepare = || -> Result<()> {
        if rs.resume {
            let (tensors, meta) = load_state(m, &state_path, rs.device)?;
            let rekeyed = || match (rs.rekey, meta.get("config")) {
                (Some(f), Some(c)) => f(c).ok(),
                _ => None,
            };
            if meta.get("resume_key") != Some(&rs.resume_key)
                && rekeyed().as_ref() != Some(&rs.resume_key)
            {
                bail!(
                    "--resume: the run in {} was started with a different configuration (only the step count and logging cadence may change); start a new run with another --out",
                    run.root.display()
                );
            }
            if let Some((sha, dir)) = rs.teacher {
                if meta.get("teacher_sha256").map(String::as_str) != Some(sha) {
                    bail!(
                        "--resume: the teacher {} is not the one this run started from (its weights changed)",
                        dir.display()
                    );
                }
            }
            start = meta
                .get("step")
                .context("training state lacks its step")?
                .parse()?;
            m.load_state(&tensors, &meta)?;
            if let Some(w) = meta.get(WINDOW_KEY) {
                window = window_from_json(w)
                    .with_context(|| format!("{}: bad {WINDOW_KEY} {w:?}", state_path.display()))?;
            }
            if let Some(e) = &mut ema {
                let w: HashMap<String, Tensor> = tensors
                    .iter()
                    .filter_map(|(k, v)| k.strip_prefix("ema.").map(|n| (n.to_string(), v.clone())))
                    .collect();
                e.load(&w).context("training state lacks the model's EMA")?;
            }
        } else if state_path.exists() {
            bail!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                run.root.display()
            );
        }
        Ok(())
    };
    if rank0 {
        let prepared = prepare();
        if world.world_size() == 1 {
            prepared?;
        } else {
            let state = prepared.and_then(|_| state_bytes(m, start, &window));
            crate::parallel::broadcast_result(world, state, "the training state")?;
        }
    } else {
        (start, window) = receive_state(m, world, rs.device)?;
    }
    if world.world_size() > 1 {
        let (mut t, mut meta) = (HashMap::new(), HashMap::new());
        m.save_state(&mut t, &mut meta);
        let digest = crate::parallel::sha256(&checkpoint::safetensors_bytes(&t)?);
        crate::parallel::check_same(
            world,
            digest,
            "the trained weights and optimiser state after rank 0's broadcast",
        )?;
    }
    let zero1 = cfg.zero1 && world.world_size() > 1;
    if zero1 {
        for t in m.trainables() {
            t.shard()?;
        }
    }
    let moments_mb = m.trainables().iter().map(|t| t.moment_bytes()).sum::<u64>() as f64 / 1e6;
    if rank0 && world.world_size() > 1 {
        // Every parameter has two f32 moments: 8 bytes each, unsharded.
        let full: usize = m
            .trainables()
            .iter()
            .flat_map(|t| t.vars())
            .map(|(_, v)| 8 * v.elem_count())
            .sum();
        eprintln!(
            "optimiser moments: {moments_mb:.3} MB on rank 0 of {} ({}; {:.3} MB unsharded)",
            world.world_size(),
            if zero1 {
                "ZeRO-1"
            } else {
                "not sharded: --zero1 shards them"
            },
            full as f64 / 1e6
        );
    }
    let inject = test_nan_at()?;
    let mut committed = rs.resume.then_some(start);
    let mut log = if rank0 {
        checkpoint::write_atomic(&run.config(), rs.config_toml.as_bytes())?;
        Some(MetricsLog::open(
            &run.metrics(),
            rs.resume.then_some(start),
        )?)
    } else {
        None
    };
    let pb = progress_bar(cfg.train_steps, start, rs.show_progress && rank0, m.name());
    let t0 = Instant::now();
    let mut last = BTreeMap::new();
    let mut win_start = Instant::now();
    let mut win_steps = 0u64;
    let mut win_reduce = crate::parallel::reduce_stats();
    let mut pending: Option<Pending> = None;
    for step in start..cfg.train_steps {
        let before = m.student_updates();
        if inject == Some((world.rank(), step, Poison::Grads)) {
            super::distill::TEST_POISON_GRADS.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut metrics = match m.step(step) {
            Ok(x) => x,
            Err(e) => {
                return Err(e.context(format!(
                    "{} iteration {step} failed; {}",
                    m.name(),
                    kept(run, committed)
                )))
            }
        };
        if inject == Some((world.rank(), step, Poison::Loss)) {
            if let Some(v) = metrics.values_mut().next() {
                *v = f64::NAN;
            }
        }
        // Checked on this rank's own values (before the average), so the error names it; the
        // other ranks learn of the stop in their next collective (Collective::stop).
        if let Some((k, v)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
            let on = if world.world_size() > 1 {
                format!(" on rank {} of {}", world.rank(), world.world_size())
            } else {
                String::new()
            };
            bail!(
                "{k} is {v} at step {step}{on}: training diverged and was stopped; {} (try a lower --lr or a smaller --grad-clip, then --resume)",
                kept(run, committed)
            );
        }
        let metrics = match average_over_ranks(metrics) {
            Ok(x) => x,
            Err(e) => {
                return Err(e.context(format!(
                    "{} iteration {step} failed; {}",
                    m.name(),
                    kept(run, committed)
                )))
            }
        };
        // The previous checkpoint's weights just gave finite losses: it is proven.
        if let Some(p) = pending.take() {
            committed = Some(commit(&p, run)?);
        }
        let done = step + 1;
        let checkpoint_now = done % cfg.checkpoint_every == 0 || done == cfg.train_steps;
        if zero1 && checkpoint_now {
            // The checkpoint holds the full moments: gathered to rank 0 (every rank takes part).
            for t in m.trainables() {
                t.gather_moments()?;
            }
        }
        if !rank0 {
            // The other ranks only train: rank 0 logs, evaluates, samples and checkpoints.
            pb.set_position(step + 1);
            continue;
        }
        for (k, v) in &metrics {
            let e = window.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        if let Some(e) = &mut ema {
            if let Some(t) = m.ema_step(step, before) {
                e.update(m.student_vars(), t)?;
            }
        }
        win_steps += 1;
        pb.set_position(done);
        // What a checkpoint of this step carries on: the window, unless a regular log line
        // closes it (the end of a run flushes it early, but a resume to more steps continues it).
        let carry = if done % cfg.log_every == 0 {
            Window::new()
        } else {
            window.clone()
        };
        let mut record: BTreeMap<String, f64> = BTreeMap::new();
        if done % cfg.log_every == 0 || done == cfg.train_steps {
            for (k, (s, n)) in std::mem::take(&mut window) {
                record.insert(k, s / n as f64);
            }
            record.extend(m.gauges());
            record.insert(
                "it_per_s".into(),
                win_steps as f64 / win_start.elapsed().as_secs_f64(),
            );
            if world.world_size() > 1 {
                // The gradient all-reduces of this window, per iteration.
                let now = crate::parallel::reduce_stats();
                let k = win_steps as f64;
                record.insert("allreduce_s".into(), (now.seconds - win_reduce.seconds) / k);
                record.insert(
                    "allreduce_mb".into(),
                    (now.bytes - win_reduce.bytes) as f64 / 1e6 / k,
                );
                win_reduce = now;
                record.insert("optim_moments_mb".into(), moments_mb);
            }
            (win_start, win_steps) = (Instant::now(), 0);
            let msg: Vec<String> = record
                .iter()
                .filter(|(k, _)| k.starts_with("loss"))
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            pb.set_message(msg.join(" "));
        }
        let want_eval =
            cfg.eval_every > 0 && (done % cfg.eval_every == 0 || done == cfg.train_steps);
        if let (true, Some(ev)) = (want_eval, rs.evaluator) {
            let den = denoiser_from(
                &m.model_config(),
                m.inference_weights(student_weights(&ema, m.student_vars()))?,
                rs.device,
            )?;
            let r = eval_student(ev, &den, &m.spec(), cfg.eval_n, rs.device)?;
            for (k, v) in r.metrics() {
                record.insert(k.into(), v);
            }
        }
        if !record.is_empty() {
            record.insert("elapsed_s".into(), t0.elapsed().as_secs_f64());
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), done.into());
            for (k, v) in &record {
                // Counters stay JSON integers, as metrics.jsonl has always written them.
                let j = if COUNTERS.contains(&k.as_str()) && v.fract() == 0.0 && v.abs() < 9e15 {
                    serde_json::json!(*v as i64)
                } else {
                    serde_json::json!(v)
                };
                obj.insert(k.clone(), j);
            }
            if let Some(log) = &mut log {
                log.write(&serde_json::Value::Object(obj))?;
            }
            last.extend(record);
        }
        if checkpoint_now {
            let snap = snapshot(m, rs, done, &ema, &carry);
            if zero1 {
                m.trainables().into_iter().for_each(|t| t.release_moments());
            }
            match snap? {
                Ok(p) if done == cfg.train_steps => committed = Some(commit(&p, run)?),
                Ok(p) => pending = Some(p),
                Err(why) => bail!(
                    "the model after step {done} is not finite ({why}): training diverged and was stopped; {} (try a lower --lr or a smaller --grad-clip, then --resume)",
                    kept(run, committed)
                ),
            }
        }
        if cfg.sample_every > 0 && (done % cfg.sample_every == 0 || done == cfg.train_steps) {
            let den = denoiser_from(
                &m.model_config(),
                m.inference_weights(student_weights(&ema, m.student_vars()))?,
                rs.device,
            )?;
            let png = run.samples().join(format!("step_{done:06}.png"));
            m.sample_grid(&den, cfg.seed, rs.device, &png)?;
        }
    }
    pb.finish();
    if rank0 {
        super::write_curves(run)?;
    }
    Ok(RunOutcome {
        checkpoint: run.checkpoint(),
        train_steps: cfg.train_steps,
        seconds: t0.elapsed().as_secs_f64(),
        last,
        student_updates: m.student_updates(),
    })
}

/// What the test-only NaN injection poisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poison {
    /// The iteration's first metric (its loss).
    Loss,
    /// The first gradient of the iteration's first update.
    Grads,
}

/// Test-only: `DISTILL_TEST_NAN_AT=RANK:STEP` makes rank RANK's first metric of iteration STEP
/// NaN, `RANK:STEP:grad` its first gradient there (a divergence on one rank, for the agreed-stop
/// tests in tests/parallel.rs). Not for users.
fn test_nan_at() -> Result<Option<(usize, u64, Poison)>> {
    let Ok(v) = std::env::var("DISTILL_TEST_NAN_AT") else {
        return Ok(None);
    };
    let bad = || format!("DISTILL_TEST_NAN_AT={v:?}: expected RANK:STEP or RANK:STEP:grad");
    let parts: Vec<&str> = v.split(':').collect();
    let poison = match parts.get(2) {
        None => Poison::Loss,
        Some(&"grad") => Poison::Grads,
        Some(_) => bail!(bad()),
    };
    ensure!(parts.len() == 2 || parts.len() == 3, bad());
    Ok(Some((
        parts[0].parse().with_context(bad)?,
        parts[1].parse().with_context(bad)?,
        poison,
    )))
}

/// Refuses a data-parallel start unless every rank has the same configuration and teacher
/// (sha256 of the config, the resume key and the teacher's weights compared across ranks).
fn check_ranks_agree(rs: &RunSpec) -> Result<()> {
    let world = crate::parallel::world();
    if world.world_size() == 1 {
        return Ok(());
    }
    let mut h = Vec::new();
    for part in [
        rs.config_toml.as_str(),
        rs.resume_key.as_str(),
        rs.teacher.map_or("", |t| t.0),
        if rs.resume { "resume" } else { "fresh" },
    ] {
        h.extend_from_slice(&crate::parallel::sha256(part.as_bytes()));
    }
    crate::parallel::check_same(
        world,
        crate::parallel::sha256(&h),
        "the configuration or the teacher (or --resume)",
    )
}

/// The training state rank 0 starts from (fresh or resumed), for the other ranks: every
/// network and optimiser, the start step and the open metrics window.
fn state_bytes<M: Method>(m: &M, start: u64, window: &Window) -> Result<Vec<u8>> {
    let (mut tensors, mut meta) = (HashMap::new(), HashMap::new());
    m.save_state(&mut tensors, &mut meta);
    meta.insert("step".into(), start.to_string());
    meta.insert(WINDOW_KEY.into(), window_to_json(window)?);
    checkpoint::safetensors_bytes_with_meta(&tensors, Some(meta))
}

/// A rank other than 0: loads rank 0's broadcast training state; returns its step and window.
fn receive_state<M: Method>(
    m: &mut M,
    world: &dyn crate::parallel::Collective,
    device: &Device,
) -> Result<(u64, Window)> {
    let bytes = crate::parallel::broadcast_result(world, Ok(Vec::new()), "the training state")?;
    let what = Path::new("<rank 0's training state>");
    let (tensors, meta) = checkpoint::tensors_from_bytes(&bytes, what, device)?;
    m.load_state(&tensors, &meta)?;
    let start = meta
        .get("step")
        .context("rank 0's training state lacks its step")?
        .parse()?;
    let window = window_from_json(meta.get(WINDOW_KEY).map_or("{}", String::as_str))?;
    Ok((start, window))
}

/// One iteration's metrics averaged over the ranks (each computed on its equal slice of the
/// global batch, so the average is the global batch's value).
fn average_over_ranks(mut metrics: StepMetrics) -> Result<StepMetrics> {
    let mut v: Vec<f64> = metrics.values().copied().collect();
    crate::parallel::average_values(&mut v, "the step's metrics")?;
    for (slot, x) in metrics.values_mut().zip(v) {
        *slot = x;
    }
    Ok(metrics)
}

/// Scores `n` class-balanced samples of a model with fixed noise (seed 1, as `distill eval`).
pub fn eval_student(
    ev: &crate::eval::Evaluator,
    den: &Denoiser,
    spec: &GeneratorSpec,
    n: usize,
    device: &Device,
) -> Result<crate::eval::EvalReport> {
    let ncls = den.num_classes();
    let labels: Vec<u32> = (0..n).map(|i| (i % ncls) as u32).collect();
    let inputs = crate::sample::seeded_noise(den, spec, n, 1, device)?;
    let images = crate::sample::generate(
        den,
        spec,
        &inputs,
        &Tensor::from_vec(labels.clone(), n, device)?,
        250,
        device,
    )?;
    let given = den
        .net
        .config()
        .is_class_conditional()
        .then_some(labels.as_slice());
    ev.evaluate(&images, given)
}
