#!/usr/bin/env python3
"""Parity fixtures for distill's diffusers UNet2DModel and schedulers, made by diffusers itself.

Run with the bench environment (torch + diffusers, see scripts/setup-bench.sh):

    .venv-bench/bin/python scripts/make-diffusers-fixtures.py [OUT]

OUT defaults to graphs/tests/fixtures/diffusers. Writes, all seeded (rerunning reproduces them):

* models/<name>/: a small random-init UNet2DModel folder (`save_pretrained`: config.json +
  diffusion_pytorch_model.safetensors; one model sharded with an index, one with the legacy
  attention key names), plus forward.safetensors: `sample`, `timestep`, `class_labels` (when
  conditional) and diffusers' output `expected`.
* schedulers/<name>/: scheduler_config.json (`save_config`) and trajectory.safetensors:
  `timesteps`, `sigmas` (where the scheduler has them), the initial `sample`, per-step
  `model_output_<i>` (fed to the scheduler), `noise_<i>` (the step's random draw, where it uses
  one) and `prev_sample_<i>` (diffusers' step output), for `set_timesteps(steps)`.
* teachers/<name>/: a pipeline folder (model_index.json, unet/, scheduler/) of MNIST size for
  the end-to-end test of `--teacher DIR` (tests/diffusers_teacher.rs).
* pipelines/<name>/: one model + one scheduler run end to end, the model evaluated by diffusers
  at every step (`init_noise_sigma`, `scale_model_input`, `step`), `images` the final sample.

The Rust tests (graphs/tests/diffusers_*.rs) load these and compare; torch is never needed there.

    .venv-bench/bin/python scripts/make-diffusers-fixtures.py --check DIR

loads every model folder under DIR that distill wrote (`DISTILL_DIFFUSERS_OUT=DIR cargo test
--release -p distill-graphs --test diffusers_unet saves_diffusers`) with diffusers' own
`UNet2DModel.from_pretrained`, runs its forward.safetensors inputs and compares with distill's
output there (`expected`); exits non-zero past 1e-4. A pipeline folder written by `distill
export CKPT --format diffusers -o DIR` (or a folder of them) is loaded with
`DiffusionPipeline.from_pretrained` and sampled with diffusers' own loop from the noise and
labels in its distill_check.safetensors, against distill's images there.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
import diffusers
from diffusers import (
    UNet2DModel,
    DDPMScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

OUT = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--check" else os.path.join(
    os.path.dirname(__file__), "..", "graphs", "tests", "fixtures", "diffusers"
)

MODELS = {
    # ddpm-cifar10-like: no flip, freq_shift 1, downsample_padding 0, eps 1e-6, 4 heads.
    "uncond": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        attention_head_dim=8, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        norm_eps=1e-6,
    ),
    # class table, scale_shift, attention at both levels (2 and 4 heads), 3 groups, centred
    # input, mid_block_scale_factor, two layers per block; saved sharded.
    "class_scale_shift": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(12, 24),
        layers_per_block=2, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=3,
        attention_head_dim=6, resnet_time_scale_shift="scale_shift", num_class_embeds=11,
        center_input_sample=True, mid_block_scale_factor=1.414,
    ),
    # timestep class embedding, one head of full width, three levels, no mid attention,
    # a custom time embedding width; saved with the legacy attention key names.
    "timestep_class": dict(
        sample_size=16, in_channels=2, out_channels=2, block_out_channels=(8, 16, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=None, class_embed_type="timestep", add_attention=False,
        time_embedding_dim=40, freq_shift=0.5,
    ),
    # identity class embedding, no mid block, own attention groups.
    "identity_nomid": dict(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=2,
        attention_head_dim=4, class_embed_type="identity", mid_block_type=None,
    ),
    # scale_shift mid block (its attention has no norm), attn_norm_num_groups unset.
    "scale_shift_mid": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift",
    ),
}

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def perturb(model, gen):
    """Random-init weights are too tame (GroupNorm affine = 1/0): add noise to every one."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def make_model(name, cfg, gen):
    torch.manual_seed(len(name))
    model = UNet2DModel(**cfg).eval()
    perturb(model, gen)
    d = os.path.join(OUT, "models", name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    if name == "class_scale_shift":
        model.save_pretrained(d, max_shard_size="250KB")
    else:
        model.save_pretrained(d)
    if name == "timestep_class":
        path = os.path.join(d, "diffusion_pytorch_model.safetensors")
        sd = {}
        for k, v in model.state_dict().items():
            for new, old in LEGACY.items():
                k = k.replace(f".{new}.", f".{old}.")
            sd[k] = v.contiguous()
        save_file(sd, path)
    n = 3
    side = cfg["sample_size"]
    sample = torch.randn((n, cfg["in_channels"], side, side), generator=gen)
    timestep = torch.tensor([0.0, 261.5, 999.0])
    extra = {}
    kw = {}
    if cfg.get("num_class_embeds"):
        labels = torch.tensor([0, 7, 10], dtype=torch.int64)
        kw["class_labels"] = labels
        extra["class_labels"] = labels.to(torch.int32)
    elif cfg.get("class_embed_type") == "timestep":
        labels = torch.tensor([3, 0, 9], dtype=torch.int64)
        kw["class_labels"] = labels
        extra["class_labels"] = labels.to(torch.int32)
    elif cfg.get("class_embed_type") == "identity":
        temb = cfg.get("time_embedding_dim") or cfg["block_out_channels"][0] * 4
        labels = torch.randn((n, temb), generator=gen)
        kw["class_labels"] = labels
        extra["class_labels"] = labels
    with torch.no_grad():
        out = model(sample, timestep, **kw).sample
    save_file(
        {"sample": sample, "timestep": timestep, "expected": out.contiguous(), **extra},
        os.path.join(d, "forward.safetensors"),
    )
    return model

SCHEDULERS = {
    # name: (class, config, steps, extra step kwargs)
    "ddpm_linear_eps": (DDPMScheduler, dict(), 10, {}),
    "ddpm_cos_v_trailing": (
        DDPMScheduler,
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
             timestep_spacing="trailing", clip_sample=False, variance_type="fixed_small_log"),
        7, {},
    ),
    "ddpm_sample_linspace_large": (
        DDPMScheduler,
        dict(prediction_type="sample", timestep_spacing="linspace", variance_type="fixed_large",
             clip_sample_range=0.8, num_train_timesteps=100),
        6, {},
    ),
    "ddim_scaled_linear_offset": (
        DDIMScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
             set_alpha_to_one=False, clip_sample=False),
        8, {},
    ),
    "ddim_zero_snr_v_trailing_eta": (
        DDIMScheduler,
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
             prediction_type="v_prediction", clip_sample=False),
        5, {"eta": 0.7},
    ),
    "ddim_sample_linspace_clip": (
        DDIMScheduler,
        dict(prediction_type="sample", timestep_spacing="linspace", clip_sample_range=0.9),
        4, {},
    ),
    "euler_linear_eps": (EulerDiscreteScheduler, dict(), 10, {}),
    "euler_scaled_leading_v": (
        EulerDiscreteScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
             timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
        7, {},
    ),
    "euler_trailing_zero_snr_sigma_min": (
        EulerDiscreteScheduler,
        dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction",
             final_sigmas_type="sigma_min"),
        3, {},
    ),
    "dpm_2m_eps": (DPMSolverMultistepScheduler, dict(), 4, {}),
    "dpm_2m_v_trailing_trained": (
        DPMSolverMultistepScheduler,
        dict(num_train_timesteps=100, prediction_type="v_prediction", timestep_spacing="trailing",
             trained_betas=[round(0.0002 + 0.0003 * i, 6) for i in range(100)]),
        5, {},
    ),
    "dpm_2m_heun_sample_leading": (
        DPMSolverMultistepScheduler,
        dict(prediction_type="sample", solver_type="heun", timestep_spacing="leading",
             steps_offset=1, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        6, {},
    ),
    "dpm_1_dpmsolver_sigma_min": (
        DPMSolverMultistepScheduler,
        dict(solver_order=1, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
        4, {},
    ),
    "dpm_2m_dpmsolver_20": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", beta_schedule="scaled_linear",
             beta_start=0.00085, beta_end=0.012),
        20, {},
    ),
    "flow_shift3": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 8, {}),
    "flow_plain": (FlowMatchEulerDiscreteScheduler, dict(), 4, {}),
    "flow_terminal_stochastic": (
        FlowMatchEulerDiscreteScheduler,
        dict(shift=2.0, shift_terminal=0.1, stochastic_sampling=True, num_train_timesteps=500),
        5, {},
    ),
}


