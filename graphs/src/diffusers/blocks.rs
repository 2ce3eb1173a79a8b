//! diffusers' 2-D UNet blocks (`ResnetBlock2D`, `Attention`, `Downsample2D`, `Upsample2D` and the
//! down/mid/up blocks built from them), parameters named by diffusers' state-dict keys.

use super::config::{BlockType, TimeScaleShift};
use crate::backend::{Backend, Param};
use crate::nn::{Conv2d, GroupNorm, Linear};
use candle_nn::VarBuilder;

fn group_norm(
    vb: VarBuilder,
    groups: usize,
    ch: usize,
    eps: f64,
) -> candle_core::Result<GroupNorm> {
    let mut g = GroupNorm::new(vb, groups, ch)?;
    g.eps = eps;
    Ok(g)
}

/// Rows `[start, start + len)` of a parameter, as a parameter of its own (differentiable: it is
/// a view of the weight taken at every forward, so it follows optimizer updates).
fn rows(p: &Param, start: usize, len: usize, tag: &str) -> anyhow::Result<Param> {
    Ok(Param {
        name: format!("{}[{tag}]", p.name),
        t: p.t.narrow(0, start, len)?,
    })
}

/// `ResnetBlock2D` (pre-norm, SiLU, `output_scale_factor`, 1x1 `conv_shortcut` when the width
/// changes).
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub shift: TimeScaleShift,
    pub dropout: f64,
    pub output_scale_factor: f64,
    pub cout: usize,
}

/// What every block of one network shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockOpts {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub shift: TimeScaleShift,
    pub dropout: f64,
    pub attention_head_dim: Option<usize>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        o: &BlockOpts,
        output_scale_factor: f64,
    ) -> candle_core::Result<Self> {
        let proj_out = match o.shift {
            TimeScaleShift::Default => cout,
            TimeScaleShift::ScaleShift => 2 * cout,
        };
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), o.groups, cin, o.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: Linear::new(vb.pp("time_emb_proj"), o.temb, proj_out)?,
            norm2: group_norm(vb.pp("norm2"), o.groups, cout, o.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            shift: o.shift,
            dropout: o.dropout,
            output_scale_factor,
            cout,
        })
    }

    /// `temb_silu` = SiLU(time embedding), `[N, temb]` (diffusers applies the SiLU in every
    /// block; computing it once is the same).
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, temb_silu: &B::T) -> anyhow::Result<B::T> {
        let c = self.cout as i64;
        let col = |t: B::T| b.reshape(&t, &[-1, c, 1, 1]);
        let h = self.norm1.forward_silu(b, x)?;
        let h = match self.shift {
            TimeScaleShift::Default => {
                let h = self
                    .conv1
                    .forward_shifted(b, &h, |b| col(self.time_emb_proj.forward(b, temb_silu)?))?;
                self.norm2.forward_silu(b, &h)?
            }
            TimeScaleShift::ScaleShift => {
                let (w, bias) = (&self.time_emb_proj.weight, &self.time_emb_proj.bias);
                let n = self.cout;
                let proj = |tag: &str, start: usize| -> anyhow::Result<B::T> {
                    col(b.linear(
                        temb_silu,
                        &rows(w, start, n, tag)?,
                        Some(&rows(bias, start, n, tag)?),
                    )?)
                };
                let scale = proj("scale", 0)?;
                let shift = proj("shift", n)?;
                let h = self.norm2.forward(b, &self.conv1.forward(b, &h)?)?;
                let h = b.add(&b.mul(&h, &b.affine(&scale, 1.0, 1.0)?)?, &shift)?;
                b.silu(&h)?
            }
        };
        let h = b.dropout(&h, self.dropout)?;
        let out = self
            .conv2
            .forward_residual(b, &h, |b| match &self.conv_shortcut {
                Some(s) => s.forward(b, x),
                None => Ok(x.clone()),
            })?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            b.affine(&out, 1.0 / self.output_scale_factor, 0.0)
        }
    }
}

