//! Walks a network's parameters (name -> tensor), e.g. to save them or to count them.

use crate::nn::{Conv2d, GanHead, GroupNorm, Linear, ResBlock, SelfAttention};
use crate::unet::Layer;
use crate::{Denoiser, Param};

fn conv(v: &mut Vec<Param>, c: &Conv2d) {
    v.push(c.weight.clone());
    v.push(c.bias.clone());
}
fn lin(v: &mut Vec<Param>, l: &Linear) {
    v.push(l.weight.clone());
    v.push(l.bias.clone());
}
fn gn(v: &mut Vec<Param>, g: &GroupNorm) {
    v.push(g.gamma.clone());
    v.push(g.beta.clone());
}
fn res(v: &mut Vec<Param>, r: &ResBlock) {
    gn(v, &r.norm1);
    conv(v, &r.conv1);
    lin(v, &r.emb_proj);
    gn(v, &r.norm2);
    conv(v, &r.conv2);
    if let Some(s) = &r.skip {
        conv(v, s);
    }
}
fn attn(v: &mut Vec<Param>, a: &SelfAttention) {
    gn(v, &a.norm);
    for c in [&a.q, &a.k, &a.v, &a.proj] {
        conv(v, c);
    }
}

/// Every parameter of the denoiser, in a fixed order.
pub fn collect(den: &Denoiser) -> Vec<Param> {
    let u = match &den.net {
        crate::Network::Unet(u) => u,
        crate::Network::Diffusers(d) => return d.params.clone(),
        crate::Network::Condition(d) => return d.params.clone(),
    };
    let mut v = Vec::new();
    lin(&mut v, &u.emb1);
    lin(&mut v, &u.emb2);
    v.push(u.label_emb.table.clone());
    conv(&mut v, &u.conv_in);
    for l in u.down.iter().chain(&u.mid).chain(&u.up) {
        match l {
            Layer::Res(r) => res(&mut v, r),
            Layer::Attn(a, _) => attn(&mut v, a),
            Layer::Down(c) | Layer::Up(c) => conv(&mut v, c),
        }
    }
    gn(&mut v, &u.norm_out);
    conv(&mut v, &u.conv_out);
    v
}

pub fn count(den: &Denoiser) -> usize {
    collect(den).iter().map(|p| p.t.elem_count()).sum()
}

/// Every parameter of a GAN head, in a fixed order.
pub fn collect_head(head: &GanHead) -> Vec<Param> {
    let mut v = Vec::new();
    for (c, g) in &head.blocks {
        conv(&mut v, c);
        gn(&mut v, g);
    }
    conv(&mut v, &head.out);
    if let Some(e) = &head.proj {
        v.push(e.table.clone());
    }
    if let Some(c) = &head.classifier {
        conv(&mut v, c);
    }
    v
}

/// A copy of `den` whose weights are detached from autograd (same storage, no gradient): for
/// no-grad rollouts and for frozen copies of a trainable network inside another network's loss.
pub fn detached(den: &Denoiser) -> anyhow::Result<Denoiser> {
    let map: std::collections::HashMap<String, candle_core::Tensor> = collect(den)
        .into_iter()
        .map(|p| (p.name, p.t.detach()))
        .collect();
    let device = map
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let vb = candle_nn::VarBuilder::from_tensors(map, candle_core::DType::F32, &device);
    Denoiser::new(vb, &den.config())
}

/// A copy of `den` with its weights converted to `dtype` (detached): e.g. the f64 twin of an f32
/// reference, to measure how much f32 round-off alone moves its output.
pub fn in_dtype(den: &Denoiser, dtype: candle_core::DType) -> anyhow::Result<Denoiser> {
    let map: std::collections::HashMap<String, candle_core::Tensor> = collect(den)
        .into_iter()
        .map(|p| Ok((p.name, p.t.detach().to_dtype(dtype)?)))
        .collect::<anyhow::Result<_>>()?;
    let device = map
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, &device);
    Denoiser::new(vb, &den.config())
}

/// A copy of a GAN head with detached weights (see [`detached`]).
pub fn detached_head(head: &GanHead) -> GanHead {
    let mut h = head.clone();
    for (c, g) in &mut h.blocks {
        for p in [&mut c.weight, &mut c.bias, &mut g.gamma, &mut g.beta] {
            p.t = p.t.detach();
        }
    }
    for p in [&mut h.out.weight, &mut h.out.bias] {
        p.t = p.t.detach();
    }
    if let Some(e) = &mut h.proj {
        e.table.t = e.table.t.detach();
    }
    if let Some(c) = &mut h.classifier {
        for p in [&mut c.weight, &mut c.bias] {
            p.t = p.t.detach();
        }
    }
    h
}
