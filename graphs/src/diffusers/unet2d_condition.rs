//! diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / SDXL), written against
//! [`Backend`]: one definition that candle runs (and trains) and the ONNX exporter lowers, with
//! diffusers' state-dict keys. The res blocks, down/up sampling and the timestep embedding are
//! `UNet2DModel`'s ([`super::blocks`], [`super::unet2d`]); the cross-attention transformers are
//! in [`super::transformer2d`].

use super::blocks::{BlockOpts, Downsample2D, ResnetBlock2D};
use super::condition_config::{CondBlockType, CondMidBlock, UNet2DConditionConfig};
use super::load::{check_named, load_weights};
use super::transformer2d::Transformer2DModel;
use super::unet2d::{TimestepEmbedding, Timesteps};
use crate::backend::Backend;
use crate::nn::{Conv2d, GroupNorm};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What a block's transformers share: heads, head width, layers, context width, projection.
#[derive(Clone, Copy, Debug)]
struct TOpts {
    heads: usize,
    layers: usize,
    cross: usize,
    groups: usize,
    linear: bool,
}

impl TOpts {
    fn build(&self, vb: VarBuilder, ch: usize) -> candle_core::Result<Transformer2DModel> {
        Transformer2DModel::new(
            vb,
            ch,
            self.heads,
            ch / self.heads,
            self.layers,
            self.cross,
            self.groups,
            self.linear,
        )
    }
}

/// `CrossAttnDownBlock2D` (a transformer after every res block) or `DownBlock2D` (none).
#[derive(Clone, Debug)]
pub struct CondDownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

/// `UNetMidBlock2DCrossAttn` (res, then (transformer, res) per layer) or the attention-free
/// `UNetMidBlock2D` (one res block).
#[derive(Clone, Debug)]
pub struct CondMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

/// `CrossAttnUpBlock2D` / `UpBlock2D`: res blocks on the concatenation with one skip each.
#[derive(Clone, Debug)]
pub struct CondUpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Conv2d>,
}

/// SDXL's time ids: original size, crop top-left, target size (two each).
pub const SDXL_TIME_IDS: usize = 6;

/// The extra inputs of SDXL's `addition_embed_type = "text_time"`.
#[derive(Clone, Debug)]
pub struct AddedCond<T> {
    /// Pooled text embeddings, `[N, pooled]`.
    pub text_embeds: T,
    /// `[N, k]` (six for SDXL: original size, crop top-left, target size).
    pub time_ids: T,
}

