"""Parts "parity", "step" and "int8": our Wan transformer on the device.

parity: our Wan vs diffusers' ``WanTransformer3DModel`` on the same weights (a small config, full
fine-tune so every parameter has a gradient), both in bf16 the way diffusers loads a checkpoint
(``from_pretrained(torch_dtype=bf16)`` keeps its fp32 modules), against diffusers in fp32:
relative error (L2, whole tensor) of the output, the input grad and the parameter grads, ours at
most 2x diffusers' own bf16 error.

step: the Wan 2.1 1.3B architecture (random weights) at 832x480x81 (32,760 tokens), bf16 weights,
bf16 autocast, LoRA rank 16, torch AdamW (the trainer's default), no checkpointing: diffusers +
peft vs vidtune on the same weights, then vidtune + TREAD 0.5 over layers 2..-2, + chunked FF
(4096 tokens), + ``apply_compile``; every model comes from ``vidtune.build`` except the diffusers
one. Steps of all variants are interleaved (drift hits them alike). Reported: median s/step and
its spread, the ratio to diffusers, MFU (``vidtune.measure.mfu``: the planner's counted FLOPs of
the step without recompute, over the device class's bf16 peak), the step's peak memory (this
model's weights, optimizer state and inputs plus the peak allocated above them during a step) next
to the planner's predicted step peak.

int8: torchao int8 weight-only base vs bf16 on the same 1.3B LoRA step with checkpointing (the
24 GB configuration): step time, peak, weight bytes, and the output SNR of int8 vs bf16.
"""
from __future__ import annotations

import dataclasses
import tempfile

import torch

from .common import built_on, free, gib, median, peak_above, randn, spread, tensor_bytes, time_once

