#!/usr/bin/env python3
"""Parity fixtures for distill's diffusers UNet2DConditionModel, made by diffusers itself.

Called from scripts/make-diffusers-fixtures.py (or alone, same OUT argument):

    /work/venv-bench/bin/python scripts/fixtures_unet_condition.py [OUT]

OUT defaults to graphs/tests/fixtures/diffusers. Writes models/<name>/ for each entry of MODELS:
a small random-init UNet2DConditionModel folder (`save_pretrained`: config.json +
diffusion_pytorch_model.safetensors, weights stored in fp16 to keep the folder small; the
model that computes `expected` has exactly those fp16-rounded weights, in f32) and
forward.safetensors: `sample`, `timestep`, `encoder_hidden_states`, `text_embeds` and `time_ids`
(text_time models only) and diffusers' output `expected` (f32 forward); for the models in WIDE
also forward_wide.safetensors, the same on a non-square `sample`. Seeded: rerunning
reproduces them. Also pipelines/cond_sd15_ddim_cfg/: a StableDiffusionPipeline call on the
cond_sd15 UNet (see make_sd_pipeline), pipelines/cond_sdxl_euler_cfg/ the same with
StableDiffusionXLPipeline. graphs/tests/diffusers_unet_condition.rs loads them.

    /work/venv-bench/bin/python scripts/fixtures_unet_condition.py --check DIR

loads the folders distill wrote under DIR with diffusers (see check).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from diffusers import UNet2DConditionModel

MODELS = {
    # SD-1.5-like: conv projections, attention_head_dim 2 meaning two heads (diffusers' naming
    # quirk), cross-attention at the first level and in the mid block, one layer per block.
    "cond_sd15": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        cross_attention_dim=32, attention_head_dim=2,
    ),
    # SD-2-like: linear projections, per-block heads, transformer layers and layers per block,
    # cross-attention everywhere, upcast_attention, downsample_padding 0, scale_shift res blocks.
    "cond_linear": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(12, 24),
        layers_per_block=(1, 2), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        cross_attention_dim=20, attention_head_dim=(2, 4), transformer_layers_per_block=(2, 1),
        use_linear_projection=True, upcast_attention=True, downsample_padding=0,
        resnet_time_scale_shift="scale_shift", norm_eps=1e-6, flip_sin_to_cos=False,
        freq_shift=1,
    ),
    # SDXL-like: text_time added embedding (pooled 16 + 6 ids x 8), no attention at the first
    # level, two transformer layers at the second, linear projections.
    "cond_sdxl": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 24),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
    # The attention-free UNetMidBlock2D (one res block), 5x5 conv_in and 1x1 conv_out, centred
    # input, own time embedding width, two layers per block, one full-width head, mid scale.
    "cond_misc": dict(
        sample_size=8, in_channels=4, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=1, mid_block_type="UNetMidBlock2D",
        conv_in_kernel=5, conv_out_kernel=1, center_input_sample=True, time_embedding_dim=24,
        mid_block_scale_factor=1.5, dropout=0.1,
    ),
    # No mid block, three levels (8 -> 4 -> 2), cross-attention at the two outer levels.
    "cond_nomid": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=(2, 4, 4),
        mid_block_type=None,
    ),
}

POOLED = {"cond_sdxl": 16}
WIDE = {"cond_nomid": (8, 12)}


def make(out, name, cfg, gen):
    torch.manual_seed(len(name))
    model = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        # Random-init weights are too tame (norm affines 1/0): perturb every one, then round to
        # fp16 so the saved fp16 folder holds exactly the weights `expected` comes from.
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())
    d = os.path.join(out, "models", name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    model.half().save_pretrained(d)
    model.float()
    n, seq = 2, 5
    side = cfg["sample_size"]
    sample = torch.randn((n, cfg["in_channels"], side, side), generator=gen)
    timestep = torch.tensor([3.0, 981.5])
    ehs = torch.randn((n, seq, cfg["cross_attention_dim"]), generator=gen)
    tensors = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs}
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        text_embeds = torch.randn((n, POOLED[name]), generator=gen)
        time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0], [16.0, 12.0, 2.0, 1.0, 8.0, 8.0]])
        kw["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        tensors.update(text_embeds=text_embeds, time_ids=time_ids)
    with torch.no_grad():
        expected = model(sample, timestep, ehs, **kw).sample
    tensors["expected"] = expected.contiguous()
    save_file(tensors, os.path.join(d, "forward.safetensors"))
    if name in WIDE:
        # A non-square latent (SD's 512x768 is 64x96): forward_wide.safetensors.
        h, w = WIDE[name]
        wide = torch.randn((n, cfg["in_channels"], h, w), generator=gen)
        with torch.no_grad():
            out = model(wide, timestep, ehs).sample
        save_file({"sample": wide, "timestep": timestep, "encoder_hidden_states": ehs,
                   "expected": out.contiguous()}, os.path.join(d, "forward_wide.safetensors"))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params} parameters, {size // 1024} KiB, |expected| max {float(expected.abs().max()):.3f}")


def make_sd_pipeline(out, model_name, steps, guidance, gen):
    """diffusers' own StableDiffusionPipeline call on given latents and prompt embeddings, with
    classifier-free guidance, stopped before the VAE (`output_type="latent"`): SD 1.5's DDIM
    scheduler config, the UNet of models/<model_name>. No text encoder or VAE is needed for it
    (both None). Writes pipelines/<model_name>_ddim_cfg/: scheduler_config.json, pipeline.json
    and expected.safetensors (`noise`, `prompt_embeds`, `negative_prompt_embeds`, `latents_<i>`
    after each step, `latents` the result)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "models", model_name))
    unet = unet.float().eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    cfg = unet.config
    n, seq, side = 2, 5, cfg.sample_size
    noise = torch.randn((n, cfg.in_channels, side, side), generator=gen)
    cond = torch.randn((n, seq, cfg.cross_attention_dim), generator=gen)
    neg = torch.randn((n, seq, cfg.cross_attention_dim), generator=gen)
    t = {"noise": noise, "prompt_embeds": cond, "negative_prompt_embeds": neg}

    def record(p, i, ts, kw):
        t[f"latents_{i}"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        lat = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, latents=noise.clone(),
                   height=side * pipe.vae_scale_factor, width=side * pipe.vae_scale_factor,
                   num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   callback_on_step_end=record).images
    t["latents"] = lat
    d = os.path.join(out, "pipelines", f"{model_name}_ddim_cfg")
    os.makedirs(d, exist_ok=True)
    sched.save_config(d)
    with open(os.path.join(d, "pipeline.json"), "w") as f:
        json.dump({"pipeline": "StableDiffusionPipeline", "model": model_name, "steps": steps,
                   "guidance_scale": guidance, "timesteps": [int(x) for x in sched.timesteps]}, f)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "expected.safetensors"))
    print(f"{d}: timesteps {[int(x) for x in sched.timesteps]}, |latents| max {float(lat.abs().max()):.3f}")