def init_sigma(s):
    return float(getattr(s, "init_noise_sigma", 1.0))


def scale_input(s, x, t):
    return s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x


class NoiseTap:
    """Replaces diffusers' randn_tensor in the given modules with draws from `gen`, recorded."""

    def __init__(self, gen, modules):
        self.gen, self.modules, self.draws, self.saved = gen, modules, [], []

    def __enter__(self):
        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            z = torch.randn(shape, generator=self.gen, dtype=torch.float32)
            self.draws.append(z.clone())
            return z.to(dtype) if dtype is not None else z

        for m in self.modules:
            self.saved.append(m.randn_tensor)
            m.randn_tensor = draw
        return self

    def __exit__(self, *a):
        for m, f in zip(self.modules, self.saved):
            m.randn_tensor = f


def sched_modules():
    import diffusers.schedulers.scheduling_ddpm as a
    import diffusers.schedulers.scheduling_ddim as b
    import diffusers.schedulers.scheduling_euler_discrete as c
    import diffusers.schedulers.scheduling_dpmsolver_multistep as d
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as e
    return [a, b, c, d, e]


def make_scheduler(name, cls, cfg, steps, kw, gen):
    d = os.path.join(OUT, "schedulers", name)
    os.makedirs(d, exist_ok=True)
    s = cls(**cfg)
    s.save_config(d)
    s.set_timesteps(steps)
    t = {"timesteps": s.timesteps.clone().to(torch.float32),
         "init_noise_sigma": torch.tensor([init_sigma(s)]),
         "eta": torch.tensor([float(kw.get("eta", 0.0))])}
    if hasattr(s, "alphas_cumprod"):
        t["alphas_cumprod"] = s.alphas_cumprod.clone().to(torch.float32)
    if getattr(s, "sigmas", None) is not None and cls is not DDPMScheduler:
        t["sigmas"] = torch.as_tensor(s.sigmas).clone().to(torch.float32)
    sample = torch.randn((2, 3, 4, 4), generator=gen) * init_sigma(s)
    t["sample"] = sample.clone()
    fixed = torch.randn(sample.shape, generator=gen)
    for i, ts in enumerate(s.timesteps):
        x_in = scale_input(s, sample, ts)
        mo = 0.6 * x_in + 0.4 * fixed * (1 + i)
        t[f"model_output_{i}"] = mo.clone()
        with NoiseTap(gen, sched_modules()) as tap:
            extra = dict(kw)
            if cls is DDIMScheduler and kw.get("eta", 0) > 0:
                z = torch.randn(sample.shape, generator=gen)
                extra["variance_noise"] = z
                tap.draws.append(z)
            sample = s.step(mo, ts, sample, **extra).prev_sample
        if tap.draws:
            t[f"noise_{i}"] = tap.draws[0]
        t[f"prev_sample_{i}"] = sample.clone()
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "trajectory.safetensors"))


