//! `config.json` of a diffusers `UNet2DConditionModel` (SD 1.x / 2.x / SDXL layouts): every key
//! diffusers writes, with diffusers' default where absent, resolved the way diffusers resolves
//! it (per-block lists, `num_attention_heads = num_attention_heads or attention_head_dim`). A
//! value this implementation does not support is an error naming key and value; an unknown key
//! is an error too.

use super::config::TimeScaleShift;
use crate::json::Reader;
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Block kinds of a conditional UNet's encoder and decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CondBlockType {
    /// `DownBlock2D` / `UpBlock2D`: res blocks only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: a `Transformer2DModel` after every res
    /// block.
    CrossAttn,
}

/// `mid_block_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CondMidBlock {
    /// `UNetMidBlock2DCrossAttn`: res, (transformer, res).
    CrossAttn,
    /// `UNetMidBlock2D` as the conditional UNet builds it (`num_layers = 0`, no attention): one
    /// res block.
    Plain,
    /// `null`: no mid block.
    None,
}

/// SDXL's `addition_embed_type = "text_time"`: pooled text embeddings and the six size/crop
/// `time_ids` through `add_time_proj` (sinusoidal, `addition_time_embed_dim` per id) and
/// `add_embedding` (`projection_class_embeddings_input_dim` -> time embedding width), added to
/// the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextTime {
    pub addition_time_embed_dim: usize,
    pub projection_class_embeddings_input_dim: usize,
}

/// The `UNet2DConditionModel` architecture, per-block values already resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<CondBlockType>,
    pub mid_block: CondMidBlock,
    pub up_block_types: Vec<CondBlockType>,
    pub block_out_channels: Vec<usize>,
    /// Res blocks per down block (an up block has one more), per block.
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// Width of `encoder_hidden_states` each block attends to, per block.
    pub cross_attention_dim: Vec<usize>,
    /// `BasicTransformerBlock`s per `Transformer2DModel`, per block.
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads per block: diffusers' `num_attention_heads or attention_head_dim` (the
    /// SD-1.5 naming quirk: there `attention_head_dim = 8` means 8 heads); head width =
    /// channels / heads.
    pub heads: Vec<usize>,
    pub use_linear_projection: bool,
    /// Read and kept; changes nothing here (our attention scores are f32 anyway).
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: TimeScaleShift,
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub addition: Option<TextTime>,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' `UNet2DConditionModel()` defaults (SD 1.x's layout with 1280-wide context).
    fn default() -> Self {
        use CondBlockType::*;
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![CrossAttn, CrossAttn, CrossAttn, Plain],
            mid_block: CondMidBlock::CrossAttn,
            up_block_types: vec![Plain, CrossAttn, CrossAttn, CrossAttn],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: vec![1280; 4],
            transformer_layers_per_block: vec![1; 4],
            heads: vec![8; 4],
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: TimeScaleShift::Default,
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            addition: None,
        }
    }
}

/// Block families diffusers has that are not implemented here.
const UNSUPPORTED_BLOCKS: &[&str] = &[
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
    "KDownBlock2D",
    "KCrossAttnDownBlock2D",
    "KUpBlock2D",
    "KCrossAttnUpBlock2D",
    "DownEncoderBlock2D",
    "AttnDownEncoderBlock2D",
    "UpDecoderBlock2D",
    "AttnUpDecoderBlock2D",
];

fn unsupported(key: &str, v: &Value, what: &str) -> anyhow::Error {
    anyhow::anyhow!("config.json: unsupported {key} = {v} ({what})")
}

fn blocks(
    key: &'static str,
    vals: &[Value],
    plain: &str,
    cross: &str,
) -> Result<Vec<CondBlockType>> {
    vals.iter()
        .map(
            |v| match v.as_str().map(|s| s.strip_prefix("UNetRes").unwrap_or(s)) {
                Some(s) if s == plain => Ok(CondBlockType::Plain),
                Some(s) if s == cross => Ok(CondBlockType::CrossAttn),
                Some(s) if UNSUPPORTED_BLOCKS.contains(&s) => Err(unsupported(
                    key,
                    v,
                    &format!("{s} is not implemented; supported: {plain}, {cross}"),
                )),
                _ => Err(unsupported(key, v, &format!("supported: {plain}, {cross}"))),
            },
        )
        .collect()
}

/// An int broadcast to every block (diffusers' `(x,) * len(down_block_types)`) or a per-block
/// list of ints; `None` when absent.
fn per_block(r: &mut Reader, key: &'static str, n: usize) -> Result<Option<Vec<usize>>> {
    let Some(v) = r.get(key) else {
        return Ok(None);
    };
    let int = |e: &Value| -> Result<usize> {
        e.as_u64().map(|x| x as usize).ok_or_else(|| {
            unsupported(
                key,
                v,
                "an integer or a list of integers, one per block, is supported",
            )
        })
    };
    match v {
        Value::Array(a) => {
            if a.len() != n {
                bail!(
                    "config.json: {key} = {v} has {} entries for {n} down_block_types",
                    a.len()
                );
            }
            a.iter().map(int).collect::<Result<_>>().map(Some)
        }
        _ => Ok(Some(vec![int(v)?; n])),
    }
}

