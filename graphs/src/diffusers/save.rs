//! Writing a `UNet2DModel` back as a diffusers model folder (`config.json` with every key
//! diffusers writes, `diffusion_pytorch_model.safetensors` by state-dict keys), so a model
//! trained or fine-tuned here loads in diffusers' own `UNet2DModel.from_pretrained`.

use super::config::{BlockType, ClassEmbed, TimeScaleShift, UNet2DConfig};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The diffusers version whose `UNet2DModel` this implementation mirrors.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

impl UNet2DConfig {
    /// `config.json` as diffusers' `save_pretrained` writes it (every key).
    pub fn to_json(&self) -> Value {
        let blocks = |v: &[BlockType], plain: &str, attn: &str| -> Vec<String> {
            v.iter()
                .map(|b| match b {
                    BlockType::Plain => plain.to_string(),
                    BlockType::Attn => attn.to_string(),
                })
                .collect()
        };
        let (class_embed_type, num_class_embeds) = match self.class_embed {
            ClassEmbed::None => (Value::Null, Value::Null),
            ClassEmbed::Table(n) => (Value::Null, json!(n)),
            ClassEmbed::Timestep => (json!("timestep"), Value::Null),
            ClassEmbed::Identity => (json!("identity"), Value::Null),
        };
        json!({
            "_class_name": "UNet2DModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "add_attention": self.add_attention,
            "attention_head_dim": self.attention_head_dim,
            "attn_norm_num_groups": self.attn_norm_num_groups,
            "block_out_channels": self.block_out_channels,
            "center_input_sample": self.center_input_sample,
            "class_embed_type": class_embed_type,
            "down_block_types": blocks(&self.down_block_types, "DownBlock2D", "AttnDownBlock2D"),
            "downsample_padding": self.downsample_padding,
            "downsample_type": "conv",
            "dropout": self.dropout,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": num(self.freq_shift),
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": num(self.mid_block_scale_factor),
            "mid_block_type": if self.mid_block { json!("UNetMidBlock2D") } else { Value::Null },
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "num_class_embeds": num_class_embeds,
            "num_train_timesteps": self.num_train_timesteps,
            "out_channels": self.out_channels,
            "resnet_time_scale_shift": match self.resnet_time_scale_shift {
                TimeScaleShift::Default => "default",
                TimeScaleShift::ScaleShift => "scale_shift",
            },
            "sample_size": self.sample_size,
            "time_embedding_dim": self.time_embedding_dim,
            "time_embedding_type": "positional",
            "up_block_types": blocks(&self.up_block_types, "UpBlock2D", "AttnUpBlock2D"),
            "upsample_type": "conv",
        })
    }
}

/// Writes `path` through a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Writes a diffusers model folder: the weights first, `config.json` last (its presence marks
/// the folder complete). Every weight the config needs must be in `weights` (checked).
pub fn save_unet(dir: &Path, cfg: &UNet2DConfig, weights: &HashMap<String, Tensor>) -> Result<()> {
    super::load::check_weights(cfg, weights)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let w = dir.join("diffusion_pytorch_model.safetensors");
    write_atomic(&w, |p| {
        candle_core::safetensors::save(weights, p)
            .with_context(|| format!("writing {}", p.display()))
    })?;
    let text = serde_json::to_string_pretty(&cfg.to_json())?;
    write_atomic(&dir.join("config.json"), |p| {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
    })
}

/// Writes a diffusers `UNet2DConditionModel` folder (e.g. a student with its LoRA merged), the
/// weights first and `config.json` last, each atomically; every weight the config needs must be
/// in `weights` (checked by name and shape, nothing else allowed).
pub fn save_unet_condition(
    dir: &Path,
    cfg: &super::condition_config::UNet2DConditionConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    super::load::check_named(
        &super::unet2d_condition::expected_params_condition(cfg)?,
        weights,
    )?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let w = dir.join("diffusion_pytorch_model.safetensors");
    write_atomic(&w, |p| {
        candle_core::safetensors::save(weights, p)
            .with_context(|| format!("writing {}", p.display()))
    })?;
    let text = serde_json::to_string_pretty(&cfg.to_json())?;
    write_atomic(&dir.join("config.json"), |p| {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
    })
}
