//! transformers' `CLIPTextModel` (and `CLIPTextModelWithProjection`), written against
//! [`Backend`] with transformers' own parameter names (`text_model.embeddings.*`,
//! `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`, `text_projection`), so a
//! Stable Diffusion `text_encoder/` folder loads key for key and the same code runs in candle and
//! lowers to ONNX.
//!
//! Token + position embeddings, pre-LN layers (causal self-attention, MLP with `quick_gelu` or
//! exact `gelu` per `hidden_act`), the final LayerNorm -> `last_hidden_state` (what SD 1.5
//! conditions on). The pooled output (the hidden state at the end-of-text token, transformers'
//! rule for picking it included) is computed in-graph from the ids with elementwise ops and
//! matrix products only (no ArgMax), so it lowers to the same ONNX ops as the rest.

use crate::backend::{Backend, Param};
use crate::diffusers::vae::{check_shapes, expected_shapes};
use crate::json::Reader;
use crate::nn::{param, Embedding, LayerNorm, Linear};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The activation of the MLP (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.5).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H / bigG, SD 2 and SDXL's second encoder).
    Gelu,
}

/// `config.json` of a `CLIPTextModel` (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
    /// `eos_token_id`: 2 is transformers' legacy value, for which the pooled output is taken at
    /// the largest id (`argmax`), as transformers does; otherwise at the first `eos_token_id`.
    pub eos_token_id: i64,
    /// `Some(projection_dim)` for a `CLIPTextModelWithProjection` (`text_projection`).
    pub projection_dim: Option<usize>,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            projection_dim: None,
        }
    }
}

/// Keys of a `CLIPTextConfig` that do not change the inference network (training-only values,
/// tokenizer ids, transformers' bookkeeping) or that `PretrainedConfig` writes for every model.
const IGNORED_KEYS: &[&str] = &[
    "architectures",
    "attention_dropout",
    "dropout",
    "initializer_factor",
    "initializer_range",
    "bos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_word_embeddings",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "finetuning_task",
    "torchscript",
    "pruned_heads",
    "tf_legacy_loss",
    "use_bfloat16",
    "name_or_path",
    // Generation defaults older transformers wrote into every config.
    "bad_words_ids",
    "begin_suppress_tokens",
    "cross_attention_hidden_size",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict_in_generate",
    "suppress_tokens",
    "temperature",
    "tie_encoder_decoder",
    "top_k",
    "top_p",
    "typical_p",
];