def make_sdxl_pipeline(out, model_name, steps, guidance, gen):
    """diffusers' own StableDiffusionXLPipeline call (text encoders and VAE None) on given
    latents, prompt embeddings and pooled embeddings, guidance, `output_type="latent"`, SDXL's
    Euler scheduler config: the pipeline builds `time_ids` itself (original size, crop, target
    size). Writes pipelines/<model_name>_euler_cfg/ like make_sd_pipeline, plus
    `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` and the pipeline's `time_ids`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "models", model_name))
    unet = unet.float().eval()
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=sched, add_watermarker=False)
    cfg = unet.config
    n, seq, side = 2, 5, cfg.sample_size
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    noise = torch.randn((n, cfg.in_channels, side, side), generator=gen)
    t = {
        "noise": noise,
        "prompt_embeds": torch.randn((n, seq, cfg.cross_attention_dim), generator=gen),
        "negative_prompt_embeds": torch.randn((n, seq, cfg.cross_attention_dim), generator=gen),
        "pooled_prompt_embeds": torch.randn((n, pooled), generator=gen),
        "negative_pooled_prompt_embeds": torch.randn((n, pooled), generator=gen),
    }
    seen = {}
    orig = unet.forward

    def spy(*a, **kw):
        seen["time_ids"] = kw["added_cond_kwargs"]["time_ids"].clone()
        return orig(*a, **kw)

    unet.forward = spy

    def record(p, i, ts, kw):
        t[f"latents_{i}"] = kw["latents"].clone()
        return kw

    px = side * pipe.vae_scale_factor
    with torch.no_grad():
        lat = pipe(latents=noise.clone(), height=px, width=px, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="latent", callback_on_step_end=record,
                   **{k: v for k, v in t.items() if k != "noise"}).images
    unet.forward = orig
    t["latents"] = lat
    t["time_ids"] = seen["time_ids"]
    d = os.path.join(out, "pipelines", f"{model_name}_euler_cfg")
    os.makedirs(d, exist_ok=True)
    sched.save_config(d)
    with open(os.path.join(d, "pipeline.json"), "w") as f:
        json.dump({"pipeline": "StableDiffusionXLPipeline", "model": model_name, "steps": steps,
                   "guidance_scale": guidance,
                   "timesteps": [float(x) for x in sched.timesteps]}, f)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "expected.safetensors"))
    print(f"{d}: timesteps {[float(x) for x in sched.timesteps]}, time_ids "
          f"{seen['time_ids'].tolist()}, |latents| max {float(lat.abs().max()):.3f}")


def main(out):
    gen = torch.Generator().manual_seed(4321)
    for name, cfg in MODELS.items():
        make(out, name, cfg, gen)
    make_sd_pipeline(out, "cond_sd15", 4, 7.5, gen)
    make_sdxl_pipeline(out, "cond_sdxl", 4, 5.0, gen)


def check(root):
    """diffusers' own from_pretrained on every UNet2DConditionModel folder under `root` that
    distill wrote (`DISTILL_DIFFUSERS_OUT=DIR cargo test --release --workspace --test
    diffusers_unet_condition saves_diffusers`): its forward.safetensors inputs through diffusers,
    against distill's output there (`expected`); exits non-zero past 1e-4."""
    from safetensors.torch import load_file
    worst = 0.0
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, "config.json")):
            continue
        model = UNet2DConditionModel.from_pretrained(d).eval()
        f = load_file(os.path.join(d, "forward.safetensors"))
        kw = {}
        if "text_embeds" in f:
            kw["added_cond_kwargs"] = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}
        with torch.no_grad():
            out = model(f["sample"], f["timestep"], f["encoder_hidden_states"], **kw).sample
        err = float((out - f["expected"]).abs().max())
        worst = max(worst, err)
        print(f"{name}: diffusers vs distill max abs {err:.3e}")
    if worst > 1e-4:
        sys.exit(f"max abs {worst:.3e} > 1e-4")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
            os.path.dirname(__file__), "..", "graphs", "tests", "fixtures", "diffusers"))
