//! diffusers' `Transformer2DModel` (the continuous-input path SD 1.x / 2.x / SDXL use) with its
//! `BasicTransformerBlock`s (LayerNorm, self-attention, cross-attention over
//! `encoder_hidden_states`, GEGLU feed-forward), written against [`Backend`] with diffusers'
//! state-dict keys (`norm`, `proj_in`, `transformer_blocks.{j}.attn1.to_q`, .., `proj_out`).

use crate::backend::{Backend, Param};
use crate::nn::{param, uniform_fan_in, Conv2d, GroupNorm, LayerNorm, Linear};
use candle_nn::VarBuilder;

/// A linear layer whose bias may be absent (`nn.Linear(.., bias=False)`: diffusers' `to_q`,
/// `to_k`, `to_v`).
#[derive(Clone, Debug)]
pub struct Proj {
    pub weight: Param,
    pub bias: Option<Param>,
}

impl Proj {
    pub fn new(vb: VarBuilder, din: usize, dout: usize, bias: bool) -> candle_core::Result<Self> {
        let init = uniform_fan_in(din);
        Ok(Self {
            weight: param(&vb, (dout, din), "weight", init)?,
            bias: if bias {
                Some(param(&vb, dout, "bias", init)?)
            } else {
                None
            },
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T) -> anyhow::Result<B::T> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// diffusers' `Attention` as `BasicTransformerBlock` builds it: `to_q` / `to_k` / `to_v` without
/// bias (`attention_bias = False`), `to_out.0` with bias, `heads` heads of `head_dim`, scale
/// `head_dim^-0.5`. Keys and values come from `context` (`[N, S, cross_dim]`) for
/// cross-attention, from the queries' own tokens for self-attention.
///
/// `upcast_attention` (diffusers computes the scores in f32 under fp16) needs nothing here: the
/// scores are f32 in candle and in every export (only weight matmuls run in f16 there).
#[derive(Clone, Debug)]
pub struct CrossAttention {
    pub to_q: Proj,
    pub to_k: Proj,
    pub to_v: Proj,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

impl CrossAttention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let kv = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Proj::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Proj::new(vb.pp("to_k"), kv, inner, false)?,
            to_v: Proj::new(vb.pp("to_v"), kv, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim)?,
            heads,
            head_dim,
        })
    }

    /// `x`: `[N, L, C]` tokens; `context`: `[N, S, cross_dim]` (None: self-attention).
    /// Heads stay a separate axis (`[N, heads, L, d]`, batched matmuls), never folded into the
    /// batch, so an export keeps its dynamic batch.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        context: Option<&B::T>,
    ) -> anyhow::Result<B::T> {
        let (h, d) = (self.heads as i64, self.head_dim as i64);
        let ctx = context.unwrap_or(x);
        let split = |t: B::T| b.reshape(&t, &[0, 0, h, d]); // [N, L, heads, d]
        let q = b.permute(&split(self.to_q.forward(b, x)?)?, &[0, 2, 1, 3])?; // [N, h, L, d]
        let k = b.permute(&split(self.to_k.forward(b, ctx)?)?, &[0, 2, 3, 1])?; // [N, h, d, S]
        let v = b.permute(&split(self.to_v.forward(b, ctx)?)?, &[0, 2, 1, 3])?; // [N, h, S, d]
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = b.affine(&b.matmul(&q, &k)?, scale, 0.0)?; // [N, h, L, S]
        let attn = b.softmax_last(&scores)?;
        let o = b.permute(&b.matmul(&attn, &v)?, &[0, 2, 1, 3])?; // [N, L, h, d]
        let o = b.reshape(&o, &[0, 0, h * d])?;
        self.to_out.forward(b, &o)
    }
}

