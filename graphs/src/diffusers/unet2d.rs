//! diffusers' `UNet2DModel`, written against [`Backend`]: one definition that candle runs
//! (and trains) and the ONNX exporter lowers. Parameter names are diffusers' state-dict keys.

use super::blocks::{BlockOpts, DownBlock, MidBlock, UpBlock};
use super::config::{ClassEmbed, UNet2DConfig};
use crate::backend::Backend;
use crate::nn::{Conv2d, Embedding, GroupNorm, Linear};
use candle_nn::VarBuilder;

/// `Timesteps`: `[sin(t f), cos(t f)]` (or cos first with `flip_sin_to_cos`),
/// `f_i = exp(-ln(10000) i / (half - freq_shift))`, the frequencies rounded as PyTorch computes
/// them in f32.
#[derive(Clone, Debug)]
pub struct Timesteps {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    pub fn freqs(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let l = -(10000f64.ln()) as f32;
        let den = (half as f64 - self.freq_shift) as f32;
        (0..half).map(|i| ((l * i as f32) / den).exp()).collect()
    }

    /// `t`: `[N]` f32 -> `[N, dim]`.
    pub fn forward<B: Backend>(&self, b: &B, t: &B::T) -> anyhow::Result<B::T> {
        let f = self.freqs();
        let arg = b.mul(&b.reshape(t, &[-1, 1])?, &b.constant(&f, &[1, f.len()])?)?;
        let (s, c) = (b.sin(&arg)?, b.cos(&arg)?);
        if self.flip_sin_to_cos {
            b.concat(&[&c, &s], 1)
        } else {
            b.concat(&[&s, &c], 1)
        }
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, din: usize, dout: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), din, dout)?,
            linear_2: Linear::new(vb.pp("linear_2"), dout, dout)?,
        })
    }
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        self.linear_2
            .forward(b, &b.silu(&self.linear_1.forward(b, x)?)?)
    }
}

#[derive(Clone, Debug)]
pub enum ClassEmbedding {
    Table(Embedding),
    Timestep(TimestepEmbedding),
    Identity,
}

