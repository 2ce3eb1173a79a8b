//! The settings every distillation method shares ([`DistillCommon`]: teacher, run loop, student
//! timesteps, the teacher's guidance scale, the two optimisers) and [`distill_config!`], which
//! embeds them in a method's config.
//!
//! The TOML stays one flat table (`teacher`, `timesteps`, `[run]`, `[student_optim]`, ... next to
//! the method's own keys, as run folders have always stored it). serde's `flatten` would read that
//! but cannot be combined with `deny_unknown_fields` (and loses the line of a bad value), so the
//! macro derives a flat twin of the config that serde reads and writes: an unknown key is refused
//! by serde itself, naming the key, every valid key and its line, exactly as before.

use super::optim::AdamWConfig;
use super::runner::RunConfig;
use anyhow::{ensure, Result};
use graphs::NoiseGrid;
use std::path::PathBuf;

/// What DMD2 and TDM share, embedded in both configs as `common`.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillCommon {
    /// The teacher checkpoint folder.
    pub teacher: PathBuf,
    pub run: RunConfig,
    /// The student's steps as timesteps of the 1000-bin noise grid, descending (`[999]`: one step
    /// at sigma_max; `[999, 749, 499, 249]`: four steps).
    pub timesteps: Vec<usize>,
    /// Classifier-free guidance scale of the teacher (the real score) in the student's target;
    /// 1 = off. (DMD2's `real_guidance_scale` before; still read, with a deprecation note.)
    pub cfg_scale: f64,
    /// Guide the real score only where the noise level's sigma lies in `(lo, hi]` (the
    /// conditional x0 elsewhere); `None`: at every level.
    pub cfg_interval: Option<[f64; 2]>,
    /// Autoguidance (Karras et al. 2024): the real score is guided against this weaker teacher
    /// checkpoint's conditional x0 (e.g. the same teacher trained for fewer steps) instead of
    /// the teacher's unconditional one, at `cfg_scale` and within `cfg_interval`.
    pub autoguidance: Option<PathBuf>,
    /// Optimiser of the student.
    pub student_optim: AdamWConfig,
    /// Optimiser of the fake score (and DMD2's GAN head).
    pub fake_optim: AdamWConfig,
    /// LoRA on the student and the fake score (`[lora]`; rank 0, the default, trains every
    /// weight). With a rank, only the adapters are trained and stored in the training state; the
    /// base weights are the teacher's own tensors, shared by all three networks.
    pub lora: graphs::nn::lora::LoraConfig,
}

impl DistillCommon {
    /// Defaults with the given student timesteps and optimisers.
    pub fn new(timesteps: Vec<usize>, student_optim: AdamWConfig, fake_optim: AdamWConfig) -> Self {
        Self {
            teacher: PathBuf::from("runs/teacher/checkpoint"),
            run: RunConfig::default(),
            timesteps,
            cfg_scale: 1.5,
            cfg_interval: None,
            autoguidance: None,
            student_optim,
            fake_optim,
            lora: Default::default(),
        }
    }

    pub fn validate(&self, grid: &NoiseGrid) -> Result<()> {
        self.run.validate()?;
        self.lora.validate()?;
        if let Some([lo, hi]) = self.cfg_interval {
            ensure!(
                lo >= 0.0 && lo < hi,
                "cfg_interval must be [lo, hi] sigmas with 0 <= lo < hi, got [{lo}, {hi}]"
            );
        }
        check_timesteps(&self.timesteps, grid)
    }

    /// Clears what may change on resume: totals, cadence, precision, and the cosine decay length
    /// (derived from the step count when 0 in the config).
    pub fn clear_resumable(&mut self) {
        self.run.clear_resumable();
        (self.student_optim.decay_steps, self.fake_optim.decay_steps) = (0, 0);
    }

    /// Both optimisers, for flags that set them together.
    pub fn optims(&mut self) -> [&mut AdamWConfig; 2] {
        [&mut self.student_optim, &mut self.fake_optim]
    }
}

/// Student timesteps must be non-empty, strictly descending and on the grid.
pub fn check_timesteps(ts: &[usize], grid: &NoiseGrid) -> Result<()> {
    ensure!(!ts.is_empty(), "a student needs at least one timestep");
    for w in ts.windows(2) {
        ensure!(
            w[0] > w[1],
            "student timesteps must be strictly descending, got {ts:?}"
        );
    }
    ensure!(
        ts[0] < grid.len(),
        "timestep {} is outside the noise grid 0..{}",
        ts[0],
        grid.len()
    );
    Ok(())
}

