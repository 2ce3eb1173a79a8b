//! LoRA (Hu et al., 2021) on the `Linear` and `Conv2d` layers of a [`Denoiser`]: per adapted layer
//! a `lora_A` ("down", `[r, in]`, or `[r, in, k, k]` for a `k x k` conv) and a `lora_B` ("up",
//! `[out, r]` or `[out, r, 1, 1]`), named as PEFT names them (`<module>.lora_A.weight`), with
//! `lora_B` zero-initialised so the adapted network starts equal to its base, and the update
//! scaled by `alpha / rank`.
//!
//! The adapter is always **merged**: an adapted network is the base network whose adapted weights
//! are `W + (alpha / r) * B @ A` (for a conv, `B` and `A` flattened to matrices and the product
//! reshaped to `W`'s `[out, in, k, k]`: exactly PEFT's `get_delta_weight` for a conv whose `A` has
//! the base conv's kernel, stride and padding and whose `B` is 1x1). That sum is an ordinary,
//! differentiable candle expression, so the same [`crate::Backend`] code runs it (gradients reach
//! `A` and `B` through the merge; the base tensors stay constants, shared with the network the
//! adapter was built on) and lowers it (the exporter sees the merged weights as initializers
//! under the base weights' names: the exported graph has no extra op).
//!
//! Targets are module names as PEFT matches `target_modules`: a layer is adapted when its path
//! equals a target or ends with `.` + the target (`to_q` adapts `mid_block.attentions.0.to_q`).

use crate::backend::Param;
use crate::network::Network;
use crate::unet::Layer;
use crate::Denoiser;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// PEFT's key of a layer's down projection: `<path>.lora_A.weight`.
pub fn down_key(path: &str) -> String {
    format!("{path}.lora_A.weight")
}
/// PEFT's key of a layer's up projection: `<path>.lora_B.weight`.
pub fn up_key(path: &str) -> String {
    format!("{path}.lora_B.weight")
}

/// The diffusers attention projections, PEFT's usual UNet targets.
pub const DIFFUSERS_DEFAULT_TARGETS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];
/// Our UNet's attention projections (`SelfAttention`'s 1x1 convs `q`, `k`, `v`, `proj`): the
/// same four layers as diffusers' default.
pub const UNET_DEFAULT_TARGETS: &[&str] = &["q", "k", "v", "proj"];

/// A LoRA's settings (`[lora]` of a distillation config). `rank` 0 means no LoRA (full
/// fine-tuning).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of every adapter; 0 = off.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / rank` (default: `alpha = rank`, scale 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Module names to adapt (empty: the network's attention projections, see
    /// [`default_targets`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn is_off(&self) -> bool {
        self.rank == 0
    }
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }
    /// `alpha / rank`, what multiplies `B @ A`.
    pub fn scale(&self) -> f64 {
        self.alpha() / self.rank as f64
    }
    pub fn validate(&self) -> Result<()> {
        if self.is_off() {
            ensure!(
                self.alpha.is_none() && self.targets.is_empty(),
                "lora alpha / targets (--lora-alpha, --lora-targets) are set but the rank is 0 \
                 (LoRA off): pass --lora-rank R"
            );
            return Ok(());
        }
        let a = self.alpha();
        ensure!(
            a.is_finite() && a > 0.0,
            "lora alpha (--lora-alpha) must be positive, got {a}"
        );
        for t in &self.targets {
            ensure!(
                !t.trim().is_empty(),
                "lora targets (--lora-targets) holds an empty name"
            );
        }
        Ok(())
    }
    /// The targets, or the network's default when none were given.
    pub fn targets_for(&self, net: &Network) -> Vec<String> {
        if self.targets.is_empty() {
            default_targets(net)
        } else {
            self.targets.clone()
        }
    }
}

/// The default targets of a network: the attention projections.
pub fn default_targets(net: &Network) -> Vec<String> {
    let t = match net {
        Network::Unet(_) => UNET_DEFAULT_TARGETS,
        Network::Diffusers(_) | Network::Condition(_) => DIFFUSERS_DEFAULT_TARGETS,
    };
    t.iter().map(|s| s.to_string()).collect()
}

/// What kind of layer an adapter sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    /// A `k x k` convolution.
    Conv(usize),
}

/// A layer LoRA can adapt: its module path (the weight's key without `.weight`), kind and the
/// base weight.
#[derive(Clone, Debug)]
pub struct Adaptable {
    pub path: String,
    pub kind: LayerKind,
    pub weight: Param,
}

impl Adaptable {
    /// `(out, in)` of the layer (`in` without the kernel).
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }
    /// Shapes of `lora_A` and `lora_B` at rank `r`.
    pub fn adapter_shapes(&self, r: usize) -> (Vec<usize>, Vec<usize>) {
        let (o, i) = self.dims();
        match self.kind {
            LayerKind::Linear => (vec![r, i], vec![o, r]),
            LayerKind::Conv(k) => (vec![r, i, k, k], vec![o, r, 1, 1]),
        }
    }
    /// Fan-in of `lora_A` (PEFT draws it as `kaiming_uniform_(a = sqrt(5))`: U(+-1/sqrt(fan_in))).
    pub fn fan_in(&self) -> usize {
        let (_, i) = self.dims();
        match self.kind {
            LayerKind::Linear => i,
            LayerKind::Conv(k) => i * k * k,
        }
    }
}

