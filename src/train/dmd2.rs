//! DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", 2024),
//! following the official EDM code (`main/edm/edm_guidance.py`, `train_edm.py`):
//!
//! * three networks: the frozen teacher (real score), a fake score and the student (generator),
//!   both initialised from the teacher's EMA weights, plus a GAN head on the fake score's bottleneck;
//! * every iteration the student generates images from noise (`sigma_0 * z` through the teacher's
//!   preconditioning at `sigma_0`, 80 for EDM); every `dfake_gen_update_ratio` iterations it gets
//!   the distribution-matching gradient (see `graphs::losses::dmd2`) plus the GAN generator loss;
//! * every iteration the fake score learns the student's (detached) images with the teacher's own
//!   denoising loss over the whole grid, and the GAN head (with the fake score) learns real vs
//!   generated images, both noised at a random level;
//! * multi-step students use backward simulation: one random step `k` per iteration, a no-grad
//!   rollout from pure noise for `k` steps with fresh noise at every re-noise, and the losses on
//!   step `k`'s x0 estimate.

use super::distill::{
    draw_condition, finite, grid_level, net_cond, pair, real_score, rollout_with, scalar,
    sigma_level, Method, StepMetrics, Teacher, TextPrompts, Trainable, TrainedNet,
};
use super::distill_config::{distill_config, DistillCommon};
use super::optim::AdamWConfig;
use super::{step_rng, DataOrder};
use crate::checkpoint::Role;
use crate::data::Dataset;
use crate::rng::SampleRngs;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use graphs::losses::dmd2::{dm_loss_weighted, FDivergence};
use graphs::losses::{gan, teacher_loss_with};
use graphs::nn::GanHead;
use graphs::{CandleBackend, Cond, Denoiser, GeneratorSpec, ModelConfig, NetCond, NoiseGrid};
use rand::Rng;
use std::collections::HashMap;

distill_config! {
    /// Everything that defines a DMD2 run (the `config.toml` of the run folder): the shared
    /// settings (`common`; `student_optim` is the student's, `fake_optim` the fake score's and the
    /// GAN head's) and DMD2's own.
    pub struct Dmd2Config {
        /// Overrides the first step's sigma (DMD2's `conditioning_sigma`, 80 for EDM = sigma_max).
        pub conditioning_sigma: Option<f64>,
        /// The student is updated every this many iterations, the fake score every iteration.
        pub dfake_gen_update_ratio: u64,
        /// Distribution-matching timesteps are drawn from `[min_step, max_step]` (fractions of the
        /// grid).
        pub min_step: f64,
        pub max_step: f64,
        /// The GAN head and its losses.
        pub gan: bool,
        /// Weight of the student's GAN loss `softplus(-D(fake))`.
        pub gan_generator_weight: f64,
        /// Weight of the head's loss `softplus(D(fake)) + softplus(-D(real))`.
        pub gan_critic_weight: f64,
        /// Real and generated images are noised at a grid timestep below this before the head.
        pub gan_max_timestep: usize,
        /// Class-conditional teachers: the head is a projection discriminator (a learned class
        /// embedding dotted with its pooled features is added to the logit), so it judges each
        /// image against its own class; `false`: DMD2's head, which sees the class only through
        /// the fake score's features. Refused for text-to-image and unconditional teachers.
        pub gan_projection: bool,
        /// Class-conditional teachers with a null class: the head also gets a classifier (AC-GAN),
        /// learned on real images (through the fake score's null-class features, so the label
        /// cannot leak in), and the student gets its cross-entropy against its own label at this
        /// weight, pushing off-class images towards their class; 0 = no classifier.
        pub gan_classifier_weight: f64,
        /// Images reach the classifier noised at a grid timestep below this (the class must be
        /// readable: 250 is sigma <= 0.17 on the EDM grid).
        pub gan_classifier_max_timestep: usize,
        /// The student's cross-entropy only on the images the classifier assigns to another class
        /// (those already of their class keep their variety); `false`: on every image.
        pub gan_classifier_misclassified_only: bool,
        /// The f-divergence distribution matching descends (f-distill, Xu et al. 2025):
        /// `reverse_kl` (DMD's), or the less mode-seeking `forward_kl` / `jensen_shannon`, whose
        /// per-sample weights come from the GAN head's logit on the noisy `x_t` (a density-ratio
        /// estimate, real = teacher); those need `gan = true`.
        pub f_divergence: FDivergence,
        /// Multi-step students: step `k`'s images are matched (and the fake score learns them)
        /// only at noise levels in its own phase, the grid timesteps from its own timestep down
        /// to the next step's (Phased DMD, arXiv 2510.27684), instead of over the whole grid;
        /// no effect on a 1-step student.
        pub phased: bool,
    }
}

