"""Model FLOPs utilisation: the one definition the benchmarks, the GPU check and the trainer share.

    MFU = model FLOPs of one step / step time / the device's dense peak FLOP/s

Model FLOPs are the counters' FLOPs of a step (torch's flop counter over a real or fake-tensor
run: ``vidtune.measure.counters``, replayed to full depth by the planner) without the work that
memory savers repeat: a checkpointed block runs its forward twice and chunked FF recomputes each
chunk in backward; that buys memory, not progress. Count the step of :func:`flops_config` (the same
config with both savers off) and nothing needs subtracting; :func:`recompute_flops` gives the
checkpointing share of an already counted step (it cannot see chunked FF's, which stays inside a
block). TREAD needs nothing special: routed blocks are counted at the tokens they keep, so a routed
step has fewer model FLOPs, and its MFU says how well the work it really does runs.
"""
from __future__ import annotations

from vidtune.config import Config, override


def flops_config(cfg: Config) -> Config:
    """``cfg`` with gradient checkpointing and chunked FF off: its counted FLOPs are model FLOPs."""
    return override(cfg, ["memory.gradient_checkpointing=false", "memory.chunked_ff.enabled=false"],
                    "<model FLOPs>")


def recompute_flops(sim: dict) -> int:
    """Forward FLOPs that checkpointed blocks recompute, from a planner replay (``Plan.sim``)."""
    return sum(flops for (_, ckpt), _, _, flops in sim["block_calls"] if ckpt)


def model_flops(fwd_flops: int, bwd_flops: int, recompute: int = 0) -> int:
    return fwd_flops + bwd_flops - recompute


def mfu(flops: float, step_s: float, peak_flops: float) -> float | None:
    """Share of ``peak_flops`` (FLOP/s) that ``flops`` model FLOPs per ``step_s`` seconds reach;
    None without a peak (a GPU no device class describes) or a step time."""
    if not peak_flops or not step_s or step_s <= 0:
        return None
    return flops / step_s / peak_flops
