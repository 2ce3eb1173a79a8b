//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE), written against [`Backend`] with
//! diffusers' own parameter names: `encoder.*` (`DownEncoderBlock2D`s, mid block, `conv_out`),
//! `quant_conv`, `post_quant_conv`, `decoder.*` (mid block, `UpDecoderBlock2D`s, `conv_out`).
//!
//! Reused from the `UNet2DModel` blocks: [`Attention`] (the mid block's, one head of full width,
//! the legacy `query`/`key`/`value`/`proj_attn` names renamed on load as for UNets) and
//! [`Downsample2D`] (diffusers' asymmetric pad of `downsample_padding = 0`). The VAE's res blocks
//! have no time embedding (`temb_channels=None`: no `time_emb_proj`), so they are their own
//! [`VaeResnet`] here rather than the UNet's `ResnetBlock2D`.
//!
//! Latents as pipelines use them: [`AutoencoderKL::decode_latents`] takes the scaled latents a
//! sampler works in and decodes `latents / scaling_factor + shift_factor` (what
//! `StableDiffusionPipeline` / `StableDiffusion3Pipeline` hand to `vae.decode`);
//! [`AutoencoderKL::encode_latents`] is the inverse, `(mean - shift_factor) * scaling_factor` of
//! the diagonal Gaussian (its mode).

use super::blocks::{Attention, Downsample2D};
use super::load::{load_weights, rename_legacy};
use crate::backend::{Backend, Param};
use crate::json::Reader;
use crate::nn::{Conv2d, GroupNorm};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The `AutoencoderKL` architecture, as diffusers reads it from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<usize>,
    pub scaling_factor: f64,
    /// `None` (diffusers' default) = 0.
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// diffusers' `AutoencoderKL()` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// The VAE's res blocks, the GroupNorm eps diffusers' `Encoder` / `Decoder` hard-code.
const EPS: f64 = 1e-6;

fn block_list(r: &mut Reader, key: &'static str, want: &str, n_default: usize) -> Result<usize> {
    match r.list(key)? {
        None => Ok(n_default),
        Some(l) => {
            for v in l {
                if v.as_str() != Some(want) {
                    return Err(r.unsupported(key, v, &format!("supported: {want}")));
                }
            }
            Ok(l.len())
        }
    }
}

