//! `config.json` of a diffusers `UNet2DModel`: every key diffusers reads, with diffusers' default
//! where absent. A value this implementation does not support is an error naming key and value;
//! an unknown key is an error too (it may change the network in a way we would silently ignore).

use crate::json::Reader;
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Block kinds of the encoder (`down_block_types`) and decoder (`up_block_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    /// `DownBlock2D` / `UpBlock2D`: res blocks only.
    Plain,
    /// `AttnDownBlock2D` / `AttnUpBlock2D`: a self-attention after every res block.
    Attn,
}

/// How the projected embedding enters a `ResnetBlock2D` (`resnet_time_scale_shift`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeScaleShift {
    /// `h = norm2(conv1(x) + proj(emb))`.
    Default,
    /// `h = norm2(conv1(x)) * (1 + scale) + shift`, `[scale, shift] = proj(emb)`.
    ScaleShift,
}

/// `class_embed_type` (with `num_class_embeds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassEmbed {
    /// No class conditioning.
    None,
    /// `class_embed_type: null` with `num_class_embeds: n`: a learned `[n, temb]` table.
    Table(usize),
    /// `timestep`: labels go through the sinusoidal projection and their own MLP.
    Timestep,
    /// `identity`: `class_labels` is already a `[N, temb]` embedding.
    Identity,
}

/// The `UNet2DModel` architecture, as diffusers reads it from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct UNet2DConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub time_embedding_dim: Option<usize>,
    pub freq_shift: f64,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<BlockType>,
    pub up_block_types: Vec<BlockType>,
    /// `mid_block_type: null` drops the mid block.
    pub mid_block: bool,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: usize,
    pub dropout: f64,
    /// `None`: one head of the block's width.
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: usize,
    /// Groups of the mid block's attention norm; `None` = diffusers' rule (see the mid block).
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub resnet_time_scale_shift: TimeScaleShift,
    pub add_attention: bool,
    pub class_embed: ClassEmbed,
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DConfig {
    /// diffusers' `UNet2DModel()` defaults.
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: vec![
                BlockType::Plain,
                BlockType::Attn,
                BlockType::Attn,
                BlockType::Attn,
            ],
            up_block_types: vec![
                BlockType::Attn,
                BlockType::Attn,
                BlockType::Attn,
                BlockType::Plain,
            ],
            mid_block: true,
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            dropout: 0.0,
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: TimeScaleShift::Default,
            add_attention: true,
            class_embed: ClassEmbed::None,
            num_train_timesteps: None,
        }
    }
}

/// Families of diffusers blocks that exist but are not implemented here.
const UNSUPPORTED_BLOCKS: &[&str] = &[
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
    "KDownBlock2D",
    "KCrossAttnDownBlock2D",
    "KUpBlock2D",
    "KCrossAttnUpBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "DownEncoderBlock2D",
    "AttnDownEncoderBlock2D",
    "UpDecoderBlock2D",
    "AttnUpDecoderBlock2D",
];

fn unsupported(key: &str, v: &Value, what: &str) -> anyhow::Error {
    anyhow::anyhow!("config.json: unsupported {key} = {v} ({what})")
}

fn blocks(key: &'static str, vals: &[Value], plain: &str, attn: &str) -> Result<Vec<BlockType>> {
    // diffusers strips a "UNetRes" prefix (old configs) before matching.
    vals.iter()
        .map(
            |v| match v.as_str().map(|s| s.strip_prefix("UNetRes").unwrap_or(s)) {
                Some(s) if s == plain => Ok(BlockType::Plain),
                Some(s) if s == attn => Ok(BlockType::Attn),
                Some(s) if UNSUPPORTED_BLOCKS.contains(&s) => Err(unsupported(
                    key,
                    v,
                    &format!("{s} is not implemented; supported: {plain}, {attn}"),
                )),
                _ => Err(unsupported(key, v, &format!("supported: {plain}, {attn}"))),
            },
        )
        .collect()
}

