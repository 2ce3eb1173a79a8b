#!/usr/bin/env python3
"""A text-to-image LoRA student distill wrote, run by diffusers: the fixture of tests/text_lora.rs.

    /work/venv-bench/bin/python scripts/text_lora_check.py

Needs the distill release binary ($DISTILL_BIN, default target/release/distill) and the tiny
Stable Diffusion pipeline graphs/tests/fixtures/diffusers/teachers/sd_tiny. Steps:

1. `distill train tdm --teacher sd_tiny --prompts P --lora-rank 8` (default targets
   to_q,to_k,to_v,to_out.0), a few iterations at a high learning rate so the adapters move the
   output;
2. `distill export --format lora` (the file kept in tests/fixtures/lora/sd_tiny) and
   `--format diffusers` (the student as a whole pipeline folder, with distill's own images for
   seeded noise and two prompts in its distill_check.safetensors);
3. diffusers, two ways, on the check's noise and prompt embeddings, `num_inference_steps` = the
   student's steps, `guidance_scale = 1` (the guidance is distilled in):
   a. `StableDiffusionPipeline.from_pretrained(<the exported folder>)`;
   b. the teacher's `StableDiffusionPipeline.from_pretrained(sd_tiny)` with
      `pipe.load_lora_weights(<our LoRA file>)` and the exported folder's DDIMScheduler;
   both against distill's images (<= 1e-3, the pipeline call's tolerance elsewhere);
4. pipeline_call.safetensors (noise, prompt_embeds, steps, `images` = diffusers' LoRA run,
   `base` = the same call without the LoRA) for the Rust test, which checks that distill's own
   network with that LoRA file applied computes `images`.

Exits non-zero past the tolerance.
"""
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_check import distill  # the same binary runner (scripts/ is on sys.path when run)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SD_TINY = os.path.join(ROOT, "graphs", "tests", "fixtures", "diffusers", "teachers", "sd_tiny")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "lora", "sd_tiny")
PROMPTS = "a red circle on a blue square\ndigits\na blue circle\n"
TOL = 1e-3


def run(pipe, check):
    steps = int(check["steps"][0])
    out = pipe(
        prompt_embeds=check["prompt_embeds"],
        latents=check["noise"],
        num_inference_steps=steps,
        guidance_scale=1.0,
        output_type="np",
    ).images
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


def main():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="text-lora-check")
    try:
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write(PROMPTS)
        run_dir = os.path.join(tmp, "run")
        distill("train", "tdm", "--teacher", SD_TINY, "--prompts", prompts, "--lora-rank", "8",
                "--train-steps", "6", "--batch-size", "2", "--lr", "2e-2", "--fake-lr", "2e-2",
                "--sample-every", "0", "--out", run_dir)
        ckpt = os.path.join(run_dir, "checkpoint")
        os.makedirs(FIXTURE, exist_ok=True)
        distill("export", ckpt, "--format", "lora", "-o", FIXTURE)
        folder = os.path.join(tmp, "student_pipeline")
        distill("export", ckpt, "--format", "diffusers", "-o", folder)
        check = load_file(os.path.join(folder, "distill_check.safetensors"))
        ours = check["images"]

        merged = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        merged.set_progress_bar_config(disable=True)
        e_merged = (run(merged, check) - ours).abs().max().item()

        pipe = StableDiffusionPipeline.from_pretrained(SD_TINY, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        base = run(pipe, check)
        pipe.load_lora_weights(FIXTURE, weight_name="pytorch_lora_weights.safetensors")
        lora = run(pipe, check)
        e_lora = (lora - ours).abs().max().item()
        moved = (lora - base).abs().max().item()
        print(f"text_lora_check: diffusers on the exported pipeline folder vs distill: {e_merged:.2e}; "
              f"the teacher pipeline + load_lora_weights(our LoRA) vs distill: {e_lora:.2e} "
              f"(the LoRA moves the images by {moved:.2e}; tolerance {TOL:g})")
        save_file({"noise": check["noise"], "prompt_embeds": check["prompt_embeds"],
                   "steps": check["steps"], "images": lora, "base": base},
                  os.path.join(FIXTURE, "pipeline_call.safetensors"))
        if max(e_merged, e_lora) > TOL or moved < 1e-2:
            sys.exit("text_lora_check: FAILED")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