impl UNet2DConditionConfig {
    /// Parses a `config.json` object.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut r = Reader::new(v, "config.json")?;
        if let Some(c) = r.map.get("_class_name") {
            if c.as_str() != Some("UNet2DConditionModel") {
                bail!("config.json: _class_name = {c} is not UNet2DConditionModel");
            }
        }
        let d = Self::default();
        let down_block_types = match r.list("down_block_types")? {
            Some(l) => blocks("down_block_types", l, "DownBlock2D", "CrossAttnDownBlock2D")?,
            None => d.down_block_types.clone(),
        };
        let up_block_types = match r.list("up_block_types")? {
            Some(l) => blocks("up_block_types", l, "UpBlock2D", "CrossAttnUpBlock2D")?,
            None => d.up_block_types.clone(),
        };
        let n = down_block_types.len();
        if up_block_types.len() != n {
            bail!(
                "config.json: {n} down_block_types and {} up_block_types",
                up_block_types.len()
            );
        }
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
        if block_out_channels.len() != n {
            bail!(
                "config.json: {} block_out_channels for {n} down_block_types",
                block_out_channels.len()
            );
        }
        let mid_block = match r.get("mid_block_type") {
            None if r.has("mid_block_type") => CondMidBlock::None,
            None => CondMidBlock::CrossAttn,
            Some(v) if v.as_str() == Some("UNetMidBlock2DCrossAttn") => CondMidBlock::CrossAttn,
            Some(v) if v.as_str() == Some("UNetMidBlock2D") => CondMidBlock::Plain,
            Some(v) => {
                return Err(unsupported(
                    "mid_block_type",
                    v,
                    "supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null",
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
            ("attention_type", &["default"][..]),
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
        for key in [
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "class_embed_type",
            "num_class_embeds",
            "time_embedding_act_fn",
            "timestep_post_act",
            "time_cond_proj_dim",
            "reverse_transformer_layers_per_block",
        ] {
            r.require(key, &Value::Null)?;
        }
        for key in ["dual_cross_attention", "class_embeddings_concat"] {
            r.require(key, &Value::Bool(false))?;
        }
        // `only_cross_attention`: a bool or one per block; only `false` is supported.
        if let Some(v) = r.get("only_cross_attention") {
            let all_false = match v {
                Value::Bool(b) => !b,
                Value::Array(a) => a.iter().all(|e| e == &Value::Bool(false)),
                _ => false,
            };
            if !all_false {
                return Err(unsupported(
                    "only_cross_attention",
                    v,
                    "only false is supported",
                ));
            }
        }
        // diffusers itself refuses `num_attention_heads` ("not possible ... because of a naming
        // issue", diffusers#2011); heads come from `attention_head_dim`.
        if let Some(v) = r.get("num_attention_heads") {
            return Err(unsupported(
                "num_attention_heads",
                v,
                "diffusers' UNet2DConditionModel refuses it too; the head count is attention_head_dim",
            ));
        }
        // Keys diffusers passes only to block families refused above (SimpleCrossAttn,
        // ResnetDownsample, TextTimeEmbedding of `addition_embed_type = "text"`): they cannot
        // change the blocks built here, whatever their value.
        for key in [
            "resnet_skip_time_act",
            "resnet_out_scale_factor",
            "cross_attention_norm",
            "mid_block_only_cross_attention",
            "addition_embed_type_num_heads",
        ] {
            r.get(key);
        }
        let heads = match per_block(&mut r, "attention_head_dim", n)? {
            Some(h) => h,
            None if r.map.contains_key("attention_head_dim") => {
                bail!("config.json: unsupported attention_head_dim = null (the cross-attention blocks need a head count)")
            }
            None => vec![8; n],
        };
        let layers_per_block = per_block(&mut r, "layers_per_block", n)?.unwrap_or(vec![2; n]);
        let cross_attention_dim =
            per_block(&mut r, "cross_attention_dim", n)?.unwrap_or(vec![1280; n]);
        let transformer_layers_per_block =
            match per_block(&mut r, "transformer_layers_per_block", n) {
                Ok(t) => t.unwrap_or(vec![1; n]),
                Err(e) => {
                    return Err(e).context(
                        "transformer_layers_per_block: a list of lists (asymmetric UNets with \
                         reverse_transformer_layers_per_block) is not supported",
                    )
                }
            };
        let norm_num_groups = match r.get("norm_num_groups") {
            None if r.has("norm_num_groups") => {
                bail!("config.json: unsupported norm_num_groups = null (diffusers' blocks need a group count)")
            }
            _ => r.usize_or("norm_num_groups", d.norm_num_groups)?,
        };
        let addition = match r.str_opt("addition_embed_type")? {
            None => {
                r.get("addition_time_embed_dim");
                r.get("projection_class_embeddings_input_dim");
                None
            }
            Some("text_time") => {
                let need = |r: &mut Reader, key: &'static str| -> Result<usize> {
                    r.usize_opt(key)?.with_context(|| {
                        format!("config.json: addition_embed_type = \"text_time\" needs {key}")
                    })
                };
                Some(TextTime {
                    addition_time_embed_dim: need(&mut r, "addition_time_embed_dim")?,
                    projection_class_embeddings_input_dim: need(
                        &mut r,
                        "projection_class_embeddings_input_dim",
                    )?,
                })
            }
            Some(s) => {
                return Err(unsupported(
                    "addition_embed_type",
                    &Value::String(s.into()),
                    "supported: null, text_time",
                ))
            }
        };
        let cfg = Self {
            sample_size,
            in_channels: r.usize_or("in_channels", d.in_channels)?,
            out_channels: r.usize_or("out_channels", d.out_channels)?,
            center_input_sample: r.bool_or("center_input_sample", d.center_input_sample)?,
            flip_sin_to_cos: r.bool_or("flip_sin_to_cos", d.flip_sin_to_cos)?,
            freq_shift: r.f64_or("freq_shift", d.freq_shift)?,
            down_block_types,
            mid_block,
            up_block_types,
            block_out_channels,
            layers_per_block,
            downsample_padding: r.usize_or("downsample_padding", d.downsample_padding)?,
            mid_block_scale_factor: r.f64_or("mid_block_scale_factor", d.mid_block_scale_factor)?,
            dropout: r.f64_or("dropout", d.dropout)?,
            norm_num_groups,
            norm_eps: r.f64_or("norm_eps", d.norm_eps)?,
            cross_attention_dim,
            transformer_layers_per_block,
            heads,
            use_linear_projection: r.bool_or("use_linear_projection", d.use_linear_projection)?,
            upcast_attention: r.bool_or("upcast_attention", d.upcast_attention)?,
            resnet_time_scale_shift,
            time_embedding_dim: r.usize_opt("time_embedding_dim")?,
            conv_in_kernel: r.usize_or("conv_in_kernel", d.conv_in_kernel)?,
            conv_out_kernel: r.usize_or("conv_out_kernel", d.conv_out_kernel)?,
            addition,
        };
        r.finish("UNet2DConditionModel")?;
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

    /// Heads and head width of block `i`'s transformers (the mid block is the last block's).
    pub fn heads_of(&self, i: usize) -> (usize, usize) {
        let h = self.heads[i];
        (h, self.block_out_channels[i] / h)
    }

    /// Whether `forward` needs `text_embeds` and `time_ids` (SDXL).
    pub fn has_text_time(&self) -> bool {
        self.addition.is_some()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("config.json: block_out_channels must not be empty");
        }
        for (key, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
            ("layers_per_block", self.layers_per_block.len()),
            ("cross_attention_dim", self.cross_attention_dim.len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.len(),
            ),
            ("attention_head_dim", self.heads.len()),
        ] {
            if len != n {
                bail!("config.json: {len} {key} for {n} block_out_channels");
            }
        }
        if self.block_out_channels[0] % 2 == 1 {
            bail!(
                "config.json: unsupported block_out_channels[0] = {} (odd sinusoidal embedding width)",
                self.block_out_channels[0]
            );
        }
        if let Some(a) = &self.addition {
            if a.addition_time_embed_dim % 2 == 1 || a.addition_time_embed_dim == 0 {
                bail!(
                    "config.json: unsupported addition_time_embed_dim = {} (odd sinusoidal embedding width)",
                    a.addition_time_embed_dim
                );
            }
        }
        if self.layers_per_block.contains(&0) {
            bail!("config.json: layers_per_block must be positive");
        }
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                bail!("config.json: unsupported {key} = {k} (odd kernels only: same padding)");
            }
        }
        let attn = |i: usize| {
            self.down_block_types[i] == CondBlockType::CrossAttn
                || self.up_block_types[n - 1 - i] == CondBlockType::CrossAttn
                || (i == n - 1 && self.mid_block == CondMidBlock::CrossAttn)
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(self.norm_num_groups) {
                bail!(
                    "config.json: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                );
            }
            let h = self.heads[i];
            if attn(i) && (h == 0 || !c.is_multiple_of(h)) {
                bail!(
                    "config.json: block {i}'s {c} channels do not split into attention_head_dim = {h} heads"
                );
            }
        }
        if self.downsample_padding > 1 {
            bail!(
                "config.json: unsupported downsample_padding = {} (supported: 0, 1)",
                self.downsample_padding
            );
        }
        Ok(())
    }
}

impl UNet2DConditionConfig {
    /// `config.json` as diffusers' `save_pretrained` writes it (every key; a per-block value as
    /// one int where all blocks agree, as diffusers' own configs have it).
    pub fn to_json(&self) -> Value {
        use serde_json::json;
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let per = |v: &[usize]| {
            if v.iter().all(|x| *x == v[0]) {
                json!(v[0])
            } else {
                json!(v)
            }
        };
        let blocks = |v: &[CondBlockType], plain: &str, cross: &str| -> Vec<String> {
            v.iter()
                .map(|b| match b {
                    CondBlockType::Plain => plain.to_string(),
                    CondBlockType::CrossAttn => cross.to_string(),
                })
                .collect()
        };
        let (addition, add_dim, proj_dim) = match &self.addition {
            None => (Value::Null, Value::Null, Value::Null),
            Some(a) => (
                json!("text_time"),
                json!(a.addition_time_embed_dim),
                json!(a.projection_class_embeddings_input_dim),
            ),
        };
        let entries: Vec<(&str, Value)> = vec![
            ("_class_name", json!("UNet2DConditionModel")),
            ("_diffusers_version", json!(super::save::DIFFUSERS_VERSION)),
            ("act_fn", json!("silu")),
            ("addition_embed_type", json!(addition)),
            ("addition_embed_type_num_heads", json!(64)),
            ("addition_time_embed_dim", json!(add_dim)),
            ("attention_head_dim", json!(per(&self.heads))),
            ("attention_type", json!("default")),
            ("block_out_channels", json!(self.block_out_channels)),
            ("center_input_sample", json!(self.center_input_sample)),
            ("class_embed_type", json!(null)),
            ("class_embeddings_concat", json!(false)),
            ("conv_in_kernel", json!(self.conv_in_kernel)),
            ("conv_out_kernel", json!(self.conv_out_kernel)),
            ("cross_attention_dim", json!(per(&self.cross_attention_dim))),
            ("cross_attention_norm", json!(null)),
            (
                "down_block_types",
                json!(blocks(
                    &self.down_block_types,
                    "DownBlock2D",
                    "CrossAttnDownBlock2D"
                )),
            ),
            ("downsample_padding", json!(self.downsample_padding)),
            ("dropout", json!(self.dropout)),
            ("dual_cross_attention", json!(false)),
            ("encoder_hid_dim", json!(null)),
            ("encoder_hid_dim_type", json!(null)),
            ("flip_sin_to_cos", json!(self.flip_sin_to_cos)),
            ("freq_shift", json!(num(self.freq_shift))),
            ("in_channels", json!(self.in_channels)),
            ("layers_per_block", json!(per(&self.layers_per_block))),
            ("mid_block_only_cross_attention", json!(null)),
            (
                "mid_block_scale_factor",
                json!(num(self.mid_block_scale_factor)),
            ),
            (
                "mid_block_type",
                json!(match self.mid_block {
                    CondMidBlock::CrossAttn => json!("UNetMidBlock2DCrossAttn"),
                    CondMidBlock::Plain => json!("UNetMidBlock2D"),
                    CondMidBlock::None => Value::Null,
                }),
            ),
            ("norm_eps", json!(self.norm_eps)),
            ("norm_num_groups", json!(self.norm_num_groups)),
            ("num_attention_heads", json!(null)),
            ("num_class_embeds", json!(null)),
            ("only_cross_attention", json!(false)),
            ("out_channels", json!(self.out_channels)),
            ("projection_class_embeddings_input_dim", json!(proj_dim)),
            ("resnet_out_scale_factor", json!(1.0)),
            ("resnet_skip_time_act", json!(false)),
            (
                "resnet_time_scale_shift",
                json!(match self.resnet_time_scale_shift {
                    TimeScaleShift::Default => "default",
                    TimeScaleShift::ScaleShift => "scale_shift",
                }),
            ),
            ("reverse_transformer_layers_per_block", json!(null)),
            ("sample_size", json!(self.sample_size)),
            ("time_cond_proj_dim", json!(null)),
            ("time_embedding_act_fn", json!(null)),
            ("time_embedding_dim", json!(self.time_embedding_dim)),
            ("time_embedding_type", json!("positional")),
            ("timestep_post_act", json!(null)),
            (
                "transformer_layers_per_block",
                json!(per(&self.transformer_layers_per_block)),
            ),
            (
                "up_block_types",
                json!(blocks(
                    &self.up_block_types,
                    "UpBlock2D",
                    "CrossAttnUpBlock2D"
                )),
            ),
            ("upcast_attention", json!(self.upcast_attention)),
            ("use_linear_projection", json!(self.use_linear_projection)),
        ];
        Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }
}
