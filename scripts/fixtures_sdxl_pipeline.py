#!/usr/bin/env python3
"""A tiny SDXL-like pipeline folder written by diffusers itself, and diffusers' own
StableDiffusionXLPipeline call on it, for distill's SDXL text-to-image teacher.

    /work/venv-bench/bin/python scripts/fixtures_sdxl_pipeline.py [OUT]

OUT defaults to graphs/tests/fixtures/diffusers. Needs the fixtures of scripts/fixtures_vae_clip.py
(vae/kl_sd, clip/clip_quick, clip/clip_gelu_proj) under OUT. Writes
* teachers/sdxl_tiny/: `StableDiffusionXLPipeline.save_pretrained` of a random-init
  UNet2DConditionModel with `addition_embed_type = "text_time"` (cross_attention_dim 64 = the two
  encoders' widths, 32 + 32; projection_class_embeddings_input_dim 72 = the second encoder's
  projection, 24, + 6 time ids x 8), clip_quick as `text_encoder` (CLIPTextModel, quick_gelu,
  pad = eos) and clip_gelu_proj as `text_encoder_2` (CLIPTextModelWithProjection, gelu, pad "!")
  with their tokenizers, the 2-level AutoencoderKL kl_sd and SDXL's EulerDiscreteScheduler
  config; `force_zeros_for_empty_prompt` true (SDXL's value).
* teachers/sdxl_tiny_call/: prompts.json and expected.safetensors: `noise` (the given `latents`),
  encode_prompt's `prompt_embeds`, `pooled_prompt_embeds`, `negative_prompt_embeds`,
  `negative_pooled_prompt_embeds` (zeros: force_zeros_for_empty_prompt), `add_time_ids`, the
  call's `images` (`output_type="np"`, NHWC in [0, 1]) and `latents` (`output_type="latent"`);
  and with force_zeros_for_empty_prompt false: `empty_prompt_embeds`,
  `empty_pooled_prompt_embeds` (the empty prompt's, as the negative) and `latents_empty` (the call
  guided against them).
Seeded: rerunning reproduces the files.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

PROMPTS = ["a red circle on a blue square", "", "digits",
           "a very long prompt that the sixteen token tokenizer has to truncate somewhere"]
STEPS, GUIDANCE = 4, 5.0


def perturb(model, gen, scale=0.1):
    """Random-init norms are 1/0 and some convolutions 0: add noise to every weight."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def main(out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(17)
    clip1 = os.path.join(out, "clip", "clip_quick")
    clip2 = os.path.join(out, "clip", "clip_gelu_proj")
    te = CLIPTextModel.from_pretrained(os.path.join(clip1, "text_encoder"))
    tok = CLIPTokenizerFast.from_pretrained(os.path.join(clip1, "tokenizer"))
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(clip2, "text_encoder"))
    tok2 = CLIPTokenizerFast.from_pretrained(os.path.join(clip2, "tokenizer"))
    cross = te.config.hidden_size + te2.config.hidden_size
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 24), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * 8).eval()
    perturb(unet, gen)
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae", "kl_sd"))
    # SDXL base's scheduler_config.json.
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading",
                                   interpolation_type="linear", use_karras_sigmas=False,
                                   prediction_type="epsilon", num_train_timesteps=1000)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    d = os.path.join(out, "teachers", "sdxl_tiny")
    pipe.unet.half()  # the UNet's weights stored in fp16: smaller
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
    pipe = StableDiffusionXLPipeline.from_pretrained(d, add_watermarker=False)
    pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    cfg = pipe.unet.config
    n, side = len(PROMPTS), cfg.sample_size
    px = side * pipe.vae_scale_factor
    noise = torch.randn((n, cfg.in_channels, side, side), generator=gen)
    kw = dict(prompt=PROMPTS, height=px, width=px, num_inference_steps=STEPS,
              guidance_scale=GUIDANCE)
    t = {"noise": noise}
    with torch.no_grad():
        pe, ne, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                     do_classifier_free_guidance=True)
        t.update(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=npooled)
        t["add_time_ids"] = pipe._get_add_time_ids(
            (px, px), (0, 0), (px, px), torch.float32,
            text_encoder_projection_dim=te2.config.projection_dim)
        t["images"] = torch.from_numpy(pipe(latents=noise.clone(), output_type="np", **kw).images)
        t["latents"] = pipe(latents=noise.clone(), output_type="latent", **kw).images
        # The other branch: the empty prompt's embeddings as the negative ones.
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
        _, ne2, _, npooled2 = pipe.encode_prompt(PROMPTS, device="cpu",
                                                 do_classifier_free_guidance=True)
        t.update(empty_prompt_embeds=ne2[:1], empty_pooled_prompt_embeds=npooled2[:1])
        t["latents_empty"] = pipe(latents=noise.clone(), output_type="latent", **kw).images
    c = os.path.join(out, "teachers", "sdxl_tiny_call")
    os.makedirs(c, exist_ok=True)
    with open(os.path.join(c, "prompts.json"), "w") as f:
        json.dump({"pipeline": "StableDiffusionXLPipeline", "prompts": PROMPTS, "steps": STEPS,
                   "guidance_scale": GUIDANCE, "height": px, "width": px,
                   "timesteps": [int(x) for x in pipe.scheduler.timesteps]}, f, indent=1)
    save_file({k: v.float().contiguous() for k, v in t.items()},
              os.path.join(c, "expected.safetensors"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    images = t["images"].numpy()
    inside = float(((images > 0) & (images < 1)).mean())
    print(f"{d}: {size // 1024} KiB; {inside:.0%} of the pixels unclamped; images {images.shape}, "
          f"|latents| max {float(t['latents'].abs().max()):.2f}, prompt_embeds {tuple(pe.shape)}, "
          f"pooled {tuple(pooled.shape)}, time ids {t['add_time_ids'].tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(__file__), "..", "graphs", "tests", "fixtures", "diffusers"))
