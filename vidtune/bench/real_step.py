"""Real runs under the counters: what the planner and the projections are checked against.

``real_step`` builds the small model for real (random weights, peft adapter, checkpointing,
chunked FF, TREAD), runs one training step (forward, flow-matching-style MSE loss, backward,
AdamW step) under the counters, and reports its FLOPs, bytes materialised and peak. The peak
includes what was held before the step (weights, inputs), so it is comparable with the
planner's step peak. Counts depend only on shapes and the op sequence: identical on every
machine and thread count.
"""
from __future__ import annotations

import dataclasses

import torch

from vidtune.bench import probes as P
from vidtune.bench.counters import counting


def build_real(arch, cfg, seed: int = 0):
    from vidtune.memory.checkpointing import apply_activation_checkpointing
    from vidtune.models.wan import WanTransformer

    torch.manual_seed(seed)
    model = P.apply_adapter(WanTransformer(arch), P.AdapterSpec.from_config(cfg.adapter)).train()
    mem = cfg.memory
    if mem.gradient_checkpointing:
        apply_activation_checkpointing(model.blocks, mem.gradient_checkpointing_every_n)
    model.set_ff_chunk_size(mem.chunked_ff.chunk_size if mem.chunked_ff.enabled else None)
    return model


def real_step(cfg, arch, latent, seed: int = 0) -> dict:
    """Counters of one real fp32 training step of ``arch`` at ``latent`` = (frames, h, w)."""
    model = build_real(arch, cfg, seed)
    f, h, w = latent
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, arch.in_channels, f, h, w, generator=g)
    target = torch.randn(b, arch.out_channels, f, h, w, generator=g)
    t, ctx = torch.full((b,), 500.0), torch.randn(b, P.TEXT_LEN, arch.text_dim, generator=g)
    routes = [dataclasses.asdict(r) for r in cfg.tread.routes] or None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    existing = [*model.parameters(), *model.buffers(), x, target, t, ctx]
    with counting(existing) as c:
        out = model(x, t, ctx, routes=routes, generator=torch.Generator().manual_seed(0))
        loss = (out.float() - target.float()).pow(2).mean()
        c.mark("fwd")
        loss.backward()
        c.mark("bwd")
        opt.step()
    held = sum(p.numel() * p.element_size() for p in existing)
    fwd, bwd = c.marks[0], c.marks[1]
    return dict(peak_bytes=held + c.peak_live_bytes, fwd_flops=fwd.flops, bwd_flops=bwd.flops - fwd.flops,
                materialized_bytes=bwd.materialized_bytes)  # fwd+bwd, as the planner counts
