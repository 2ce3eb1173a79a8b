#!/usr/bin/env python3
"""Parity fixtures for distill's AutoencoderKL and CLIP text encoder + tokenizer, made by diffusers
and transformers themselves (called by scripts/make-diffusers-fixtures.py; runnable alone):

    /work/venv-bench/bin/python scripts/fixtures_vae_clip.py [OUT]

OUT defaults to graphs/tests/fixtures/diffusers. Writes, all seeded, nothing downloaded:

* vae/<name>/: a small random-init AutoencoderKL folder (`save_pretrained`; `kl_sd` with the
  legacy attention key names) and forward.safetensors: `latents` (scaled, as a sampler has them)
  -> `images` = `vae.decode(latents / scaling_factor + shift_factor).sample`; `image_in` ->
  `latent_mean` (`encode(..).latent_dist.mean`), `latents_enc` = `(mean - shift) * scaling`,
  `noise` + `latents_sampled` (`latent_dist.sample(generator)` with that noise, scaled).
* clip/<name>/: `tokenizer/` (a CLIPTokenizerFast over a tiny byte-level BPE vocabulary trained
  here, `save_pretrained`: tokenizer.json, tokenizer_config.json), `tokenizer_slow/` (the same
  as vocab.json + merges.txt + tokenizer_config.json only, like SD 1.x folders), `text_encoder/` (a tiny
  CLIPTextModel or CLIPTextModelWithProjection folder), prompts.json and forward.safetensors:
  `input_ids` (transformers' ids for the prompts, padding="max_length", truncation=True, as the
  SD pipelines call the tokenizer) -> `last_hidden_state`, `pooler_output`, `clip_skip_1`
  (final_layer_norm(hidden_states[-2]), diffusers' clip_skip=1), `penultimate`
  (hidden_states[-2], SDXL's), `text_embeds` (with a projection).
"""
import json
import os
import sys
from collections import Counter

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
)

