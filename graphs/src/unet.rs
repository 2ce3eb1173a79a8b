//! The class-conditional UNet (a SimpleUNet: res blocks, GroupNorm+SiLU, self-attention at chosen
//! resolutions, sinusoidal noise embedding plus a label embedding with a "null" class).

use crate::backend::Backend;
use crate::nn::{
    Conv2d, Embedding, GroupNorm, Linear, ResBlock, SelfAttention, SinusoidalEmbedding,
};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Architecture hyper-parameters, stored in every checkpoint's `config.json`. A TOML `[model]`
/// table may give any subset of the fields; the rest are [`UNetConfig::mnist_small`]'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Image channels (1 for MNIST, 3 for CIFAR-10).
    pub channels: usize,
    /// Square image side in pixels; must be divisible by 2^(levels-1).
    pub resolution: usize,
    pub base_channels: usize,
    /// Channel multiplier per resolution level.
    pub channel_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Resolutions (in pixels) with a self-attention block after each res block.
    pub attn_resolutions: Vec<usize>,
    pub dropout: f64,
    /// Number of real classes; the label embedding has one more row, the null class.
    pub num_classes: usize,
    pub groups: usize,
    /// Copies of the label table (default 1). A TDM fake score conditioned on the student's step
    /// index uses one copy per step: label id `k * (num_classes + 1) + class`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub label_groups: usize,
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self::mnist_small()
    }
}

impl UNetConfig {
    /// The default teacher for 32x32 MNIST on a 2-core CPU (16-32-64 channels, ~0.7M params).
    pub fn mnist_small() -> Self {
        Self {
            channels: 1,
            resolution: 32,
            base_channels: 16,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 1,
            attn_resolutions: vec![8],
            dropout: 0.0,
            num_classes: 10,
            groups: 8,
            label_groups: 1,
        }
    }

    /// The 2.39M-parameter UNet of the CPU benchmark (#3): 32-64-128, two blocks, attention at 8.
    pub fn bench() -> Self {
        Self {
            base_channels: 32,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            ..Self::mnist_small()
        }
    }

    /// A very small network for tests.
    pub fn tiny() -> Self {
        Self {
            channels: 1,
            resolution: 16,
            base_channels: 8,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![8],
            dropout: 0.0,
            num_classes: 10,
            groups: 4,
            label_groups: 1,
        }
    }

    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    /// Rows of the label table: `label_groups * (num_classes + 1)`.
    pub fn label_rows(&self) -> usize {
        self.label_groups * (self.num_classes + 1)
    }

    /// Channels and side of the bottleneck (the mid block's output), what a GAN head reads.
    pub fn bottleneck_shape(&self) -> (usize, usize) {
        let levels = self.channel_mult.len();
        (
            self.base_channels * self.channel_mult[levels - 1],
            self.resolution >> (levels - 1),
        )
    }

    pub fn emb_dim(&self) -> usize {
        self.base_channels * 4
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.channel_mult.is_empty(),
            "channel_mult must not be empty"
        );
        let down = 1usize << (self.channel_mult.len() - 1);
        anyhow::ensure!(
            self.resolution.is_multiple_of(down),
            "resolution {} is not divisible by {down} ({} levels)",
            self.resolution,
            self.channel_mult.len()
        );
        for m in &self.channel_mult {
            anyhow::ensure!(
                (self.base_channels * m).is_multiple_of(self.groups),
                "channels {} not divisible by {} groups",
                self.base_channels * m,
                self.groups
            );
        }
        anyhow::ensure!(
            self.num_classes > 0 && self.channels > 0 && self.label_groups > 0,
            "num_classes, channels and label_groups must be positive"
        );
        Ok(())
    }
}

/// One step of the encoder or decoder, in execution order.
#[derive(Clone, Debug)]
pub enum Layer {
    Res(ResBlock),
    Attn(SelfAttention, usize),
    Down(Conv2d),
    Up(Conv2d),
}

