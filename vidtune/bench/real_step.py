"""Real runs under the counters: what the planner and the projections are checked against.

``real_step`` builds the config's model for real with ``vidtune.build`` (random weights of the
given architecture: adapter, checkpointing, chunked FF; no offload or int8 on the CPU, see
``real_config``), runs one training step (forward with TREAD, flow-matching-style MSE loss,
backward, AdamW step) under the counters, and reports its FLOPs, bytes materialised and peak.
The peak includes what was held before the step (weights, inputs), so it is comparable with the
planner's step peak. Counts depend only on shapes and the op sequence: identical on every
machine and thread count.
"""
from __future__ import annotations

import torch

from vidtune.build import build_from_config
from vidtune.config import Config, override
from vidtune.measure.counters import counting
from vidtune.models import example_inputs, family


def real_config(cfg: Config) -> Config:
    """The config the CPU measures: block offload on a CPU keeps the same bytes in the same RAM
    (the planner says so), so the real step runs resident."""
    if cfg.memory.offload.type == "none":
        return cfg
    return override(cfg, ['memory.offload.type="none"'], "<real step>")


def real_step(cfg: Config, arch, latent, seed: int = 0) -> dict:
    """Counters of one real training step of ``arch`` at ``latent`` = (frames, h, w) on the CPU."""
    cfg = real_config(cfg)
    model = build_from_config(cfg, "cpu", init="random", arch=arch).model
    f, h, w = latent
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, arch.in_channels, f, h, w, generator=g)
    target = torch.randn(b, arch.out_channels, f, h, w, generator=g)
    t = torch.full((b,), 500.0)
    ctx = torch.randn(b, family(cfg.model.family).TEXT_LEN, arch.text_dim, generator=g)
    extra = example_inputs(model, x)
    routes = cfg.tread.resolve(len(model.blocks))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    existing = [*model.parameters(), *model.buffers(), x, target, t, ctx, *extra.values()]
    with counting(existing) as c:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, routes=routes,
                    generator=torch.Generator().manual_seed(0), **extra)
        loss = (out.float() - target.float()).pow(2).mean()
        c.mark("fwd")
        loss.backward()
        c.mark("bwd")
        opt.step()
    held = sum(p.numel() * p.element_size() for p in existing)
    fwd, bwd = c.marks[0], c.marks[1]
    return dict(peak_bytes=held + c.peak_live_bytes, fwd_flops=fwd.flops, bwd_flops=bwd.flops - fwd.flops,
                materialized_bytes=bwd.materialized_bytes)  # fwd+bwd, as the planner counts


# The LoRA module set of the saved-for-backward comparison: attention and both feed-forward linears.
SAVED_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


def lora_pair(spec: dict, targets: list[str] | None = None):
    """(vidtune model, diffusers ``WanTransformer3DModel``, (x, target, t, ctx)) for a ``[timed]``
    spec of a suite: the same base and peft LoRA weights (rank ``lora_rank`` on ``targets``,
    default q/k/v/out), fp32 on the CPU, vidtune through the trainer's build path without
    checkpointing (diffusers trains without it here)."""
    from diffusers import WanTransformer3DModel
    from peft import inject_adapter_in_model

    from vidtune.adapters.lora import lora_config
    from vidtune.build import build_training_model
    from vidtune.config import AdapterConfig, CompileConfig, MemoryConfig, ModelConfig
    from vidtune.models.wan import WanConfig

    arch = dict(patch_size=(1, 2, 2), num_attention_heads=spec["num_attention_heads"],
                attention_head_dim=spec["attention_head_dim"], in_channels=16, out_channels=16,
                text_dim=spec["text_dim"], freq_dim=spec["freq_dim"], ffn_dim=spec["ffn_dim"],
                num_layers=spec["num_layers"], cross_attn_norm=True)
    adapter = AdapterConfig(rank=spec["lora_rank"], alpha=float(spec["lora_rank"]),
                            **({"target_modules": targets} if targets else {}))
    ours = build_training_model(ModelConfig(dtype="fp32"), adapter, MemoryConfig(gradient_checkpointing=False),
                                CompileConfig(enabled="off"), "cpu", init="random", arch=WanConfig(**arch)).model
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**arch)
    ref.requires_grad_(False)
    lora = lora_config(adapter)
    lora.init_lora_weights = "gaussian"  # non-zero B too, so the adapter path does real work
    inject_adapter_in_model(lora, ref)
    ref.train()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same base and adapter weights
    f, h, w = spec["latent"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, f, h, w, generator=g)
    target = torch.randn(1, 16, f, h, w, generator=g)
    t, ctx = torch.tensor([500.0]), torch.randn(1, spec["text_len"], spec["text_dim"], generator=g)
    return ours, ref, (x, target, t, ctx)


def lora_saved_vs_diffusers(spec: dict, targets: list[str] = SAVED_TARGETS) -> dict:
    """What a LoRA step keeps for backward, vidtune vs diffusers + peft on the same weights: the
    counters' live bytes right after the forward (its output included), by op and (op, shape)."""
    ours, ref, (x, _, t, ctx) = lora_pair(spec, targets)
    out = {}
    for name, m, fwd in (("vidtune", ours, lambda: ours(x, t, ctx)),
                         ("diffusers+peft", ref, lambda: ref(x, t, ctx, return_dict=False)[0])):
        with counting([*m.parameters(), *m.buffers(), x, t, ctx]) as c:
            y = fwd()
            mark = c.mark("forward")
            y.float().pow(2).mean().backward()
        m.zero_grad(set_to_none=True)
        out[name] = mark
    return out