impl AutoencoderKLConfig {
    /// Parses a `config.json` object. Values this implementation does not support (another
    /// block type or activation, `latents_mean` / `latents_std`) and unknown keys are errors
    /// naming the key.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut r = Reader::new(v, "config.json")?;
        if let Some(c) = r.map.get("_class_name") {
            if c.as_str() != Some("AutoencoderKL") {
                bail!("config.json: _class_name = {c} is not AutoencoderKL");
            }
        }
        let d = Self::default();
        let block_out_channels: Vec<usize> = match r.list("block_out_channels")? {
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
        let n = block_out_channels.len();
        let n_down = block_list(&mut r, "down_block_types", "DownEncoderBlock2D", 1)?;
        let n_up = block_list(&mut r, "up_block_types", "UpDecoderBlock2D", 1)?;
        ensure!(
            n_down == n && n_up == n,
            "config.json: {n_down} down_block_types and {n_up} up_block_types for {n} \
             block_out_channels"
        );
        if let Some(v) = r.get("act_fn") {
            if !matches!(v.as_str(), Some("silu" | "swish")) {
                return Err(r.unsupported("act_fn", v, "supported: silu"));
            }
        }
        for key in ["latents_mean", "latents_std"] {
            if let Some(v) = r.get(key) {
                return Err(r.unsupported(key, v, "per-channel latent statistics: only null"));
            }
        }
        let present = r.has("sample_size");
        let sample_size = match r.get("sample_size") {
            None if present => None,
            None => d.sample_size,
            Some(v) if v.is_u64() => v.as_u64().map(|n| n as usize),
            // A [h, w] pair: a default resolution only, the networks take any size.
            Some(Value::Array(a)) if a.len() == 2 && a.iter().all(Value::is_u64) => {
                a[0].as_u64().map(|n| n as usize)
            }
            Some(v) => return Err(r.unsupported("sample_size", v, "an integer or [h, w]")),
        };
        let cfg = Self {
            in_channels: r.usize_or("in_channels", d.in_channels)?,
            out_channels: r.usize_or("out_channels", d.out_channels)?,
            block_out_channels,
            layers_per_block: r.usize_or("layers_per_block", d.layers_per_block)?,
            latent_channels: r.usize_or("latent_channels", d.latent_channels)?,
            norm_num_groups: r.usize_or("norm_num_groups", d.norm_num_groups)?,
            sample_size,
            scaling_factor: r.f64_or("scaling_factor", d.scaling_factor)?,
            shift_factor: r.f64_opt("shift_factor")?,
            force_upcast: r.bool_or("force_upcast", d.force_upcast)?,
            use_quant_conv: r.bool_or("use_quant_conv", d.use_quant_conv)?,
            use_post_quant_conv: r.bool_or("use_post_quant_conv", d.use_post_quant_conv)?,
            mid_block_add_attention: r
                .bool_or("mid_block_add_attention", d.mid_block_add_attention)?,
        };
        r.finish("AutoencoderKL")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            crate::json::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.block_out_channels.is_empty(),
            "config.json: block_out_channels must not be empty"
        );
        ensure!(
            self.layers_per_block > 0,
            "config.json: layers_per_block must be positive"
        );
        ensure!(
            self.norm_num_groups > 0,
            "config.json: norm_num_groups must be positive"
        );
        for &c in &self.block_out_channels {
            ensure!(
                c.is_multiple_of(self.norm_num_groups),
                "config.json: block_out_channels entry {c} is not divisible by norm_num_groups = {}",
                self.norm_num_groups
            );
        }
        ensure!(
            self.scaling_factor.is_finite() && self.scaling_factor != 0.0,
            "config.json: unsupported scaling_factor = {} (finite, non-zero)",
            self.scaling_factor
        );
        ensure!(
            self.latent_channels > 0 && self.in_channels > 0 && self.out_channels > 0,
            "config.json: in_channels, out_channels and latent_channels must be positive"
        );
        Ok(())
    }

    /// Image side / latent side (2 per down block after the first).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn group_norm(vb: VarBuilder, groups: usize, ch: usize) -> candle_core::Result<GroupNorm> {
    let mut g = GroupNorm::new(vb, groups, ch)?;
    g.eps = EPS;
    Ok(g)
}

/// Output channels `[start, start + len)` of a conv, as a conv of its own (a view of the weight).
fn conv_rows(c: &Conv2d, start: usize, len: usize, tag: &str) -> Result<Conv2d> {
    let rows = |p: &Param| -> Result<Param> {
        Ok(Param {
            name: format!("{}[{tag}]", p.name),
            t: p.t.narrow(0, start, len)?,
        })
    };
    Ok(Conv2d {
        weight: rows(&c.weight)?,
        bias: rows(&c.bias)?,
        stride: c.stride,
        pad: c.pad,
    })
}