/// `FeedForward` with `activation_fn = "geglu"`: `net.0` = `GEGLU` (`proj` to twice the inner
/// width, `hidden * gelu(gate)` on its two halves, exact GELU), `net.2` the output projection
/// (`net.1` is a dropout, identity at inference).
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
    pub inner: usize,
    pub dropout: f64,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize, dropout: f64) -> candle_core::Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner)?,
            out: Linear::new(vb.pp("net.2"), inner, dim)?,
            inner,
            dropout,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, last_axis: usize) -> anyhow::Result<B::T> {
        let p = self.proj.forward(b, x)?;
        let hidden = b.narrow(&p, last_axis, 0, self.inner)?;
        let gate = b.narrow(&p, last_axis, self.inner, self.inner)?;
        let h = b.mul(&hidden, &b.gelu(&gate)?)?;
        let h = b.dropout(&h, self.dropout)?;
        self.out.forward(b, &h)
    }
}

/// `BasicTransformerBlock` with `norm_type = "layer_norm"` (eps 1e-5, affine):
/// `x += attn1(norm1(x))`, `x += attn2(norm2(x), context)`, `x += ff(norm3(x))`.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: CrossAttention,
    pub norm2: LayerNorm,
    pub attn2: CrossAttention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5, true)?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5, true)?,
            attn2: CrossAttention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
            )?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5, true)?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4, 0.0)?,
        })
    }

    /// `x`: `[N, L, dim]`, `context`: `[N, S, cross_attention_dim]`.
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, context: &B::T) -> anyhow::Result<B::T> {
        let h = b.add(&self.attn1.forward(b, &self.norm1.forward(b, x)?, None)?, x)?;
        let h = b.add(
            &self
                .attn2
                .forward(b, &self.norm2.forward(b, &h)?, Some(context))?,
            &h,
        )?;
        b.add(&self.ff.forward(b, &self.norm3.forward(b, &h)?, 2)?, &h)
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions on the feature map, or linear layers on the tokens
/// (`use_linear_projection`).
#[derive(Clone, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` on a `[N, C, H, W]` feature map: GroupNorm (eps 1e-6), `proj_in`,
/// `transformer_blocks` on the `H * W` tokens, `proj_out`, residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
    pub channels: usize,
    pub inner: usize,
}

impl Transformer2DModel {
    /// `heads` x `head_dim` is the inner width (diffusers: `num_attention_heads`,
    /// `in_channels // num_attention_heads`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        head_dim: usize,
        layers: usize,
        cross_attention_dim: usize,
        groups: usize,
        use_linear_projection: bool,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let mut norm = GroupNorm::new(vb.pp("norm"), groups, channels)?;
        norm.eps = 1e-6;
        let (proj_in, proj_out) = if use_linear_projection {
            (
                Projection::Linear(Linear::new(vb.pp("proj_in"), channels, inner)?),
                Projection::Linear(Linear::new(vb.pp("proj_out"), inner, channels)?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(vb.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Projection::Conv(Conv2d::new(vb.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let transformer_blocks = (0..layers)
            .map(|j| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{j}")),
                    inner,
                    heads,
                    head_dim,
                    cross_attention_dim,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
            channels,
            inner,
        })
    }

    /// `x`: `[N, C, h, w]` with static `h`, `w`; `context`: `[N, S, cross_attention_dim]`.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::T,
        h: usize,
        w: usize,
        context: &B::T,
    ) -> anyhow::Result<B::T> {
        let l = (h * w) as i64;
        let (c, inner) = (self.channels as i64, self.inner as i64);
        let xn = self.norm.forward(b, x)?;
        let to_tokens = |t: &B::T, ch: i64| -> anyhow::Result<B::T> {
            b.permute(&b.reshape(t, &[0, ch, l])?, &[0, 2, 1]) // [N, L, ch]
        };
        let to_map = |t: &B::T, ch: i64| -> anyhow::Result<B::T> {
            b.reshape(&b.permute(t, &[0, 2, 1])?, &[0, ch, h as i64, w as i64])
        };
        let mut t = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(b, &xn)?, inner)?,
            Projection::Linear(p) => p.forward(b, &to_tokens(&xn, c)?)?,
        };
        for blk in &self.transformer_blocks {
            t = blk.forward(b, &t, context)?;
        }
        let o = match &self.proj_out {
            Projection::Conv(p) => p.forward(b, &to_map(&t, inner)?)?,
            Projection::Linear(p) => to_map(&p.forward(b, &t)?, c)?,
        };
        b.add(&o, x)
    }
}
