"""The model call of one training micro-step, per model family.

The trainer draws the noise and the noise levels (from its flow generator, so the draws do not
depend on the family); a family's function builds the model's inputs from the batch (cached
latents, text, and whatever conditioning was cached beside the latents in ``batch.cond``), calls
the model and returns ``(prediction, target, weight)``: the flow-matching target and the loss
weight, broadcastable to the prediction (None: every element counts; a mask leaves out what the
model is given rather than asked for, e.g. a clean conditioning frame).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .flow import noisy_input


def unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


def wan_forward(model, batch, noise: torch.Tensor, sigma: torch.Tensor, *, routes, generator, x_t=None,
                **model_kwargs):
    """Wan: text-to-video denoises the whole clip; image-to-video adds the conditioning cached
    beside the latents (``vidtune.data.conditioning``), as WanImageToVideoPipeline feeds it.
    ``x_t`` replaces the noised latents as the input (scheduled sampling); ``model_kwargs`` go to
    the model call (``capture_hidden`` for CREPA, which then returns ``(prediction, {block: hidden})``)."""
    noised, target, timestep = noisy_input(batch.latents, noise, sigma)
    x_in, timestep, weight, keep = i2v_model_input(noised if x_t is None else x_t, timestep, batch.cond,
                                                   unwrapped(model).config.patch_size)
    image = batch.cond.get("image_embeds")
    if image is not None:  # (B, images, tokens, D): one CLIP context per conditioning image
        image = image.flatten(0, 1)
    pred = model(x_in, timestep, batch.prompt_embeds, image, routes=routes, force_keep=keep, generator=generator,
                 **model_kwargs)
    return pred, target, weight


def i2v_model_input(x_t: torch.Tensor, timestep: torch.Tensor, cond: dict, patch):
    """(model input, timestep, loss weight, tokens TREAD must keep) of noisy latents ``x_t``.

    ``condition`` (Wan I2V: mask + first-frame latents) is concatenated on channels.
    ``first_frame`` (TI2V-5B, diffusers' expand_timesteps) replaces latent frame 0 by the clean
    first-frame latent, whose tokens get t = 0 and stay out of the loss; TREAD keeps them, so
    every routed block still sees the conditioning."""
    if "condition" in cond:
        return torch.cat([x_t, cond["condition"].to(x_t.dtype)], dim=1), timestep, None, None
    if "first_frame" not in cond:
        return x_t, timestep, None, None
    mask = torch.ones_like(x_t[:, :1])
    mask[:, :, 0] = 0
    x_in = (1 - mask) * cond["first_frame"].to(x_t.dtype) + mask * x_t
    tokens = mask[:, 0, :, ::patch[1], ::patch[2]].flatten(1)  # (B, F' x H'/2 x W'/2) in the model's order
    per_token = tokens * timestep.view(-1, 1).to(tokens.dtype)
    return x_in, per_token.float(), mask, tokens == 0


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
        pt, ph, pw = unwrapped(model).config.patch_size
        cells = torch.nn.functional.max_pool2d(batch.cond["loss_mask"].flatten(0, 2).float(), (ph, pw)) > 0
        force_keep = cells.flatten(1).repeat(1, x_t.shape[2] // pt)  # (B, tokens): frame-major, like the patches
    pred = model(x_t, batch.prompt_embeds, timestep, encoder_attention_mask=batch.prompt_mask, routes=routes,
                 force_keep=force_keep, generator=generator)
    return pred, target, weight


FORWARDS: dict[str, Callable] = {"wan": wan_forward, "wan_s2v": wan_s2v_forward, "sana_video": sana_video_forward}


def supports(forward: Callable, keyword: str) -> bool:
    """Whether ``forward`` takes ``keyword`` (by name or through ``**kwargs``)."""
    params = inspect.signature(forward).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def training_forward(family: str) -> Callable:
    """The training forward of ``family`` (``model.family`` in the config)."""
    try:
        return FORWARDS[family]
    except KeyError:
        raise ValueError(f"model family {family!r} has no training forward yet (trainable: "
                         f"{', '.join(FORWARDS)})") from None
