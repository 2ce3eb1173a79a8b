"""PyTorch peer of `distill bench --what inference`: a student generator (graphs/src/sampler.rs
`sample_student`: x = sigma_0 z; per step x0 = D(x, sigma_i); DMD2 re-noises x0 + sigma_{i+1}
noise_i; TDM moves deterministically; the result clamped to [-1, 1]) on the same weights, eager and
(when it works) torch.compile, on the CPU with the bench's thread count.

First checks its output against candle's on the same inputs (--check-input/--check-output), then
times each batch. Prints one JSON object on stdout.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_unet import EdmDenoiser, load_config  # noqa: E402


class Student(torch.nn.Module):
    def __init__(self, cfg, sigmas, fresh_noise):
        super().__init__()
        self.den = EdmDenoiser(cfg)
        self.sigmas = [float(s) for s in sigmas]
        self.fresh_noise = fresh_noise

    def forward(self, z, labels, fresh):
        x = z * self.sigmas[0]
        n = z.shape[0]
        x0 = x
        for i, s in enumerate(self.sigmas):
            x0 = self.den(x, torch.full((n,), s, dtype=z.dtype), labels)
            if i + 1 == len(self.sigmas):
                break
            nxt = self.sigmas[i + 1]
            if self.fresh_noise:
                x = x0 + fresh[i] * nxt
            else:
                x = x0 + (x - x0) * (nxt / s)
        return x0.clamp(-1.0, 1.0)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="distill ModelConfig JSON, or @file")
    ap.add_argument("--weights", required=True, help="the student's model.safetensors")
    ap.add_argument("--sigmas", required=True, help="comma-separated step sigmas, descending")
    ap.add_argument("--fresh-noise", action="store_true")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--check-input", required=True, help="safetensors: noise, labels, noise_1..")
    ap.add_argument("--check-output", required=True, help="safetensors: candle's images")
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    args = ap.parse_args()
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cfg = load_config(args.config)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    model = Student(cfg, sigmas, args.fresh_noise)
    missing, unexpected = model.den.net.load_state_dict(load_file(args.weights), strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.eval()
    u = cfg["unet"]
    shape = (u["channels"], u["resolution"], u["resolution"])

    inp = load_file(args.check_input)
    want = load_file(args.check_output)["images"]
    fresh_n = len(sigmas) - 1 if args.fresh_noise else 0
    with torch.inference_mode():
        got = model(inp["noise"], inp["labels"].long(), [inp[f"noise_{i}"] for i in range(1, fresh_n + 1)])
    parity = float((got - want).abs().max())

    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
           "parity_max_abs_diff": parity, "eager_ms": {}, "compile_ms": {}, "compile_note": None}
    compiled = None
    if args.compile == "on":
        try:
            compiled = torch.compile(model, dynamic=False)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["compile_note"] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        z = torch.randn((b,) + shape, generator=g)
        labels = torch.arange(b) % u["num_classes"]
        fresh = [torch.randn((b,) + shape, generator=g) for _ in range(fresh_n)]
        with torch.inference_mode():
            out["eager_ms"][str(b)] = timed(lambda: model(z, labels, fresh), args.warmup, args.iters)
            if compiled is not None:
                try:
                    out["compile_ms"][str(b)] = timed(lambda: compiled(z, labels, fresh), args.warmup, args.iters)
                except Exception as e:  # noqa: BLE001
                    out["compile_note"] = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    compiled = None
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