impl ClipTextConfig {
    /// Parses a `config.json` object: `model_type` must be `clip_text_model`; an unsupported
    /// `hidden_act` is refused naming the key, and so is any key that is neither read nor known
    /// to leave the network unchanged (transformers' bookkeeping and generation defaults).
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut r = Reader::new(v, "config.json")?;
        if let Some(m) = r.get("model_type") {
            if m.as_str() != Some("clip_text_model") {
                return Err(r.unsupported(
                    "model_type",
                    m,
                    "a CLIPTextModel folder has clip_text_model (a full CLIPModel folder is not \
                     supported: use its text encoder)",
                ));
            }
        }
        let with_projection = match r.map.get("architectures").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .any(|s| s.as_str() == Some("CLIPTextModelWithProjection")),
            None => false,
        };
        for k in IGNORED_KEYS {
            r.has(k);
        }
        let d = Self::default();
        let hidden_act = match r.get("hidden_act") {
            None => d.hidden_act,
            Some(v) => match v.as_str() {
                Some("quick_gelu") => HiddenAct::QuickGelu,
                Some("gelu") => HiddenAct::Gelu,
                _ => return Err(r.unsupported("hidden_act", v, "supported: quick_gelu, gelu")),
            },
        };
        let projection = r.usize_opt("projection_dim")?;
        let cfg = Self {
            vocab_size: r.usize_or("vocab_size", d.vocab_size)?,
            hidden_size: r.usize_or("hidden_size", d.hidden_size)?,
            intermediate_size: r.usize_or("intermediate_size", d.intermediate_size)?,
            num_hidden_layers: r.usize_or("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: r.usize_or("num_attention_heads", d.num_attention_heads)?,
            max_position_embeddings: r
                .usize_or("max_position_embeddings", d.max_position_embeddings)?,
            hidden_act,
            layer_norm_eps: r.f64_or("layer_norm_eps", d.layer_norm_eps)?,
            eos_token_id: r.i64_or("eos_token_id", d.eos_token_id)?,
            projection_dim: if with_projection {
                Some(projection.unwrap_or(512))
            } else {
                None
            },
        };
        r.finish("CLIPTextConfig")?;
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
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            ensure!(v > 0, "config.json: {k} must be positive");
        }
        ensure!(
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            "config.json: hidden_size = {} does not split into num_attention_heads = {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// `CLIPAttention`: multi-head causal self-attention, `[N, L, D]` -> `[N, L, D]`.
#[derive(Clone, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

impl ClipAttention {
    /// `mask`: `[L, L]` additive causal mask (0 on and below the diagonal).
    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, mask: &B::T) -> Result<B::T> {
        let (h, d) = (self.heads as i64, self.head_dim as i64);
        // [N, L, D] -> [N, H, L, d]: reshape with copied leading dims keeps the batch dynamic.
        let split =
            |t: B::T| -> Result<B::T> { b.permute(&b.reshape(&t, &[0, 0, h, d])?, &[0, 2, 1, 3]) };
        let q = split(self.q_proj.forward(b, x)?)?;
        let k = b.permute(
            &b.reshape(&self.k_proj.forward(b, x)?, &[0, 0, h, d])?,
            &[0, 2, 3, 1],
        )?;
        let v = split(self.v_proj.forward(b, x)?)?;
        let scores = b.affine(&b.matmul(&q, &k)?, 1.0 / (self.head_dim as f64).sqrt(), 0.0)?;
        let attn = b.softmax_last(&b.add(&scores, mask)?)?; // [N, H, L, L]
        let o = b.permute(&b.matmul(&attn, &v)?, &[0, 2, 1, 3])?; // [N, L, H, d]
        self.out_proj.forward(b, &b.reshape(&o, &[0, 0, h * d])?)
    }
}

/// `CLIPEncoderLayer`: `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
#[derive(Clone, Debug)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: HiddenAct,
}

impl ClipEncoderLayer {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let (dm, di) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), dm, cfg.layer_norm_eps, true)?,
            self_attn: ClipAttention {
                q_proj: Linear::new(a.pp("q_proj"), dm, dm)?,
                k_proj: Linear::new(a.pp("k_proj"), dm, dm)?,
                v_proj: Linear::new(a.pp("v_proj"), dm, dm)?,
                out_proj: Linear::new(a.pp("out_proj"), dm, dm)?,
                heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim(),
            },
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), dm, cfg.layer_norm_eps, true)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), dm, di)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), di, dm)?,
            act: cfg.hidden_act,
        })
    }

    pub fn forward<B: Backend>(&self, b: &B, x: &B::T, mask: &B::T) -> Result<B::T> {
        let h = self
            .self_attn
            .forward(b, &self.layer_norm1.forward(b, x)?, mask)?;
        let x = b.add(x, &h)?;
        let h = self.fc1.forward(b, &self.layer_norm2.forward(b, &x)?)?;
        let h = match self.act {
            HiddenAct::QuickGelu => b.mul(&h, &b.sigmoid(&b.affine(&h, 1.702, 0.0)?)?)?,
            HiddenAct::Gelu => b.gelu(&h)?,
        };
        b.add(&x, &self.fc2.forward(b, &h)?)
    }
}

/// The text encoder's outputs.
#[derive(Clone, Debug)]
pub struct ClipTextOutput<T> {
    /// `[N, L, hidden]`: the final LayerNorm of the last layer (or of an earlier layer, with
    /// `clip_skip`).
    pub hidden: T,
    /// `[N, hidden]` at the end-of-text token (`pooler_output`), when asked for.
    pub pooled: Option<T>,
    /// `[N, projection_dim]`: `text_projection(pooled)` of a `CLIPTextModelWithProjection`.
    pub text_embeds: Option<T>,
}

