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


def sana_video_forward(model, batch, noise: torch.Tensor, sigma: torch.Tensor, *, routes, generator):
    """Sana Video, text-to-video or, when the batch carries ``image_latents`` (I2V flavours),
    image-to-video as SanaImageToVideoPipeline conditions it: the clean image latent in frame 0
    with timestep 0 there, the later frames noised, the loss over frames 1 onward. A cached
    ``loss_mask`` (B, 1, 1, h, w) weights the loss per latent cell, and its tokens are never
    routed around by TREAD."""
    x_t, target, timestep = noisy_input(batch.latents, noise, sigma)
    weight = batch.cond.get("loss_mask")
    if "image_latents" in batch.cond:
        x_t = torch.cat([batch.cond["image_latents"].to(x_t.dtype), x_t[:, :, 1:]], dim=2)
        f = x_t.shape[2]
        timestep = timestep[:, None].expand(-1, f).clone()
        timestep[:, 0] = 0.0  # per latent frame: the model sees frame 0 as clean
        frames = torch.ones(1, 1, f, 1, 1, device=x_t.device)
        frames[:, :, 0] = 0.0
        weight = frames if weight is None else weight * frames
    force_keep = None
    if "loss_mask" in batch.cond and routes:
        pt, ph, pw = model.config.patch_size
        cells = torch.nn.functional.max_pool2d(batch.cond["loss_mask"].flatten(0, 2).float(), (ph, pw)) > 0
        force_keep = cells.flatten(1).repeat(1, x_t.shape[2] // pt)  # (B, tokens): frame-major, like the patches
    pred = model(x_t, batch.prompt_embeds, timestep, encoder_attention_mask=batch.prompt_mask, routes=routes,
                 force_keep=force_keep, generator=generator)
    return pred, target, weight


FORWARDS: dict[str, Callable] = {"wan": wan_forward, "sana_video": sana_video_forward}


def training_forward(family: str) -> Callable:
    """The training forward of ``family`` (``model.family`` in the config)."""
    try:
        return FORWARDS[family]
    except KeyError:
        raise ValueError(f"model family {family!r} has no training forward yet (trainable: "
                         f"{', '.join(FORWARDS)})") from None
