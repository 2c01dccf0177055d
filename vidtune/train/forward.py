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


FORWARDS: dict[str, Callable] = {"wan": wan_forward}


def training_forward(family: str) -> Callable:
    """The training forward of ``family`` (``model.family`` in the config)."""
    try:
        return FORWARDS[family]
    except KeyError:
        raise ValueError(f"model family {family!r} has no training forward yet (trainable: "
                         f"{', '.join(FORWARDS)})") from None
