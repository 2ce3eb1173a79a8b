#!/usr/bin/env python3
"""A LoRA distill wrote, loaded by diffusers and peft: the fixture of tests/lora.rs.

    /work/venv-bench/bin/python scripts/lora_check.py [DIFFUSERS_FIXTURES]

(also run by scripts/make-diffusers-fixtures.py after it has made its teachers). Needs the
distill release binary ($DISTILL_BIN, default target/release/distill). Steps:

1. `distill train dmd2 --teacher <DIFFUSERS_FIXTURES>/teachers/digits32_ddim --lora-rank 4
   --lora-alpha 8` on linear (to_q, to_k, to_v, to_out.0), 3x3 (conv1, conv2, the
   up/downsamplers' conv, stride 2 for the downsampler) and 1x1 (conv_shortcut) layers, a few
   iterations at a high learning rate so the adapters move the output;
2. `distill export --format lora` (the file kept in tests/fixtures/lora/digits32_ddim) and
   `--format diffusers` (the merged UNet folder);
3. the base UNet2DModel with that LoRA, loaded two ways: peft's `inject_adapter_in_model` +
   `set_peft_model_state_dict` (UNet2DModel has no LoRA loader of its own: it is not a
   `PeftAdapterMixin`), with the `LoraConfig` read from the file's `lora_adapter_metadata`; and
   diffusers' own `PeftAdapterMixin.load_lora_adapter(..., prefix="unet")` on a UNet2DModel
   subclass that mixes it in (what diffusers' LoRA-capable models do), which reads the config
   and its scale from the metadata itself;
4. both against the merged folder loaded by `UNet2DModel.from_pretrained` (<= 1e-4), and
   forward.safetensors (inputs, `expected` = peft's output, `base` = the output without LoRA)
   written for the Rust test, which checks that distill's own adapted network computes
   `expected`.

Exits non-zero past 1e-4.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "lora", "digits32_ddim")
TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,conv"
TOL = 1e-4


def distill(*args):
    exe = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "target", "release", "distill"))
    if not os.path.isfile(exe):
        sys.exit(f"lora_check: no distill binary at {exe} (cargo build --release, or set DISTILL_BIN)")
    r = subprocess.run([exe, "--quiet", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"distill {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def peft_load(unet, path):
    """peft: LoraConfig from the file's lora_adapter_metadata, adapters injected and set."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    cfg = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items()
           if k.startswith("unet.")}
    sd = {k[len("unet."):]: v for k, v in load_file(path).items()}
    inject_adapter_in_model(LoraConfig(**cfg), unet)
    res = set_peft_model_state_dict(unet, sd)
    unexpected = getattr(res, "unexpected_keys", [])
    if unexpected:
        sys.exit(f"peft did not use {unexpected}")
    missing = [k for k in unet.state_dict() if "lora_" in k and
               k.replace(".default", "") not in sd]
    if missing:
        sys.exit(f"peft adapters without weights in the file: {missing}")
    return unet, cfg


def diffusers_load(unet_dir, path):
    """diffusers' own loader (PeftAdapterMixin.load_lora_adapter) on a UNet2DModel with it."""
    from diffusers import UNet2DModel
    from diffusers.loaders.peft import PeftAdapterMixin

    class LoraUNet2DModel(UNet2DModel, PeftAdapterMixin):
        pass

    unet = LoraUNet2DModel.from_pretrained(unet_dir).eval()
    unet.load_lora_adapter(os.path.dirname(path), weight_name=os.path.basename(path),
                           prefix="unet", adapter_name="distill")
    return unet


def main(fixtures):
    from diffusers import UNet2DModel
    teacher = os.path.join(fixtures, "teachers", "digits32_ddim")
    tmp = tempfile.mkdtemp(prefix="distill-lora-check")
    try:
        run = os.path.join(tmp, "dmd2")
        # Relative to the repository (the adapter's header records the base folder).
        distill("train", "dmd2", "--teacher", os.path.relpath(teacher, ROOT), "--train-steps", "4", "--batch-size", "4",
                "--cfg-scale", "1", "--no-gan", "--dfake-gen-update-ratio", "1", "--lr", "0.02",
                "--warmup", "0", "--ema-decay", "0", "--sample-every", "0",
                "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", TARGETS, "-o", run)
        ckpt = os.path.join(run, "checkpoint")
        os.makedirs(FIXTURE, exist_ok=True)
        lora = os.path.join(FIXTURE, "pytorch_lora_weights.safetensors")
        print(distill("export", ckpt, "--format", "lora", "-o",
                      os.path.relpath(lora, ROOT)).strip())
        merged = os.path.join(tmp, "merged")
        distill("export", ckpt, "--format", "diffusers", "-o", merged)

        gen = torch.Generator().manual_seed(77)
        n = 3
        sample = torch.randn((n, 1, 32, 32), generator=gen)
        timestep = torch.tensor([999.0, 500.0, 20.0])
        labels = torch.tensor([3, 7, 1], dtype=torch.int64)
        unet_dir = os.path.join(teacher, "unet")

        def fwd(m):
            with torch.no_grad():
                return m.eval()(sample, timestep, class_labels=labels).sample

        base = fwd(UNet2DModel.from_pretrained(unet_dir))
        with_peft, cfg = peft_load(UNet2DModel.from_pretrained(unet_dir), lora)
        out_peft = fwd(with_peft)
        out_merged = fwd(UNet2DModel.from_pretrained(os.path.join(merged, "unet")))
        out_diffusers = fwd(diffusers_load(unet_dir, lora))
        save_file({"sample": sample, "timestep": timestep, "class_labels": labels,
                   "expected": out_peft.contiguous(), "base": base.contiguous()},
                  os.path.join(FIXTURE, "forward.safetensors"))
        d_peft = float((out_peft - out_merged).abs().max())
        d_diff = float((out_diffusers - out_merged).abs().max())
        moved = float((out_peft - base).abs().max())
        print(f"lora_check: LoraConfig {cfg}")
        print(f"lora_check: peft inject_adapter_in_model + set_peft_model_state_dict vs distill's "
              f"merged UNet (--format diffusers) max abs {d_peft:.3e}")
        print(f"lora_check: diffusers PeftAdapterMixin.load_lora_adapter vs the merged UNet "
              f"max abs {d_diff:.3e}")
        print(f"lora_check: the LoRA moves the base output by up to {moved:.3e}")
        if max(d_peft, d_diff) > TOL:
            sys.exit(f"lora_check: max abs {max(d_peft, d_diff):.3e} > {TOL}")
        if moved < 1e-2:
            sys.exit(f"lora_check: the LoRA barely changes the output ({moved:.3e})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(ROOT, "graphs", "tests", "fixtures", "diffusers"))
