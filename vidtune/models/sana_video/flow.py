"""Sana Video's training noise schedule: the checkpoint's canonical flow schedule.

SimpleTuner's Sana Video guide: the model trains on the canonical flow-matching schedule of its
checkpoint and ignores user shift settings. Concretely (SimpleTuner's ``sample_flow_sigmas``):
noise levels are drawn uniformly from the discrete training table of a flow-match Euler scheduler
with the checkpoint scheduler's ``num_train_timesteps`` and shift, ``sigma_i = shift s_i / (1 +
(shift - 1) s_i)`` for ``s_i = i / N``, and the model is given ``timestep_i = sigma_i N``. The
shift is the scheduler config's ``shift`` (flow-match Euler) or ``flow_shift`` (the published
checkpoint's flow DPM-Solver: 8.0); SimpleTuner reads ``shift`` only, so on that checkpoint it
falls back to 1.0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

IGNORED = ("shift", "auto_shift")  # train.timestep_sampling values this schedule overrides


def canonical_table(scheduler_config: dict | None) -> tuple[torch.Tensor, int, float]:
    """(sigmas (N,) fp32, N, shift) of the checkpoint's training schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = scheduler_config or {}
    n = int(cfg.get("num_train_timesteps", 1000))
    shift = float(cfg.get("shift", cfg.get("flow_shift", 1.0)))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=shift).sigmas.float(), n, shift


def sigma_sampler(train_cfg, scheduler_config: dict | None, log=print) -> Callable:
    """``draw(batch, generator) -> sigma (batch,)`` on the canonical schedule, and one line saying
    so (a warning when the config asks for a shift it will not get)."""
    sigmas, n, shift = canonical_table(scheduler_config)
    what = (f"Sana Video trains on its checkpoint's canonical flow schedule (uniform over the {n} training "
            f"sigmas of scheduler_config.json, shift {shift:g})")
    if train_cfg.timestep_sampling in IGNORED:
        log(f"warning: train.timestep_sampling = {train_cfg.timestep_sampling!r} (train.flow_shift "
            f"{train_cfg.flow_shift:g}) is ignored: {what}")
    else:
        log(f"timesteps: {what}; train.timestep_sampling is not used")

    def draw(batch: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=generator.device)
        return sigmas.to(u.device)[(u * n).long().clamp_(max=n - 1)]

    return draw