impl Default for Dmd2Config {
    fn default() -> Self {
        let adam = AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.01,
            warmup_steps: 100,
            grad_clip: 10.0,
            ..Default::default()
        };
        Self {
            common: DistillCommon::new(vec![999], adam.clone(), adam),
            conditioning_sigma: None,
            dfake_gen_update_ratio: 10,
            min_step: 0.02,
            max_step: 0.98,
            gan: true,
            gan_generator_weight: 3e-3,
            gan_critic_weight: 1e-2,
            gan_max_timestep: 1000,
            gan_projection: false,
            gan_classifier_weight: 0.0,
            gan_classifier_max_timestep: 250,
            gan_classifier_misclassified_only: true,
            f_divergence: FDivergence::ReverseKl,
            phased: true,
        }
    }
}

impl Dmd2Config {
    pub fn validate(&self, grid: &NoiseGrid) -> Result<()> {
        self.common.validate(grid)?;
        ensure!(
            self.dfake_gen_update_ratio >= 1,
            "dfake_gen_update_ratio must be >= 1"
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_step)
                && (0.0..=1.0).contains(&self.max_step)
                && self.min_step <= self.max_step,
            "need 0 <= min_step <= max_step <= 1"
        );
        ensure!(
            self.gan_max_timestep >= 1 && self.gan_max_timestep <= grid.len(),
            "gan_max_timestep must be in 1..={}",
            grid.len()
        );
        if let Some(s) = self.conditioning_sigma {
            ensure!(s > 0.0, "conditioning_sigma must be positive");
        }
        ensure!(
            self.gan_classifier_weight >= 0.0 && self.gan_classifier_weight.is_finite(),
            "gan_classifier_weight must be >= 0, got {}",
            self.gan_classifier_weight
        );
        ensure!(
            self.gan_classifier_max_timestep >= 1 && self.gan_classifier_max_timestep <= grid.len(),
            "gan_classifier_max_timestep must be in 1..={}",
            grid.len()
        );
        ensure!(
            self.gan || self.gan_classifier_weight == 0.0,
            "gan_classifier_weight (--gan-classifier-weight) is a second output of the GAN head: \
             it needs gan = true"
        );
        ensure!(
            self.gan || !self.f_divergence.needs_ratio(),
            "f_divergence = {} (--f-divergence) weights distribution matching by the GAN head's \
             density-ratio estimate: it needs gan = true (or f_divergence = reverse_kl)",
            self.f_divergence.name()
        );
        Ok(())
    }

    /// The student's sigmas, descending.
    pub fn sigmas(&self, grid: &NoiseGrid) -> Vec<f64> {
        let mut s = grid.sigmas_of(&self.common.timesteps);
        if let Some(c) = self.conditioning_sigma {
            s[0] = c;
        }
        s
    }

    /// The config without what may change on resume (totals, cadence, precision).
    pub fn resume_key(&self) -> Result<String> {
        let mut c = self.clone();
        c.common.clear_resumable();
        Ok(toml::to_string(&c)?)
    }
}