/// diffusers' `Attention` as the 2-D UNet blocks build it: optional GroupNorm, multi-head
/// self-attention over the pixels, residual connection, `rescale_output_factor`.
#[derive(Clone, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rescale_output_factor: f64,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        groups: Option<usize>,
        eps: f64,
        head_dim: Option<usize>,
        rescale_output_factor: f64,
    ) -> candle_core::Result<Self> {
        let d = head_dim.unwrap_or(channels);
        let heads = channels / d;
        let inner = heads * d;
        Ok(Self {
            group_norm: groups
                .map(|g| group_norm(vb.pp("group_norm"), g, channels, eps))
                .transpose()?,
            to_q: Linear::new(vb.pp("to_q"), channels, inner)?,
            to_k: Linear::new(vb.pp("to_k"), channels, inner)?,
            to_v: Linear::new(vb.pp("to_v"), channels, inner)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, channels)?,
            channels,
            heads,
            head_dim: d,
            rescale_output_factor,
        })
    }

    /// `x`: `[N, C, H, W]` with static `h`, `w`.
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, h: usize, w: usize) -> anyhow::Result<B::T> {
        let (c, l) = (self.channels as i64, (h * w) as i64);
        let d = self.head_dim;
        let xn = match &self.group_norm {
            Some(g) => g.forward(b, x)?,
            None => x.clone(),
        };
        let tokens = b.permute(&b.reshape(&xn, &[0, c, l])?, &[0, 2, 1])?; // [N, L, C]

        // One projection + attention per head, each `[N, d, L]` (the layout of
        // `Backend::attention`), rather than folding heads into the batch: a `[N * heads, ..]`
        // tensor has no static shape in an ONNX export with a dynamic batch.
        let mut outs = Vec::with_capacity(self.heads);
        for hd in 0..self.heads {
            let tag = format!("head{hd}");
            let proj = |lin: &Linear| -> anyhow::Result<B::T> {
                let (w, bias) = if self.heads == 1 {
                    (lin.weight.clone(), lin.bias.clone())
                } else {
                    let s = hd * self.head_dim;
                    (
                        rows(&lin.weight, s, self.head_dim, &tag)?,
                        rows(&lin.bias, s, self.head_dim, &tag)?,
                    )
                };
                b.permute(&b.linear(&tokens, &w, Some(&bias))?, &[0, 2, 1])
            };
            let (q, k, v) = (proj(&self.to_q)?, proj(&self.to_k)?, proj(&self.to_v)?);
            outs.push(b.attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?); // [N, d, L]
        }
        let o = if outs.len() == 1 {
            outs.pop().expect("one head")
        } else {
            b.concat(&outs.iter().collect::<Vec<_>>(), 1)? // [N, heads * d, L]
        };
        let o = self.to_out.forward(b, &b.permute(&o, &[0, 2, 1])?)?; // [N, L, C]
        let o = b.reshape(&b.permute(&o, &[0, 2, 1])?, &[-1, c, h as i64, w as i64])?;
        let o = b.add(&o, x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(o)
        } else {
            b.affine(&o, 1.0 / self.rescale_output_factor, 0.0)
        }
    }
}

/// `Downsample2D` with a conv (`downsamplers.0.conv`): stride 2, padding `downsample_padding`;
/// padding 0 is diffusers' asymmetric zero pad of one row and column at the bottom and right.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        if self.padding == 1 {
            return self.conv.forward(b, x);
        }
        // pad (0, 1, 0, 1) + 3x3 conv == pad 1 all round + the kernel zero-padded to 4x4 at its
        // top and left: the Backend's convolutions only pad symmetrically.
        let w = &self.conv.weight;
        let k = w.t.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 0)?;
        let w4 = Param {
            name: format!("{}[pad4x4]", w.name),
            t: k,
        };
        b.conv2d(x, &w4, Some(&self.conv.bias), 2, 1)
    }
}