fn path_of(p: &Param) -> String {
    p.name
        .strip_suffix(".weight")
        .unwrap_or(&p.name)
        .to_string()
}

fn lin(v: &mut Vec<Adaptable>, l: &super::Linear) {
    v.push(Adaptable {
        path: path_of(&l.weight),
        kind: LayerKind::Linear,
        weight: l.weight.clone(),
    });
}
fn conv(v: &mut Vec<Adaptable>, c: &super::Conv2d) {
    v.push(Adaptable {
        path: path_of(&c.weight),
        kind: LayerKind::Conv(c.weight.dims()[2]),
        weight: c.weight.clone(),
    });
}

/// Every `Linear` and `Conv2d` of the network, in a fixed order (embedding tables and norms are
/// not adaptable).
pub fn layers(net: &Network) -> Vec<Adaptable> {
    let mut v = Vec::new();
    match net {
        Network::Unet(u) => {
            lin(&mut v, &u.emb1);
            lin(&mut v, &u.emb2);
            conv(&mut v, &u.conv_in);
            for l in u.down.iter().chain(&u.mid).chain(&u.up) {
                match l {
                    Layer::Res(r) => {
                        conv(&mut v, &r.conv1);
                        lin(&mut v, &r.emb_proj);
                        conv(&mut v, &r.conv2);
                        if let Some(s) = &r.skip {
                            conv(&mut v, s);
                        }
                    }
                    Layer::Attn(a, _) => {
                        for c in [&a.q, &a.k, &a.v, &a.proj] {
                            conv(&mut v, c);
                        }
                    }
                    Layer::Down(c) | Layer::Up(c) => conv(&mut v, c),
                }
            }
            conv(&mut v, &u.conv_out);
        }
        // Every 2-D weight is a linear layer (the attention projections are bias-free ones), every
        // 4-D one a convolution: adapters merge by name, so the layer types need not be listed.
        Network::Condition(c) => {
            for p in &c.params {
                if !p.name.ends_with(".weight") {
                    continue;
                }
                let kind = match p.dims() {
                    [_, _] => LayerKind::Linear,
                    [_, _, k, _] => LayerKind::Conv(*k),
                    _ => continue,
                };
                v.push(Adaptable {
                    path: path_of(p),
                    kind,
                    weight: p.clone(),
                });
            }
        }
        Network::Diffusers(d) => {
            use crate::diffusers::blocks::{Attention, ResnetBlock2D};
            use crate::diffusers::unet2d::ClassEmbedding;
            let m = &d.model;
            let res = |v: &mut Vec<Adaptable>, r: &ResnetBlock2D| {
                conv(v, &r.conv1);
                lin(v, &r.time_emb_proj);
                conv(v, &r.conv2);
                if let Some(s) = &r.conv_shortcut {
                    conv(v, s);
                }
            };
            let attn = |v: &mut Vec<Adaptable>, a: &Attention| {
                for l in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                    lin(v, l);
                }
            };
            lin(&mut v, &m.time_embedding.linear_1);
            lin(&mut v, &m.time_embedding.linear_2);
            if let Some(ClassEmbedding::Timestep(t)) = &m.class_embedding {
                lin(&mut v, &t.linear_1);
                lin(&mut v, &t.linear_2);
            }
            conv(&mut v, &m.conv_in);
            for b in &m.down_blocks {
                for (i, r) in b.resnets.iter().enumerate() {
                    res(&mut v, r);
                    if let Some(a) = b.attentions.get(i) {
                        attn(&mut v, a);
                    }
                }
                if let Some(ds) = &b.downsampler {
                    conv(&mut v, &ds.conv);
                }
            }
            if let Some(mb) = &m.mid_block {
                res(&mut v, &mb.resnets[0]);
                if let Some(a) = &mb.attention {
                    attn(&mut v, a);
                }
                res(&mut v, &mb.resnets[1]);
            }
            for b in &m.up_blocks {
                for (i, r) in b.resnets.iter().enumerate() {
                    res(&mut v, r);
                    if let Some(a) = b.attentions.get(i) {
                        attn(&mut v, a);
                    }
                }
                if let Some(u) = &b.upsampler {
                    conv(&mut v, u);
                }
            }
            conv(&mut v, &m.conv_out);
        }
    }
    v
}

