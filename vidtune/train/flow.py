"""Rectified flow / flow matching for Wan: noise levels, noisy input, target, loss.

Conventions of diffusers' ``FlowMatchEulerDiscreteScheduler`` as WanPipeline uses it:
``x_t = (1 - sigma) * x0 + sigma * noise``, the model predicts ``noise - x0``, and it is given
``timestep = sigma * 1000``.
"""
from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
# auto_shift: diffusers' calculate_shift line (as SimpleTuner uses it), over per-frame tokens.
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift diffusers applies: more samples at high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def auto_shift(tokens_per_frame: int) -> float:
    """Resolution-dependent shift exp(mu), mu linear in the spatial token count of one frame.

    At 832x480 (52 x 30 = 1560 tokens per frame) this gives about 2.06; per frame, so clip
    length does not change it.
    """
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    mu = BASE_SHIFT + m * (tokens_per_frame - BASE_SEQ_LEN)
    return math.exp(mu)


def sample_sigmas(batch: int, method: str, generator: torch.Generator, *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift: float = 3.0, tokens_per_frame: int | None = None) -> torch.Tensor:
    """(batch,) fp32 noise levels in (0, 1), drawn on the generator's device."""
    dev = generator.device
    if method == "logit_norm":
        z = torch.randn(batch, generator=generator, device=dev) * logit_std + logit_mean
        return torch.sigmoid(z)
    u = torch.rand(batch, generator=generator, device=dev)
    if method == "uniform":
        return u
    if method == "shift":
        return shift_sigmas(u, shift)
    if method == "auto_shift":
        if tokens_per_frame is None:
            raise ValueError("auto_shift needs tokens_per_frame")
        return shift_sigmas(u, auto_shift(tokens_per_frame))
    raise ValueError(f"unknown timestep sampling {method!r}")


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """(x_t, target, timestep) for latents x0 (B, C, F, H, W) and sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    return x_t, noise - x0, sigma * NUM_TRAIN_TIMESTEPS


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32 (a bf16 mean over millions of elements loses digits); with
    ``weight`` (broadcastable to ``pred``, e.g. a 0/1 mask) the weighted mean."""
    if weight is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    w = weight.float().expand_as(pred)
    return ((pred.float() - target.float()).square() * w).sum() / w.sum().clamp_min(1e-12)
