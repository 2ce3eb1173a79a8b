//! The CLIP tokenizer of a Stable Diffusion pipeline, through Hugging Face's `tokenizers` crate
//! (the one candle already depends on; built without its download features): a
//! `tokenizer.json` (what `CLIPTokenizerFast.save_pretrained` writes), or the slow tokenizer's
//! `vocab.json` + `merges.txt` assembled as transformers does, padded and truncated to a
//! fixed length as the diffusers pipelines call it (`padding="max_length",
//! max_length=tokenizer.model_max_length, truncation=True`).

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// A prompt tokenizer with its fixed output length.
pub struct ClipTokenizer {
    tok: Tokenizer,
    /// Every sequence has exactly this many ids.
    pub max_length: usize,
    pub pad_id: u32,
    /// Where it was loaded from (for messages).
    pub dir: PathBuf,
}

/// A special token as `tokenizer_config.json` / `special_tokens_map.json` write it: a string or
/// an `AddedToken` object with `content`.
fn token_str(v: &Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
}

fn read_json(p: &Path) -> Result<Option<Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(
        crate::json::parse(&text).with_context(|| format!("parsing {}", p.display()))?,
    ))
}

/// The `tokenizer.json` transformers' `CLIPTokenizer` builds from a slow tokenizer's
/// `vocab.json` + `merges.txt` (what the published SD 1.x folders ship): NFC, whitespace runs to
/// one space, lowercase; CLIP's split then byte-level; BPE with `</w>` word ends; `<bos> .. <eos>`
/// around each sequence; every special token an added token.
fn clip_tokenizer_json(dir: &Path, bos: &str, eos: &str, unk: &str, pad: &str) -> Result<Value> {
    let vp = dir.join("vocab.json");
    let vocab = read_json(&vp)?.context("vocab.json")?;
    let map = vocab
        .as_object()
        .with_context(|| format!("{}: not a token -> id object", vp.display()))?;
    let id = |t: &str| -> Result<u64> {
        map.get(t).and_then(Value::as_u64).with_context(|| {
            format!(
                "{}: special token {t:?} is not in the vocabulary",
                vp.display()
            )
        })
    };
    let mp = dir.join("merges.txt");
    let text = std::fs::read_to_string(&mp).with_context(|| format!("reading {}", mp.display()))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push(serde_json::json!([a, b])),
            _ => bail!(
                "{}: line {} is not a merge (`a b`): {line:?}",
                mp.display(),
                i + 1
            ),
        }
    }
    let mut specials: Vec<(u64, &str)> = Vec::new();
    for t in [bos, eos, unk, pad] {
        let i = id(t)?;
        if !specials.iter().any(|(_, s)| *s == t) {
            specials.push((i, t));
        }
    }
    specials.sort();
    let added: Vec<Value> = specials
        .iter()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let split = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, id(eos)?],
            "cls": [bos, id(bos)?], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// The tokenizer folder: a folder with `tokenizer.json`, or a pipeline folder's `tokenizer/`.
pub fn tokenizer_folder(dir: &Path) -> PathBuf {
    if dir.join("model_index.json").is_file() {
        dir.join("tokenizer")
    } else {
        dir.to_path_buf()
    }
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` from `dir` (or `dir/tokenizer/` of a pipeline folder). The length
    /// is `tokenizer_config.json`'s `model_max_length` (transformers' value for SD), capped by
    /// `max_positions` (the text encoder's `max_position_embeddings`); the pad token is
    /// `tokenizer_config.json`'s `pad_token` (else `special_tokens_map.json`'s).
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let dir = tokenizer_folder(dir);
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let special = read_json(&dir.join("special_tokens_map.json"))?;
        let from = |key: &str| -> Option<&Value> {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| special.as_ref().and_then(|s| s.get(key)))
                .filter(|v| !v.is_null())
        };
        let file = dir.join("tokenizer.json");
        let tok = if file.is_file() {
            Tokenizer::from_file(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            let special = |key: &str, default: &str| -> String {
                from(key).and_then(token_str).unwrap_or(default).to_string()
            };
            let json = clip_tokenizer_json(
                &dir,
                &special("bos_token", "<|startoftext|>"),
                &special("eos_token", "<|endoftext|>"),
                &special("unk_token", "<|endoftext|>"),
                &special("pad_token", "<|endoftext|>"),
            )?;
            Tokenizer::from_bytes(json.to_string().as_bytes())
                .map_err(|e| anyhow!("{}: vocab.json + merges.txt: {e}", dir.display()))?
        } else {
            bail!(
                "{}: no tokenizer.json (nor the slow tokenizer's vocab.json + merges.txt)",
                dir.display()
            );
        };
        let model_max = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_f64)
            // transformers writes a huge sentinel (1e30) when unset.
            .filter(|&n| n >= 1.0 && n < 1e9)
            .map(|n| n as usize);
        let max_length = model_max.unwrap_or(max_positions).min(max_positions);
        let pad = from("pad_token")
            .and_then(token_str)
            .with_context(|| {
                format!(
                    "{}: no pad_token in tokenizer_config.json or special_tokens_map.json",
                    dir.display()
                )
            })?
            .to_string();
        let pad_id = tok.token_to_id(&pad).with_context(|| {
            format!(
                "{}: pad_token {pad:?} is not in the vocabulary",
                dir.display()
            )
        })?;
        Self::new(tok, max_length, &pad, pad_id, dir)
    }

    fn new(
        mut tok: Tokenizer,
        max_length: usize,
        pad: &str,
        pad_id: u32,
        dir: PathBuf,
    ) -> Result<Self> {
        ensure!(max_length > 0, "{}: max_length 0", dir.display());
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| anyhow!("{}: truncation: {e}", dir.display()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_string(),
        }));
        Ok(Self {
            tok,
            max_length,
            pad_id,
            dir,
        })
    }

    /// Token ids of one prompt: `<bos> tokens <eos>` padded with the pad token, exactly
    /// `max_length` ids (longer prompts truncated, the end-of-text token kept).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let e = self
            .tok
            .encode(prompt, true)
            .map_err(|e| anyhow!("tokenizing {prompt:?} with {}: {e}", self.dir.display()))?;
        let ids = e.get_ids().to_vec();
        ensure!(
            ids.len() == self.max_length,
            "tokenizer {}: {} ids for a fixed length of {}",
            self.dir.display(),
            ids.len(),
            self.max_length
        );
        Ok(ids)
    }

    /// `[prompts.len(), max_length]` ids, row-major.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            out.extend(self.encode(p)?);
        }
        Ok(out)
    }

    /// The same as a `[N, max_length]` u32 tensor (what [`super::ClipTextModel`] takes).
    pub fn encode_tensor(
        &self,
        prompts: &[&str],
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let ids = self.encode_batch(prompts)?;
        Ok(candle_core::Tensor::from_vec(
            ids,
            (prompts.len(), self.max_length),
            device,
        )?)
    }
}

/// Prompts of a text file: one per line (trailing `\r` dropped, blank lines skipped); a file
/// without a prompt is an error naming it.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let v: Vec<String> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        !v.is_empty(),
        "prompts {}: no prompts (every line is blank)",
        path.display()
    );
    Ok(v)
}
