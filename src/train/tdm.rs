//! TDM (Luo et al., "Learning Few-Step Diffusion Models by Trajectory Distribution Matching",
//! ICCV 2025), following the official training code (`train_tdm`):
//!
//! * a frozen teacher, a few-step student and a fake score, the latter two initialised from the
//!   teacher's EMA weights; the student samples with deterministic DDIM along its own timesteps;
//! * every iteration: a no-grad rollout of the student from pure noise; per sample a random step
//!   `k`; the student's `(x0, eps)` there; the *noisy* next trajectory point
//!   `x_m = x0 + s_m * eps`; diffused to a matching level `t` drawn from `[t_m, t_k)` (`separate`)
//!   or `[t_m, T)` (`to-T`) with fresh noise (see `graphs::losses::tdm`);
//! * the fake score learns the student's x0 at `x_t` (Min-SNR and importance weighted), every
//!   `update_fake_every` iterations;
//! * the student follows `x0_real - x0_fake` plus the teacher's CFG direction, normalised per
//!   sample by `mean |x0 - x0_real_cfg|`, with MSE or pseudo-Huber distance.
//!
//! The fake score ("estimator" in the paper) is the same machinery as DMD2's: a trainable copy of
//! the teacher (`train::distill`).

use super::distill::{
    draw_condition, finite, gather_steps, grid_level, net_cond, pair, real_score, rollout_with,
    scalar, sigma_level, Method, StepMetrics, Teacher, Trainable, TrainedNet,
};
use super::distill_config::{distill_config, DistillCommon};
use super::optim::{AdamWConfig, GradAccum, LrSchedule};
use crate::checkpoint::Role;
use crate::rng::SampleRngs;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, Var};
use graphs::losses::tdm::{self, Distance, Weighting};
use graphs::{CandleBackend, Denoiser, GeneratorSpec, ModelConfig, NoiseGrid};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Where the matching level `t` is drawn for a trajectory point of step `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseMode {
    /// `t` in `[t_m, t_k)`: each step matches its own interval (no overlap across steps).
    Separate,
    /// `t` in `[t_m, T)`: every step matches up to pure noise.
    ToT,
}

distill_config! {
    /// Everything that defines a TDM run (the `config.toml` of the run folder): the shared
    /// settings (`common`; the student's optimiser defaults to Adam betas (0, 0.95) at the fake
    /// score's lr / 5) and TDM's own.
    pub struct TdmConfig {
        pub noise_mode: NoiseMode,
        /// `to-T` only: condition the fake score on the student's step index (one label table per
        /// step).
        pub condition_on_step: bool,
        /// Draw the trajectory point's level `t_m` uniformly in `[t_next, t_k - 20]` instead of
        /// `t_next` (the official code's `use_randmid`, a regulariser).
        pub random_mid: bool,
        /// Importance-weight the fake score's loss by the mixed/fresh noise density ratio.
        pub importance_weight: bool,
        pub distance: Distance,
        /// Pseudo-Huber constant `c`.
        pub huber_c: f64,
        /// SNR weighting of the student loss.
        pub student_weighting: Weighting,
        /// SNR weighting of the fake score's loss (TDM: Min-SNR with gamma 5).
        pub fake_weighting: Weighting,
        pub min_snr_gamma: f64,
        /// Lowest matching timestep (keeps `t` away from the noise-free end).
        pub min_timestep: usize,
        /// The fake score is updated every this many iterations.
        pub update_fake_every: u64,
        /// Micro-batches whose gradients are averaged per update.
        pub grad_accum: usize,
    }
}

impl Default for TdmConfig {
    fn default() -> Self {
        let fake = AdamWConfig {
            lr: 1e-4,
            beta1: 0.0,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 50,
            grad_clip: 1.0,
            schedule: LrSchedule::Cosine,
            decay_steps: 0,
            min_lr_ratio: 0.1,
        };
        let student = AdamWConfig {
            lr: fake.lr / 5.0,
            ..fake.clone()
        };
        Self {
            common: DistillCommon::new(vec![999, 749, 499, 249], student, fake),
            noise_mode: NoiseMode::Separate,
            condition_on_step: false,
            random_mid: false,
            importance_weight: true,
            distance: Distance::Huber,
            huber_c: 1e-3,
            student_weighting: Weighting::Constant,
            fake_weighting: Weighting::MinSnr,
            min_snr_gamma: 5.0,
            min_timestep: 20,
            update_fake_every: 1,
            grad_accum: 1,
        }
    }
}

/// Margin kept below a step's own timestep in `separate` mode and below `T` (official: 10).
const TOP_MARGIN: usize = 10;

impl TdmConfig {
    pub fn validate(&self, grid: &NoiseGrid) -> Result<()> {
        self.common.validate(grid)?;
        ensure!(
            self.update_fake_every >= 1,
            "update_fake_every must be >= 1"
        );
        ensure!(self.grad_accum >= 1, "grad_accum must be >= 1");
        ensure!(self.huber_c > 0.0, "huber_c must be positive");
        ensure!(
            !self.condition_on_step || self.noise_mode == NoiseMode::ToT,
            "condition_on_step only applies to noise_mode = \"to-t\" (separate intervals already tell the steps apart)"
        );
        for k in 0..self.common.timesteps.len() {
            let (lo, hi) = self.interval(k, grid.len(), self.next_t(k));
            ensure!(
                lo <= hi,
                "step {k} (timestep {}) leaves no matching interval: [{lo}, {hi}]; use fewer or more spread timesteps, or a smaller min_timestep",
                self.common.timesteps[k]
            );
        }
        Ok(())
    }

    /// The next trajectory point's timestep after step `k` (0 after the last step).
    pub fn next_t(&self, k: usize) -> usize {
        self.common.timesteps.get(k + 1).copied().unwrap_or(0)
    }

    /// The matching interval `[lo, hi]` (inclusive) for step `k` with trajectory point at `t_m`.
    pub fn interval(&self, k: usize, grid_len: usize, t_m: usize) -> (usize, usize) {
        let lo = t_m.max(self.min_timestep);
        let hi = match self.noise_mode {
            NoiseMode::Separate => self.common.timesteps[k].saturating_sub(TOP_MARGIN),
            NoiseMode::ToT => grid_len.saturating_sub(TOP_MARGIN),
        };
        (lo, hi)
    }

    pub fn resume_key(&self) -> Result<String> {
        let mut c = self.clone();
        c.common.clear_resumable();
        Ok(toml::to_string(&c)?)
    }
}

/// Per-sample draws of one matching problem: the step, the trajectory point and matching level.
#[derive(Clone, Debug)]
pub struct Draw {
    pub k: Vec<usize>,
    pub t_m: Vec<usize>,
    pub t: Vec<usize>,
}

impl TdmConfig {
    /// Draws `(k, t_m, t)` for `n` samples.
    pub fn draw<R: Rng>(&self, rng: &mut R, n: usize, grid_len: usize) -> Draw {
        let steps = self.common.timesteps.len();
        let mut d = Draw {
            k: Vec::with_capacity(n),
            t_m: Vec::with_capacity(n),
            t: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let k = rng.gen_range(0..steps);
            let next = self.next_t(k);
            let t_m = if self.random_mid {
                let top = self.common.timesteps[k].saturating_sub(20).max(next);
                rng.gen_range(next..=top)
            } else {
                next
            };
            let (lo, hi) = self.interval(k, grid_len, t_m);
            let t = rng.gen_range(lo.min(hi)..=hi);
            d.k.push(k);
            d.t_m.push(t_m);
            d.t.push(t);
        }
        d
    }
}

impl Draw {
    /// Each sample's own draw ([`TdmConfig::draw`] of one sample from its RNG), in order.
    pub fn per_sample(cfg: &TdmConfig, rngs: &mut SampleRngs, grid_len: usize) -> Self {
        let mut d = Draw {
            k: Vec::with_capacity(rngs.len()),
            t_m: Vec::with_capacity(rngs.len()),
            t: Vec::with_capacity(rngs.len()),
        };
        for one in rngs.each(|r| cfg.draw(r, 1, grid_len)) {
            d.k.extend(one.k);
            d.t_m.extend(one.t_m);
            d.t.extend(one.t);
        }
        d
    }
}

/// The TDM method: student, fake score and their optimisers.
pub struct Tdm<'a> {
    pub cfg: TdmConfig,
    teacher: &'a Teacher,
    grid: NoiseGrid,
    sigmas: Vec<f64>,
    student: TrainedNet,
    fake: TrainedNet,
    student_t: Trainable,
    fake_t: Trainable,
    device: Device,
    pub fake_updates: u64,
}

impl<'a> Tdm<'a> {
    pub fn new(mut cfg: TdmConfig, teacher: &'a Teacher, device: &Device) -> Result<Self> {
        let mcfg = teacher.meta.model.clone();
        let grid = NoiseGrid::new(&mcfg.parameterisation);
        cfg.validate(&grid)?;
        teacher.check_guidance(cfg.common.cfg_scale)?;
        for o in [&mut cfg.common.student_optim, &mut cfg.common.fake_optim] {
            if o.schedule == LrSchedule::Cosine && o.decay_steps == 0 {
                o.decay_steps = cfg.common.run.train_steps;
            }
        }
        let w = teacher.weights();
        let (lora, seed) = (&cfg.common.lora, cfg.common.run.seed);
        let (student, svars) =
            TrainedNet::new(&mcfg, &teacher.den, &w, lora, (seed, 0x10A5), device)?;
        let mut fcfg = mcfg.clone();
        let mut fw = w.clone();
        if cfg.condition_on_step && teacher.text.is_some() {
            anyhow::bail!(
                "condition_on_step (--condition-on-step) gives the fake score one label table per \
                 student step; a text-to-image teacher is conditioned on prompts: turn it off"
            );
        }
        if cfg.condition_on_step && !lora.is_off() {
            anyhow::bail!(
                "condition_on_step (--condition-on-step) gives the fake score new per-step label \
                 tables to train, which LoRA's frozen base cannot hold: turn one of them off"
            );
        }
        if cfg.condition_on_step {
            // One copy of the label table per student step, each starting as the teacher's.
            let groups = cfg.common.timesteps.len();
            let graphs::NetworkConfig::Unet(u) = &mut fcfg.network else {
                anyhow::bail!(
                    "condition_on_step (--condition-on-step) gives the fake score one label table \
                     per student step; a diffusers teacher's network has none to copy: turn it off"
                );
            };
            u.label_groups = groups;
            let key = "label_emb.weight";
            let table = &w[key];
            fw.insert(key.into(), Tensor::cat(&vec![table.clone(); groups], 0)?);
        }
        let (fake, fvars) =
            TrainedNet::new(&fcfg, &teacher.den, &fw, lora, (seed, 0x10A6), device)?;
        let sigmas = grid.sigmas_of(&cfg.common.timesteps);
        Ok(Self {
            student_t: Trainable::new("student", svars, cfg.common.student_optim.clone())?
                .with_precision(cfg.common.run.precision, &cfg.common.run.loss_scale),
            fake_t: Trainable::new("fake", fvars, cfg.common.fake_optim.clone())?
                .with_precision(cfg.common.run.precision, &cfg.common.run.loss_scale),
            teacher,
            grid,
            sigmas,
            student,
            fake,
            cfg,
            device: device.clone(),
            fake_updates: 0,
        })
    }

    /// The student and the fake score as they are now (under LoRA: the teacher's tensors with
    /// the adapters merged).
    pub fn networks(&self) -> Result<(Denoiser, Denoiser)> {
        Ok((self.student.net()?, self.fake.net()?))
    }

    /// The fake score's label ids: the class, offset by the step's table when conditioned on it.
    fn fake_labels(&self, labels: &[u32], k: &[usize]) -> Result<Tensor> {
        let rows = (self.teacher.meta.model.num_classes() + 1) as u32;
        let l: Vec<u32> = labels
            .iter()
            .zip(k)
            .map(|(&l, &k)| {
                if self.cfg.condition_on_step {
                    k as u32 * rows + l
                } else {
                    l
                }
            })
            .collect();
        Ok(Tensor::from_vec(l, labels.len(), &self.device)?)
    }

    /// `x_t` for a draw: the trajectory points `x_m = x0 + s_m * eps` diffused to `s_t`, plus the
    /// mixed noise and the fresh noise.
    fn matching_input(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        d: &Draw,
        rngs: &mut SampleRngs,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s_m = self.grid.sigmas_of(&d.t_m);
        let s_t = self.grid.sigmas_of(&d.t);
        let x_m = tdm::trajectory_point(x0, eps, &s_m)?;
        let fresh = rngs.randn(&x0.dims()[1..], &self.device)?;
        let x_t = tdm::diffuse(&x_m, &fresh, &s_m, &s_t)?;
        let mixed = tdm::mixed_noise(eps, &fresh, &s_m, &s_t)?;
        Ok((x_t, mixed, fresh))
    }

    fn snr_weights(&self, w: Weighting, t: &[usize]) -> Result<Tensor> {
        let snr: Vec<f64> = t.iter().map(|&t| self.grid.snr(t)).collect();
        let v: Vec<f32> = w
            .weights(&snr, self.cfg.min_snr_gamma)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        Ok(Tensor::from_vec(v, t.len(), &self.device)?)
    }
}

impl Method for Tdm<'_> {
    const ROLE: Role = Role::Tdm;

    fn name(&self) -> &'static str {
        "tdm"
    }

    fn step(&mut self, step: u64) -> Result<StepMetrics> {
        let dev = self.device.clone();
        let b =
            CandleBackend::training(&dev).with_autocast(self.cfg.common.run.precision.autocast());
        let u = &self.teacher.meta.model;
        let (c, r) = (u.channels(), u.resolution());
        // This rank's slice of every micro-batch; each sample draws from its own stream.
        let global = self.cfg.common.run.batch_size;
        let range = crate::parallel::shard(global)?;
        let n = range.len();
        let shape = [n, c, r, r];
        let steps = self.sigmas.len();
        let mut m = StepMetrics::new();
        // The student as it is now (under LoRA: the base with the adapters merged).
        let student = self.student.net()?;
        let fake_turn = step.is_multiple_of(self.cfg.update_fake_every);
        let accum = self.cfg.grad_accum as u64;
        let ncls = u.num_classes();
        let text = self.teacher.text.as_ref();
        // One rollout per micro-batch, shared by the fake-score and the student turn.
        let mut micro = Vec::with_capacity(accum as usize);
        for i in 0..accum {
            let mut rngs =
                SampleRngs::new(self.cfg.common.run.seed, step, 0x7D30 + i, range.clone());
            // Class labels, or for a text-to-image teacher the index of each sample's prompt.
            let (label_ids, labels, cond) = draw_condition(text, ncls, &mut rngs, &dev)?;
            let z = rngs.randn(&shape[1..], &dev)?;
            let frozen = graphs::params::detached(&student)?;
            let nc = net_cond(&cond, &labels);
            let ro = rollout_with(&b, &frozen, &z, nc, &self.sigmas, steps, None)?;
            micro.push((rngs, label_ids, labels, ro, cond));
        }
        let k = accum as f64;
        if fake_turn {
            // Fake score first (as the official loop): learn the student's x0 at the diffused
            // trajectory points.
            let fake = self.fake.net()?;
            let mut acc = GradAccum::new(self.fake_t.vars().len());
            let (mut sum_lf, mut sum_w) = (0.0, 0.0);
            for (rng, label_ids, _, ro, cond) in micro.iter_mut() {
                let d = Draw::per_sample(&self.cfg, rng, self.grid.len());
                let x_in = gather_steps(&ro.xs, &d.k)?;
                let x0 = gather_steps(&ro.x0s, &d.k)?;
                let s_k: Vec<f64> = d.k.iter().map(|&k| self.sigmas[k]).collect();
                let eps = tdm_eps(&x_in, &x0, &s_k)?;
                let (x_t, mixed, fresh) = self.matching_input(&x0, &eps, &d, rng)?;
                let level = grid_level(&self.grid, &d.t, &dev)?;
                let fl = self.fake_labels(label_ids, &d.k)?;
                let fake_x0 = fake.forward_with(&b, &x_t, &level, net_cond(cond, &fl))?;
                let mut w = self.snr_weights(self.cfg.fake_weighting, &d.t)?;
                if self.cfg.importance_weight {
                    let wis = tdm::importance_weight(&mixed, &fresh)?;
                    sum_w += scalar(&wis.mean_all()?)?;
                    w = (w * wis)?;
                }
                let lf = tdm::fake_score_loss(&fake_x0, &x0, &w)?;
                sum_lf += finite("loss_fake", &lf)?;
                acc.add(self.fake_t.backward(&lf)?)?;
            }
            let st = self.fake_t.apply(acc.mean()?)?;
            if st.is_some() {
                self.fake_updates += 1;
            }
            m.insert("loss_fake".into(), sum_lf / k);
            self.fake_t.log(&mut m, "fake", &st);
            if self.cfg.importance_weight {
                m.insert("importance_weight".into(), sum_w / k);
            }
        }
        // Student: its (x0, eps) at step k with gradient, matched at x_t (no gradient).
        let mut acc_student = GradAccum::new(self.student_t.vars().len());
        let (mut sum_ls, mut sum_norm) = (0.0, 0.0);
        // After the fake score's update: its network as it is now.
        let fake_frozen = graphs::params::detached(&self.fake.net()?)?;
        for (rng, label_ids, labels, ro, cond) in micro.iter_mut() {
            let d = Draw::per_sample(&self.cfg, rng, self.grid.len());
            let x_in = gather_steps(&ro.xs, &d.k)?;
            let s_k: Vec<f64> = d.k.iter().map(|&k| self.sigmas[k]).collect();
            let level_k = sigma_level(&student, &s_k, &dev)?;
            let x0 = student.forward_with(&b, &x_in, &level_k, net_cond(cond, labels))?;
            let eps = tdm_eps(&x_in, &x0.detach(), &s_k)?;
            let (x_t, _, _) = self.matching_input(&x0.detach(), &eps, &d, rng)?;
            let level = grid_level(&self.grid, &d.t, &dev)?;
            let scale = self.cfg.common.cfg_scale;
            let interval = self.cfg.common.cfg_interval;
            let real = real_score(
                &b,
                &self.teacher.den,
                self.teacher.guide.as_ref(),
                &x_t,
                &level,
                labels,
                cond,
                scale,
                interval,
            )?;
            let fl = self.fake_labels(label_ids, &d.k)?;
            let fake_x0 = fake_frozen.forward_with(&b, &x_t, &level, net_cond(cond, &fl))?;
            let w = self.snr_weights(self.cfg.student_weighting, &d.t)?;
            let sl = tdm::student_loss(
                &x0,
                &real,
                &fake_x0,
                self.cfg.distance,
                self.cfg.huber_c,
                &w,
            )?;
            sum_ls += finite("loss_student", &sl.loss)?;
            sum_norm += sl.normaliser;
            acc_student.add(self.student_t.backward(&sl.loss)?)?;
        }
        let st = self.student_t.apply(acc_student.mean()?)?;
        m.insert("loss_student".into(), sum_ls / k);
        m.insert("normaliser".into(), sum_norm / k);
        self.student_t.log(&mut m, "student", &st);
        Ok(m)
    }

    pair::methods!();
    fn spec(&self) -> GeneratorSpec {
        // TDM's student samples deterministically (DDIM along its own timesteps).
        pair::spec(&self.sigmas, false)
    }
    fn text_probe(&self, n: usize) -> Result<Option<graphs::TextCond<Tensor>>> {
        let Some(t) = &self.teacher.text else {
            return Ok(None);
        };
        Ok(Some(t.uncond(n)?))
    }
}

/// `eps = (x - x0) / s` per sample.
fn tdm_eps(x: &Tensor, x0: &Tensor, s: &[f64]) -> Result<Tensor> {
    let inv: Vec<f32> = s.iter().map(|&s| (1.0 / s) as f32).collect();
    let inv = Tensor::from_vec(inv, s.len(), x.device())?;
    Ok((x - x0)?.broadcast_mul(&graphs::losses::per_image(&inv)?)?)
}
