"""Decoding (torchcodec for video, PIL for images), frame-rate resampling, resize and crop.

Clips start at the first frame and are resampled to the model's frame rate by timestamp
(frame i is the source frame shown at i / fps), so a 30 fps source and a 16 fps source of the
same scene give the same clip. Decoding and resizing go in chunks of frames so a long 1080p
clip never sits in memory as float.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DECODE_CHUNK = 16  # frames decoded and resized at a time


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    duration: float  # seconds; 0 for images
    source_fps: float
    is_image: bool = False

    def frames(self, fps: int) -> int:
        """Frames available when resampled to ``fps`` (1 for images)."""
        return 1 if self.is_image else int(math.floor(self.duration * fps + 1e-6))


class DecoderUnavailable(RuntimeError):
    """torchcodec cannot load at all: a fault of the install, not of any video (never skipped)."""


# torchcodec release -> the torch it is built against; from 0.10 on, 0.N pairs with 2.N.
_TORCHCODEC_TORCH = {"0.9": "2.9", "0.8": "2.9", "0.7": "2.8", "0.6": "2.8", "0.5": "2.7", "0.4": "2.7",
                     "0.3": "2.7", "0.2": "2.6", "0.1": "2.5"}


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def torchcodec_pair(torchcodec_version: str) -> str | None:
    """The torch minor a torchcodec release is built for (None: unknown)."""
    tc = _minor(torchcodec_version)
    if tc in _TORCHCODEC_TORCH:
        return _TORCHCODEC_TORCH[tc]
    major, _, n = tc.partition(".")
    return f"2.{n}" if major == "0" and n.isdigit() and int(n) >= 10 else None


def torchcodec_for_torch(torch_version: str) -> str | None:
    """The torchcodec minor built for a torch release (the newest one when several are)."""
    want = _minor(torch_version)
    major, _, n = want.partition(".")
    if major == "2" and n.isdigit() and int(n) >= 10:
        return f"0.{n}"
    return max((tc for tc, t in _TORCHCODEC_TORCH.items() if t == want), key=lambda v: int(v[2:]), default=None)


def decoder_mismatch_message(torch_version: str, torchcodec_version: str | None, error: str) -> str:
    """Why torchcodec does not load, naming both versions and the pip command that fixes it."""
    want = torchcodec_for_torch(torch_version)
    fix = (f'pip install "torchcodec=={want}.*" (the release built for torch {_minor(torch_version)})' if want
           else "install the torchcodec release built for it (see torchcodec's compatibility table)")
    if torchcodec_version is None:
        return f"video decoding needs torchcodec, which is not installed beside torch {torch_version}: {fix}"
    built = torchcodec_pair(torchcodec_version)
    return (f"torchcodec {torchcodec_version} cannot load beside torch {torch_version} ({error})"
            + (f"; it is built for torch {built}" if built else "")
            + f". No video can be decoded until it matches: {fix}")


@functools.cache
def _video_decoder_class():
    """torchcodec's VideoDecoder, imported at the first decode; a torchcodec that cannot load
    beside this torch raises ``DecoderUnavailable`` instead of making every clip unreadable."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as exc:  # ImportError, or OSError/RuntimeError from loading its libraries
        from importlib.metadata import PackageNotFoundError, version

        try:
            tc = version("torchcodec")
        except PackageNotFoundError:
            tc = None
        raise DecoderUnavailable(decoder_mismatch_message(torch.__version__, tc, str(exc).strip().splitlines()[-1]
                                                          if str(exc).strip() else type(exc).__name__)) from exc
    return VideoDecoder


def _decoder(path: Path, seek_mode: str = "exact"):
    return _video_decoder_class()(str(path), dimension_order="NCHW", seek_mode=seek_mode)


def probe_video(path: str | Path) -> MediaInfo:
    """Size and duration; raises if the file has no decodable video stream.

    Headers are read first (cheap); containers without a duration in the header are scanned.
    """
    path = Path(path)
    md = _decoder(path, "approximate").metadata
    if md.duration_seconds is None or not md.duration_seconds > 0:
        md = _decoder(path, "exact").metadata
    begin = md.begin_stream_seconds or 0.0
    end = md.end_stream_seconds if md.end_stream_seconds is not None else begin + (md.duration_seconds or 0.0)
    duration = max(0.0, end - begin)
    if not md.width or not md.height:
        raise ValueError("no video dimensions in the stream")
    return MediaInfo(md.width, md.height, duration, float(md.average_fps or 0.0))