#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub cfg: ClipTextConfig,
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    pub text_projection: Option<Param>,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let t = vb.pp("text_model");
        let e = t.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(t.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<candle_core::Result<_>>()?;
        let text_projection = match cfg.projection_dim {
            Some(p) => Some(param(
                &vb.pp("text_projection"),
                (p, cfg.hidden_size),
                "weight",
                crate::nn::uniform_fan_in(cfg.hidden_size),
            )?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            token_embedding: Embedding::new(
                e.pp("token_embedding"),
                cfg.vocab_size,
                cfg.hidden_size,
            )?,
            position_embedding: Embedding::new(
                e.pp("position_embedding"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                t.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
                true,
            )?,
            text_projection,
        })
    }

    /// The `[L, L]` additive causal mask: 0 where a token may attend, the f32 minimum above the
    /// diagonal (transformers' `finfo.min`).
    fn causal_mask<B: Backend>(&self, b: &B, l: usize) -> Result<B::T> {
        let mut m = vec![0f32; l * l];
        for i in 0..l {
            for j in i + 1..l {
                m[i * l + j] = f32::MIN;
            }
        }
        b.constant(&m, &[l, l])
    }

    /// The hidden states after `layers` encoder layers (`[N, L, hidden]`, no final norm):
    /// transformers' `hidden_states[layers]`. `ids`: `[N, L]` integer token ids, `L` (static) at
    /// most `max_position_embeddings`.
    pub fn hidden_states<B: Backend>(
        &self,
        b: &B,
        ids: &B::T,
        seq_len: usize,
        layers: usize,
    ) -> Result<B::T> {
        let max = self.cfg.max_position_embeddings;
        ensure!(
            seq_len > 0 && seq_len <= max,
            "CLIPTextModel: {seq_len} tokens (max_position_embeddings = {max})"
        );
        ensure!(
            layers <= self.layers.len(),
            "CLIPTextModel: {layers} layers asked of {}",
            self.layers.len()
        );
        let tok = self.token_embedding.forward(b, ids)?; // [N, L, D]
        let pos_table = &self.position_embedding.table;
        let pos = Param {
            name: format!("{}[:{seq_len}]", pos_table.name),
            t: pos_table.t.narrow(0, 0, seq_len)?,
        };
        let pos = b.param_value(&pos)?; // [L, D]
        let mut h = b.add(&tok, &pos)?;
        let mask = self.causal_mask(b, seq_len)?;
        for l in &self.layers[..layers] {
            h = l.forward(b, &h, &mask)?;
        }
        Ok(h)
    }

    /// What SDXL's `encode_prompt` takes of an encoder: `hidden_states[-(skip + 2)]` (no final
    /// LayerNorm; `skip` is diffusers' `clip_skip`, 0 for none) and, with `text_embeds`, the
    /// projected pooled output of the last layer (a `CLIPTextModelWithProjection`'s
    /// `text_embeds`). The layers run once: the pooled branch continues from the penultimate.
    pub fn penultimate<B: Backend>(
        &self,
        b: &B,
        ids: &B::T,
        seq_len: usize,
        skip: usize,
        text_embeds: bool,
    ) -> Result<(B::T, Option<B::T>)> {
        let n = self.layers.len();
        ensure!(
            skip + 1 < n,
            "CLIPTextModel: hidden_states[-{}] of {n} layers",
            skip + 2
        );
        let k = n - 1 - skip;
        let h = self.hidden_states(b, ids, seq_len, k)?;
        if !text_embeds {
            return Ok((h, None));
        }
        let w = self.text_projection.as_ref().with_context(|| {
            "text_embeds: the text encoder has no text_projection (a CLIPTextModelWithProjection \
             is needed)"
        })?;
        let mask = self.causal_mask(b, seq_len)?;
        let mut last = h.clone();
        for l in &self.layers[k..] {
            last = l.forward(b, &last, &mask)?;
        }
        let last = self.final_layer_norm.forward(b, &last)?;
        let pooled = self.pool(b, ids, &last, seq_len)?;
        Ok((h, Some(b.linear(&pooled, w, None)?)))
    }

    /// `[N, L]` ids -> `last_hidden_state` (`clip_skip = 0`), or with `clip_skip = k` the final
    /// LayerNorm of `hidden_states[-(k + 1)]` (diffusers' `clip_skip` in the SD pipelines).
    /// `pooled` adds the pooled output (and `text_embeds` with a projection).
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        ids: &B::T,
        seq_len: usize,
        clip_skip: usize,
        pooled: bool,
    ) -> Result<ClipTextOutput<B::T>> {
        let n = self.layers.len();
        ensure!(
            clip_skip < n,
            "CLIPTextModel: clip_skip {clip_skip} of {n} layers"
        );
        let (hidden, pooled_out) = if clip_skip == 0 {
            let h = self
                .final_layer_norm
                .forward(b, &self.hidden_states(b, ids, seq_len, n)?)?;
            let p = if pooled {
                Some(self.pool(b, ids, &h, seq_len)?)
            } else {
                None
            };
            (h, p)
        } else {
            let h = self.hidden_states(b, ids, seq_len, n - clip_skip)?;
            let h = self.final_layer_norm.forward(b, &h)?;
            let p = if pooled {
                // The pooled output is always the last layer's.
                let last = self
                    .final_layer_norm
                    .forward(b, &self.hidden_states(b, ids, seq_len, n)?)?;
                Some(self.pool(b, ids, &last, seq_len)?)
            } else {
                None
            };
            (h, p)
        };
        let text_embeds = match (&pooled_out, &self.text_projection) {
            (Some(p), Some(w)) => Some(b.linear(p, w, None)?),
            _ => None,
        };
        Ok(ClipTextOutput {
            hidden,
            pooled: pooled_out,
            text_embeds,
        })
    }

    /// `last_hidden_state[i, pos_i]`: `pos_i` the first position of the largest id
    /// (`eos_token_id == 2`, transformers' legacy rule) or of the first `eos_token_id`. Built from
    /// f32 comparisons of the (exactly representable) ids: a one-hot row per sequence, then a
    /// matrix product.
    fn pool<B: Backend>(&self, b: &B, ids: &B::T, h: &B::T, l: usize) -> Result<B::T> {
        let li = l as i64;
        let f = b.to_f32(ids)?; // [N, L]
                                // `hit[i]` = 1 where position i is a candidate, 0 elsewhere.
        let hit = if self.cfg.eos_token_id == 2 {
            // Candidates: ids no other id exceeds. greater[i] = #{j: id_j > id_i} (ids are
            // integers, so clamp(id_j - id_i, 0, 1) is 1 exactly when id_j > id_i).
            let col = b.reshape(&f, &[-1, li, 1])?;
            let row = b.reshape(&f, &[-1, 1, li])?;
            let gt = b.clamp(&b.sub(&row, &col)?, 0.0, 1.0)?; // [N, L(i), L(j)]
            let greater = b.matmul(&gt, &b.constant(&vec![1f32; l], &[l, 1])?)?; // [N, L, 1]
            let none = b.affine(&b.clamp(&greater, 0.0, 1.0)?, -1.0, 1.0)?;
            b.reshape(&none, &[-1, li])?
        } else {
            let eos = self.cfg.eos_token_id as f64;
            let d = b.clamp(&b.affine(&f, 1.0, -eos)?, -1.0, 1.0)?;
            // 1 - |d| for d in {-1, 0, 1}: 1 - d^2.
            b.affine(&b.mul(&d, &d)?, -1.0, 1.0)?
        };
        // First candidate: no candidate before it. before[i] = sum_{j < i} hit[j].
        let mut tri = vec![0f32; l * l];
        for j in 0..l {
            for i in j + 1..l {
                tri[j * l + i] = 1.0;
            }
        }
        let before = b.matmul(&hit, &b.constant(&tri, &[l, l])?)?; // [N, L]
        let first = b.mul(&hit, &b.affine(&b.clamp(&before, 0.0, 1.0)?, -1.0, 1.0)?)?;
        // No candidate at all (no end-of-text token): argmax of zeros, position 0.
        let any = b.clamp(
            &b.matmul(&hit, &b.constant(&vec![1f32; l], &[l, 1])?)?,
            0.0,
            1.0,
        )?;
        let mut e0 = vec![0f32; l];
        e0[0] = 1.0;
        let first = b.add(
            &first,
            &b.mul(&b.affine(&any, -1.0, 1.0)?, &b.constant(&e0, &[1, l])?)?,
        )?;
        let p = b.matmul(&b.reshape(&first, &[-1, 1, li])?, h)?; // [N, 1, D]
        b.reshape(&p, &[-1, self.cfg.hidden_size as i64])
    }

    /// Every parameter, by transformers key.
    pub fn params(&self) -> Vec<Param> {
        let mut v = vec![
            self.token_embedding.table.clone(),
            self.position_embedding.table.clone(),
        ];
        let ln = |v: &mut Vec<Param>, l: &LayerNorm| {
            v.extend(l.weight.iter().cloned());
            v.extend(l.bias.iter().cloned());
        };
        let lin = |v: &mut Vec<Param>, l: &Linear| {
            v.push(l.weight.clone());
            v.push(l.bias.clone());
        };
        for l in &self.layers {
            ln(&mut v, &l.layer_norm1);
            let a = &l.self_attn;
            for p in [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj] {
                lin(&mut v, p);
            }
            ln(&mut v, &l.layer_norm2);
            lin(&mut v, &l.fc1);
            lin(&mut v, &l.fc2);
        }
        ln(&mut v, &self.final_layer_norm);
        v.extend(self.text_projection.iter().cloned());
        v
    }
}