#[derive(Clone, Debug)]
pub struct TextTimeEmbedding {
    pub add_time_proj: Timesteps,
    pub add_embedding: TimestepEmbedding,
}

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub cfg: UNet2DConditionConfig,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    pub add: Option<TextTimeEmbedding>,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<CondDownBlock>,
    pub mid_block: Option<CondMidBlock2D>,
    pub up_blocks: Vec<CondUpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.temb_dim();
        let o = BlockOpts {
            temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            shift: cfg.resnet_time_scale_shift,
            dropout: cfg.dropout,
            attention_head_dim: None,
        };
        let topts = |i: usize| TOpts {
            heads: cfg.heads[i],
            layers: cfg.transformer_layers_per_block[i],
            cross: cfg.cross_attention_dim[i],
            groups: cfg.norm_num_groups,
            linear: cfg.use_linear_projection,
        };

        let mut down_blocks = Vec::new();
        let mut cout = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = ch[i];
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let ci = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::new(
                    vb.pp(format!("resnets.{j}")),
                    ci,
                    cout,
                    &o,
                    1.0,
                )?);
                if *kind == CondBlockType::CrossAttn {
                    attentions.push(topts(i).build(vb.pp(format!("attentions.{j}")), cout)?);
                }
            }
            let downsampler = if i + 1 < n {
                let p = cfg.downsample_padding;
                Some(Downsample2D {
                    conv: Conv2d::new(vb.pp("downsamplers.0.conv"), cout, cout, 3, 2, p)?,
                    padding: p,
                })
            } else {
                None
            };
            down_blocks.push(CondDownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = ch[n - 1];
        let mid_block = match cfg.mid_block {
            CondMidBlock::None => None,
            kind => {
                let vb = vb.pp("mid_block");
                let s = cfg.mid_block_scale_factor;
                let mut resnets = vec![ResnetBlock2D::new(vb.pp("resnets.0"), last, last, &o, s)?];
                let mut attentions = Vec::new();
                if kind == CondMidBlock::CrossAttn {
                    attentions.push(topts(n - 1).build(vb.pp("attentions.0"), last)?);
                    resnets.push(ResnetBlock2D::new(vb.pp("resnets.1"), last, last, &o, s)?);
                }
                Some(CondMidBlock2D {
                    resnets,
                    attentions,
                })
            }
        };

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut cout = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let b = n - 1 - i; // the encoder block this decoder block mirrors
            let prev = cout;
            cout = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let vb = vb.pp(format!("up_blocks.{i}"));
            let layers = cfg.layers_per_block[b] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { cin } else { cout };
                let ri = if j == 0 { prev } else { cout };
                resnets.push(ResnetBlock2D::new(
                    vb.pp(format!("resnets.{j}")),
                    ri + skip,
                    cout,
                    &o,
                    1.0,
                )?);
                if *kind == CondBlockType::CrossAttn {
                    attentions.push(topts(b).build(vb.pp(format!("attentions.{j}")), cout)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Conv2d::new(
                    vb.pp("upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(CondUpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let add = match &cfg.addition {
            None => None,
            Some(a) => Some(TextTimeEmbedding {
                add_time_proj: Timesteps {
                    dim: a.addition_time_embed_dim,
                    flip_sin_to_cos: cfg.flip_sin_to_cos,
                    freq_shift: cfg.freq_shift,
                },
                add_embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    a.projection_class_embeddings_input_dim,
                    temb,
                )?,
            }),
        };
        let mut conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, ch[0])?;
        conv_norm_out.eps = cfg.norm_eps;
        let (ki, ko) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        Ok(Self {
            cfg: cfg.clone(),
            time_proj: Timesteps {
                dim: ch[0],
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            },
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?,
            add,
            conv_in: Conv2d::new(
                vb.pp("conv_in"),
                cfg.in_channels,
                ch[0],
                ki,
                1,
                (ki - 1) / 2,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                ko,
                1,
                (ko - 1) / 2,
            )?,
        })
    }

    /// The time embedding (+ SDXL's text/time embedding), before the blocks' SiLU.
    pub fn embed<B: Backend>(
        &self,
        b: &B,
        timestep: &B::T,
        added: Option<&AddedCond<B::T>>,
    ) -> Result<B::T> {
        let emb = self
            .time_embedding
            .forward(b, &self.time_proj.forward(b, timestep)?)?;
        match (&self.add, added) {
            (None, None) => Ok(emb),
            (None, Some(_)) => bail!(
                "UNet2DConditionModel: text_embeds / time_ids given to a model without \
                 addition_embed_type = \"text_time\""
            ),
            (Some(_), None) => bail!(
                "UNet2DConditionModel: text_embeds and time_ids are required \
                 (addition_embed_type = \"text_time\")"
            ),
            (Some(a), Some(c)) => {
                // diffusers: add_time_proj(time_ids.flatten()).reshape(N, -1), computed here on
                // `[N, k, 1]` so no reshape needs `k`: [N, k, dim] -> [N, k * dim].
                let p = &a.add_time_proj;
                let f = p.freqs();
                let ids = b.reshape(&c.time_ids, &[0, -1, 1])?;
                let arg = b.mul(&ids, &b.constant(&f, &[1, 1, f.len()])?)?;
                let (sn, cs) = (b.sin(&arg)?, b.cos(&arg)?);
                let t = if p.flip_sin_to_cos {
                    b.concat(&[&cs, &sn], 2)?
                } else {
                    b.concat(&[&sn, &cs], 2)?
                };
                let t = b.reshape(&t, &[0, -1])?;
                let x = b.concat(&[&c.text_embeds, &t], 1)?;
                b.add(&emb, &a.add_embedding.forward(b, &x)?)
            }
        }
    }

    /// For `text_time`: the width of `text_embeds` that goes with `k` time ids
    /// (`projection_class_embeddings_input_dim = pooled + k * addition_time_embed_dim`); SDXL
    /// has `k` = [`SDXL_TIME_IDS`].
    pub fn text_embeds_dim(&self, k: usize) -> Option<usize> {
        let a = self.cfg.addition?;
        a.projection_class_embeddings_input_dim
            .checked_sub(k * a.addition_time_embed_dim)
    }

    /// diffusers' `UNet2DConditionModel.forward(...).sample` on a square `sample`
    /// `[N, C, side, side]`, see [`Self::forward_hw`].
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        side: usize,
        timestep: &B::T,
        encoder_hidden_states: &B::T,
        added: Option<&AddedCond<B::T>>,
    ) -> Result<B::T> {
        self.forward_hw(
            b,
            sample,
            (side, side),
            timestep,
            encoder_hidden_states,
            added,
        )
    }

    /// diffusers' `UNet2DConditionModel.forward(...).sample`: `sample` `[N, C, height, width]`
    /// (both divisible by 2^(levels - 1), e.g. SD's 64x96 latents of a 512x768 image),
    /// `timestep` `[N]` f32, `encoder_hidden_states` `[N, S, cross_attention_dim]`, plus
    /// `text_embeds` / `time_ids` for `addition_embed_type = "text_time"`.
    pub fn forward_hw<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        (height, width): (usize, usize),
        timestep: &B::T,
        encoder_hidden_states: &B::T,
        added: Option<&AddedCond<B::T>>,
    ) -> Result<B::T> {
        let ctx = encoder_hidden_states;
        let (mut h, mut skips, temb, (mut sh, mut sw)) =
            self.down_mid(b, sample, (height, width), timestep, ctx, added)?;
        for u in &self.up_blocks {
            for (j, r) in u.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .context("UNet2DConditionModel: skip bookkeeping")?;
                h = r.forward(b, &b.concat(&[&h, &skip], 1)?, &temb)?;
                if let Some(a) = u.attentions.get(j) {
                    h = a.forward(b, &h, sh, sw, ctx)?;
                }
            }
            if let Some(c) = &u.upsampler {
                h = c.forward(b, &b.upsample_nearest2x(&h)?)?;
                (sh, sw) = (2 * sh, 2 * sw);
            }
        }
        self.conv_out
            .forward(b, &self.conv_norm_out.forward_silu(b, &h)?)
    }

    /// The mid block's output (DMD2's GAN head reads it): the same down path as
    /// [`Self::forward_hw`], without the up path.
    pub fn bottleneck_hw<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        hw: (usize, usize),
        timestep: &B::T,
        encoder_hidden_states: &B::T,
        added: Option<&AddedCond<B::T>>,
    ) -> Result<B::T> {
        Ok(self
            .down_mid(b, sample, hw, timestep, encoder_hidden_states, added)?
            .0)
    }

    /// Down blocks and mid block: the features, the skips, the time embedding (after SiLU) and
    /// the bottleneck's side.
    #[allow(clippy::type_complexity)]
    fn down_mid<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        (height, width): (usize, usize),
        timestep: &B::T,
        ctx: &B::T,
        added: Option<&AddedCond<B::T>>,
    ) -> Result<(B::T, Vec<B::T>, B::T, (usize, usize))> {
        let levels = self.cfg.block_out_channels.len();
        let f = 1 << (levels - 1);
        anyhow::ensure!(
            height.is_multiple_of(f) && width.is_multiple_of(f),
            "UNet2DConditionModel: sample {height}x{width} is not divisible by 2^{} ({levels} levels)",
            levels - 1
        );
        let x = if self.cfg.center_input_sample {
            b.affine(sample, 2.0, -1.0)?
        } else {
            sample.clone()
        };
        let temb = b.silu(&self.embed(b, timestep, added)?)?;
        let mut h = self.conv_in.forward(b, &x)?;
        let mut skips = vec![h.clone()];
        let (mut sh, mut sw) = (height, width);
        for d in &self.down_blocks {
            for (j, r) in d.resnets.iter().enumerate() {
                h = r.forward(b, &h, &temb)?;
                if let Some(a) = d.attentions.get(j) {
                    h = a.forward(b, &h, sh, sw, ctx)?;
                }
                skips.push(h.clone());
            }
            if let Some(ds) = &d.downsampler {
                h = ds.forward(b, &h)?;
                (sh, sw) = (sh.div_ceil(2), sw.div_ceil(2));
                skips.push(h.clone());
            }
        }
        if let Some(m) = &self.mid_block {
            h = m.resnets[0].forward(b, &h, &temb)?;
            for (a, r) in m.attentions.iter().zip(&m.resnets[1..]) {
                h = a.forward(b, &h, sh, sw, ctx)?;
                h = r.forward(b, &h, &temb)?;
            }
        }
        Ok((h, skips, temb, (sh, sw)))
    }
}

