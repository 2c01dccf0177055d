"""Image-to-video conditioning, computed once per clip while caching and stored in the clip's
latent cache entry (so the training step still touches only cached tensors).

What is stored is exactly what diffusers' ``WanImageToVideoPipeline`` builds from a first frame
(``prepare_latents`` and ``encode_image``), for the model kinds of ``vidtune.models.wan.WanInputs``:

- ``"concat"`` (Wan 2.1 / 2.2 I2V, 36 input channels): ``condition`` (4 + z, F', H', W'): the
  first-frame mask in latent layout (the first pixel frame stands for the ``vae_temporal`` frames
  of latent frame 0, so latent frame 0 has all four mask channels set) followed by the VAE latents
  of the first frame and zero frames (and the last frame with ``last_image``), normalised like the
  clip's latents. Wan 2.1 adds ``image_embeds`` (images, tokens, D): CLIP's penultimate hidden
  state of the first (and last) frame.
- ``"first_frame"`` (TI2V-5B, per-token timesteps): ``first_frame`` (z, 1, H', W'): the
  normalised VAE latent of the first frame alone; the training forward puts it in place of latent
  frame 0 at t = 0.
"""
from __future__ import annotations

import torch

from ..config import DatasetConfig
from .discover import DataError


def dataset_i2v(ds: DatasetConfig, inputs) -> str | None:
    """How dataset ``ds`` trains on a model taking ``inputs`` (``WanInputs`` or None):
    None (text-to-video), ``"first"`` or ``"first_last"``; a dataset the model cannot train on
    is a DataError naming the key and the fix."""
    kind = getattr(inputs, "i2v", None)
    where = f"dataset {ds.id!r}"
    on = ds.i2v if ds.i2v is not None else kind == "concat"
    if kind == "concat" and not on:
        raise DataError(f"{where}: i2v = false, but this model is image-to-video (its transformer takes the "
                        f"first frame's latents on 36 input channels) and cannot train text-to-video; remove "
                        f"i2v = false, or train a text-to-video flavour")
    if on and kind is None:
        raise DataError(f"{where}: i2v = true, but this model is text-to-video only; use an image-to-video "
                        f"flavour (i2v-480p-14b-2.1, i2v-720p-14b-2.1, i2v-14b-2.2, ti2v-5b-2.2) or unset i2v")
    if on and ds.type == "image":
        raise DataError(f"{where}: an image dataset on an image-to-video model has no frames after the first "
                        f"to learn; train on videos, or use it for validation (validation.dataset = {ds.id!r})")
    if not on:
        return None
    if ds.last_image and kind == "first_frame":
        raise DataError(f"{where}: last_image: TI2V-5B conditions on the first frame only (its pipeline "
                        f"ignores last_image); set last_image = false")
    if ds.last_image and inputs.image_encoder and not inputs.paired_images:
        raise DataError(f"{where}: last_image: this Wan 2.1 I2V transformer embeds one CLIP image (no "
                        f"pos_embed_seq_len for a first/last pair, as FLF2V has); set last_image = false")
    return "first_last" if ds.last_image else "first"


def condition_settings(mode: str, inputs, image_fingerprint: str | None) -> dict:
    """The cache-key fields of the conditioning (added to a latent entry's settings)."""
    out = dict(i2v=mode, i2v_input=inputs.i2v)
    if inputs.image_encoder:
        out["image_encoder"] = image_fingerprint
    return out


def first_frame_mask(batch: int, frames: int, height: int, width: int, temporal: int, last: bool) -> torch.Tensor:
    """(B, temporal, F', H', W') mask of the conditioning frames in latent layout: pixel frame 0
    (and the last one with ``last``) is known; frame 0 counts ``temporal`` times, so each latent
    frame holds ``temporal`` consecutive pixel frames on its channels."""
    known = torch.zeros(frames)
    known[0] = 1
    if last:
        known[-1] = 1
    known = torch.cat([known[:1].repeat(temporal), known[1:]])
    mask = known.view(-1, temporal).transpose(0, 1)  # (temporal, F')
    return mask[None, :, :, None, None].expand(batch, -1, -1, height, width).contiguous()


def to_uint8_images(frames: torch.Tensor) -> list:
    """PIL images of float frames (B, 3, H, W) in [-1, 1] (the image a user would hand the pipeline)."""
    from PIL import Image

    u8 = ((frames.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(f.permute(1, 2, 0).cpu().numpy()) for f in u8]


@torch.no_grad()
def encode_condition(encoders, first: torch.Tensor, last: torch.Tensor | None, num_frames: int,
                     inputs) -> dict[str, torch.Tensor]:
    """Conditioning tensors (batched) of first frames ``first`` (B, 3, H, W) in [-1, 1] and optional
    last frames, for clips of ``num_frames`` pixel frames."""
    if inputs.i2v == "first_frame":
        return {"first_frame": encoders.encode_video(first.unsqueeze(2))}
    b, _, h, w = first.shape
    video = first.new_zeros(b, 3, num_frames, h, w)
    video[:, :, 0] = first
    if last is not None:
        video[:, :, -1] = last
    latents = encoders.encode_video(video)
    mask = first_frame_mask(b, num_frames, latents.shape[-2], latents.shape[-1], inputs.vae_temporal,
                            last is not None).to(latents.device, latents.dtype)
    out = {"condition": torch.cat([mask, latents], dim=1)}
    if inputs.image_encoder:
        images = to_uint8_images(first) if last is None else [
            im for pair in zip(to_uint8_images(first), to_uint8_images(last)) for im in pair]
        embeds = encoders.encode_image(images)
        out["image_embeds"] = embeds.view(b, -1, *embeds.shape[1:])  # (B, images, tokens, D)
    return out


def clip_condition(encoders, pixels: torch.Tensor, mode: str, inputs) -> dict[str, torch.Tensor]:
    """Conditioning of clips ``pixels`` (B, 3, F, H, W) in [-1, 1] trained with ``mode``."""
    last = pixels[:, :, -1] if mode == "first_last" else None
    return encode_condition(encoders, pixels[:, :, 0], last, pixels.shape[2], inputs)