/// The buffer older checkpoints carry (not a parameter).
const POSITION_IDS: &str = "embeddings.position_ids";

/// The text encoder's folder: a model folder (`config.json` + `model.safetensors`), or a
/// pipeline folder's `text_encoder/`.
pub fn text_encoder_folder(dir: &Path) -> Result<PathBuf> {
    if dir.join("model_index.json").is_file() {
        let t = dir.join("text_encoder");
        ensure!(
            t.join("config.json").is_file(),
            "{}: a pipeline folder (model_index.json) without text_encoder/config.json",
            dir.display()
        );
        return Ok(t);
    }
    ensure!(
        dir.join("config.json").is_file(),
        "{}: not a CLIPTextModel folder (no config.json)",
        dir.display()
    );
    Ok(dir.to_path_buf())
}

/// `model.safetensors`, or the shards of `model.safetensors.index.json` (every tensor in the
/// shard the index names, none elsewhere).
fn read_weights(folder: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = folder.join("model.safetensors");
    let load = |f: &Path| {
        candle_core::safetensors::load(f, device)
            .with_context(|| format!("loading {}", f.display()))
    };
    if file.is_file() {
        return load(&file);
    }
    let index = folder.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut shards: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (k, f) in map {
            let f = f.as_str().with_context(|| {
                format!("{}: weight_map[{k}] is not a file name", index.display())
            })?;
            shards.entry(f).or_default().push(k);
        }
        let mut all = HashMap::new();
        for (shard, keys) in shards {
            let mut t = load(&folder.join(shard))?;
            for k in keys {
                let v = t.remove(k).with_context(|| {
                    format!(
                        "tensor {k}: listed in {} but not in {shard}",
                        index.display()
                    )
                })?;
                all.insert(k.to_string(), v);
            }
            if let Some(k) = t.keys().next() {
                bail!("tensor {k}: in {shard} but not in {}", index.display());
            }
        }
        return Ok(all);
    }
    if folder.join("pytorch_model.bin").is_file() {
        bail!(
            "{}: only PyTorch pickle weights (pytorch_model.bin); convert them to safetensors \
             (`save_pretrained(dir, safe_serialization=True)`)",
            folder.display()
        );
    }
    bail!(
        "{}: no model.safetensors nor model.safetensors.index.json",
        folder.display()
    )
}