/// Whether module `path` matches `target` the way PEFT matches `target_modules`.
pub fn matches(path: &str, target: &str) -> bool {
    path == target
        || path
            .strip_suffix(target)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// The short names a target may use: each layer's last name component(s) after its block
/// indices (`to_q`, `to_out.0`, `conv1`, `downsamplers.0.conv` -> `conv`).
fn short_names(layers: &[Adaptable]) -> Vec<String> {
    let mut s = BTreeSet::new();
    for l in layers {
        let parts: Vec<&str> = l.path.split('.').collect();
        // The last non-numeric component, with any numeric suffix after it (`to_out.0`).
        let mut i = parts.len();
        while i > 0 && parts[i - 1].parse::<usize>().is_ok() {
            i -= 1;
        }
        let start = i.saturating_sub(1);
        s.insert(parts[start..].join("."));
    }
    s.into_iter().collect()
}

/// The layers `cfg`'s targets select, in [`layers`] order. A target that matches no layer is an
/// error naming it and listing the names that exist.
pub fn select(net: &Network, cfg: &LoraConfig) -> Result<Vec<Adaptable>> {
    let all = layers(net);
    let targets = cfg.targets_for(net);
    for t in &targets {
        if !all.iter().any(|l| matches(&l.path, t)) {
            bail!(
                "LoRA target {t:?} (--lora-targets / lora.targets) matches no Linear or Conv2d of \
                 the network; its layers are named {} (or give a full module path, e.g. {:?})",
                short_names(&all).join(", "),
                all.first().map(|l| l.path.as_str()).unwrap_or("")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|l| targets.iter().any(|t| matches(&l.path, t)))
        .collect())
}

/// Fresh adapters for the selected layers: `lora_A` ~ U(+-1/sqrt(fan_in)) from `rng` (PEFT's
/// default init), `lora_B` = 0, so the adapted network equals the base. Keys are PEFT's.
pub fn init_adapters<R: rand::Rng>(
    layers: &[Adaptable],
    rank: usize,
    rng: &mut R,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    ensure!(rank > 0, "LoRA rank must be positive");
    let mut out = HashMap::new();
    for l in layers {
        let (a, b) = l.adapter_shapes(rank);
        let bound = 1.0 / (l.fan_in() as f32).sqrt();
        let n: usize = a.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
        out.insert(down_key(&l.path), Tensor::from_vec(vals, a, device)?);
        out.insert(up_key(&l.path), Tensor::zeros(b, DType::F32, device)?);
    }
    Ok(out)
}

/// `W + scale * B @ A` in `W`'s shape.
pub fn merged_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let r = a.dim(0)?;
    ensure!(
        b.dim(1)? == r && b.dim(0)? == w.dim(0)?,
        "LoRA: lora_B {:?} does not fit lora_A {:?} and the weight {:?}",
        b.dims(),
        a.dims(),
        w.dims()
    );
    let delta = b.flatten_from(1)?.matmul(&a.flatten_from(1)?)?;
    ensure!(
        delta.elem_count() == w.elem_count(),
        "LoRA: B @ A has {} elements, the weight {:?} {}",
        delta.elem_count(),
        w.dims(),
        w.elem_count()
    );
    Ok((w + (delta * scale)?.reshape(w.dims())?)?)
}

/// The layer paths an adapter map holds (every `<path>.lora_A.weight`), sorted.
pub fn adapter_paths(adapters: &HashMap<String, Tensor>) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    for k in adapters.keys() {
        if let Some(p) = k.strip_suffix(".lora_A.weight") {
            paths.push(p.to_string());
        } else if k.strip_suffix(".lora_B.weight").is_none() {
            bail!("LoRA: unexpected tensor {k} (expected <module>.lora_A.weight / .lora_B.weight)");
        }
    }
    paths.sort();
    ensure!(
        adapters.len() == 2 * paths.len(),
        "LoRA: every lora_A needs its lora_B ({} tensors for {} layers)",
        adapters.len(),
        paths.len()
    );
    Ok(paths)
}

/// The base weights with every adapted weight replaced by its merge (the others are the base's
/// own tensors, not copies).
pub fn merge(
    base: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    for p in adapter_paths(adapters)? {
        let wk = format!("{p}.weight");
        let w = base
            .get(&wk)
            .with_context(|| format!("LoRA: the adapter of {p} has no base weight {wk}"))?;
        let a = &adapters[&down_key(&p)];
        let b = adapters
            .get(&up_key(&p))
            .with_context(|| format!("LoRA: {p} has lora_A but no lora_B"))?;
        out.insert(wk, merged_weight(w, a, b, scale)?);
    }
    Ok(out)
}

/// `den` with the adapters merged into it: the same network whose adapted weights are
/// `W + scale * B @ A` (differentiable in `A` and `B` when they are variables) and whose other
/// weights are `den`'s own tensors (shared storage).
pub fn apply(den: &Denoiser, adapters: &HashMap<String, Tensor>, scale: f64) -> Result<Denoiser> {
    let base: HashMap<String, Tensor> = crate::params::collect(den)
        .into_iter()
        .map(|p| (p.name, p.t))
        .collect();
    let device = base
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let w = merge(&base, adapters, scale)?;
    let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &device);
    Denoiser::new(vb, &den.config())
}

/// Number of adapter parameters.
pub fn count(adapters: &HashMap<String, Tensor>) -> usize {
    adapters.values().map(|t| t.elem_count()).sum()
}