PIPELINES = {
    # name: (model, scheduler config name, steps, DDIM eta)
    "uncond_ddpm": ("uncond", "ddpm_linear_eps", 10, None),
    "class_dpm_v": ("class_scale_shift", "dpm_2m_v_trailing_trained", 4, None),
    "timestep_class_euler": ("timestep_class", "euler_linear_eps", 6, None),
    "identity_flow": ("identity_nomid", "flow_shift3", 5, None),
    "scale_shift_ddim_eta": ("scale_shift_mid", "ddim_zero_snr_v_trailing_eta", 4, 0.5),
}


def make_pipeline(name, model_name, sched_name, steps, eta, gen):
    """The generic pipeline loop (init_noise_sigma, scale_model_input, unet, step)."""
    cls, cfg, _, _ = SCHEDULERS[sched_name]
    mcfg = MODELS[model_name]
    model = UNet2DModel.from_pretrained(os.path.join(OUT, "models", model_name)).eval()
    s = cls(**cfg)
    s.set_timesteps(steps)
    side = mcfg["sample_size"]
    n = 2
    t = {}
    x = torch.randn((n, mcfg["in_channels"], side, side), generator=gen)
    t["noise"] = x.clone()
    x = x * init_sigma(s)
    kw = {}
    if mcfg.get("num_class_embeds"):
        kw["class_labels"] = torch.tensor([2, 9])
        t["class_labels"] = kw["class_labels"].to(torch.int32)
    elif mcfg.get("class_embed_type") == "timestep":
        kw["class_labels"] = torch.tensor([5, 1])
        t["class_labels"] = kw["class_labels"].to(torch.int32)
    elif mcfg.get("class_embed_type") == "identity":
        kw["class_labels"] = torch.randn((n, mcfg["block_out_channels"][0] * 4), generator=gen)
        t["class_labels"] = kw["class_labels"]
    for i, ts in enumerate(s.timesteps):
        with torch.no_grad():
            mo = model(scale_input(s, x, ts), ts.expand(n).to(torch.float32), **kw).sample
        t[f"model_output_{i}"] = mo.clone()
        with NoiseTap(gen, sched_modules()) as tap:
            extra = {}
            if eta is not None:
                z = torch.randn(x.shape, generator=gen)
                extra = {"eta": eta, "variance_noise": z}
                tap.draws.append(z)
            x = s.step(mo, ts, x, **extra).prev_sample
        if tap.draws:
            t[f"noise_{i}"] = tap.draws[0]
        t[f"sample_{i}"] = x.clone()
    t["images"] = x.clone()
    d = os.path.join(OUT, "pipelines", name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "pipeline.json"), "w") as f:
        json.dump({"model": model_name, "scheduler": sched_name, "steps": steps, "eta": eta}, f)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "expected.safetensors"))



