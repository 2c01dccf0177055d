"""The model call of one training micro-step, per model family.

The trainer draws the noise and the noise levels (from its flow generator, so the draws do not
depend on the family); a family's function builds the model's inputs from the batch (cached
latents, text, and whatever conditioning was cached beside the latents in ``batch.cond``), calls
the model and returns ``(prediction, target, weight)``: the flow-matching target and the loss
weight, broadcastable to the prediction (None: every element counts; a mask leaves out what the
model is given rather than asked for, e.g. a clean conditioning frame).
"""
from __future__ import annotations

from typing import Callable

import torch

from .flow import noisy_input


def wan_forward(model, batch, noise: torch.Tensor, sigma: torch.Tensor, *, routes, generator):
    """Wan text-to-video: denoise the whole clip."""
    x_t, target, timestep = noisy_input(batch.latents, noise, sigma)
    pred = model(x_t, timestep, batch.prompt_embeds, routes=routes, generator=generator)
    return pred, target, None


def wan_s2v_forward(model, batch, noise: torch.Tensor, sigma: torch.Tensor, *, routes, generator):
    """Wan S2V (the inputs inference implies; ``vidtune.data.s2v``): the window's first latent is
    its reference frame (clean, at t = 0, outside the loss); a continuation window's first 19 latents
    are its motion frames; the latents after them are denoised with the audio features of their
    frames (``batch.cond["audio"]``, (B, 4F, L, C)), zeroed where the caption was dropped: the
    unconditional branch of CFG drops both. No pose video: the pose embedder adds its bias."""
    from ..models.wan_s2v import MOTION_FRAMES

    latents, audio = batch.latents, batch.cond["audio"]
    lead = latents.shape[2] - audio.shape[1] // 4
    if lead not in (1, MOTION_FRAMES[1]):
        raise ValueError(f"S2V batch: {latents.shape[2]} latents for {audio.shape[1]} audio frames; expected the "
                         f"reference latent (+ {MOTION_FRAMES[1] - 1} motion latents) and 1 latent per 4 frames")
    x_t, target, timestep = noisy_input(latents[:, :, lead:], noise[:, :, lead:], sigma)
    audio = audio * (~batch.dropped).to(audio.dtype).view(-1, 1, 1, 1)
    pred = model(x_t, timestep, batch.prompt_embeds, audio=audio.permute(0, 2, 3, 1),
                 ref_latents=latents[:, :, :1], motion_latents=latents[:, :, :lead] if lead > 1 else None,
                 routes=routes, generator=generator)
    return pred, target, None


FORWARDS: dict[str, Callable] = {"wan": wan_forward, "wan_s2v": wan_s2v_forward}


def training_forward(family: str) -> Callable:
    """The training forward of ``family`` (``model.family`` in the config)."""
    try:
        return FORWARDS[family]
    except KeyError:
        raise ValueError(f"model family {family!r} has no training forward yet (trainable: "
                         f"{', '.join(FORWARDS)})") from None