/// The DMD2 method: student, fake score, GAN head and their optimisers.
pub struct Dmd2<'a> {
    pub cfg: Dmd2Config,
    teacher: &'a Teacher,
    data: &'a Dataset,
    grid: NoiseGrid,
    sigmas: Vec<f64>,
    student: TrainedNet,
    fake: TrainedNet,
    head: Option<GanHead>,
    student_t: Trainable,
    /// Fake score and GAN head together (DMD2's "guidance" optimiser).
    fake_t: Trainable,
    order: DataOrder,
    device: Device,
    /// Counts, for the update-schedule test.
    pub fake_updates: u64,
    _head_vars: Option<VarMap>,
    /// A text-to-image teacher's real data: `data` holds VAE latents whose label `i` is
    /// caption `i` of these ([`Teacher::encode_captioned`]).
    captions: Option<&'a TextPrompts>,
}

impl<'a> Dmd2<'a> {
    pub fn new(
        cfg: Dmd2Config,
        teacher: &'a Teacher,
        data: &'a Dataset,
        device: &Device,
    ) -> Result<Self> {
        let mcfg = teacher.meta.model.clone();
        let grid = NoiseGrid::new(&mcfg.parameterisation);
        cfg.validate(&grid)?;
        teacher.check_guidance(cfg.common.cfg_scale)?;
        let (uc, ur, ncls) = (mcfg.channels(), mcfg.resolution(), mcfg.num_classes());
        if cfg.gan && (data.channels != uc || data.height != ur || data.width != ur) {
            bail!(
                "the GAN head compares generated images with real ones: data {} is {}x{}x{}, the teacher makes {uc}x{ur}x{ur}",
                data.source, data.channels, data.height, data.width
            );
        }
        if cfg.gan
            && mcfg.network.is_class_conditional()
            && data.labels.iter().any(|&l| l as usize >= ncls)
        {
            bail!(
                "data {} has labels outside the teacher's {ncls} classes",
                data.source
            );
        }
        let w = teacher.weights();
        let (lora, seed) = (&cfg.common.lora, cfg.common.run.seed);
        let (student, svars) =
            TrainedNet::new(&mcfg, &teacher.den, &w, lora, (seed, 0x10A5), device)?;
        let (fake, mut fvars) =
            TrainedNet::new(&mcfg, &teacher.den, &w, lora, (seed, 0x10A6), device)?;
        let (head, head_vm) = if cfg.gan {
            let vm = VarMap::new();
            let (c, side, groups) = mcfg.network.bottleneck_shape();
            let labelled = mcfg.network.is_class_conditional() && teacher.text.is_none();
            if cfg.gan_projection && !labelled {
                bail!(
                    "gan_projection (--gan-projection) scores images against their class: the \
                     teacher {} has no class labels (text-to-image or unconditional); turn it off",
                    cfg.common.teacher.display()
                );
            }
            let classes = cfg.gan_projection.then_some(ncls);
            let vb = VarBuilder::from_varmap(&vm, DType::F32, device).pp("gan_head");
            let mut head = GanHead::new(vb.clone(), c, side, groups, classes)?;
            if cfg.gan_classifier_weight > 0.0 {
                if !labelled || teacher.den.null_class().is_none() {
                    bail!(
                        "gan_classifier_weight (--gan-classifier-weight) classifies images through \
                         the fake score's null-class features: the teacher {} has no class labels \
                         or no null class; set it to 0",
                        cfg.common.teacher.display()
                    );
                }
                head = head.with_classifier(vb.pp("classifier"), ncls)?;
            }
            fvars.extend(super::seeded_init(
                &vm,
                cfg.common.run.seed,
                0x6A11,
                device,
            )?);
            (Some(head), Some(vm))
        } else {
            (None, None)
        };
        let sigmas = cfg.sigmas(&grid);
        Ok(Self {
            student_t: Trainable::new("student", svars, cfg.common.student_optim.clone())?
                .with_precision(cfg.common.run.precision, &cfg.common.run.loss_scale),
            fake_t: Trainable::new("fake", fvars, cfg.common.fake_optim.clone())?
                .with_precision(cfg.common.run.precision, &cfg.common.run.loss_scale),
            order: DataOrder::new(data.len().max(1), cfg.common.run.seed ^ 0xD2),
            teacher,
            data,
            grid,
            sigmas,
            student,
            fake,
            head,
            cfg,
            device: device.clone(),
            fake_updates: 0,
            _head_vars: head_vm,
            captions: None,
        })
    }