PARITY = {
    "toy": dict(arch=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=40, num_layers=2, text_dim=24,
                          freq_dim=16, in_channels=4, out_channels=4, rope_max_seq_len=64),
                latent=(2, 4, 3, 4, 6), text_len=7),
    "full": dict(arch=dict(num_attention_heads=4, attention_head_dim=128, ffn_dim=2048, num_layers=4, text_dim=512,
                           freq_dim=256, in_channels=16, out_channels=16),
                 latent=(2, 16, 9, 30, 52), text_len=512),
}
# text_len: Wan pads prompts to 512 tokens (the planner's probes too); the dry run uses fewer.
# backend: the dry run's compiled variant only traces (Dynamo, eager backend) to stay cheap.
STEP = {
    "toy": dict(arch=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=4, text_dim=32,
                          freq_dim=16, in_channels=16, out_channels=16),
                resolution=64, frames=1, text_len=16, chunk=16, reps=1, backend="eager"),
    "full": dict(arch=None, resolution=480, frames=81, text_len=512, chunk=4096, reps=3, backend="inductor"),
}
ROUTE = [{"selection_ratio": 0.5, "start_layer": 2, "end_layer": -2}]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _diffusers_kwargs(arch) -> dict:
    return {k: v for k, v in arch.to_dict().items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# parity

def parity(ctx) -> None:
    from diffusers import WanTransformer3DModel

    from vidtune.build import build_training_model
    from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig
    from vidtune.models.wan import WanConfig

    sz = PARITY[ctx.size]
    arch = WanConfig(**sz["arch"])
    torch.manual_seed(0)
    ref32 = WanTransformer3DModel(**_diffusers_kwargs(arch))
    with tempfile.TemporaryDirectory() as d:  # diffusers' own bf16 loading (fp32-kept modules)
        ref32.save_pretrained(d)
        ref16 = WanTransformer3DModel.from_pretrained(d, torch_dtype=torch.bfloat16)
    ours = build_training_model(ModelConfig(dtype="bf16"), AdapterConfig(type="full"),
                                MemoryConfig(gradient_checkpointing=False), CompileConfig(enabled="off"), ctx.device,
                                init="random", arch=arch).model
    ours.load_state_dict(ref16.state_dict(), strict=True)
    b, c, f, h, w = sz["latent"]
    x = randn((b, c, f, h, w), ctx.device, seed=1)
    t = torch.tensor([900.0, 37.5][:b], device=ctx.device)
    text = randn((b, sz["text_len"], arch.text_dim), ctx.device, seed=2)

    def run(model, dtype, diffusers: bool):
        model.to(ctx.device).train()
        xi = x.to(dtype).clone().requires_grad_()
        out = model(xi, t, text.to(dtype), return_dict=False)[0] if diffusers else model(xi, t, text.to(dtype))
        (out.float() * randn(out.shape, ctx.device, seed=3)).sum().backward()  # every element its own grad
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach().double(), xi.grad.double(), grads

    exact = run(ref32, torch.float32, True)
    theirs = run(ref16, torch.bfloat16, True)
    mine = run(ours, torch.bfloat16, False)
    for i, what in enumerate(("output", "input grad")):
        e_ours, e_ref = _rel(mine[i], exact[i]), _rel(theirs[i], exact[i])
        ctx.row(f"{what}, bf16", e_ours <= 2 * e_ref + 1e-7, vidtune_rel_err=e_ours, diffusers_rel_err=e_ref,
                ratio=e_ours / max(e_ref, 1e-30))
    names = sorted(exact[2])
    missing = [n for n in names if n not in mine[2] or n not in theirs[2]]
    ratios = {n: _rel(mine[2][n], exact[2][n]) / max(_rel(theirs[2][n], exact[2][n]), 1e-30) for n in names
              if n not in missing}
    flat = {k: torch.cat([g[2][n].flatten() for n in names if n not in missing]) for k, g in
            (("mine", mine), ("theirs", theirs), ("exact", exact))}
    e_ours, e_ref = _rel(flat["mine"], flat["exact"]), _rel(flat["theirs"], flat["exact"])
    worst = max(ratios, key=ratios.get)
    ctx.row("parameter grads, bf16 (all as one vector)", e_ours <= 2 * e_ref + 1e-7 and not missing,
            vidtune_rel_err=e_ours, diffusers_rel_err=e_ref, ratio=e_ours / max(e_ref, 1e-30),
            tensors=len(names), tensors_over_2x=sum(r > 2 for r in ratios.values()),
            worst_tensor=f"{worst} ({ratios[worst]:.2f}x)", missing=", ".join(missing) or None)


# ---------------------------------------------------------------------------------------------
# the full-size step

def step_config(sz: dict, *, tread=False, chunk=False, compile_=False, ckpt=False, int8=False):
    """The run config of a check workload: the trainer's sections, validated by its loader."""
    from vidtune.config import config_from_dict

    data = {
        "model": {"flavour": "t2v-480p-1.3b-2.1", "dtype": "bf16", "base_precision": "int8" if int8 else "bf16",
                  "quantize_via": "device"},
        "adapter": {"type": "lora", "rank": 16},
        "train": {"batch_size": 1, "mixed_precision": "bf16", "optimizer": "adamw"},
        "memory": {"gradient_checkpointing": ckpt, "chunked_ff": {"enabled": chunk, "chunk_size": sz["chunk"]}},
        "compile": {"enabled": "on" if compile_ else "off", "backend": sz["backend"]},
        "tread": {"routes": ROUTE if tread else []},
        "dataset": [{"id": "gpu-check", "path": "(synthetic: the check needs no data)", "resolution": sz["resolution"],
                     "resolution_type": "pixel", "num_frames": sz["frames"]}],
    }
    return config_from_dict(data, "<gpu check>")


class _Workload:
    """A built model, its optimizer and one training step on shared inputs."""

    def __init__(self, model, call, inputs):
        self.model, self.call = model, call
        self.x, self.t, self.text, self.target = inputs
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.times, self.peaks, self.first_s, self.first_loss = [], [], None, None

    def step(self):
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16):
            out = self.call(self.model, self.x, self.t, self.text)
        loss = (out.float() - self.target.float()).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, first: bool = False):
        peak = []
        with peak_above(self.x.device, peak):
            s, loss = time_once(self.step, self.x.device)
        if first:
            self.first_s, self.first_loss = s, loss.item()
        else:
            self.times.append(s)
            self.peaks.append(peak[0])

    def static_bytes(self) -> int:
        """What the step holds before it starts: weights, optimizer state, inputs."""
        state = [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return tensor_bytes(self.model.parameters()) + tensor_bytes(state) + tensor_bytes(
            [self.x, self.t, self.text, self.target])


def _setup(ctx, sz):
    """(arch, shape, inputs, planner device class, GPU peak bf16 FLOP/s or None)."""
    from vidtune.build import architecture
    from vidtune.measure import devices as D
    from vidtune.models.wan import WanConfig
    from vidtune.planner import train_shape

    cfg = step_config(sz)
    arch = WanConfig(**sz["arch"]) if sz["arch"] else architecture(cfg.model)
    shape = train_shape(cfg)
    f, h, w = shape.latent
    dt = torch.bfloat16
    inputs = (randn((1, arch.in_channels, f, h, w), ctx.device, dt, 1), torch.full((1,), 500.0, device=ctx.device),
              randn((1, sz["text_len"], arch.text_dim), ctx.device, dt, 2),
              randn((1, arch.out_channels, f, h, w), ctx.device, dt, 3))
    cls = D.gpu_class(torch.cuda.get_device_name(ctx.device)) if ctx.cuda else None
    plan_device = (cls.name if cls else "h100") if ctx.cuda else "cpu"
    return arch, shape, inputs, plan_device, (cls.bf16_flops if cls else None)


def _build(cfg, arch, device, ref=None):
    """The config's model through ``vidtune.build`` (``bench_model``), with ``ref``'s weights."""
    from vidtune.bench.timing import bench_model

    torch.manual_seed(0)
    with built_on(device):
        model = bench_model(cfg, arch, device).model
    if ref is not None:
        model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _diffusers_lora(cfg, arch, device):
    """diffusers' WanTransformer3DModel with a peft LoRA of the same targets, bf16 weights with
    diffusers' fp32-kept modules, fp32 adapter weights (as the trainer keeps them)."""
    from diffusers import WanTransformer3DModel
    from peft import inject_adapter_in_model

    from vidtune.adapters.lora import lora_config
    from vidtune.models import family
    from vidtune.models.load import apply_dtype_policy

    torch.manual_seed(0)
    with built_on(device):
        ref = WanTransformer3DModel(**_diffusers_kwargs(arch))
    apply_dtype_policy(ref, torch.bfloat16, family("wan").KEEP_FP32)
    ref.requires_grad_(False)
    inject_adapter_in_model(lora_config(cfg.adapter), ref)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return ref.train()  # made on the device already


def _interleave(ctx, work: dict, reps: int) -> None:
    """Warm-up (for compiled variants: the compile), then ``reps`` rounds of one step of each.
    A variant whose step fails (e.g. out of memory) is recorded and dropped; the others go on."""
    for first in [True] + [False] * reps:
        for name in list(work):
            failed = False
            try:
                work[name].run(first=first)
            except Exception as e:
                ctx.fail(f"{name}: step", e)
                failed = True
            if failed:  # outside the handler: the traceback no longer holds the step's tensors
                del work[name]
                free(ctx.device)


def step(ctx) -> None:
    from vidtune.config import CompileConfig
    from vidtune.measure.mfu import flops_config, mfu, model_flops
    from vidtune.planner import plan

    sz = STEP[ctx.size]
    arch, shape, inputs, plan_device, peak_flops = _setup(ctx, sz)
    tokens = shape.tokens(arch.patch_size)
    routes = step_config(sz, tread=True).tread.resolve(arch.num_layers)
    gen = torch.Generator(device=ctx.device)

    def plain(m, x, t, c):
        return m(x, t, c)

    def routed(m, x, t, c):
        return m(x, t, c, routes=routes, generator=gen.manual_seed(0))

    cfgs = {"vidtune": step_config(sz), "vidtune+tread0.5": step_config(sz, tread=True),
            "vidtune+chunked_ff": step_config(sz, chunk=True), "vidtune+compile": step_config(sz, compile_=True)}
    work, ref = {}, None
    with ctx.guard("diffusers+peft: build"):
        ref = _diffusers_lora(cfgs["vidtune"], arch, ctx.device)
        work["diffusers+peft"] = _Workload(ref, lambda m, x, t, c: m(x, t, c, return_dict=False)[0], inputs)
    for name, cfg in cfgs.items():
        with ctx.guard(f"{name}: build"):
            work[name] = _Workload(_build(cfg, arch, ctx.device, ref), routed if cfg.tread.routes else plain, inputs)
    _interleave(ctx, work, sz["reps"])

    plans, flops, predicted = {}, {}, {}

    def planned(cfg):  # the planner does not model compile: equal configs otherwise share a plan
        key = repr(dataclasses.replace(cfg, compile=CompileConfig()))
        if key not in plans:
            plans[key] = plan(cfg, plan_device, search=False, arch=arch)
        return plans[key]

    for name, cfg in cfgs.items():
        with ctx.guard(f"{name}: planner"):
            predicted[name] = planned(cfg).phase("training step").peak
            c = planned(flops_config(cfg)).counters
            flops[name] = model_flops(c["fwd_flops"], c["bwd_flops"])
    flops["diffusers+peft"] = flops.get("vidtune")  # the same math on the same shapes
    base = median(work["diffusers+peft"].times) if "diffusers+peft" in work else None
    for name, w in work.items():
        s = median(w.times)
        peak = max(w.peaks) if w.peaks[0] is not None else None
        measured = w.static_bytes() + peak if peak is not None else None
        values = dict(s_step=s, spread=spread(w.times), vs_diffusers=s / base if base else None, tokens_s=tokens / s,
                      mfu_pct=100 * mfu(flops[name], s, peak_flops) if peak_flops and flops.get(name) else None,
                      peak_GiB=gib(measured), plan_GiB=gib(predicted.get(name)),
                      plan_over_measured=predicted[name] / measured if measured and name in predicted else None)
        if name == "vidtune+compile":
            values["compile_s"] = w.first_s - s
        if name == "vidtune" and base:  # same weights and inputs: the same loss up to bf16 rounding
            ref_loss = work["diffusers+peft"].first_loss
            values["first_loss_rel_diff"] = abs(w.first_loss - ref_loss) / abs(ref_loss)
        ctx.row(name, None, tokens=tokens, **values)
    del work, ref
    free(ctx.device)


def int8(ctx) -> None:
    from vidtune.memory.quant import weight_bytes

    sz = STEP[ctx.size]
    arch, shape, inputs, _, _ = _setup(ctx, sz)

    def plain(m, x, t, c):
        return m(x, t, c)

    work = {}
    for name, quant in (("bf16 base", False), ("int8 base", True)):
        with ctx.guard(f"{name}: build"):
            work[name] = _Workload(_build(step_config(sz, ckpt=True, int8=quant), arch, ctx.device), plain, inputs)
    outs = {}
    x, t, text, _ = inputs
    for name, w in work.items():
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            outs[name] = w.model(x, t, text).float()
    _interleave(ctx, work, sz["reps"])
    base = median(work["bf16 base"].times) if "bf16 base" in work else None
    for name, w in work.items():
        s = median(w.times)
        peak = max(w.peaks) if w.peaks[0] is not None else None
        values = dict(s_step=s, spread=spread(w.times), vs_bf16=s / base if base else None,
                      weights_GiB=gib(weight_bytes(w.model)),
                      peak_GiB=gib(w.static_bytes() + peak) if peak is not None else None)
        ok = None
        if name != "bf16 base" and "bf16 base" in outs:
            ref = outs["bf16 base"]
            snr = 10 * torch.log10(ref.pow(2).sum() / (outs[name] - ref).pow(2).sum().clamp_min(1e-30)).item()
            values["output_snr_db"], ok = snr, snr > 20.0  # DESIGN: quantized numerics by SNR > 20 dB
        ctx.row(name, ok, tokens=shape.tokens(arch.patch_size), **values)
