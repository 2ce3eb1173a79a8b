#!/usr/bin/env python3
"""A tiny Stable-Diffusion-like pipeline folder written by diffusers itself, and diffusers' own
StableDiffusionPipeline call on it, for distill's text-to-image teacher.

    /work/venv-bench/bin/python scripts/fixtures_sd_pipeline.py [OUT]

OUT defaults to graphs/tests/fixtures/diffusers. Needs the fixtures of
scripts/fixtures_unet_condition.py (models/cond_sd15) and scripts/fixtures_vae_clip.py
(vae/kl_sd, clip/clip_quick) under OUT. Writes
* teachers/sd_tiny/: `StableDiffusionPipeline.save_pretrained` of those components (UNet with
  cross_attention_dim 32, a 2-level AutoencoderKL, a 32-wide CLIPTextModel with 16 positions and
  its tokenizer) with SD 1.5's DDIMScheduler config; no safety checker.
* teachers/sd_tiny_call/: prompts.json (prompts, steps, guidance) and expected.safetensors:
  `noise` (the given `latents`), `images` (the pipeline's `output_type="np"` result, NHWC in
  [0, 1]), `prompt_embeds` / `negative_prompt_embeds` (what the pipeline's encode_prompt made;
  the negative prompt is the empty one), and `latents` (the same call with
  `output_type="latent"`).
Seeded: rerunning reproduces the files.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizerFast

PROMPTS = ["a red circle on a blue square", "", "digits",
           "a very long prompt that the sixteen token tokenizer has to truncate somewhere"]
STEPS, GUIDANCE = 4, 7.5


def main(out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(16)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "models", "cond_sd15")).float()
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae", "kl_sd"))
    clip = os.path.join(out, "clip", "clip_quick")
    te = CLIPTextModel.from_pretrained(os.path.join(clip, "text_encoder"))
    tok = CLIPTokenizerFast.from_pretrained(os.path.join(clip, "tokenizer"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    d = os.path.join(out, "teachers", "sd_tiny")
    pipe.unet.half()  # the UNet's weights stored in fp16 (as in models/cond_sd15): smaller
    pipe.save_pretrained(d, safe_serialization=True)
    # `_name_or_path` records where the components were read from (an absolute path here): drop
    # it so a rerun anywhere writes the same bytes.
    for sub in ("unet", "vae"):
        p = os.path.join(d, sub, "config.json")
        with open(p) as f:
            c = json.load(f)
        c.pop("_name_or_path", None)
        with open(p, "w") as f:
            f.write(json.dumps(c, indent=2, sort_keys=True) + "\n")
    # Reload: the call runs on exactly what the folder holds, in f32.
    pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    n, side = len(PROMPTS), cfg.sample_size
    noise = torch.randn((n, cfg.in_channels, side, side), generator=gen)
    kw = dict(prompt=PROMPTS, height=side * pipe.vae_scale_factor,
              width=side * pipe.vae_scale_factor, num_inference_steps=STEPS,
              guidance_scale=GUIDANCE)
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        images = pipe(latents=noise.clone(), output_type="np", **kw).images
        lat = pipe(latents=noise.clone(), output_type="latent", **kw).images
    c = os.path.join(out, "teachers", "sd_tiny_call")
    os.makedirs(c, exist_ok=True)
    with open(os.path.join(c, "prompts.json"), "w") as f:
        json.dump({"pipeline": "StableDiffusionPipeline", "prompts": PROMPTS, "steps": STEPS,
                   "guidance_scale": GUIDANCE, "negative_prompt": "",
                   "timesteps": [int(x) for x in pipe.scheduler.timesteps]}, f, indent=1)
    t = {"noise": noise, "images": torch.from_numpy(images).float(), "latents": lat,
         "prompt_embeds": pe, "negative_prompt_embeds": ne}
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(c, "expected.safetensors"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    inside = float(((images > 0) & (images < 1)).mean())
    print(f"{d}: {size // 1024} KiB; {inside:.0%} of the pixels unclamped; images {images.shape}, range "
          f"[{images.min():.3f}, {images.max():.3f}], |latents| max {float(lat.abs().max()):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(__file__), "..", "graphs", "tests", "fixtures", "diffusers"))
