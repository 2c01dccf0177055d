"""Validation sampling for Sana Video: ``SanaVideoPipeline.__call__`` (and, with ``image_latents``,
``SanaImageToVideoPipeline.__call__``) step for step, with our transformer and the pipeline's own
scheduler (the class and settings of its ``scheduler/scheduler_config.json``; the published
checkpoint's is a flow DPM-Solver with shift 8).

- noise: ``randn_tensor`` of shape (B, C, (F-1)//4+1, H//8, W//8) in fp32 from a
  ``torch.Generator(generator_device).manual_seed(seed)``, as the pipeline's ``prepare_latents``;
- ``scheduler.set_timesteps(steps)``; CFG (``guidance > 1``) batches [negative, prompt] in one
  forward and combines ``uncond + guidance * (cond - uncond)``; ``scheduler.step`` on the fp32
  latents with the pipeline's extra step arguments (its generator, when ``step`` takes one);
- I2V: the clean image latent in frame 0, timestep 0 there (our per-frame form of the pipeline's
  per-token timesteps), only frames 1 onward stepped.
The pipeline's resolution binning is not applied: the requested size is sampled as given.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .sampler import _model_dtype, check_sampling, decode, initial_latents

# The published checkpoint's scheduler (diffusers' convert_sana_video_to_diffusers.py), used when
# the pipeline directory has no scheduler/ to read.
SANA_SCHEDULER_CONFIG = dict(_class_name="DPMSolverMultistepScheduler", flow_shift=8.0, use_flow_sigmas=True,
                             prediction_type="flow_prediction")


def pipeline_scheduler(config: dict | None):
    """A fresh scheduler of the class and settings ``config`` names (diffusers' own from_config)."""
    import diffusers

    config = config or SANA_SCHEDULER_CONFIG
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"scheduler_config names {config.get('_class_name')!r}, not a diffusers scheduler")
    return cls.from_config(config)


@torch.no_grad()
def sample_sana(
    transformer,
    *,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
    scheduler_config: dict | None = None,
    image_latents: torch.Tensor | None = None,
    generator_device: str = "cpu",
    device: str | torch.device | None = None,
    vae=None,
    output_type: str = "latent",
    callback: Callable[[int, torch.Tensor], None] | None = None,
):
    """Sample videos for ``prompt_embeds`` (B, L, D) with their ``prompt_mask`` (B, L) (as
    ``SanaVideoPipeline.encode_prompt`` returns them). ``image_latents`` (B, C, 1, h, w), normalised
    like the training latents: image-to-video. ``output_type``: "latent" (fp32 latents) or "video"
    (uint8 frames (B, F, 3, H, W), decoded with ``vae``)."""
    cfg_on = check_sampling(output_type, vae, guidance, negative_prompt_embeds)
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = _model_dtype(transformer)
    batch = prompt_embeds.shape[0]
    embeds, mask = prompt_embeds.to(device), prompt_mask.to(device)
    if cfg_on:
        neg, neg_mask = (negative_prompt_embeds.to(device), negative_mask.to(device))
        if neg.shape[0] != batch:
            neg, neg_mask = neg.expand(batch, *neg.shape[1:]), neg_mask.expand(batch, -1)
        embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
    embeds = embeds.to(dtype)

    scheduler = pipeline_scheduler(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator(generator_device).manual_seed(int(seed))
    latents = initial_latents(batch, transformer.config.in_channels, num_frames, height, width, seed, device,
                              vae=vae, generator=generator)
    # the pipeline's prepare_extra_step_kwargs: the same generator, when the step takes one
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if image_latents is not None:
        latents[:, :, :1] = image_latents.to(device, latents.dtype)

    was_training = transformer.training
    transformer.eval()  # no TREAD routes, no dropout while sampling
    try:
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents] * 2) if cfg_on else latents
            timestep = t.expand(x.shape[0])
            if image_latents is not None:  # per latent frame: frame 0 is clean
                timestep = timestep[:, None].expand(-1, x.shape[2]).clone()
                timestep[:, 0] = 0
            pred = transformer(x.to(dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep=timestep).float()
            if cfg_on:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            if image_latents is None:
                latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
            else:
                stepped = scheduler.step(pred[:, :, 1:], t, latents[:, :, 1:], **extra, return_dict=False)[0]
                latents = torch.cat([latents[:, :, :1], stepped], dim=2)
            if callback is not None:
                callback(i, latents)
    finally:
        transformer.train(was_training)
    return latents if output_type == "latent" else decode(vae, latents)
