"""PyTorch peer of `distill bench --what diffusers-unet`: diffusers' own UNet2DModel from a
config.json (e.g. bench/configs/ddpm-cifar10-32.json), eps-prediction training step (MSE to the
noise, AdamW lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01, like the candle side) and a
no-grad forward, on the CPU with the bench's threads.

First loads candle's weights (--weights) and writes its output on --check-input to --check-output,
then times each batch from a fresh model. Prints one JSON object on stdout.
"""
import argparse
import json
import statistics
import time

import torch


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
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--check-input", required=True, help="safetensors: sample, timestep")
    ap.add_argument("--check-output", required=True)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    import diffusers
    from diffusers import UNet2DModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cfg = json.load(open(args.config))
    model = UNet2DModel.from_config(cfg)
    missing, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not match diffusers' keys: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval()
    inp = load_file(args.check_input)
    with torch.no_grad():
        out = model(inp["sample"], inp["timestep"]).sample
    save_file({"sample": out.contiguous()}, args.check_output)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    res = {"torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
           "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
           "forward_ms": {}, "step_ms": {}}
    c, s = cfg["in_channels"], cfg["sample_size"]
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        x = torch.randn(b, c, s, s, generator=g)
        eps = torch.randn(b, c, s, s, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g).float()

        def fwd():
            with torch.no_grad():
                model(x, t)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = (model(x, t).sample - eps).square().mean()
            loss.backward()
            opt.step()

        res["forward_ms"][str(b)] = timed(fwd, args.warmup, args.iters)
        res["step_ms"][str(b)] = timed(step, args.warmup, args.iters)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