#[derive(Clone, Debug)]
pub struct UNet {
    pub cfg: UNetConfig,
    pub noise_emb: SinusoidalEmbedding,
    pub emb1: Linear,
    pub emb2: Linear,
    pub label_emb: Embedding,
    pub conv_in: Conv2d,
    /// Encoder; every entry's output is saved as a skip connection.
    pub down: Vec<Layer>,
    pub mid: Vec<Layer>,
    /// Decoder; every `Res` entry consumes one skip connection (concatenated on channels).
    pub up: Vec<Layer>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let g = cfg.groups;
        let ed = cfg.emb_dim();
        let base = cfg.base_channels;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.channels, base, 3, 1, 1)?;
        let mut down = Vec::new();
        let mut skip_ch = vec![base];
        let mut ch = base;
        let mut res = cfg.resolution;
        let levels = cfg.channel_mult.len();
        for (lvl, m) in cfg.channel_mult.iter().enumerate() {
            let cout = base * m;
            for i in 0..cfg.num_res_blocks {
                let vbl = vb.pp(format!("down.{lvl}.{i}"));
                down.push(Layer::Res(ResBlock::new(
                    vbl.pp("res"),
                    ch,
                    cout,
                    ed,
                    g,
                    cfg.dropout,
                )?));
                ch = cout;
                if cfg.attn_resolutions.contains(&res) {
                    down.push(Layer::Attn(SelfAttention::new(vbl.pp("attn"), ch, g)?, res));
                }
                skip_ch.push(ch);
            }
            if lvl + 1 < levels {
                down.push(Layer::Down(Conv2d::new(
                    vb.pp(format!("down.{lvl}.downsample")),
                    ch,
                    ch,
                    3,
                    2,
                    1,
                )?));
                res /= 2;
                skip_ch.push(ch);
            }
        }
        let mid = vec![
            Layer::Res(ResBlock::new(
                vb.pp("mid.res1"),
                ch,
                ch,
                ed,
                g,
                cfg.dropout,
            )?),
            Layer::Attn(SelfAttention::new(vb.pp("mid.attn"), ch, g)?, res),
            Layer::Res(ResBlock::new(
                vb.pp("mid.res2"),
                ch,
                ch,
                ed,
                g,
                cfg.dropout,
            )?),
        ];
        let mut up = Vec::new();
        for (lvl, m) in cfg.channel_mult.iter().enumerate().rev() {
            let cout = base * m;
            for i in 0..=cfg.num_res_blocks {
                let vbl = vb.pp(format!("up.{lvl}.{i}"));
                let sc = skip_ch.pop().expect("skip channel bookkeeping");
                up.push(Layer::Res(ResBlock::new(
                    vbl.pp("res"),
                    ch + sc,
                    cout,
                    ed,
                    g,
                    cfg.dropout,
                )?));
                ch = cout;
                if cfg.attn_resolutions.contains(&res) {
                    up.push(Layer::Attn(SelfAttention::new(vbl.pp("attn"), ch, g)?, res));
                }
            }
            if lvl > 0 {
                up.push(Layer::Up(Conv2d::new(
                    vb.pp(format!("up.{lvl}.upsample")),
                    ch,
                    ch,
                    3,
                    1,
                    1,
                )?));
                res *= 2;
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            noise_emb: SinusoidalEmbedding::new(base, 1.0),
            emb1: Linear::new(vb.pp("emb.0"), base, ed)?,
            emb2: Linear::new(vb.pp("emb.1"), ed, ed)?,
            label_emb: Embedding::new(vb.pp("label_emb"), cfg.label_rows(), ed)?,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(vb.pp("norm_out"), g, ch)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch, cfg.channels, 3, 1, 1)?,
        })
    }

    /// The embedding every res block sees: SiLU(MLP(sinusoid(c_noise)) + label_emb(label)).
    pub fn embed<B: Backend>(&self, b: &B, c_noise: &B::T, labels: &B::T) -> anyhow::Result<B::T> {
        let t = self.noise_emb.forward(b, c_noise)?;
        let t = self.emb2.forward(b, &b.silu(&self.emb1.forward(b, &t)?)?)?;
        let l = self.label_emb.forward(b, labels)?;
        b.silu(&b.add(&t, &l)?)
    }

    fn layer<B: Backend>(&self, b: &B, l: &Layer, h: &B::T, emb: &B::T) -> anyhow::Result<B::T> {
        match l {
            Layer::Res(r) => r.forward(b, h, emb),
            Layer::Attn(a, res) => a.forward(b, h, *res, *res),
            Layer::Down(c) => c.forward(b, h),
            Layer::Up(c) => c.forward(b, &b.upsample_nearest2x(h)?),
        }
    }

    /// Encoder and mid block: the bottleneck features `[N, C_mid, r, r]`, the skip connections
    /// and the embedding (what the decoder needs to finish the pass).
    fn encode<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        c_noise: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<(B::T, Vec<B::T>, B::T)> {
        let emb = self.embed(b, c_noise, labels)?;
        let mut h = self.conv_in.forward(b, x)?;
        let mut skips = vec![h.clone()];
        for l in &self.down {
            h = self.layer(b, l, &h, &emb)?;
            if !matches!(l, Layer::Attn(..)) {
                skips.push(h.clone());
            } else {
                *skips.last_mut().expect("attention follows a res block") = h.clone();
            }
        }
        for l in &self.mid {
            h = self.layer(b, l, &h, &emb)?;
        }
        Ok((h, skips, emb))
    }

    /// Bottleneck features only (encoder + mid block), e.g. for DMD2's GAN head on the fake score.
    pub fn bottleneck<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        c_noise: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        Ok(self.encode(b, x, c_noise, labels)?.0)
    }

    /// Raw network output F(x, c_noise, label): `x` `[N, C, H, W]`, `c_noise` `[N]` f32,
    /// `labels` `[N]` integer (the null class `num_classes` means "unconditional").
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        c_noise: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        let (mut h, mut skips, emb) = self.encode(b, x, c_noise, labels)?;
        for l in &self.up {
            if matches!(l, Layer::Res(_)) {
                let s = skips.pop().expect("skip bookkeeping");
                h = b.concat(&[&h, &s], 1)?;
            }
            h = self.layer(b, l, &h, &emb)?;
        }
        self.conv_out
            .forward(b, &self.norm_out.forward_silu(b, &h)?)
    }
}