    /// The captions of a text-to-image teacher's real data (the GAN term's real latents).
    pub fn with_captions(mut self, captions: &'a TextPrompts) -> Self {
        self.captions = Some(captions);
        self
    }

    /// The student and the fake score as they are now (under LoRA: the teacher's tensors with
    /// the adapters merged).
    pub fn networks(&self) -> Result<(Denoiser, Denoiser)> {
        Ok((self.student.net()?, self.fake.net()?))
    }

    /// Step `k`'s distribution-matching timesteps: `[min_step, max_step]` as fractions of the
    /// grid (DMD2's min/max_step_percent), within the step's phase when phased.
    fn dm_bounds(&self, k: usize) -> (usize, usize) {
        dm_bounds(&self.cfg, self.grid.len(), k)
    }

    /// The fake score's bottleneck features of `x` noised at the per-sample grid timesteps `ts`
    /// with noise `eps`.
    fn noised_feats(
        &self,
        b: &CandleBackend,
        fake: &Denoiser,
        x: &Tensor,
        cond: NetCond<'_, Tensor>,
        (ts, eps): (Vec<usize>, Tensor),
    ) -> Result<Tensor> {
        let level = grid_level(&self.grid, &ts, &self.device)?;
        let xn = (x + eps.broadcast_mul(&graphs::losses::per_image(&level.sigma)?)?)?;
        fake.bottleneck_with(b, &xn, &level, cond)
    }

    /// GAN realism logits of `x` noised with `draw` (see [`Self::noised_feats`]).
    fn gan_logits(
        &self,
        b: &CandleBackend,
        fake: &Denoiser,
        head: &GanHead,
        x: &Tensor,
        cond: NetCond<'_, Tensor>,
        draw: (Vec<usize>, Tensor),
    ) -> Result<Tensor> {
        let labels = match cond {
            NetCond::Labels(l) => Some(l),
            NetCond::Text(_) => None,
        };
        head.forward(b, &self.noised_feats(b, fake, x, cond, draw)?, labels)
    }

    /// The fake score's null-class features of `x` noised with `draw`: the classifier's input
    /// (the label must not reach it).
    fn null_feats(
        &self,
        b: &CandleBackend,
        fake: &Denoiser,
        x: &Tensor,
        draw: (Vec<usize>, Tensor),
    ) -> Result<Tensor> {
        let null = self
            .teacher
            .den
            .null_class()
            .ok_or_else(|| anyhow::anyhow!("the GAN classifier needs a null class"))?;
        let nulls = Tensor::full(null as u32, x.dim(0)?, &self.device)?;
        self.noised_feats(b, fake, x, NetCond::Labels(&nulls), draw)
    }

    /// Each sample's GAN noise draw: a grid timestep below `gan_max_timestep` and unit noise.
    fn gan_draw(
        &self,
        rngs: &mut SampleRngs,
        per_sample: &[usize],
    ) -> Result<(Vec<usize>, Tensor)> {
        self.noise_draw(rngs, per_sample, self.cfg.gan_max_timestep)
    }

    /// Each sample's classifier noise draw (below `gan_classifier_max_timestep`).
    fn class_draw(
        &self,
        rngs: &mut SampleRngs,
        per_sample: &[usize],
    ) -> Result<(Vec<usize>, Tensor)> {
        self.noise_draw(rngs, per_sample, self.cfg.gan_classifier_max_timestep)
    }

    /// A grid timestep below `below` and unit noise per sample.
    fn noise_draw(
        &self,
        rngs: &mut SampleRngs,
        per_sample: &[usize],
        below: usize,
    ) -> Result<(Vec<usize>, Tensor)> {
        let top = below - 1;
        let ts = rngs.each(|r| r.gen_range(0..=top));
        Ok((ts, rngs.randn(per_sample, &self.device)?))
    }
}

