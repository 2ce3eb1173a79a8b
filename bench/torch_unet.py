#!/usr/bin/env python3
"""PyTorch peer of distill's class-conditional UNet and EDM denoiser, for `distill bench`.

The architecture mirrors graphs/src/unet.rs, graphs/src/nn/*.rs and graphs/src/denoiser.rs module
for module, with the same parameter names as distill's safetensors keys (so `load_state_dict`
with strict=True takes a candle checkpoint as is).

Three modes (each prints one JSON object on stdout; progress goes to stderr):

  time:   torch_unet.py --config CFG --batch 64 --threads 2 --warmup 3 --iters 10
          times the denoiser forward (EDM preconditioning, torch.no_grad) and a full teacher
          training step (EDM loss forward + backward + AdamW step), reports medians, peak RSS
          and PyTorch's own FLOP count of one forward (torch.utils.flop_counter).
  check:  torch_unet.py --config CFG --check WEIGHTS.safetensors --input IN.safetensors
                        --out OUT.safetensors
          loads the weights (strict), reads x0/noise/sigma/labels from IN, writes
          `denoised` = D(x0 + sigma * noise, sigma, labels) and the teacher `loss` to OUT.

  ops:    torch_unet.py --config CFG --ops @SPECS.json --threads 2 --warmup 3 --iters 10
          times each building block of SPECS (distill's bench_ops::OpSpec list: conv, GroupNorm+SiLU,
          res block, attention at given shapes) forward under no_grad and forward + backward of
          sum(y * g), and one AdamW step over the model's parameters; medians in ms.

CFG is distill's ModelConfig as JSON ({"unet": {...}, "parameterisation": {"kind": "edm", ...}}),
inline or as @path. Only the EDM parameterisation is implemented here.
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb():
    """Peak resident memory of this process, MiB: VmHWM (per address space, so it starts afresh
    at exec). ru_maxrss is no good here: Linux carries it over from the parent across
    fork+exec, so a peer started by a big candle process would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def conv(cin, cout, k, stride=1):
    # padding: 1 for 3x3 (stride 1 or 2), 0 for 1x1 -- as in unet.rs / nn/*.rs.
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class ResBlock(nn.Module):
    """nn/resblock.rs: GN-SiLU-conv, + emb_proj(emb), GN-SiLU-dropout-conv, 1x1 skip if cin != cout."""

    def __init__(self, cin, cout, emb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = conv(cin, cout, 3)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = conv(cout, cout, 3)
        self.skip = conv(cin, cout, 1) if cin != cout else None
        self.dropout = dropout

    def forward(self, x, emb_silu):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb_silu)[:, :, None, None]
        h = F.dropout(F.silu(self.norm2(h)), self.dropout, self.training)
        h = self.conv2(h)
        s = self.skip(x) if self.skip is not None else x
        return s + h