/// A down block (`DownBlock2D` / `AttnDownBlock2D`).
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        kind: BlockType,
        layers: usize,
        cin: usize,
        cout: usize,
        add_downsample: bool,
        downsample_padding: usize,
        o: &BlockOpts,
    ) -> candle_core::Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let ci = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                ci,
                cout,
                o,
                1.0,
            )?);
            if kind == BlockType::Attn {
                attentions.push(Attention::new(
                    vb.pp(format!("attentions.{i}")),
                    cout,
                    Some(o.groups),
                    o.eps,
                    o.attention_head_dim,
                    1.0,
                )?);
            }
        }
        let downsampler = if add_downsample {
            let p = downsample_padding;
            Some(Downsample2D {
                conv: Conv2d::new(vb.pp("downsamplers.0.conv"), cout, cout, 3, 2, p)?,
                padding: p,
            })
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and appends each sub-layer's output to `skips`; `side` is updated.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        temb: &B::T,
        side: &mut usize,
        skips: &mut Vec<B::T>,
    ) -> anyhow::Result<B::T> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(b, &h, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(b, &h, *side, *side)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(b, &h)?;
            *side = side.div_ceil(2);
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2D`: res, (attention, res) with `output_scale_factor` = `mid_block_scale_factor`.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<Attention>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        ch: usize,
        o: &BlockOpts,
        attn_groups: Option<usize>,
        add_attention: bool,
        scale: f64,
    ) -> candle_core::Result<Self> {
        // diffusers: attn_groups = resnet_groups for "default", None (no norm) otherwise.
        let groups = attn_groups.or(match o.shift {
            TimeScaleShift::Default => Some(o.groups),
            TimeScaleShift::ScaleShift => None,
        });
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(vb.pp("resnets.0"), ch, ch, o, scale)?,
                ResnetBlock2D::new(vb.pp("resnets.1"), ch, ch, o, scale)?,
            ],
            attention: if add_attention {
                Some(Attention::new(
                    vb.pp("attentions.0"),
                    ch,
                    groups,
                    o.eps,
                    o.attention_head_dim,
                    scale,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        temb: &B::T,
        side: usize,
    ) -> anyhow::Result<B::T> {
        let mut h = self.resnets[0].forward(b, x, temb)?;
        if let Some(a) = &self.attention {
            h = a.forward(b, &h, side, side)?;
        }
        self.resnets[1].forward(b, &h, temb)
    }
}

/// An up block (`UpBlock2D` / `AttnUpBlock2D`): `layers_per_block + 1` res blocks, each on the
/// concatenation with one skip connection.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
    pub upsampler: Option<Conv2d>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        kind: BlockType,
        layers: usize,
        cin: usize,
        prev: usize,
        cout: usize,
        add_upsample: bool,
        o: &BlockOpts,
    ) -> candle_core::Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let ri = if i == 0 { prev } else { cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                ri + skip,
                cout,
                o,
                1.0,
            )?);
            if kind == BlockType::Attn {
                attentions.push(Attention::new(
                    vb.pp(format!("attentions.{i}")),
                    cout,
                    Some(o.groups),
                    o.eps,
                    o.attention_head_dim,
                    1.0,
                )?);
            }
        }
        let upsampler = if add_upsample {
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
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Consumes one skip connection per res block from the end of `skips`.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        temb: &B::T,
        side: &mut usize,
        skips: &mut Vec<B::T>,
    ) -> anyhow::Result<B::T> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let s = skips
                .pop()
                .ok_or_else(|| anyhow::anyhow!("UNet2DModel: skip connection bookkeeping"))?;
            h = r.forward(b, &b.concat(&[&h, &s], 1)?, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(b, &h, *side, *side)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(b, &b.upsample_nearest2x(&h)?)?;
            *side *= 2;
        }
        Ok(h)
    }
}
