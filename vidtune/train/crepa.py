"""CREPA: cross-frame representation alignment, a temporal regulariser for video fine-tunes.

"Cross-Frame Representation Alignment for Fine-Tuning Video Diffusion Models", arXiv:2506.09229
(2025), the CREPA loss: with ``h_t^f`` the hidden states of frame
``f`` at a chosen block, ``h_phi`` a trained projection head and ``y^f`` a frozen image encoder's
features of the clean frame ``f``,

    L_align = -E[ sum_f ( sim(y^f, h_phi(h_t^f)) + sum_{k in K_f} exp(-|k - f| / tau) sim(y^k, h_phi(h_t^f)) ) ]
    L       = L_flow + lambda * L_align

with ``sim`` REPA's patch-wise similarity (the mean over patches n of the cosine similarity of
``y^{k,n}`` and ``h_phi(h_t^{f,n})``) and ``K_f = {f - d, f + d}`` the frames at the adjacent
distance ``d`` that exist (``d = 0``: no neighbours, per-frame REPA). We divide the sum over
frames by their count (SimpleTuner's default ``crepa_normalize_by_frames``), so ``lambda`` means
the same for any clip length, and take the expectation as the batch mean.

Frames are the transformer's latent frames; ``y`` comes from the feature cache
(``vidtune.data.features``: pixel frames 0, 4, 8, ... on the encoder's g x g patch grid), resampled
bilinearly to the transformer's token grid (or pooled, with ``spatial_align = false``). The head is
LayerNorm, Linear, SiLU, Linear (REPA's MLP projector, with the LayerNorm SimpleTuner puts first),
in fp32; it trains with the adapter, is checkpointed as ``crepa.*`` tensors and is not exported.
The loss reaches only the blocks up to ``block_index`` (and the embeddings before them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, CrepaConfig
from ..runtime import seed_for


def crepa_similarity(projected: torch.Tensor, features: torch.Tensor, distance: int, tau: float) -> torch.Tensor:
    """Per-frame weighted similarity (B, F): sim(y^f, p^f) + sum_{k in {f-d, f+d}} exp(-d/tau) sim(y^k, p^f).

    projected (B, F, N, D) = h_phi(h_t), features (B, F, N, D) = y; both normalised here."""
    p = F.normalize(projected.float(), dim=-1)
    y = F.normalize(features.float(), dim=-1)
    total = (p * y).sum(-1).mean(-1)
    frames = total.shape[1]
    d = distance
    if 0 < d < frames:
        w = math.exp(-d / tau)
        later = torch.zeros_like(total)
        later[:, :-d] = (p[:, :-d] * y[:, d:]).sum(-1).mean(-1)  # frame f against y^{f+d}
        earlier = torch.zeros_like(total)
        earlier[:, d:] = (p[:, d:] * y[:, :-d]).sum(-1).mean(-1)  # frame f against y^{f-d}
        total = total + w * (later + earlier)
    return total


def crepa_loss(projected: torch.Tensor, features: torch.Tensor, distance: int, tau: float,
               weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda * L_align, mean per-frame similarity): L_align = -mean_b (1/F) sum_f similarity."""
    sim = crepa_similarity(projected, features, distance, tau)
    return -weight * sim.mean(), sim.detach().mean()


class CrepaHead(nn.Module):
    """h_phi: LayerNorm -> Linear -> SiLU -> Linear, from the model width to the encoder's."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


def encoder_width(encoder: str, revision: str | None = None) -> int:
    """The feature width of a transformers vision encoder, from its config (no weights)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(encoder, revision=revision).hidden_size)


class Crepa:
    """The regulariser of one run: which block, the head, and the loss of a step."""

    def __init__(self, cfg: CrepaConfig, model, enc_dim: int, device, seed: int):
        n = len(model.blocks)
        self.block = cfg.block_index + n if cfg.block_index < 0 else cfg.block_index
        if not 0 <= self.block < n:
            raise ConfigError(f"crepa.block_index = {cfg.block_index}: the model has blocks 0..{n - 1}; "
                              f"choose one of them (SimpleTuner's Wan default is 8)")
        self.cfg = cfg
        self.patch = tuple(model.config.patch_size)
        with torch.random.fork_rng(devices=[]):  # its own init: the run's torch RNG stream stays as without CREPA
            torch.manual_seed(seed_for(seed, "crepa-head"))
            self.head = CrepaHead(model.config.inner_dim, cfg.head_dim, enc_dim).to(device)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {f"crepa.{k}": p for k, p in self.head.named_parameters()}

    def loss(self, hidden: torch.Tensor, latents: torch.Tensor, features: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, S, D) of ``self.block`` for latents (B, C, F, H, W); features (B, F', N, De)
        from the cache. Returns (lambda * L_align, mean similarity)."""
        b, _, f, h, w = latents.shape
        pt, ph, pw = self.patch
        f, gh, gw = f // pt, h // ph, w // pw
        if features.shape[1] != f:
            raise ValueError(f"CREPA: {features.shape[1]} cached feature frames for {f} latent frames; "
                             f"delete the cache's crepa/ folder so the features are encoded again")
        p = self.head(hidden.float().view(b, f, gh * gw, -1))
        y = features.float()
        if y.shape[2] == 1:  # pooled features (spatial_align = false): pool the projections too
            p = p.mean(dim=2, keepdim=True)
        elif y.shape[2] != gh * gw:  # the encoder's g x g grid -> the token grid
            g = math.isqrt(y.shape[2])
            y = y.view(b * f, g, g, -1).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=(gh, gw), mode="bilinear", align_corners=False)
            y = y.permute(0, 2, 3, 1).reshape(b, f, gh * gw, -1)
        return crepa_loss(p, y, self.cfg.adjacent_distance, self.cfg.adjacent_tau, self.cfg.weight)