/// diffusers' `ResnetBlock2D` without a time embedding (`temb_channels=None`), as the VAE's
/// blocks build it: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
#[derive(Clone, Debug)]
pub struct VaeResnet {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl VaeResnet {
    pub fn new(vb: VarBuilder, groups: usize, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, cin)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(vb.pp("norm2"), groups, cout)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> Result<B::T> {
        let h = self.conv1.forward(b, &self.norm1.forward_silu(b, x)?)?;
        let h = self.norm2.forward_silu(b, &h)?;
        self.conv2
            .forward_residual(b, &h, |b| match &self.conv_shortcut {
                Some(s) => s.forward(b, x),
                None => Ok(x.clone()),
            })
    }
}

/// `UNetMidBlock2D` with `temb_channels=None`: res, (attention of one head, res).
#[derive(Clone, Debug)]
pub struct VaeMidBlock {
    pub resnets: [VaeResnet; 2],
    pub attention: Option<Attention>,
}

impl VaeMidBlock {
    pub fn new(vb: VarBuilder, groups: usize, ch: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnets: [
                VaeResnet::new(vb.pp("resnets.0"), groups, ch, ch)?,
                VaeResnet::new(vb.pp("resnets.1"), groups, ch, ch)?,
            ],
            attention: if attention {
                // attention_head_dim = the width: one head.
                Some(Attention::new(
                    vb.pp("attentions.0"),
                    ch,
                    Some(groups),
                    EPS,
                    Some(ch),
                    1.0,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> Result<B::T> {
        let mut y = self.resnets[0].forward(b, x)?;
        if let Some(a) = &self.attention {
            y = a.forward(b, &y, h, w)?;
        }
        self.resnets[1].forward(b, &y)
    }
}

/// `DownEncoderBlock2D`: res blocks, then a stride-2 conv (`downsample_padding = 0`) except in
/// the last block.
#[derive(Clone, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<VaeResnet>,
    pub downsampler: Option<Downsample2D>,
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` res blocks, then nearest 2x + conv except in the
/// last block.
#[derive(Clone, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<VaeResnet>,
    pub upsampler: Option<Conv2d>,
}

/// `Encoder` (`double_z=True`): image -> the Gaussian's `[mean, logvar]` moments (before
/// `quant_conv`).
#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// `Decoder` (`norm_type="group"`): latent (after `post_quant_conv`) -> image.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub cfg: AutoencoderKLConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let (n, g, lat) = (ch.len(), cfg.norm_num_groups, cfg.latent_channels);
        let last = ch[n - 1];

        let e = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(n);
        let mut cout = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let cin = cout;
            cout = c;
            let vbi = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let ci = if j == 0 { cin } else { cout };
                    VaeResnet::new(vbi.pp(format!("resnets.{j}")), g, ci, cout)
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D {
                    conv: Conv2d::new(vbi.pp("downsamplers.0.conv"), cout, cout, 3, 2, 0)?,
                    padding: 0,
                })
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsampler,
            });
        }
        let encoder = Encoder {
            conv_in: Conv2d::new(e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(e.pp("mid_block"), g, last, cfg.mid_block_add_attention)?,
            conv_norm_out: group_norm(e.pp("conv_norm_out"), g, last)?,
            conv_out: Conv2d::new(e.pp("conv_out"), last, 2 * lat, 3, 1, 1)?,
        };

        let d = vb.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut cout = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let cin = cout;
            cout = c;
            let vbi = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let ci = if j == 0 { cin } else { cout };
                    VaeResnet::new(vbi.pp(format!("resnets.{j}")), g, ci, cout)
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < n {
                Some(Conv2d::new(
                    vbi.pp("upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        let decoder = Decoder {
            conv_in: Conv2d::new(d.pp("conv_in"), lat, last, 3, 1, 1)?,
            mid_block: VaeMidBlock::new(d.pp("mid_block"), g, last, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: group_norm(d.pp("conv_norm_out"), g, ch[0])?,
            conv_out: Conv2d::new(d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        };
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn check_side(&self, what: &str, h: usize, w: usize) -> Result<()> {
        let f = self.cfg.downscale();
        ensure!(
            h > 0 && w > 0 && h.is_multiple_of(f) && w.is_multiple_of(f),
            "AutoencoderKL: {what} of {h}x{w} is not divisible by {f} ({} blocks)",
            self.cfg.block_out_channels.len()
        );
        Ok(())
    }

    /// `vae.decode(z).sample`: `z` `[N, latent_channels, h, w]` (unscaled latents, static `h`,
    /// `w`) -> images `[N, out_channels, h * 2^(blocks-1), w * 2^(blocks-1)]` (in [-1, 1] for a
    /// trained VAE; not clamped, as diffusers does not).
    pub fn decode<B: Backend>(&self, b: &B, z: &B::T, h: usize, w: usize) -> Result<B::T> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(b, z)?,
            None => z.clone(),
        };
        let d = &self.decoder;
        let x = d.conv_in.forward(b, &z)?;
        let mut x = d.mid_block.forward(b, &x, h, w)?;
        for u in &d.up_blocks {
            for r in &u.resnets {
                x = r.forward(b, &x)?;
            }
            if let Some(c) = &u.upsampler {
                x = c.forward(b, &b.upsample_nearest2x(&x)?)?;
            }
        }
        d.conv_out.forward(b, &d.conv_norm_out.forward_silu(b, &x)?)
    }

    /// What a pipeline decodes: `latents` as the sampler has them, `decode(latents /
    /// scaling_factor + shift_factor)`.
    pub fn decode_latents<B: Backend>(
        &self,
        b: &B,
        latents: &B::T,
        h: usize,
        w: usize,
    ) -> Result<B::T> {
        let z = b.affine(
            latents,
            1.0 / self.cfg.scaling_factor,
            self.cfg.shift_factor.unwrap_or(0.0),
        )?;
        self.decode(b, &z, h, w)
    }

    /// The encoder's features before `conv_out` (after the mid block, norm and SiLU).
    fn encode_features<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> Result<B::T> {
        let e = &self.encoder;
        let mut y = e.conv_in.forward(b, x)?;
        let (mut sh, mut sw) = (h, w);
        for blk in &e.down_blocks {
            for r in &blk.resnets {
                y = r.forward(b, &y)?;
            }
            if let Some(ds) = &blk.downsampler {
                y = ds.forward(b, &y)?;
                (sh, sw) = (sh / 2, sw / 2);
            }
        }
        let y = e.mid_block.forward(b, &y, sh, sw)?;
        e.conv_norm_out.forward_silu(b, &y)
    }

    /// The diagonal Gaussian's `(mean, logvar)` of `vae.encode(x).latent_dist` (logvar clamped
    /// to [-30, 20] as diffusers does), each `[N, latent_channels, h / 2^(blocks-1), ..]`.
    /// `x`: images `[N, in_channels, h, w]` in [-1, 1].
    pub fn encode_moments<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        h: usize,
        w: usize,
    ) -> Result<(B::T, B::T)> {
        self.check_side("an image", h, w)?;
        let f = self.encode_features(b, x, h, w)?;
        let lat = self.cfg.latent_channels;
        // The moments' halves as convs of their own: the output rows of the last conv.
        let (mean, logvar) = match &self.quant_conv {
            Some(q) => {
                let m = self.encoder.conv_out.forward(b, &f)?;
                (
                    conv_rows(q, 0, lat, "mean")?.forward(b, &m)?,
                    conv_rows(q, lat, lat, "logvar")?.forward(b, &m)?,
                )
            }
            None => {
                let c = &self.encoder.conv_out;
                (
                    conv_rows(c, 0, lat, "mean")?.forward(b, &f)?,
                    conv_rows(c, lat, lat, "logvar")?.forward(b, &f)?,
                )
            }
        };
        Ok((mean, b.clamp(&logvar, -30.0, 20.0)?))
    }

    /// `vae.encode(x).latent_dist.mean` (the mode), unscaled.
    pub fn encode_mean<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> Result<B::T> {
        Ok(self.encode_moments(b, x, h, w)?.0)
    }

    /// Latents as a pipeline makes them from images: `(mean - shift_factor) * scaling_factor`.
    pub fn encode_latents<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> Result<B::T> {
        let m = self.encode_mean(b, x, h, w)?;
        self.scale_latents(b, &m)
    }

    /// `latent_dist.sample()` with the given standard normal `noise` (`mean + exp(logvar / 2) *
    /// noise`), scaled as [`Self::encode_latents`].
    pub fn encode_latents_sampled<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        h: usize,
        w: usize,
        noise: &B::T,
    ) -> Result<B::T> {
        let (m, logvar) = self.encode_moments(b, x, h, w)?;
        let std = b.exp(&b.affine(&logvar, 0.5, 0.0)?)?;
        self.scale_latents(b, &b.add(&m, &b.mul(&std, noise)?)?)
    }

    fn scale_latents<B: Backend>(&self, b: &B, z: &B::T) -> Result<B::T> {
        let s = self.cfg.scaling_factor;
        b.affine(z, s, -self.cfg.shift_factor.unwrap_or(0.0) * s)
    }

    /// Every parameter, by diffusers key.
    pub fn params(&self) -> Vec<Param> {
        let mut v = Vec::new();
        let conv = |v: &mut Vec<Param>, c: &Conv2d| {
            v.push(c.weight.clone());
            v.push(c.bias.clone());
        };
        let gn = |v: &mut Vec<Param>, g: &GroupNorm| {
            v.push(g.gamma.clone());
            v.push(g.beta.clone());
        };
        let res = |v: &mut Vec<Param>, r: &VaeResnet| {
            gn(v, &r.norm1);
            conv(v, &r.conv1);
            gn(v, &r.norm2);
            conv(v, &r.conv2);
            if let Some(s) = &r.conv_shortcut {
                conv(v, s);
            }
        };
        let mid = |v: &mut Vec<Param>, m: &VaeMidBlock| {
            res(v, &m.resnets[0]);
            if let Some(a) = &m.attention {
                if let Some(g) = &a.group_norm {
                    gn(v, g);
                }
                for l in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                    v.push(l.weight.clone());
                    v.push(l.bias.clone());
                }
            }
            res(v, &m.resnets[1]);
        };
        let e = &self.encoder;
        conv(&mut v, &e.conv_in);
        for blk in &e.down_blocks {
            blk.resnets.iter().for_each(|r| res(&mut v, r));
            if let Some(d) = &blk.downsampler {
                conv(&mut v, &d.conv);
            }
        }
        mid(&mut v, &e.mid_block);
        gn(&mut v, &e.conv_norm_out);
        conv(&mut v, &e.conv_out);
        for c in self.quant_conv.iter().chain(&self.post_quant_conv) {
            conv(&mut v, c);
        }
        let d = &self.decoder;
        conv(&mut v, &d.conv_in);
        mid(&mut v, &d.mid_block);
        for blk in &d.up_blocks {
            blk.resnets.iter().for_each(|r| res(&mut v, r));
            if let Some(u) = &blk.upsampler {
                conv(&mut v, u);
            }
        }
        gn(&mut v, &d.conv_norm_out);
        conv(&mut v, &d.conv_out);
        v
    }
}

/// Every parameter (name, shape) that `build` creates, from a zero-initialised `VarMap`.
pub fn expected_shapes(
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let vm = candle_nn::VarMap::new();
    build(candle_nn::VarBuilder::from_varmap(
        &vm,
        DType::F32,
        &Device::Cpu,
    ))?;
    let data = vm.data().lock().expect("varmap lock");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect())
}

/// Missing, extra and mis-shaped weights against `want`, each an error naming the tensor.
/// Keys in `ignore` (buffers a checkpoint may carry, e.g. CLIP's `position_ids`) are allowed.
pub fn check_shapes(
    want: &BTreeMap<String, Vec<usize>>,
    weights: &HashMap<String, Tensor>,
    ignore: &[&str],
) -> Result<()> {
    for (k, shape) in want {
        match weights.get(k) {
            None => bail!("missing weight {k} (shape {shape:?})"),
            Some(t) if t.dims() != shape.as_slice() => bail!(
                "weight {k} has shape {:?}, the config needs {shape:?}",
                t.dims()
            ),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = weights
        .keys()
        .filter(|k| !want.contains_key(*k) && !ignore.contains(&k.as_str()))
        .collect();
    extra.sort();
    if let Some(k) = extra.first() {
        bail!(
            "unexpected weight {k} ({} extra in all): not part of the network the config describes",
            extra.len()
        );
    }
    Ok(())
}

/// Where a VAE is: a model folder (`config.json` with `_class_name: AutoencoderKL`), or a
/// pipeline folder's `vae/`.
pub fn vae_folder(dir: &Path) -> Result<std::path::PathBuf> {
    if dir.join("model_index.json").is_file() {
        let v = dir.join("vae");
        ensure!(
            v.join("config.json").is_file(),
            "{}: a pipeline folder (model_index.json) without vae/config.json",
            dir.display()
        );
        return Ok(v);
    }
    ensure!(
        dir.join("config.json").is_file(),
        "{}: not an AutoencoderKL folder (no config.json)",
        dir.display()
    );
    Ok(dir.to_path_buf())
}

/// Loads the `AutoencoderKL` of a diffusers folder (model or pipeline) onto `device`: the
/// weights checked against the config (missing, extra, mis-shaped: errors naming the tensor),
/// legacy attention names renamed. Returns the network and its weights by diffusers key.
pub fn load_vae(dir: &Path, device: &Device) -> Result<(AutoencoderKL, HashMap<String, Tensor>)> {
    let folder = vae_folder(dir)?;
    let cfg = AutoencoderKLConfig::from_file(&folder.join("config.json"))?;
    let weights = rename_legacy(load_weights(&folder, device)?)?;
    let want = expected_shapes(|vb| AutoencoderKL::new(vb, &cfg).map(|_| ()))?;
    check_shapes(&want, &weights, &[]).with_context(|| format!("in {}", folder.display()))?;
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
    Ok((AutoencoderKL::new(vb, &cfg)?, weights))
}
