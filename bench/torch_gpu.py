"""PyTorch peer of `distill bench --device cuda`: the same UNet (torch_unet.py) trained with AMP on
the same GPU, for the teacher step's throughput and peak memory at fp32, bf16 and fp16.

fp32: plain f32 (TF32 off, as candle's f32 matmuls); bf16: autocast(bfloat16); fp16:
autocast(float16) + GradScaler; all with channels_last and AdamW, like `distill train teacher`.
Prints one JSON object per precision on stdout. `--device cpu` runs the same code with CPU
autocast (the dry run of scripts/gpu-check.sh); peak_mib is then null.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_unet import EdmDenoiser, load_config, make_inputs  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(cfg, precision, batch, warmup, iters, seed, device):
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    model = EdmDenoiser(cfg).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x0, labels, sigma, noise = (t.to(dev) for t in make_inputs(model, cfg, batch, seed))
    x0 = x0.contiguous(memory_format=torch.channels_last)
    noise = noise.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.loss(x0, labels, sigma, noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {
        "precision": precision,
        "step_ms": ms,
        "images_per_s": batch / (ms / 1e3),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="distill ModelConfig JSON, or @file")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    cfg = load_config(args.config)
    for p in args.precisions.split(","):
        r = bench(cfg, p, args.batch, args.warmup, args.iters, args.seed, args.device)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
