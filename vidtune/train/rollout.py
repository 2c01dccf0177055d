"""Scheduled sampling (rollout), experimental: train on the model's own denoising trajectory.

Teacher forcing always gives the model an exactly noised clip ``x_t = (1 - s) x0 + s eps``; at
inference it sees its own, slightly wrong, latents (exposure bias). With probability
``rollout.probability`` per sample, the training input at the drawn noise level ``s`` is instead
produced by the model itself, as SimpleTuner's SCHEDULED_SAMPLING.md describes: noise the clip
(same ``eps``) at a higher level and take ``k`` sampler steps down to ``s`` with the current
weights, without autograd, in eval mode (no TREAD routing, no dropout, like sampling).

The sampler is flow-matching Euler (``x <- x + (s_next - s) * v``, fp32, as diffusers'
FlowMatchEulerDiscreteScheduler steps) on the inference grid ``shift(linspace(1, 0, sampler_steps
+ 1))``: the ``k`` (uniform in 1..``max_step_offset``) grid levels above ``s`` and then ``s``
itself, so the timestep distribution of training is unchanged; a rollout that would start above
the grid's top starts at pure noise. The target stays the flow-matching target ``eps - x0``
(SimpleTuner replaces only the input too). Draws come from the ``rollout`` generator (saved in
checkpoints), never from the noise generator: with probability 0 the step is bitwise the plain one.
"""
from __future__ import annotations

import torch

from ..config import RolloutConfig
from ..runtime import seed_for
from .flow import noisy_input, shift_sigmas


def rollout_grid(cfg: RolloutConfig) -> torch.Tensor:
    """The sampler's noise levels, 1 -> 0 (fp32)."""
    return shift_sigmas(torch.linspace(1.0, 0.0, cfg.sampler_steps + 1), cfg.shift)


def rollout_paths(sigma: torch.Tensor, steps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, K + 1) noise levels from each sample's start down to its ``sigma``: the ``steps[i]`` grid
    levels above ``sigma[i]`` then ``sigma[i]``; shorter paths start with repeats of their first level
    (zero-length steps), K = the longest path."""
    paths = []
    for s, k in zip(sigma.tolist(), steps.tolist()):
        above = grid[grid > s]  # descending, above[0] = 1.0
        levels = above[max(0, len(above) - k):].tolist() + [s]
        paths.append(levels)
    longest = max(len(p) for p in paths)
    return torch.tensor([[p[0]] * (longest - len(p)) + p for p in paths], dtype=torch.float32)


class Rollout:
    def __init__(self, cfg: RolloutConfig, seed: int):
        self.cfg = cfg
        self.generator = torch.Generator("cpu").manual_seed(seed_for(seed, "rollout"))
        self.grid = rollout_grid(cfg)

    def draw(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(which samples roll out (B,) bool, their step counts (B,))."""
        on = torch.rand(batch, generator=self.generator) < self.cfg.probability
        steps = torch.randint(1, self.cfg.max_step_offset + 1, (batch,), generator=self.generator)
        return on, steps

    @torch.no_grad()
    def input(self, forward, model, batch, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """The training input for this micro-batch: None when no sample rolls out (the plain step),
        else the rolled-out latents where drawn and the plainly noised ones elsewhere."""
        on, steps = self.draw(sigma.shape[0])
        if not bool(on.any()):
            return None
        x0 = batch.latents
        paths = rollout_paths(sigma.float().cpu(), steps, self.grid).to(x0.device)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        start = paths[:, 0].view(shape)
        x = (1 - start) * x0.float() + start * noise.float()  # the clip noised at the rollout's start
        was_training = model.training
        model.eval()  # sampling conditions: every token, no dropout
        try:
            for j in range(paths.shape[1] - 1):
                s, s_next = paths[:, j], paths[:, j + 1]
                v = forward(model, batch, noise, s, x_t=x.to(x0.dtype), routes=(), generator=None)[0]
                x = x + (s_next - s).view(shape) * v.float()
        finally:
            model.train(was_training)
        plain = noisy_input(x0, noise, sigma)[0]
        return torch.where(on.to(x0.device).view(shape), x.to(x0.dtype), plain)

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
