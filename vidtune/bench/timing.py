"""The timed parts of the benchmarks (reported, never gated).

- ``cpu_vs_diffusers``: vidtune's Wan vs diffusers' ``WanTransformer3DModel``, both with a peft LoRA
  on the same weights (base and adapter), forward + loss + backward, interleaved repeats, medians
  and the vidtune/diffusers ratio; MFU against this machine's measured fp32 GEMM peak.
- ``gpu_window``: on a GPU matching the suite, a warmed-up window of full training steps with
  synchronisation (step time, tokens/s, MFU, peak memory).
"""
from __future__ import annotations

import statistics
import time

import torch

from vidtune.measure.counters import count
from vidtune.measure.mfu import mfu, model_flops, recompute_flops
from vidtune.models import example_inputs, family
from vidtune.runtime import DTYPES


def _quantiles(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return q[1], statistics.median(xs), q[7]  # p20, p50, p80


def cpu_vs_diffusers(spec: dict, repeats: int | None = None) -> dict:
    from vidtune.bench.real_step import lora_pair
    from vidtune.measure.devices import measure_cpu_fp32_flops

    repeats = repeats or spec.get("repeats", 7)
    ours, ref, (x, target, t, ctx) = lora_pair(spec)
    f, h, w = spec["latent"]

    def step_ref():
        out = ref(x, t, ctx, return_dict=False)[0]
        (out.float() - target).pow(2).mean().backward()

    def step_ours():
        out = ours(x, t, ctx)
        (out.float() - target).pow(2).mean().backward()

    steps = {"diffusers+peft": (ref, step_ref), "vidtune": (ours, step_ours)}
    res = {}
    for name, (m, fn) in steps.items():
        c, _ = count(fn, existing=[*m.parameters(), x, target, t, ctx])
        m.zero_grad(set_to_none=True)
        res[name] = {"flops": c.flops, "peak_bytes": c.peak_live_bytes, "times": []}
    for m, fn in steps.values():  # warm-up
        fn()
        m.zero_grad(set_to_none=True)
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, (m, fn) in steps.items():
            t0 = time.perf_counter()
            fn()
            res[name]["times"].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
    peak = measure_cpu_fp32_flops()
    tokens = f * (h // 2) * (w // 2)
    base = statistics.median(res["diffusers+peft"]["times"])
    for r in res.values():
        r["p20"], r["p50"], r["p80"] = _quantiles(r["times"])
        r["ratio"] = r["p50"] / base
        r["mfu"] = mfu(r["flops"], r["p50"], peak)
        r["tokens_per_s"] = tokens / r["p50"]
    return {"providers": res, "cpu_fp32_peak_flops": peak, "tokens": tokens, "threads": torch.get_num_threads(),
            "repeats": repeats}


def peft_lora_copy(ref, adapter):
    """A copy of diffusers model ``ref`` (same config and weights), frozen, with a peft LoRA of
    ``adapter`` whose B starts non-zero (gaussian), so the adapter path does real work; train mode."""
    from peft import inject_adapter_in_model

    from vidtune.adapters.lora import lora_config

    copy = type(ref).from_config(ref.config)
    copy.load_state_dict(ref.state_dict())
    copy.requires_grad_(False)
    lc = lora_config(adapter)
    lc.init_lora_weights = "gaussian"
    inject_adapter_in_model(lc, copy)
    return copy.train()


def interleaved_times(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each zero-argument step, ``repeats`` rounds with the steps interleaved, so
    drift (a busy host, thermal) hits every variant alike."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def gpu_matches(dev) -> bool:
    if not torch.cuda.is_available() or not dev.match:
        return False
    name = torch.cuda.get_device_name()
    return any(m.lower() in name.lower() for m in dev.match)


def bench_model(cfg, arch, device):
    """The model a timed benchmark runs: the one the config trains (``vidtune.build``, the
    trainer's path), with random weights of ``arch`` instead of a checkpoint."""
    from vidtune.build import build_from_config

    return build_from_config(cfg, device, init="random", arch=arch)


def gpu_window(cfg, arch, shape, dev, plan, *, warmup: int = 3, steps: int = 10) -> dict:
    """Full training steps on the GPU: ``bench_model``, AdamW; a synchronised timed window."""
    from vidtune.runtime import dtype as to_dtype

    dtype = to_dtype(cfg.model.dtype)
    model = bench_model(cfg, arch, "cuda").model
    routes = cfg.tread.resolve(len(model.blocks))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    f, h, w = shape.latent
    b = cfg.train.batch_size
    x = torch.randn(b, arch.in_channels, f, h, w, device="cuda", dtype=dtype)
    target = torch.randn_like(x)
    t = torch.full((b,), 500.0, device="cuda")
    ctx = torch.randn(b, family(cfg.model.family).TEXT_LEN, arch.text_dim, device="cuda", dtype=dtype)
    extra = example_inputs(model, x)
    amp = cfg.train.mixed_precision != "no"
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=DTYPES.get(cfg.train.mixed_precision, dtype), enabled=amp):
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, routes=routes, generator=gen,
                        **extra)
        (out.float() - target.float()).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()  # sync: the window starts with an idle device
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()  # sync: each step's time includes all its kernels
        times.append(time.perf_counter() - t0)
    p20, p50, p80 = _quantiles(times)
    c = plan.counters
    flops = model_flops(c["fwd_flops"], c["bwd_flops"], recompute_flops(plan.sim))
    return {"step_time_s": (p20, p50, p80), "tokens_per_s": c["tokens"] * b / p50,
            "mfu": mfu(flops, p50, dev.bf16_flops), "peak_memory_bytes": torch.cuda.max_memory_allocated()}
