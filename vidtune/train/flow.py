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


def _shift_of(method: str, shift: float, tokens_per_frame: int | None) -> float:
    if method == "uniform":
        return 1.0
    if method == "shift":
        return shift
    if method == "auto_shift":
        if tokens_per_frame is None:
            raise ValueError("auto_shift needs tokens_per_frame")
        return auto_shift(tokens_per_frame)
    raise ValueError(f"unknown timestep sampling {method!r}")


def sigma_cdf(sigma: torch.Tensor, method: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
              shift: float = 3.0, tokens_per_frame: int | None = None) -> torch.Tensor:
    """P(drawn noise level <= sigma) under ``sample_sigmas``' distribution, in float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if method == "logit_norm":
        return torch.special.ndtr((torch.logit(s) - logit_mean) / logit_std)
    k = _shift_of(method, shift, tokens_per_frame)
    return s / (k - (k - 1) * s)  # the inverse of shift_sigmas: the uniform draw that lands on sigma


def sigma_icdf(p: torch.Tensor, method: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
               shift: float = 3.0, tokens_per_frame: int | None = None) -> torch.Tensor:
    """The noise level at cumulative probability ``p`` (the inverse of ``sigma_cdf``), float64."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if method == "logit_norm":
        return torch.sigmoid(torch.special.ndtri(p) * logit_std + logit_mean)
    return shift_sigmas(p, _shift_of(method, shift, tokens_per_frame))


def _f32_inside(lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 bounds of [lo, hi): the smallest float32 >= lo and the largest float32 < hi."""
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    if lo32.double() < lo:
        lo32 = torch.nextafter(lo32, torch.tensor(2.0))
    if hi32.double() >= hi:
        hi32 = torch.nextafter(hi32, torch.tensor(-1.0))
    return lo32, hi32


def sample_sigmas(batch: int, method: str, generator: torch.Generator, *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift: float = 3.0, tokens_per_frame: int | None = None,
                  sigma_range: tuple[float, float] | None = None) -> torch.Tensor:
    """(batch,) fp32 noise levels in (0, 1), drawn on the generator's device.

    ``sigma_range = (lo, hi)`` draws from the same distribution truncated to ``lo <= sigma < hi``
    and renormalised (inverse CDF of a uniform draw between the bounds' probabilities), not
    clamped: the shape inside the range is kept. The bounds apply to the final (shifted) level,
    which is what a two-expert boundary compares."""
    dev = generator.device
    if sigma_range is not None:
        kw = dict(logit_mean=logit_mean, logit_std=logit_std, shift=shift, tokens_per_frame=tokens_per_frame)
        a, b = (float(sigma_cdf(x, method, **kw)) for x in sigma_range)
        u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
        s = sigma_icdf(a + u * (b - a), method, **kw).float()
        lo, hi = _f32_inside(*sigma_range)  # float rounding must not cross the boundary
        return torch.minimum(torch.maximum(s, lo.to(dev)), hi.to(dev))
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


def expert_sigma_range(expert: str, boundary: float) -> tuple[float, float]:
    """The noise levels an expert of a two-expert Wan 2.2 owns: the high-noise one (transformer)
    denoises timesteps >= boundary * 1000, as WanPipeline switches, the low-noise one the rest."""
    if expert not in ("high", "low"):
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    return (boundary, 1.0) if expert == "high" else (0.0, boundary)


def draw_expert(generator: torch.Generator, boundary: float, method: str, **kw) -> str:
    """Which expert trains a step when both do: "high" with the probability mass the configured
    distribution (``sample_sigmas``' keywords) puts at or above ``boundary``. Followed by a draw in
    that expert's range, a noise level has the configured distribution and goes to its owner."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return "high" if u >= float(sigma_cdf(boundary, method, **kw)) else "low"