impl UNet2DConfig {
    /// Parses a `config.json` object.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut r = Reader::new(v, "config.json")?;
        let map = r.map;
        if let Some(c) = map.get("_class_name") {
            if c.as_str() != Some("UNet2DModel") {
                bail!("config.json: _class_name = {c} is not UNet2DModel");
            }
        }
        let d = Self::default();
        let down_block_types = match r.list("down_block_types")? {
            Some(l) => blocks("down_block_types", l, "DownBlock2D", "AttnDownBlock2D")?,
            None => d.down_block_types.clone(),
        };
        let up_block_types = match r.list("up_block_types")? {
            Some(l) => blocks("up_block_types", l, "UpBlock2D", "AttnUpBlock2D")?,
            None => d.up_block_types.clone(),
        };
        let block_out_channels = match r.list("block_out_channels")? {
            Some(l) => l
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        anyhow::anyhow!(
                            "config.json: block_out_channels entry {v} is not an integer"
                        )
                    })
                })
                .collect::<Result<_>>()?,
            None => d.block_out_channels.clone(),
        };
        let mid_block = match r.get("mid_block_type") {
            None if r.has("mid_block_type") => false,
            None => true,
            Some(v) if v.as_str() == Some("UNetMidBlock2D") => true,
            Some(v) => {
                return Err(unsupported(
                    "mid_block_type",
                    v,
                    "supported: UNetMidBlock2D, null",
                ))
            }
        };
        let sample_size = match r.get("sample_size") {
            None => None,
            Some(v) if v.is_u64() => Some(v.as_u64().unwrap_or_default() as usize),
            Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] && a[0].is_u64() => {
                Some(a[0].as_u64().unwrap_or_default() as usize)
            }
            Some(v) => {
                return Err(unsupported(
                    "sample_size",
                    v,
                    "an integer or a square [h, w]",
                ))
            }
        };
        let class_embed = {
            let n = r.usize_opt("num_class_embeds")?;
            match (r.str_opt("class_embed_type")?, n) {
                (None, None) => ClassEmbed::None,
                (None, Some(n)) => ClassEmbed::Table(n),
                (Some("timestep"), _) => ClassEmbed::Timestep,
                (Some("identity"), _) => ClassEmbed::Identity,
                (Some(s), _) => {
                    return Err(unsupported(
                        "class_embed_type",
                        &Value::String(s.into()),
                        "supported: null, timestep, identity",
                    ))
                }
            }
        };
        let resnet_time_scale_shift = match r.str_opt("resnet_time_scale_shift")? {
            None | Some("default") => TimeScaleShift::Default,
            Some("scale_shift") => TimeScaleShift::ScaleShift,
            Some(s) => {
                return Err(unsupported(
                    "resnet_time_scale_shift",
                    &Value::String(s.into()),
                    "supported: default, scale_shift",
                ))
            }
        };
        // Keys whose only supported value is diffusers' default.
        for (key, ok) in [
            ("time_embedding_type", &["positional"][..]),
            ("act_fn", &["silu", "swish"][..]),
            ("downsample_type", &["conv"][..]),
            ("upsample_type", &["conv"][..]),
        ] {
            if let Some(v) = r.get(key) {
                if !v.as_str().is_some_and(|s| ok.contains(&s)) {
                    return Err(unsupported(
                        key,
                        v,
                        &format!("supported: {}", ok.join(", ")),
                    ));
                }
            }
        }
        let attention_head_dim = if r.has("attention_head_dim") {
            r.usize_opt("attention_head_dim")?
        } else {
            d.attention_head_dim
        };
        let norm_num_groups = match r.get("norm_num_groups") {
            None if r.has("norm_num_groups") => {
                bail!("config.json: unsupported norm_num_groups = null (diffusers' blocks need a group count)")
            }
            _ => r.usize_or("norm_num_groups", d.norm_num_groups)?,
        };
        let cfg = Self {
            sample_size,
            in_channels: r.usize_or("in_channels", d.in_channels)?,
            out_channels: r.usize_or("out_channels", d.out_channels)?,
            center_input_sample: r.bool_or("center_input_sample", d.center_input_sample)?,
            time_embedding_dim: r.usize_opt("time_embedding_dim")?,
            freq_shift: r.f64_or("freq_shift", d.freq_shift)?,
            flip_sin_to_cos: r.bool_or("flip_sin_to_cos", d.flip_sin_to_cos)?,
            down_block_types,
            up_block_types,
            mid_block,
            block_out_channels,
            layers_per_block: r.usize_or("layers_per_block", d.layers_per_block)?,
            mid_block_scale_factor: r.f64_or("mid_block_scale_factor", d.mid_block_scale_factor)?,
            downsample_padding: r.usize_or("downsample_padding", d.downsample_padding)?,
            dropout: r.f64_or("dropout", d.dropout)?,
            attention_head_dim,
            norm_num_groups,
            attn_norm_num_groups: r.usize_opt("attn_norm_num_groups")?,
            norm_eps: r.f64_or("norm_eps", d.norm_eps)?,
            resnet_time_scale_shift,
            add_attention: r.bool_or("add_attention", d.add_attention)?,
            class_embed,
            num_train_timesteps: r.usize_opt("num_train_timesteps")?,
        };
        r.finish("UNet2DModel")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            crate::json::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in {}", path.display()))
    }

    /// Width of the time embedding (`time_embedding_dim`, default 4x the first block's width).
    pub fn temb_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Heads and head width of an attention over `channels` channels.
    pub fn heads(&self, channels: usize) -> (usize, usize) {
        let d = self.attention_head_dim.unwrap_or(channels);
        (channels / d, d)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("config.json: block_out_channels must not be empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "config.json: {} down_block_types and {} up_block_types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if self.block_out_channels[0] % 2 == 1 {
            bail!(
                "config.json: unsupported block_out_channels[0] = {} (odd sinusoidal embedding width)",
                self.block_out_channels[0]
            );
        }
        if self.layers_per_block == 0 {
            bail!("config.json: layers_per_block must be positive");
        }
        for &c in &self.block_out_channels {
            if !c.is_multiple_of(self.norm_num_groups) {
                bail!(
                    "config.json: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                );
            }
            let d = self.attention_head_dim.unwrap_or(c);
            if d == 0 || !c.is_multiple_of(d) {
                bail!(
                    "config.json: {c} channels do not split into heads of attention_head_dim = {d}"
                );
            }
        }
        if self.downsample_padding > 1 {
            bail!(
                "config.json: unsupported downsample_padding = {} (supported: 0, 1)",
                self.downsample_padding
            );
        }
        if matches!(self.class_embed, ClassEmbed::Table(0)) {
            bail!("config.json: num_class_embeds must be positive");
        }
        Ok(())
    }
}