#[derive(Clone, Debug)]
pub struct UNet2DModel {
    pub cfg: UNet2DConfig,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    pub class_embedding: Option<ClassEmbedding>,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet2DModel {
    pub fn new(vb: VarBuilder, cfg: &UNet2DConfig) -> anyhow::Result<Self> {
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
            attention_head_dim: cfg.attention_head_dim,
        };
        let class_embedding = match cfg.class_embed {
            ClassEmbed::None => None,
            ClassEmbed::Table(k) => Some(ClassEmbedding::Table(Embedding::new(
                vb.pp("class_embedding"),
                k,
                temb,
            )?)),
            ClassEmbed::Timestep => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(
                vb.pp("class_embedding"),
                ch[0],
                temb,
            )?)),
            ClassEmbed::Identity => Some(ClassEmbedding::Identity),
        };
        let mut down_blocks = Vec::new();
        let mut cout = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = ch[i];
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                *kind,
                cfg.layers_per_block,
                cin,
                cout,
                i + 1 < n,
                cfg.downsample_padding,
                &o,
            )?);
        }
        let mid_block = if cfg.mid_block {
            Some(MidBlock::new(
                vb.pp("mid_block"),
                ch[n - 1],
                &o,
                cfg.attn_norm_num_groups,
                cfg.add_attention,
                cfg.mid_block_scale_factor,
            )?)
        } else {
            None
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut cout = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev = cout;
            cout = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                *kind,
                cfg.layers_per_block + 1,
                cin,
                prev,
                cout,
                i + 1 < n,
                &o,
            )?);
        }
        let mut conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, ch[0])?;
        conv_norm_out.eps = cfg.norm_eps;
        Ok(Self {
            cfg: cfg.clone(),
            time_proj: Timesteps {
                dim: ch[0],
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            },
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?,
            class_embedding,
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// Whether `forward` needs `class_labels`.
    pub fn is_class_conditional(&self) -> bool {
        self.class_embedding.is_some()
    }

    /// The time (+ class) embedding, before the blocks' SiLU.
    pub fn embed<B: Backend>(
        &self,
        b: &B,
        timestep: &B::T,
        class_labels: Option<&B::T>,
    ) -> anyhow::Result<B::T> {
        let emb = self
            .time_embedding
            .forward(b, &self.time_proj.forward(b, timestep)?)?;
        match (&self.class_embedding, class_labels) {
            (None, None) => Ok(emb),
            (None, Some(_)) => anyhow::bail!(
                "UNet2DModel: class_labels given to a model without a class embedding"
            ),
            (Some(_), None) => anyhow::bail!(
                "UNet2DModel: class_labels are required (class_embed_type / num_class_embeds is set)"
            ),
            (Some(ClassEmbedding::Table(t)), Some(l)) => b.add(&emb, &t.forward(b, l)?),
            (Some(ClassEmbedding::Timestep(t)), Some(l)) => {
                let p = self.time_proj.forward(b, &b.to_f32(l)?)?;
                b.add(&emb, &t.forward(b, &p)?)
            }
            (Some(ClassEmbedding::Identity), Some(l)) => b.add(&emb, l),
        }
    }

    /// The encoder and mid block: the bottleneck features, the SiLU'd embedding, their side and
    /// the skips the decoder consumes.
    #[allow(clippy::type_complexity)]
    fn encode<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        side: usize,
        timestep: &B::T,
        class_labels: Option<&B::T>,
    ) -> anyhow::Result<(B::T, B::T, usize, Vec<B::T>)> {
        let x = if self.cfg.center_input_sample {
            b.affine(sample, 2.0, -1.0)?
        } else {
            sample.clone()
        };
        let temb = b.silu(&self.embed(b, timestep, class_labels)?)?;
        let mut h = self.conv_in.forward(b, &x)?;
        let mut skips = vec![h.clone()];
        let mut s = side;
        for d in &self.down_blocks {
            h = d.forward(b, &h, &temb, &mut s, &mut skips)?;
        }
        if let Some(m) = &self.mid_block {
            h = m.forward(b, &h, &temb, s)?;
        }
        Ok((h, temb, s, skips))
    }

    /// The mid block's output (the last encoder block's without one), `[N, C_last, r, r]`: what
    /// DMD2's GAN head classifies.
    pub fn bottleneck<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        side: usize,
        timestep: &B::T,
        class_labels: Option<&B::T>,
    ) -> anyhow::Result<B::T> {
        Ok(self.encode(b, sample, side, timestep, class_labels)?.0)
    }

    /// Channels and side of [`Self::bottleneck`] for an input of side `side`.
    pub fn bottleneck_shape(&self, side: usize) -> (usize, usize) {
        let ch = &self.cfg.block_out_channels;
        (ch[ch.len() - 1], side >> (ch.len() - 1))
    }

    /// The network's raw prediction, exactly diffusers' `UNet2DModel.forward(...).sample`:
    /// `sample` `[N, C, H, W]` (square, H = W), `timestep` `[N]` f32 (diffusers' timestep
    /// values), `class_labels` `[N]` integer (a `num_class_embeds` table or `timestep` class
    /// embedding) or `[N, temb]` f32 (`identity`).
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        sample: &B::T,
        side: usize,
        timestep: &B::T,
        class_labels: Option<&B::T>,
    ) -> anyhow::Result<B::T> {
        let levels = self.cfg.block_out_channels.len();
        anyhow::ensure!(
            side.is_multiple_of(1 << (levels - 1)),
            "UNet2DModel: side {side} is not divisible by 2^{} ({levels} levels)",
            levels - 1
        );
        let (mut h, temb, mut s, mut skips) =
            self.encode(b, sample, side, timestep, class_labels)?;
        for u in &self.up_blocks {
            h = u.forward(b, &h, &temb, &mut s, &mut skips)?;
        }
        self.conv_out
            .forward(b, &self.conv_norm_out.forward_silu(b, &h)?)
    }
}