/// Declares a distillation config: `pub common: DistillCommon` plus the method's own fields (with
/// their doc comments and serde attributes), serialised as one flat table through a private twin
/// struct `flat::Config` (see the module docs). The config must implement `Default`.
macro_rules! distill_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(from = "flat::Config", into = "flat::Config")]
        pub struct $name {
            /// What every distillation method shares (flat in the TOML).
            pub common: $crate::train::distill_config::DistillCommon,
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        /// The config as serde reads and writes it: one flat table.
        mod flat {
            #[allow(unused_imports)]
            use super::*;
            use $crate::train::distill_config::DistillCommon;
            use $crate::train::optim::AdamWConfig;
            use $crate::train::runner::RunConfig;
            use std::path::PathBuf;

            #[derive(Clone, serde::Serialize, serde::Deserialize)]
            #[serde(default, deny_unknown_fields)]
            pub struct Config {
                teacher: PathBuf,
                run: RunConfig,
                timesteps: Vec<usize>,
                $( $(#[$fmeta])* $field: $ty, )*
                #[serde(alias = "real_guidance_scale")]
                cfg_scale: f64,
                #[serde(skip_serializing_if = "Option::is_none")]
                cfg_interval: Option<[f64; 2]>,
                #[serde(skip_serializing_if = "Option::is_none")]
                autoguidance: Option<PathBuf>,
                student_optim: AdamWConfig,
                fake_optim: AdamWConfig,
                // Absent when off, so a full fine-tuning run's config is what it always was.
                #[serde(skip_serializing_if = "graphs::nn::lora::LoraConfig::is_off")]
                lora: graphs::nn::lora::LoraConfig,
            }

            impl Default for Config {
                fn default() -> Self {
                    super::$name::default().into()
                }
            }

            impl From<super::$name> for Config {
                fn from(c: super::$name) -> Self {
                    let DistillCommon {
                        teacher,
                        run,
                        timesteps,
                        cfg_scale,
                        cfg_interval,
                        autoguidance,
                        student_optim,
                        fake_optim,
                        lora,
                    } = c.common;
                    Self {
                        teacher,
                        run,
                        timesteps,
                        cfg_scale,
                        cfg_interval,
                        autoguidance,
                        student_optim,
                        fake_optim,
                        lora,
                        $( $field: c.$field, )*
                    }
                }
            }

            impl From<Config> for super::$name {
                fn from(c: Config) -> Self {
                    Self {
                        common: DistillCommon {
                            teacher: c.teacher,
                            run: c.run,
                            timesteps: c.timesteps,
                            cfg_scale: c.cfg_scale,
                            cfg_interval: c.cfg_interval,
                            autoguidance: c.autoguidance,
                            student_optim: c.student_optim,
                            fake_optim: c.fake_optim,
                            lora: c.lora,
                        },
                        $( $field: c.$field, )*
                    }
                }
            }
        }
    };
}
pub(crate) use distill_config;

#[cfg(test)]
mod tests {
    use crate::train::dmd2::Dmd2Config;
    use crate::train::tdm::TdmConfig;

    #[test]
    fn configs_read_and_write_one_flat_table() {
        let text =
            "teacher = \"t/checkpoint\"\ntimesteps = [999, 499]\ncfg_scale = 2.5\ngan = false\n\
                    [run]\ntrain_steps = 4\n[fake_optim]\nlr = 0.5\n";
        let c: Dmd2Config = toml::from_str(text).unwrap();
        assert_eq!(c.common.teacher.to_str(), Some("t/checkpoint"));
        assert_eq!(c.common.timesteps, [999, 499]);
        assert_eq!(c.common.cfg_scale, 2.5);
        assert_eq!(c.common.run.train_steps, 4);
        assert_eq!(c.common.fake_optim.lr, 0.5);
        // Unset keys keep the method's defaults, the shared ones included.
        let d = Dmd2Config::default();
        assert_eq!(c.common.student_optim, d.common.student_optim);
        assert_eq!(c.dfake_gen_update_ratio, d.dfake_gen_update_ratio);
        assert!(!c.gan);
        let t = TdmConfig::default();
        let back: TdmConfig = toml::from_str("").unwrap();
        assert_eq!(back, t);
        // Written flat (no `common` table), and read back equal.
        for s in [toml::to_string(&c).unwrap(), toml::to_string(&t).unwrap()] {
            assert!(!s.contains("common"), "{s}");
            assert!(s.starts_with("teacher = "), "{s}");
        }
        assert_eq!(
            toml::from_str::<Dmd2Config>(&toml::to_string(&c).unwrap()).unwrap(),
            c
        );
        assert_eq!(
            toml::from_str::<TdmConfig>(&toml::to_string(&t).unwrap()).unwrap(),
            t
        );
        // DMD2's old name of the guidance scale.
        let old: Dmd2Config = toml::from_str("real_guidance_scale = 3.0\n").unwrap();
        assert_eq!(old.common.cfg_scale, 3.0);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name_and_line() {
        let e = toml::from_str::<TdmConfig>("cfg_scale = 2.0\nhuber = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `huber`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        // The valid keys listed include the shared and the method's own.
        assert!(e.contains("`timesteps`") && e.contains("`huber_c`"), "{e}");
        let e = toml::from_str::<Dmd2Config>("[run]\nstepz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `stepz`") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn cfg_interval_and_phased_read_from_toml_and_bad_intervals_are_refused() {
        let grid = graphs::NoiseGrid::new(&graphs::Parameterisation::edm());
        let c: Dmd2Config = toml::from_str("cfg_interval = [0.3, 5.0]\nphased = false\n").unwrap();
        assert_eq!((c.common.cfg_interval, c.phased), (Some([0.3, 5.0]), false));
        c.validate(&grid).unwrap();
        // Off by default, and then absent from the written config (older runs' keys unchanged).
        let d = Dmd2Config::default();
        assert!(d.common.cfg_interval.is_none() && d.phased);
        assert!(!toml::to_string(&d).unwrap().contains("cfg_interval"));
        for bad in ["[5.0, 0.3]", "[-1.0, 2.0]", "[1.0, 1.0]"] {
            let c: TdmConfig = toml::from_str(&format!("cfg_interval = {bad}\n")).unwrap();
            let e = c.validate(&grid).unwrap_err().to_string();
            assert!(e.contains("cfg_interval must be [lo, hi]"), "{bad}: {e}");
        }
        let e = toml::from_str::<TdmConfig>("cfg_interval = [0.3]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg_interval"), "{e}");
    }
}