/// Loads a `CLIPTextModel` folder (`config.json` + `model.safetensors` or its sharded index, or
/// a pipeline folder's `text_encoder/`) onto `device`, every weight checked against the config (missing, extra,
/// mis-shaped: errors naming the tensor).
pub fn load_text_encoder(
    dir: &Path,
    device: &Device,
) -> Result<(ClipTextModel, HashMap<String, Tensor>)> {
    load_text_encoder_as(dir, device, None)
}

/// [`load_text_encoder`] with every parameter named under `prefix` (`prefix.text_model.…`): a
/// second encoder in the same graph (SDXL's `text_encoder_2`) needs names of its own, since ONNX
/// initializers are keyed by name. The returned weights keep transformers' keys.
pub fn load_text_encoder_as(
    dir: &Path,
    device: &Device,
    prefix: Option<&str>,
) -> Result<(ClipTextModel, HashMap<String, Tensor>)> {
    let folder = text_encoder_folder(dir)?;
    let cfg = ClipTextConfig::from_file(&folder.join("config.json"))?;
    let weights = read_weights(&folder, device)?;
    // transformers 5 saves a CLIPTextModel without the `text_model.` prefix that every
    // transformers 4 checkpoint (every published SD folder) has; both load, by the prefixed name.
    let prefixed = weights.keys().any(|k| k.starts_with("text_model."));
    let weights = weights
        .into_iter()
        .filter(|(k, _)| !k.ends_with(POSITION_IDS))
        .map(|(k, t)| {
            let k = if prefixed || k.starts_with("text_projection.") {
                k
            } else {
                format!("text_model.{k}")
            };
            Ok((k, t.to_dtype(DType::F32)?))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let want = expected_shapes(|vb| ClipTextModel::new(vb, &cfg).map(|_| ()))?;
    check_shapes(&want, &weights, &[]).with_context(|| format!("in {}", folder.display()))?;
    let model = match prefix {
        None => ClipTextModel::new(
            VarBuilder::from_tensors(weights.clone(), DType::F32, device),
            &cfg,
        )?,
        Some(p) => {
            let named = weights
                .iter()
                .map(|(k, t)| (format!("{p}.{k}"), t.clone()))
                .collect();
            ClipTextModel::new(
                VarBuilder::from_tensors(named, DType::F32, device).pp(p),
                &cfg,
            )?
        }
    };
    Ok((model, weights))
}

/// Precomputed prompt embeddings: a safetensors file with `prompt_embeds` `[N, seq_len, dim]`
/// (and optionally `pooled_prompt_embeds` `[N, pooled_dim]`), e.g. written by diffusers'
/// `encode_prompt`. Shapes are checked against what the denoiser needs; errors name the file.
pub fn load_prompt_embeds(
    path: &Path,
    seq_len: usize,
    dim: usize,
    pooled_dim: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let ctx = || format!("prompt embeddings {}", path.display());
    let mut t = candle_core::safetensors::load(path, device).with_context(ctx)?;
    let e = t.remove("prompt_embeds").with_context(|| {
        format!(
            "{}: no tensor prompt_embeds (found: {})",
            ctx(),
            t.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let d = e.dims();
    ensure!(
        d.len() == 3 && d[0] > 0 && d[1] == seq_len && d[2] == dim,
        "{}: prompt_embeds has shape {d:?}, expected [N, {seq_len}, {dim}]",
        ctx()
    );
    let e = e.to_dtype(DType::F32)?;
    let pooled = match (pooled_dim, t.remove("pooled_prompt_embeds")) {
        (Some(p), Some(x)) => {
            ensure!(
                x.dims() == [d[0], p],
                "{}: pooled_prompt_embeds has shape {:?}, expected [{}, {p}]",
                ctx(),
                x.dims(),
                d[0]
            );
            Some(x.to_dtype(DType::F32)?)
        }
        (Some(p), None) => bail!(
            "{}: no tensor pooled_prompt_embeds ([N, {p}], needed by this denoiser)",
            ctx()
        ),
        (None, _) => None,
    };
    ensure!(
        e.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()),
        "{}: prompt_embeds has non-finite values",
        ctx()
    );
    Ok((e, pooled))
}