/// Step `k`'s phase of the grid, `[lo, hi]` inclusive: from its own timestep (the top of the
/// grid for the first step) down to just above the next step's (0 for the last); the whole grid
/// unless the config is phased and the student has several steps.
pub fn phase(cfg: &Dmd2Config, grid_len: usize, k: usize) -> (usize, usize) {
    let (ts, last) = (&cfg.common.timesteps, grid_len - 1);
    if !cfg.phased || ts.len() < 2 {
        return (0, last);
    }
    let hi = if k == 0 { last } else { ts[k].min(last) };
    let lo = ts.get(k + 1).map_or(0, |&t| t + 1);
    (lo.min(hi), hi)
}

/// Step `k`'s distribution-matching timesteps, `[lo, hi]` inclusive: `[min_step, max_step]` of
/// the grid within step `k`'s [`phase`] (the phase itself where they do not overlap).
pub fn dm_bounds(cfg: &Dmd2Config, grid_len: usize, k: usize) -> (usize, usize) {
    let t = grid_len;
    let lo = (cfg.min_step * t as f64) as usize;
    let hi = ((cfg.max_step * t as f64) as usize).min(t - 1).max(lo);
    let (plo, phi) = phase(cfg, grid_len, k);
    let (l, h) = (lo.max(plo), hi.min(phi));
    if l <= h {
        (l, h)
    } else {
        (plo, phi)
    }
}

