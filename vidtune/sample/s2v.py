"""Wan S2V sampling: a clip driven by a reference frame and an audio file, with that audio as the
mp4's soundtrack.

As the official pipeline samples a first clip (``wan/speech2video.py``): noise for F latents (4F
frames, ``num_frames - 1``), the reference frame's latents, the audio features of frames 0..4F-1,
no motion frames (``drop_motion_frames``), no pose; CFG's unconditional pass takes the negative
prompt and zeroed audio. The result is decoded after the reference latent, as one causal stream,
and the reference frame is dropped: 4F frames, frame k at the audio's time k / fps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.audio import NoAudio, SAMPLE_RATE, decode_audio, find_audio_file, frame_features
from ..data.discover import IMAGE_EXTS
from ..data.video import load_image, load_video_clip
from .sampler import decode, sample


@dataclass
class S2VInputs:
    """What one validation clip is conditioned on."""

    ref_latents: torch.Tensor  # (1, C, 1, H/8, W/8), normalised
    audio: torch.Tensor  # (1, L, C_a, 4F) wav2vec2 features
    soundtrack: torch.Tensor  # (4F / fps * 16000,) mono samples of the clip's span
    audio_file: Path


def audio_for(media: Path) -> Path:
    """The audio that drives a validation clip: the file of the same stem beside ``media``, else
    ``media``'s own track."""
    return find_audio_file(media.parent, media.stem) or media


def s2v_inputs(media: str | Path, width: int, height: int, num_frames: int, fps: int, encoders) -> S2VInputs:
    """Reference latents (``media``'s first frame, center-cropped to width x height), the audio
    features of ``num_frames - 1`` frames and the soundtrack, with ``encoders``' VAE and wav2vec2."""
    media = Path(media)
    if media.suffix.lower() in IMAGE_EXTS:
        pixels = load_image(media, width, height, crop=True)
    else:
        pixels = load_video_clip(media, 1, fps, width, height, crop=True)
    frames = num_frames - 1
    source = audio_for(media)
    try:
        wave = decode_audio(source)
    except NoAudio:
        raise ValueError(f"validation.reference_media: no audio for {media} (no {media.stem}.wav/.mp3/.flac/"
                         f".ogg/.m4a beside it and no audio track): Wan S2V validation needs one") from None
    hidden = encoders.encode_audio(wave).cpu()
    feats = frame_features(hidden, 0, frames, fps)  # (4F, L, C)
    span = round(frames / fps * SAMPLE_RATE)
    soundtrack = torch.cat([wave, wave.new_zeros(max(0, span - wave.numel()))])[:span]
    return S2VInputs(encoders.encode_video(pixels[None]).cpu(), feats.permute(1, 2, 0)[None], soundtrack, source)


@torch.no_grad()
def sample_s2v(transformer, inputs: S2VInputs, *, prompt_embeds: torch.Tensor, negative_prompt_embeds,
               num_frames: int, height: int, width: int, vae, **kw) -> torch.Tensor:
    """uint8 frames (1, num_frames - 1, 3, H, W) of one S2V clip; ``kw`` go to ``sample``."""
    dev = torch.device(kw.get("device") or next(transformer.parameters()).device)
    dtype = next(p for p in transformer.parameters() if p.is_floating_point()).dtype
    ref = inputs.ref_latents.to(dev, dtype)
    audio = inputs.audio.to(dev, dtype)
    latent_frames = (num_frames - 1) // 4
    latents = sample(transformer, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                     num_frames=4 * latent_frames - 3, height=height, width=width, vae=vae, output_type="latent",
                     extra=dict(audio=audio, ref_latents=ref),
                     extra_uncond=dict(audio=torch.zeros_like(audio), ref_latents=ref), **kw)
    return decode(vae, torch.cat([inputs.ref_latents.to(latents), latents], dim=2))[:, 1:]