class SelfAttention(nn.Module):
    """nn/attention.rs: single head, q/k/v/proj 1x1 convs, scale 1/sqrt(C), residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.q = conv(channels, channels, 1)
        self.k = conv(channels, channels, 1)
        self.v = conv(channels, channels, 1)
        self.proj = conv(channels, channels, 1)
        self.channels = channels

    def forward(self, x):
        n, c, h, w = x.shape
        xn = self.norm(x)
        q = self.q(xn).reshape(n, c, h * w)
        k = self.k(xn).reshape(n, c, h * w)
        v = self.v(xn).reshape(n, c, h * w)
        scores = torch.matmul(q.transpose(1, 2), k) * (1.0 / math.sqrt(self.channels))  # [N, HWq, HWk]
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(v, attn.transpose(1, 2)).reshape(n, c, h, w)  # [N, C, HWq]
        return x + self.proj(out)


class Level(nn.Module):
    """`{down,up}.{lvl}.{i}`: a res block and, at attention resolutions, a self-attention."""

    def __init__(self, res, attn):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, h, emb):
        h = self.res(h, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """unet.rs, with the same parameter names."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        base, g, ed = cfg["base_channels"], cfg["groups"], cfg["base_channels"] * 4
        mults, nrb, attn_res = cfg["channel_mult"], cfg["num_res_blocks"], cfg["attn_resolutions"]
        drop = cfg.get("dropout", 0.0)
        levels = len(mults)
        self.base = base
        self.conv_in = conv(cfg["channels"], base, 3)
        self.down = nn.ModuleDict()
        skip_ch = [base]
        ch, res = base, cfg["resolution"]
        for lvl, m in enumerate(mults):
            cout = base * m
            d = nn.ModuleDict()
            for i in range(nrb):
                r = ResBlock(ch, cout, ed, g, drop)
                ch = cout
                d[str(i)] = Level(r, SelfAttention(ch, g) if res in attn_res else None)
                skip_ch.append(ch)
            if lvl + 1 < levels:
                d["downsample"] = conv(ch, ch, 3, stride=2)
                res //= 2
                skip_ch.append(ch)
            self.down[str(lvl)] = d
        self.mid = nn.ModuleDict(
            {"res1": ResBlock(ch, ch, ed, g, drop), "attn": SelfAttention(ch, g), "res2": ResBlock(ch, ch, ed, g, drop)}
        )
        self.up = nn.ModuleDict()
        for lvl in reversed(range(levels)):
            cout = base * mults[lvl]
            u = nn.ModuleDict()
            for i in range(nrb + 1):
                sc = skip_ch.pop()
                r = ResBlock(ch + sc, cout, ed, g, drop)
                ch = cout
                u[str(i)] = Level(r, SelfAttention(ch, g) if res in attn_res else None)
            if lvl > 0:
                u["upsample"] = conv(ch, ch, 3)
                res *= 2
            self.up[str(lvl)] = u
        assert not skip_ch, "skip channel bookkeeping"
        self.emb = nn.ModuleList([nn.Linear(base, ed), nn.Linear(ed, ed)])
        self.label_emb = nn.Embedding(cfg["num_classes"] + 1, ed)
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-5)
        self.conv_out = conv(ch, cfg["channels"], 3)
        half = base // 2
        freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float32)
        self.register_buffer("freqs", freqs[None, :], persistent=False)

    def embed(self, c_noise, labels):
        arg = c_noise.reshape(-1, 1) * self.freqs  # SinusoidalEmbedding scale 1.0
        t = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
        t = self.emb[1](F.silu(self.emb[0](t)))
        return F.silu(t + self.label_emb(labels))

    def forward(self, x, c_noise, labels):
        emb = self.embed(c_noise, labels)
        h = self.conv_in(x)
        skips = [h]
        levels = len(self.cfg["channel_mult"])
        for lvl in range(levels):
            d = self.down[str(lvl)]
            for i in range(self.cfg["num_res_blocks"]):
                h = d[str(i)](h, emb)
                skips.append(h)
            if "downsample" in d:
                h = d["downsample"](h)
                skips.append(h)
        h = self.mid["res1"](h, emb)
        h = self.mid["attn"](h)
        h = self.mid["res2"](h, emb)
        for lvl in reversed(range(levels)):
            u = self.up[str(lvl)]
            for i in range(self.cfg["num_res_blocks"] + 1):
                h = torch.cat([h, skips.pop()], dim=1)
                h = u[str(i)](h, emb)
            if "upsample" in u:
                h = u["upsample"](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class EdmDenoiser(nn.Module):
    """denoiser.rs, EDM branch: D = c_skip x + c_out F(c_in x, ln(sigma)/4, label).

    The wrapper adds no parameters: the keys are the UNet's (held in `net`, whose
    keys `net.state_dict()` gives without a prefix)."""

    def __init__(self, model_cfg):
        super().__init__()
        p = model_cfg["parameterisation"]
        if p.get("kind") != "edm":
            raise SystemExit(f"torch_unet.py implements the EDM parameterisation only, not {p.get('kind')!r}")
        self.sd = float(p["sigma_data"])
        self.p_mean = float(p["p_mean"])
        self.p_std = float(p["p_std"])
        self.net = UNet(model_cfg["unet"])

    def forward(self, x, sigma, labels):
        s = sigma.reshape(-1, 1, 1, 1)
        sd = self.sd
        denom = torch.sqrt(s * s + sd * sd)
        c_in = 1.0 / denom
        c_skip = (sd * sd) / (denom * denom)
        c_out = s * sd / denom
        c_noise = torch.log(sigma) * 0.25
        f = self.net(x * c_in, c_noise, labels)
        return x * c_skip + f * c_out

    def loss(self, x0, labels, sigma, noise):
        """losses.rs teacher_loss, EDM: mean over the batch of lambda(sigma) * mean |D - x0|^2."""
        s = sigma.reshape(-1, 1, 1, 1)
        x = x0 + noise * s
        d = self(x, sigma, labels)
        sd2 = self.sd * self.sd
        s2 = sigma * sigma
        weight = (s2 + sd2) / (s2 * sd2)
        per = (d - x0).square().flatten(1).mean(dim=1)
        return (per * weight).mean()


def load_config(arg):
    text = open(arg[1:]).read() if arg.startswith("@") else arg
    cfg = json.loads(text)
    if "unet" not in cfg:
        raise SystemExit("--config must be distill's ModelConfig JSON: {\"unet\": {...}, \"parameterisation\": {...}}")
    return cfg


def make_inputs(model, cfg, batch, seed):
    """Inputs of the size the Rust side times: images in [-1, 1], random labels (null class
    included), log-normal training sigmas, unit noise."""
    u = cfg["unet"]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, u["channels"], u["resolution"], u["resolution"], generator=g) * 2 - 1
    labels = torch.randint(0, u["num_classes"] + 1, (batch,), generator=g)
    sigma = torch.exp(model.p_mean + model.p_std * torch.randn(batch, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    return x0, labels, sigma, noise


def median_ms(samples):
    return statistics.median(samples) * 1e3


def run_check(args, cfg):
    from safetensors.torch import load_file, save_file

    model = EdmDenoiser(cfg)
    weights = load_file(args.check)
    missing, unexpected = model.net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not match the PyTorch peer: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.eval()
    inp = load_file(args.input)
    x0, noise = inp["x0"].float(), inp["noise"].float()
    sigma, labels = inp["sigma"].float(), inp["labels"].long()
    with torch.no_grad():
        x = x0 + noise * sigma.reshape(-1, 1, 1, 1)
        denoised = model(x, sigma, labels)
        loss = model.loss(x0, labels, sigma, noise)
    save_file({"denoised": denoised.contiguous(), "loss": loss.reshape(1).contiguous()}, args.out)
    print(json.dumps({"mode": "check", "torch_version": torch.__version__, "params": sum(p.numel() for p in model.parameters())}))


def run_time(args, cfg):
    from torch.utils.flop_counter import FlopCounterMode

    rss_import = peak_rss_mb()
    torch.manual_seed(args.seed)
    model = EdmDenoiser(cfg)
    params = sum(p.numel() for p in model.parameters())
    x0, labels, sigma, noise = make_inputs(model, cfg, args.batch, args.seed)
    x = x0 + noise * sigma.reshape(-1, 1, 1, 1)

    # PyTorch's own count of one forward (2 x MACs of conv/mm/bmm), at batch 1, times the batch.
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1], sigma[:1], labels[:1])
    torch_flops = fc.get_total_flops() * args.batch

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads: forward x{args.warmup}+{args.iters}")
    fwd = []
    with torch.no_grad():
        for it in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            model(x, sigma, labels)
            dt = time.perf_counter() - t0
            if it >= args.warmup:
                fwd.append(dt)
    rss_fwd = peak_rss_mb()

    log(f"torch: train step x{args.warmup}+{args.iters}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    steps = []
    loss = None
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x0, labels, sigma, noise)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if it >= args.warmup:
            steps.append(dt)
    # The machine's GEMM peak as PyTorch reaches it: f32 N^3 torch.mm, best of 5.
    n = GEMM_N
    a, b2 = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b2)
    best = min(median_of(lambda: torch.mm(a, b2), 0, 1) for _ in range(5))
    gemm_gflops = 2 * n ** 3 / (best * 1e-3) * 1e-9
    out = {
        "mode": "time",
        "gemm_gflops": gemm_gflops,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "params": params,
        "forward_flops": int(torch_flops),
        "forward_ms": [t * 1e3 for t in fwd],
        "step_ms": [t * 1e3 for t in steps],
        "forward_median_ms": median_ms(fwd),
        "step_median_ms": median_ms(steps),
        "rss_mb_after_import": rss_import,
        "peak_rss_mb_forward": rss_fwd,
        "peak_rss_mb": peak_rss_mb(),
        "last_loss": float(loss.item()),
    }
    print(json.dumps(out))


