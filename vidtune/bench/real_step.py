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
from vidtune.measure import probes as P
from vidtune.measure.counters import counting
from vidtune.models import example_inputs


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
    t, ctx = torch.full((b,), 500.0), torch.randn(b, P.TEXT_LEN, arch.text_dim, generator=g)
    extra = example_inputs(model, x)
    routes = cfg.tread.resolve(len(model.blocks))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    existing = [*model.parameters(), *model.buffers(), x, target, t, ctx, *extra.values()]
    with counting(existing) as c:
        out = model(x, t, ctx, routes=routes, generator=torch.Generator().manual_seed(0), **extra)
        loss = (out.float() - target.float()).pow(2).mean()
        c.mark("fwd")
        loss.backward()
        c.mark("bwd")
        opt.step()
    held = sum(p.numel() * p.element_size() for p in existing)
    fwd, bwd = c.marks[0], c.marks[1]
    return dict(peak_bytes=held + c.peak_live_bytes, fwd_flops=fwd.flops, bwd_flops=bwd.flops - fwd.flops,
                materialized_bytes=bwd.materialized_bytes)  # fwd+bwd, as the planner counts