def probe_image(path: str | Path) -> MediaInfo:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        # EXIF orientations 5-8 rotate by 90 degrees: the decoded image is transposed.
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return MediaInfo(w, h, 0.0, 0.0, is_image=True)


def _resize_crop_chunk(frames_u8: torch.Tensor, width: int, height: int, crop: bool,
                       offset: tuple[int, int]) -> torch.Tensor:
    x = frames_u8.float()
    src_h, src_w = x.shape[-2:]
    if crop:
        scale = max(width / src_w, height / src_h)
        rh, rw = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    else:
        rh, rw = height, width
    if (rh, rw) != (src_h, src_w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    if crop:
        top = min(offset[0], rh - height)
        left = min(offset[1], rw - width)
        x = x[..., top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def crop_offset(src_w: int, src_h: int, width: int, height: int, crop: bool, crop_style: str,
                seed_text: str) -> tuple[int, int]:
    """(top, left) of the crop in the resized frame; ``random`` is fixed per ``seed_text``
    (the file's content digest) so a cache entry always holds the same crop."""
    if not crop:
        return 0, 0
    scale = max(width / src_w, height / src_h)
    rh, rw = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if crop_style == "center":
        return (rh - height) // 2, (rw - width) // 2
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    top = int(torch.randint(0, rh - height + 1, (1,), generator=g))
    left = int(torch.randint(0, rw - width + 1, (1,), generator=g))
    return top, left


def load_video_clip(path: str | Path, num_frames: int, fps: int, width: int, height: int,
                    crop: bool = False, crop_style: str = "center", seed_text: str = "",
                    start: int = 0) -> torch.Tensor:
    """``num_frames`` frames at ``fps`` from frame ``start`` (at that fps; 0: the first), resized/cropped,
    as float (C, F, H, W) in [-1, 1]."""
    dec = _decoder(Path(path))
    md = dec.metadata
    begin = md.begin_stream_seconds or 0.0
    offset = crop_offset(md.width, md.height, width, height, crop, crop_style, seed_text)
    out = torch.empty(3, num_frames, height, width)
    for s in range(0, num_frames, DECODE_CHUNK):
        n = min(DECODE_CHUNK, num_frames - s)
        times = [begin + (start + s + i) / fps for i in range(n)]
        batch = dec.get_frames_played_at(times).data  # (n, C, H, W) uint8
        if batch.shape[0] != n:
            raise RuntimeError(f"decoded {batch.shape[0]} of {n} frames")
        out[:, s:s + n] = _resize_crop_chunk(batch[:, :3], width, height, crop, offset).transpose(0, 1)
    return out


def load_image(path: str | Path, width: int, height: int, crop: bool = False,
               crop_style: str = "center", seed_text: str = "") -> torch.Tensor:
    """An image as a one-frame clip: float (C, 1, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]  # (1, C, H, W)
    src_h, src_w = pixels.shape[-2:]
    offset = crop_offset(src_w, src_h, width, height, crop, crop_style, seed_text)
    return _resize_crop_chunk(pixels, width, height, crop, offset).transpose(0, 1)


def load_mask(path: str | Path, src_w: int, src_h: int, width: int, height: int, crop: bool = False,
              crop_style: str = "center", seed_text: str = "") -> torch.Tensor:
    """A loss-mask image as float (1, H, W) in [0, 1] (white = 1), aligned with its clip: scaled
    to the clip's source size, then resized and cropped exactly like the clip's frames (same
    ``seed_text``, the clip's digest, so a random crop lands on the same pixels)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("L")
        m = torch.from_numpy(np.asarray(im).copy())[None, None].float()  # (1, 1, h, w), 0..255
    if tuple(m.shape[-2:]) != (src_h, src_w):
        m = F.interpolate(m, size=(src_h, src_w), mode="bilinear", antialias=True, align_corners=False)
    offset = crop_offset(src_w, src_h, width, height, crop, crop_style, seed_text)
    return ((_resize_crop_chunk(m, width, height, crop, offset) + 1.0) / 2.0)[0]
