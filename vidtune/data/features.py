"""Frozen vision-encoder features of the training clips, cached like latents (CREPA's targets).

CREPA (``vidtune.train.crepa``) aligns a transformer block's hidden states of each latent frame with
a frozen image encoder's features of that frame and its neighbours. The encoder (DINOv2 in real
runs: ``facebook/dinov2-giant`` is SimpleTuner's ``dinov2_vitg14``; any transformers vision model
with patch tokens) sees each clip's pixel frames once, while the caches are filled, so training
never runs the encoder nor the VAE. Wan's VAE keeps frame 0 and every 4th frame after it as latent
frames (4k+1 frames -> k+1), so the features are those of pixel frames 0, 4, 8, ...

Per frame: resize to ``encoder_image_size`` square (bilinear, antialiased), normalise with the
encoder's image mean/std (``preprocessor_config.json``; ImageNet's by default), and keep the
encoder's patch tokens (the last g x g of ``last_hidden_state``, after the CLS and register
tokens): (frames, g*g, D) on the encoder's native grid, resampled to the transformer's token grid
at training time; with ``spatial_align = false`` their mean, (frames, 1, D). Stored fp16 under
the cache kind ``crepa``, keyed by the clip's latent key plus the encoder settings.

``drop_vae_encoder``: the latents must all be cached already; ``NoVaeEncoders`` makes a missing
one an error instead of loading the VAE encoder.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from ..config import CacheConfig, CrepaConfig, DatasetConfig, ModelConfig
from ..runtime import DTYPES
from .cache import CacheStore, SourceIndex, model_fingerprint, settings_key
from .discover import DataError, SkipLog, _short
from .encode import Encoders
from .prepare import CacheEntry, PreparedData
from .video import DecoderUnavailable, load_image, load_video_clip

FEATURES = "crepa"
VAE_FRAME_STRIDE = 4  # Wan VAEs (2.1 and 2.2): latent frame k >= 1 holds pixel frames 4k-3..4k
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def frame_indices(num_frames: int) -> list[int]:
    """Pixel frames that stand for the latent frames of a 4k+1 clip: 0, 4, 8, ..., 4k."""
    return list(range(0, num_frames, VAE_FRAME_STRIDE))


class FeatureEncoder:
    """A frozen transformers vision encoder, loaded on first use."""

    def __init__(self, crepa: CrepaConfig, device, revision: str | None = None):
        self.cfg, self.device, self.revision = crepa, torch.device(device), revision
        self.dtype = DTYPES[crepa.encoder_dtype]
        self._model = None

    @cached_property
    def fingerprint(self) -> str:
        p = Path(self.cfg.encoder).expanduser()
        if p.is_dir():
            return model_fingerprint(p)
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(self.cfg.encoder, revision=self.revision, allow_patterns=["config.json"]))
        return f"hub:{self.cfg.encoder}@{snap.name}"

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(self.cfg.encoder, dtype=self.dtype, revision=self.revision)
            self._model.eval().requires_grad_(False).to(self.device)
        return self._model

    @cached_property
    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        p = Path(self.cfg.encoder).expanduser() / "preprocessor_config.json"
        if p.is_file():
            d = json.loads(p.read_text())
            mean, std = d.get("image_mean", mean), d.get("image_std", std)
        return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (T, 3, H, W) in [-1, 1] -> patch features (T, g*g, D), or (T, 1, D) pooled."""
        s = self.cfg.encoder_image_size
        x = torch.nn.functional.interpolate((frames.float() + 1) / 2, size=(s, s), mode="bilinear",
                                           antialias=True, align_corners=False)
        mean, std = self.mean_std
        x = ((x - mean) / std).to(self.device, self.dtype)
        hidden = self.model(pixel_values=x).last_hidden_state.float()
        patch = self.model.config.patch_size
        g = s // patch
        tokens = hidden[:, -g * g:]  # CLS and register tokens come first
        return tokens if self.cfg.spatial_align else tokens.mean(dim=1, keepdim=True)

    def settings(self) -> dict:
        c = self.cfg
        return dict(encoder=self.fingerprint, size=c.encoder_image_size, spatial=c.spatial_align,
                    dtype=c.encoder_dtype, frames="every-4th")

    def release(self) -> None:
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class NoVaeEncoders(Encoders):
    """Encoders whose VAE encoder never loads (``crepa.drop_vae_encoder``): a clip without cached
    latents is an error naming the fix."""

    @property
    def vae(self):
        raise DataError("crepa.drop_vae_encoder = true, but some clips have no cached latents and the VAE encoder "
                        "may not be loaded: run once with crepa.drop_vae_encoder = false (vidtune-train --prepare-only "
                        "fills the caches), or keep it false")


def cache_features(prepared: PreparedData, datasets: list[DatasetConfig], cache: CacheConfig, model: ModelConfig,
                   encoder: FeatureEncoder, log: Callable[[str], None] = print) -> PreparedData:
    """Encode the frames of every entry (training and held out) whose features are not cached; each
    entry gets ``(FEATURES, key)`` in ``cond_keys`` (loaded into ``Batch.cond["crepa"]``). A clip
    that fails to decode is skipped and counted."""
    store = CacheStore(cache.dir, cache.compress)
    index = SourceIndex(Path(cache.dir) / "sources.json")
    fps = model.resolved_fps()
    by_id = {d.id: d for d in datasets}
    settings = encoder.settings()

    def key(e: CacheEntry) -> str:
        return settings_key(kind=FEATURES, latents=e.latent_key, **settings)

    entries = prepared.entries + prepared.held_out
    damaged: list = []
    todo = [e for e in entries if not store.intact(FEATURES, key(e), damaged)]
    skips = SkipLog()
    failed = set()
    if todo:
        log(f"CREPA: encoding the frames of {len(todo)} clip(s) with {encoder.cfg.encoder}...")
    for e in todo:
        ds, b = by_id[e.dataset_id], e.bucket
        try:
            digest = index.digest(e.source)
            if b.frames > 1:
                px = load_video_clip(e.source, b.frames, fps, b.width, b.height, ds.crop, ds.crop_style, digest)
            else:
                px = load_image(e.source, b.width, b.height, ds.crop, ds.crop_style, digest)
        except DecoderUnavailable:
            raise
        except Exception as exc:  # changed or unreadable since the latents were cached: skipped
            skips.add(e.dataset_id, e.source, f"decode failed: {_short(exc)}")
            failed.add(e.latent_key)
            continue
        frames = px[:, frame_indices(px.shape[1])].transpose(0, 1)  # (T, 3, H, W)
        store.save(FEATURES, key(e), {FEATURES: encoder.encode(frames).to(torch.float16).cpu()})
    index.save()
    encoder.release()
    if skips.entries:
        log(skips.summary())
        prepared.skips.entries.extend(skips.entries)

    def with_features(es):
        return [dataclasses.replace(e, cond_keys=e.cond_keys + ((FEATURES, key(e)),))
                for e in es if e.latent_key not in failed]

    prepared.entries = with_features(prepared.entries)
    prepared.held_out = with_features(prepared.held_out)
    return prepared