GEMM_N = 2048


def median_of(fn, warmup, iters):
    """Median wall time of `fn` in ms over `iters` runs after `warmup`."""
    ts = []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if it >= warmup:
            ts.append(dt)
    return median_ms(ts)


def run_ops(args, cfg):
    text = open(args.ops[1:]).read() if args.ops.startswith("@") else args.ops
    specs = json.loads(text)
    torch.manual_seed(args.seed)
    w, n_it = args.warmup, args.iters
    out = []
    for s in specs:
        kind, name = s["kind"], s["name"]
        log(f"torch: op {name}")
        if kind == "adamw":
            model = EdmDenoiser(cfg)
            params = list(model.parameters())
            for p in params:
                p.grad = torch.randn_like(p)
            opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
            out.append({"name": name, "fwd_ms": None, "fwdbwd_ms": median_of(opt.step, w, n_it)})
            continue
        n, cin, hw = s["batch"], s["cin"], s["hw"]
        if kind == "conv":
            m = nn.Conv2d(cin, s["cout"], s["k"], stride=s["stride"], padding=s["k"] // 2)
            f = m
        elif kind == "gn_silu":
            m = nn.GroupNorm(s["groups"], cin, eps=1e-5)
            f = lambda x: F.silu(m(x))
        elif kind == "resblock":
            m = ResBlock(cin, s["cout"], s["emb_dim"], s["groups"], 0.0)
            emb = torch.randn(n, s["emb_dim"])
            f = lambda x: m(x, emb)
        elif kind == "attention":
            m = SelfAttention(cin, s["groups"])
            f = m
        else:
            raise SystemExit(f"unknown op kind {kind!r}")
        x = torch.randn(n, cin, hw, hw)
        with torch.no_grad():
            g = torch.randn_like(f(x))

        def fwd():
            with torch.no_grad():
                f(x)

        xg = x.clone().requires_grad_(True)

        def fwd_bwd():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            (f(xg) * g).sum().backward()

        out.append({"name": name, "fwd_ms": median_of(fwd, w, n_it), "fwdbwd_ms": median_of(fwd_bwd, w, n_it)})
    print(json.dumps({"mode": "ops", "torch_version": torch.__version__, "threads": torch.get_num_threads(), "ops": out}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="distill ModelConfig JSON, or @file")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", metavar="WEIGHTS", help="safetensors weights to load (check mode)")
    ap.add_argument("--input", help="check mode: safetensors with x0, noise, sigma, labels")
    ap.add_argument("--out", help="check mode: where to write denoised and loss")
    ap.add_argument("--ops", metavar="SPECS", help="ops mode: distill's op specs as JSON, or @file")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.ops:
        if args.iters < 1 or args.warmup < 0:
            ap.error("--iters must be positive, --warmup non-negative")
        run_ops(args, cfg)
    elif args.check:
        if not (args.input and args.out):
            ap.error("--check needs --input and --out")
        run_check(args, cfg)
    else:
        if args.batch < 1 or args.iters < 1 or args.warmup < 0:
            ap.error("--batch and --iters must be positive, --warmup non-negative")
        run_time(args, cfg)


if __name__ == "__main__":
    main()