# A teacher pipeline folder of MNIST size (1x32x32, 10 classes: what `distill eval`'s classifier
# scores) for the end-to-end test (tests/diffusers_teacher.rs): `DDIMPipeline.save_pretrained`
# writes model_index.json + unet/ + scheduler/. Random-init: the test checks the commands work
# on it, not sample quality.
TEACHERS = {
    "digits32_ddim": dict(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        attention_head_dim=8, num_class_embeds=10,
    ),
}


def make_teacher(name, cfg, gen):
    from diffusers import DDIMPipeline
    torch.manual_seed(len(name))
    model = UNet2DModel(**cfg).eval()
    perturb(model, gen)
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    d = os.path.join(OUT, "teachers", name)
    DDIMPipeline(unet=model, scheduler=sched).save_pretrained(d)


def main():
    gen = torch.Generator().manual_seed(1234)
    os.makedirs(OUT, exist_ok=True)
    for name, cfg in TEACHERS.items():
        make_teacher(name, cfg, torch.Generator().manual_seed(99))
    for name, cfg in MODELS.items():
        make_model(name, cfg, gen)
    for name, (cls, cfg, steps, kw) in SCHEDULERS.items():
        make_scheduler(name, cls, cfg, steps, kw, gen)
    for name, (m, sname, steps, eta) in PIPELINES.items():
        make_pipeline(name, m, sname, steps, eta, gen)
    import fixtures_vae_clip  # AutoencoderKL, CLIPTextModel + tokenizer: vae/, clip/
    fixtures_vae_clip.main(OUT)
    import fixtures_unet_condition  # UNet2DConditionModel: scripts/fixtures_unet_condition.py
    fixtures_unet_condition.main(OUT)
    import lora_check  # a LoRA distill wrote for a teacher above, loaded by diffusers / peft
    lora_check.main(OUT)
    import fixtures_sd_pipeline  # a StableDiffusionPipeline folder of the above: teachers/sd_tiny
    fixtures_sd_pipeline.main(OUT)


def check_pipeline(d):
    """A pipeline folder `distill export --format diffusers` wrote: diffusers' own DDIM loop
    (set_timesteps(steps), unet, step with eta 0) from distill_check.safetensors' noise and labels,
    against distill's images for them. Returns the max abs difference."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file
    pipe = DiffusionPipeline.from_pretrained(d)
    unet, sched = pipe.unet.eval(), pipe.scheduler
    f = load_file(os.path.join(d, "distill_check.safetensors"))
    steps = int(f["steps"][0])
    sched.set_timesteps(steps)
    x = f["noise"] * sched.init_noise_sigma
    kw = {"class_labels": f["class_labels"]} if unet.config.num_class_embeds else {}
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t, **kw).sample
            x = sched.step(out, t, x, eta=0.0).prev_sample
    x = x.clamp(-1, 1)
    diff = (x - f["images"]).abs()
    err = float(diff.max())
    print(f"{d}: {type(sched).__name__} timesteps {sched.timesteps.tolist()}: diffusers vs "
          f"distill images max abs {err:.3e}, mean abs {float(diff.mean()):.3e}")
    return err


# An eps model's x0 at DDIM's first timestep (sigma 157) is (x_t - sqrt(1 - acp) eps) * 157:
# f32 round-off in eps between torch and candle is multiplied by 157, so sampled images are
# compared at 1e-3 (the network forward itself at 1e-4).
PIPELINE_TOL = 1e-3


def check(root):
    """diffusers loads folders distill wrote and computes distill's outputs."""
    from safetensors.torch import load_file
    worst = 0.0
    if os.path.isfile(os.path.join(root, "model_index.json")):
        worst = check_pipeline(root)
        if worst > PIPELINE_TOL:
            sys.exit(f"max abs {worst:.3e} > {PIPELINE_TOL}")
        return
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isfile(os.path.join(d, "model_index.json")):
            err = check_pipeline(d)
            if err > PIPELINE_TOL:
                sys.exit(f"{d}: max abs {err:.3e} > {PIPELINE_TOL}")
            continue
        if not os.path.isfile(os.path.join(d, "config.json")):
            continue
        model = UNet2DModel.from_pretrained(d).eval()
        f = load_file(os.path.join(d, "forward.safetensors"))
        kw = {}
        if "class_labels" in f:
            l = f["class_labels"]
            kw["class_labels"] = l if l.is_floating_point() else l.to(torch.int64)
        with torch.no_grad():
            out = model(f["sample"], f["timestep"], **kw).sample
        err = float((out - f["expected"]).abs().max())
        worst = max(worst, err)
        print(f"{name}: diffusers vs distill max abs {err:.3e}")
    if worst > 1e-4:
        sys.exit(f"max abs {worst:.3e} > 1e-4")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    if len(sys.argv) > 2 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        main()