/// A `VarBuilder` backend that hands out every parameter as a broadcast view of one zero: the
/// right shape, no memory (a real-size SD or SDXL UNet is built in a millisecond, for its
/// parameter names, shapes and count). Records each (name, shape).
#[allow(clippy::type_complexity)]
struct ShapesOnly(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for ShapesOnly {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("shapes lock")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shapes-only builder: {name} has no shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The network `cfg` describes with every weight a broadcast zero (nothing allocated), and each
/// parameter's (name, shape): for shape checks, parameter counts and the FLOP counter at real
/// size. Its outputs are meaningless.
pub fn shapes_only(
    cfg: &UNet2DConditionConfig,
) -> Result<(UNet2DConditionModel, BTreeMap<String, Vec<usize>>)> {
    let shapes = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(ShapesOnly(shapes.clone()));
    let vb = VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
    let model = UNet2DConditionModel::new(vb, cfg)?;
    let map = shapes.lock().expect("shapes lock").clone();
    Ok((model, map))
}

/// Every parameter (name, shape) of the network `cfg` describes (nothing allocated).
pub fn expected_params_condition(
    cfg: &UNet2DConditionConfig,
) -> Result<BTreeMap<String, Vec<usize>>> {
    Ok(shapes_only(cfg)?.1)
}

/// Number of parameters of the network `cfg` describes (SD 1.5: 859,520,964, as diffusers
/// counts them; nothing allocated).
pub fn parameter_count(cfg: &UNet2DConditionConfig) -> Result<usize> {
    Ok(expected_params_condition(cfg)?
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum())
}

/// Loads the `UNet2DConditionModel` of a model folder (`config.json` +
/// `diffusion_pytorch_model.safetensors`, or sharded) or of a pipeline folder (`unet/`) onto
/// `device`; every weight checked by name and shape. Returns the network and its weights by
/// diffusers' keys.
pub fn load_unet_condition(
    dir: &Path,
    device: &Device,
) -> Result<(UNet2DConditionModel, HashMap<String, Tensor>)> {
    let folder = super::load::DiffusersFolder::resolve(dir)?;
    let cfg = UNet2DConditionConfig::from_file(&folder.unet.join("config.json"))?;
    let weights = load_weights(&folder.unet, device)?;
    check_named(&expected_params_condition(&cfg)?, &weights)
        .with_context(|| format!("in {}", folder.unet.display()))?;
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
    Ok((UNet2DConditionModel::new(vb, &cfg)?, weights))
}