impl Method for Dmd2<'_> {
    const ROLE: Role = Role::Dmd2;

    fn name(&self) -> &'static str {
        "dmd2"
    }

    fn step(&mut self, step: u64) -> Result<StepMetrics> {
        let dev = self.device.clone();
        let b =
            CandleBackend::training(&dev).with_autocast(self.cfg.common.run.precision.autocast());
        let u = &self.teacher.meta.model;
        let (c, r) = (u.channels(), u.resolution());
        // This rank's slice of the global batch: batch-wide draws (the backward-simulation step)
        // from the step's stream, per-sample draws from each sample's own stream.
        let global = self.cfg.common.run.batch_size;
        let range = crate::parallel::shard(global)?;
        let n = range.len();
        let shape = [n, c, r, r];
        let seed = self.cfg.common.run.seed;
        let mut rng = step_rng(seed, step, 0xD3D2);
        let mut rngs = SampleRngs::new(seed, step, 0xD3D3, range.clone());
        let mut m = StepMetrics::new();
        // The networks as they are now (under LoRA: the base with the adapters merged).
        let (student, fake) = (self.student.net()?, self.fake.net()?);
        // Class labels, or for a text-to-image teacher the index of each sample's prompt.
        let text = self.teacher.text.as_ref();
        let (_, labels, cond) = draw_condition(text, u.num_classes(), &mut rngs, &dev)?;
        let nc = net_cond(&cond, &labels);
        let z = rngs.randn(&shape[1..], &dev)?;
        // Backward simulation: the input of a random step k, from a no-grad rollout.
        let steps = self.sigmas.len();
        let k = if steps > 1 {
            rng.gen_range(0..steps)
        } else {
            0
        };
        let fresh: Vec<Tensor> = (0..k)
            .map(|_| rngs.randn(&shape[1..], &dev))
            .collect::<Result<_>>()?;
        let x_in = if k == 0 {
            (&z * graphs::sampler::initial_scale(&student.param, self.sigmas[0]))?
        } else {
            let frozen = graphs::params::detached(&student)?;
            let ro = rollout_with(&b, &frozen, &z, nc, &self.sigmas, k, Some(&fresh))?;
            ro.xs[k].clone()
        };
        let level_k = sigma_level(&student, &vec![self.sigmas[k]; n], &dev)?;
        let gen_turn = step.is_multiple_of(self.cfg.dfake_gen_update_ratio);
        let x0_gen = if gen_turn {
            let x0 = student.forward_with(&b, &x_in, &level_k, nc)?;
            // Distribution matching at a random timestep (no gradient through either score).
            let (lo, hi) = self.dm_bounds(k);
            let ts = rngs.each(|r| r.gen_range(lo..=hi));
            let level = grid_level(&self.grid, &ts, &dev)?;
            let eps = rngs.randn(&shape[1..], &dev)?;
            let xd = x0.detach();
            let x_t = (&xd + eps.broadcast_mul(&graphs::losses::per_image(&level.sigma)?)?)?;
            let (scale, interval) = (self.cfg.common.cfg_scale, self.cfg.common.cfg_interval);
            let real = real_score(
                &b,
                &self.teacher.den,
                self.teacher.guide.as_ref(),
                &x_t,
                &level,
                &labels,
                &cond,
                scale,
                interval,
            )?;
            let fake_frozen = graphs::params::detached(&fake)?;
            let fake_x0 = fake_frozen.forward_with(&b, &x_t, &level, nc)?;
            // Through frozen copies: the head and fake score get nothing from the student's terms.
            let hf = self.head.as_ref().map(graphs::params::detached_head);
            let weights = match (&hf, self.cfg.f_divergence.needs_ratio()) {
                (Some(hf), true) => {
                    // The head's logit at x_t itself estimates log(p_teacher / p_student) there.
                    let labels = match nc {
                        NetCond::Labels(l) => Some(l),
                        NetCond::Text(_) => None,
                    };
                    let feats = fake_frozen.bottleneck_with(&b, &x_t, &level, nc)?;
                    let log_r = hf.forward(&b, &feats, labels)?;
                    m.insert("log_density_ratio".into(), scalar(&log_r.mean_all()?)?);
                    let w = self.cfg.f_divergence.weights(&log_r)?;
                    if let Some(w) = &w {
                        m.insert("f_weight_max".into(), scalar(&w.max(0)?)?);
                    }
                    w
                }
                _ => None,
            };
            let dm = dm_loss_weighted(&x0, &real, &fake_x0, weights.as_ref())?;
            m.insert("loss_dm".into(), finite("loss_dm", &dm.loss)?);
            m.insert("dm_normaliser".into(), dm.normaliser);
            let mut loss = dm.loss;
            if let Some(hf) = &hf {
                let draw = self.gan_draw(&mut rngs, &shape[1..])?;
                let logits = self.gan_logits(&b, &fake_frozen, hf, &x0, nc, draw)?;
                let g = gan::generator_loss(&logits)?;
                m.insert("loss_gan_gen".into(), finite("loss_gan_gen", &g)?);
                loss = (loss + (g * self.cfg.gan_generator_weight)?)?;
                if hf.classifier.is_some() {
                    let draw = self.class_draw(&mut rngs, &shape[1..])?;
                    let cl = hf.classify(&b, &self.null_feats(&b, &fake_frozen, &x0, draw)?)?;
                    let only = self.cfg.gan_classifier_misclassified_only;
                    let (ce, mean, hit) = gan::classifier_generator_loss(&cl, &labels, only)?;
                    m.insert("loss_class_gen".into(), finite("loss_class_gen", &mean)?);
                    m.insert("class_acc_gen".into(), scalar(&hit)?);
                    loss = (loss + (ce * self.cfg.gan_classifier_weight)?)?;
                }
            }
            let st = self.student_t.update(&loss)?;
            self.student_t.log(&mut m, "student", &st);
            x0.detach()
        } else {
            let frozen = graphs::params::detached(&student)?;
            frozen.forward_with(&b, &x_in, &level_k, nc)?
        };
        // Fake-score turn: the teacher's own loss on the student's images, over the whole grid
        // (phased: over step k's phase, so each phase of the fake score models its own step).
        let (flo, fhi) = phase(&self.cfg, self.grid.len(), k);
        let ts = rngs.each(|r| r.gen_range(flo..=fhi));
        let noise = rngs.randn(&shape[1..], &dev)?;
        let noise_cond = self
            .teacher
            .meta
            .model
            .parameterisation
            .grid_training_level(&self.grid, &ts)
            .to_tensor(&dev)?;
        let lf = teacher_loss_with(&b, &fake, &x0_gen, nc, &noise_cond, &noise)?;
        m.insert("loss_fake".into(), finite("loss_fake", &lf)?);
        let mut loss = lf;
        if let Some(head) = &self.head {
            let idx = self.order.batch(step, global)[range.clone()].to_vec();
            let (real, real_labels) = self.data.batch(&idx, &dev)?;
            // Real and generated samples' conditions, concatenated like the samples.
            let both_cond = match (&cond, self.captions) {
                (None, _) => Cond::Labels(Tensor::cat(&[&real_labels, &labels], 0)?),
                (Some(Cond::Text { cond: c, .. }), Some(caps)) => {
                    let ids: Vec<u32> = real_labels.to_vec1()?;
                    let Cond::Text { cond: rc, .. } = caps.cond(&ids)? else {
                        unreachable!("captions give a text condition")
                    };
                    let added = match (&rc.added, &c.added) {
                        (Some(r), Some(g)) => Some(graphs::cond::AddedCond {
                            text_embeds: Tensor::cat(&[&r.text_embeds, &g.text_embeds], 0)?,
                            time_ids: Tensor::cat(&[&r.time_ids, &g.time_ids], 0)?,
                        }),
                        _ => None,
                    };
                    Cond::Text {
                        cond: graphs::TextCond {
                            prompt_embeds: Tensor::cat(&[&rc.prompt_embeds, &c.prompt_embeds], 0)?,
                            added,
                        },
                        uncond: None,
                    }
                }
                _ => bail!(
                    "DMD2's GAN term on a text-to-image teacher needs real images with captions \
                     (--data an image+caption folder), or gan = false (--no-gan)"
                ),
            };
            // Real and generated images through the fake score and head in one batched call;
            // each sample draws the noise of its real image, then of its generated one.
            let (ts_real, eps_real) = self.gan_draw(&mut rngs, &shape[1..])?;
            let (ts_fake, eps_fake) = self.gan_draw(&mut rngs, &shape[1..])?;
            let both = self.gan_logits(
                &b,
                &fake,
                head,
                &Tensor::cat(&[&real, &x0_gen], 0)?,
                both_cond.net(),
                (
                    [ts_real, ts_fake].concat(),
                    Tensor::cat(&[&eps_real, &eps_fake], 0)?,
                ),
            )?;
            let nr = real.dim(0)?;
            let real_logits = both.narrow(0, 0, nr)?;
            let fake_logits = both.narrow(0, nr, n)?;
            let cl = gan::critic_loss(&real_logits, &fake_logits)?;
            m.insert("loss_gan_critic".into(), finite("loss_gan_critic", &cl)?);
            m.insert(
                "p_real_on_real".into(),
                scalar(&candle_nn::ops::sigmoid(&real_logits)?.mean_all()?)?,
            );
            m.insert(
                "p_real_on_fake".into(),
                scalar(&candle_nn::ops::sigmoid(&fake_logits)?.mean_all()?)?,
            );
            loss = (loss + (cl * self.cfg.gan_critic_weight)?)?;
            if head.classifier.is_some() {
                // Learned on real images only, on the fake score's features as they are (the
                // classifier's loss does not train the fake score).
                let draw = self.class_draw(&mut rngs, &shape[1..])?;
                let feats = self.null_feats(&b, &fake, &real, draw)?.detach();
                let cls = head.classify(&b, &feats)?;
                let ce = candle_nn::loss::cross_entropy(&cls, &real_labels)?;
                m.insert("loss_gan_class".into(), finite("loss_gan_class", &ce)?);
                let hit = cls.argmax(1)?.eq(&real_labels)?.to_dtype(DType::F32)?;
                m.insert("class_acc_real".into(), scalar(&hit.mean_all()?)?);
                loss = (loss + (ce * self.cfg.gan_critic_weight)?)?;
            }
        }
        let st = self.fake_t.update(&loss)?;
        if st.is_some() {
            self.fake_updates += 1;
        }
        self.fake_t.log(&mut m, "fake", &st);
        Ok(m)
    }

    pair::methods!();
    fn spec(&self) -> GeneratorSpec {
        // Backward simulation trains multi-step students on fresh noise at every re-noise.
        pair::spec(&self.sigmas, self.sigmas.len() > 1)
    }
    fn text_probe(&self, n: usize) -> Result<Option<graphs::TextCond<Tensor>>> {
        let Some(t) = &self.teacher.text else {
            return Ok(None);
        };
        Ok(Some(t.uncond(n)?))
    }
}