VAES = {
    # SD-1.5-like: quant convs, mid attention, scaling 0.18215; legacy attention key names.
    "kl_sd": dict(
        in_channels=3, out_channels=3, block_out_channels=(12, 24), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215,
    ),
    # SD3-like: no quant convs, shift_factor, three levels, two layers per block, a non-square
    # image (16x24, latent 4x6).
    "kl_sd3": dict(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=6, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ),
    # One level (no up/down sampling), no mid attention.
    "kl_noattn": dict(
        in_channels=2, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=2, norm_num_groups=2, sample_size=8, mid_block_add_attention=False,
    ),
}
VAE_SIZE = {"kl_sd": (16, 16), "kl_sd3": (16, 24), "kl_noattn": (8, 8)}

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def perturb(model, gen, scale=0.1):
    """Random-init norms are 1/0: add noise to every weight so each one is tested."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_vae(out, name, cfg, gen):
    torch.manual_seed(len(name))
    vae = AutoencoderKL(**cfg).eval()
    perturb(vae, gen)
    d = os.path.join(out, "vae", name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    vae.save_pretrained(d)
    if name == "kl_sd":
        sd = {}
        for k, v in vae.state_dict().items():
            for new, old in LEGACY.items():
                k = k.replace(f".{new}.", f".{old}.")
            sd[k] = v.contiguous()
        save_file(sd, os.path.join(d, "diffusion_pytorch_model.safetensors"))
    h, w = VAE_SIZE[name]
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    n = 2
    latents = torch.randn((n, cfg["latent_channels"], h // f, w // f), generator=gen) * sf
    image_in = torch.rand((n, cfg["in_channels"], h, w), generator=gen) * 2 - 1
    with torch.no_grad():
        images = vae.decode(latents / sf + shift).sample
        dist = vae.encode(image_in).latent_dist
        mean = dist.mean
        seed = 7 + len(name)
        sampled = dist.sample(generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    t = {
        "latents": latents, "images": images, "image_in": image_in, "latent_mean": mean,
        "latents_enc": (mean - shift) * sf, "noise": noise,
        "latents_sampled": (sampled - shift) * sf,
    }
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "forward.safetensors"))


# --- a tiny CLIP tokenizer -------------------------------------------------------------------

CORPUS = """a photo of a cat sitting on the grass
an astronaut riding a horse on the moon
a painting of a dog in the style of van gogh
a red car parked on a street at night
portrait of a woman with a hat, highly detailed
a bowl of fruit on a wooden table
the city at sunset, photograph, 4k
a cat and a dog playing in the snow"""


def bytes_to_unicode():
    """CLIP's (GPT-2's) byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def train_bpe(corpus, n_merges):
    """Plain BPE on the corpus' words (CLIP style: `</w>` on each word's last symbol); ties
    broken by the pair itself, so the result is deterministic."""
    b2u = bytes_to_unicode()
    words = Counter()
    for w in corpus.lower().split():
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        words[tuple(syms)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    chars = list(b2u.values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def make_tokenizer(d, pad_token, max_length):
    vocab, merges = train_bpe(CORPUS, 80)
    # The slow tokenizer's files alone (what published SD 1.x folders have: no tokenizer.json),
    # beside the fast one; transformers builds the same tokenizer from them (checked below).
    slow = d + "_slow"
    os.makedirs(slow, exist_ok=True)
    with open(os.path.join(slow, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(slow, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(slow, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": max_length, "pad_token": pad_token,
                   "tokenizer_class": "CLIPTokenizer"}, f, indent=1)
    # transformers 5 builds the fast tokenizer from the vocabulary and merges directly.
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges, pad_token=pad_token,
                            model_max_length=max_length)
    tok.save_pretrained(d)
    return CLIPTokenizerFast.from_pretrained(d)


PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse, 4K!",
    "",
    "a painting of a dog in the style of van gogh sitting on the grass at sunset, highly detailed",
    "  two   spaces\tand a tab  ",
    "café naïve — Zürich 123",
]

CLIPS = {
    # SD-1.5-like: quick_gelu, legacy eos_token_id 2 (pooled at the largest id), pad = eos.
    "clip_quick": dict(model=CLIPTextModel, pad="<|endoftext|>", cfg=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0,
        pad_token_id=1)),
    # SD-2 / SDXL-second-encoder-like: gelu, the real eos id, pad "!" (id 0), a projection.
    "clip_gelu_proj": dict(model=CLIPTextModelWithProjection, pad="!", cfg=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", projection_dim=24, layer_norm_eps=1e-5)),
}


def make_clip(out, name, spec, gen):
    d = os.path.join(out, "clip", name)
    os.makedirs(d, exist_ok=True)
    cfg = dict(spec["cfg"])
    tok = make_tokenizer(os.path.join(d, "tokenizer"), spec["pad"], cfg["max_position_embeddings"])
    cfg["vocab_size"] = len(tok)
    if "eos_token_id" not in cfg:
        cfg.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(len(name))
    model = spec["model"](CLIPTextConfig(**cfg)).eval()
    perturb(model, gen)
    te = os.path.join(d, "text_encoder")
    model.save_pretrained(te)
    if name == "clip_quick":
        # transformers 5 saves a CLIPTextModel without the `text_model.` prefix; every published
        # SD folder (transformers 4) has it: write this one that way, and check transformers
        # loads it back to the same network.
        from safetensors.torch import load_file
        path = os.path.join(te, "model.safetensors")
        sd = {f"text_model.{k}": v for k, v in load_file(path).items()}
        save_file(sd, path, metadata={"format": "pt"})
        again = spec["model"].from_pretrained(te).eval()
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), k
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    slow = CLIPTokenizerFast.from_pretrained(os.path.join(d, "tokenizer_slow"))
    assert torch.equal(ids, slow(PROMPTS, padding="max_length", max_length=slow.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids), name
    with torch.no_grad():
        o = model(ids, output_hidden_states=True)
        final_ln = getattr(model, "text_model", model).final_layer_norm
        t = {
            "input_ids": ids.to(torch.int32),
            "last_hidden_state": o.last_hidden_state,
            "clip_skip_1": final_ln(o.hidden_states[-2]),
            "penultimate": o.hidden_states[-2],
        }
        if hasattr(o, "text_embeds"):
            t["text_embeds"] = o.text_embeds
            # The pooled output of a ...WithProjection model, projection undone: its text model's.
            t["pooler_output"] = model.text_model(ids).pooler_output
        else:
            t["pooler_output"] = o.pooler_output
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "forward.safetensors"))
    with open(os.path.join(d, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(PROMPTS, f, ensure_ascii=False, indent=1)


def main(out):
    gen = torch.Generator().manual_seed(1616)
    for name, cfg in VAES.items():
        make_vae(out, name, cfg, gen)
    for name, spec in CLIPS.items():
        make_clip(out, name, spec, gen)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "graphs", "tests", "fixtures", "diffusers"))
