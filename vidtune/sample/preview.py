"""Live previews while sampling: a linear latent-to-RGB decode and an optional webhook.

Decoding the latents of every K-th sampling step with the VAE would cost a full decode each time
(SimpleTuner decodes its previews with a Tiny AutoEncoder, a second network). A Wan latent pixel
is, to a good first approximation, an affine function of the colour of the 8x8 (x 4 frames) patch
it encodes, so a preview needs only that function, fitted once per run from the run's own VAE:

1. take a few latents (the run's cached training latents; their first two latent frames);
2. decode them with the VAE, map to [0, 1], and average the decoded pixels onto the latent grid:
   latent frame 0 holds pixel frame 0, latent frame k >= 1 pixel frames 4k-3..4k; spatially each
   latent pixel covers an 8x8 block (the VAE's compression factors, read from its config);
3. least squares over every latent position: ``rgb ~= z @ W + b`` with W (C, 3) and b (3,).

A preview is then one small matmul per step: ``clamp(z @ W + b)`` per latent pixel, upsampled
bilinearly to the video size; ``preview_strip`` lays up to four evenly spaced frames side by side.
The fit's reconstruction of held-out VAE decodes is measured by ``psnr`` (tests/integration/
test_previews.py prints it against the mean-colour baseline). Previews are PNGs written
atomically; ``Webhook`` POSTs them (multipart: ``payload_json`` + ``file``, the form Discord and
SimpleTuner's webhooks take) with a timeout, and turns itself off after three failures in a row:
a preview never stops a run.
"""
from __future__ import annotations

import io
import json
import math
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fsutil import atomic_write_bytes


@dataclass
class LatentRGB:
    """rgb = z @ weight + bias per latent pixel (normalised latents in, [0, 1] colours out)."""

    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)
    temporal: int = 4  # the VAE's compression factors: how far a latent pixel reaches
    spatial: int = 8

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C, F, H, W) latents -> (..., F, 3, H, W) colours in [0, 1] on the latent grid."""
        z = latents.float().movedim(-4, -1)  # (..., F, H, W, C)
        out = (z @ self.weight.to(z.device) + self.bias.to(z.device)).clamp(0, 1)
        return out.movedim(-1, -3)

    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, F, H, W) -> uint8 frames (F, 3, H * spatial, W * spatial), bilinearly upsampled."""
        x = F.interpolate(self.rgb(latents), scale_factor=self.spatial, mode="bilinear", align_corners=False)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def to_json(self) -> str:
        return json.dumps({"weight": self.weight.tolist(), "bias": self.bias.tolist(),
                           "temporal": self.temporal, "spatial": self.spatial})

    @classmethod
    def from_json(cls, text: str) -> "LatentRGB":
        d = json.loads(text)
        return cls(torch.tensor(d["weight"]), torch.tensor(d["bias"]), d["temporal"], d["spatial"])


def pool_to_latent_grid(video: torch.Tensor, latent_frames: int, temporal: int, spatial: int) -> torch.Tensor:
    """Decoded video (B, 3, T, H, W) in [0, 1] -> the colour each latent pixel stands for,
    (B, 3, latent_frames, H / spatial, W / spatial): frame 0 alone, then groups of ``temporal``."""
    groups = [video[:, :, :1]] + [video[:, :, 1 + temporal * (k - 1):1 + temporal * k]
                                  for k in range(1, latent_frames)]
    frames = torch.cat([g.mean(dim=2, keepdim=True) for g in groups], dim=2)
    return F.avg_pool3d(frames, kernel_size=(1, spatial, spatial))


@torch.no_grad()
def vae_colours(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decode of normalised latents (B, C, F, H, W) in [0, 1], (B, 3, T, H', W')."""
    from .sampler import decode

    return decode(vae, latents).float().permute(0, 2, 1, 3, 4) / 255


@torch.no_grad()
def fit_latent_rgb(vae, latents: list[torch.Tensor]) -> LatentRGB:
    """Least-squares fit of ``LatentRGB`` to the VAE's decodes of ``latents`` (each (C, F, H, W),
    any sizes), over every latent pixel of all of them."""
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    zs, rgbs = [], []
    for z in latents:
        target = pool_to_latent_grid(vae_colours(vae, z[None]), z.shape[1], temporal, spatial)
        zs.append(z.float().movedim(0, -1).reshape(-1, z.shape[0]).cpu())
        rgbs.append(target[0].movedim(0, -1).reshape(-1, 3).cpu())
    z, rgb = torch.cat(zs).double(), torch.cat(rgbs).double()
    design = torch.cat([z, torch.ones(z.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(design, rgb).solution  # (C + 1, 3)
    return LatentRGB(sol[:-1].float(), sol[-1].float(), temporal, spatial)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float((a.float() - b.float()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def preview_strip(frames: torch.Tensor, count: int = 4) -> bytes:
    """PNG bytes of up to ``count`` evenly spaced frames (F, 3, H, W uint8) side by side."""
    from PIL import Image

    f, _, h, w = frames.shape
    idx = sorted({round(i * (f - 1) / max(count - 1, 1)) for i in range(min(count, f))})
    strip = torch.cat([frames[i] for i in idx], dim=2)  # (3, H, n * W)
    buf = io.BytesIO()
    Image.fromarray(strip.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


class Previewer:
    """The ``callback`` of ``sample``: at sampling steps K, 2K, ... a strip of the current latents
    goes to ``<out_dir>/<name>_step<NNN>.png`` (atomically) and to ``on_image(path, sampling_step)``."""

    def __init__(self, projection: LatentRGB, every: int, out_dir: Path, name: str, on_image=None):
        self.projection, self.every, self.out_dir, self.name = projection, every, Path(out_dir), name
        self.on_image = on_image
        self.written: list[Path] = []

    def __call__(self, i: int, latents: torch.Tensor) -> None:
        n = i + 1  # sampling steps done
        if n % self.every:
            return
        path = atomic_write_bytes(self.out_dir / f"{self.name}_step{n:03d}.png",
                                  preview_strip(self.projection.frames(latents[0])))
        self.written.append(path)
        if self.on_image is not None:
            self.on_image(path, n)


class Webhook:
    """POSTs images to ``url``; never raises. Three failures in a row turn it off for the run."""

    def __init__(self, url: str, timeout: float = 5.0, warn=print):
        self.url, self.timeout, self.warn = url, timeout, warn
        self.failures = 0
        self.sent = 0

    @property
    def on(self) -> bool:
        return self.failures < 3

    def post(self, png: Path, payload: dict) -> bool:
        if not self.on:
            return False
        boundary = uuid.uuid4().hex
        parts = [(f'Content-Disposition: form-data; name="payload_json"\r\nContent-Type: application/json\r\n\r\n',
                  json.dumps(payload).encode()),
                 (f'Content-Disposition: form-data; name="file"; filename="{Path(png).name}"\r\n'
                  f"Content-Type: image/png\r\n\r\n", Path(png).read_bytes())]
        body = b"".join(f"--{boundary}\r\n".encode() + head.encode() + data + b"\r\n" for head, data in parts)
        body += f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
            self.failures = 0
            self.sent += 1
            return True
        except Exception as exc:  # network, HTTP status, timeout: reported, never raised
            self.failures += 1
            why = " ".join(str(exc).split())
            off = "; webhook turned off for this run" if not self.on else ""
            self.warn(f"warning: webhook {self.url} failed ({type(exc).__name__}: {why}){off}")
            return False
