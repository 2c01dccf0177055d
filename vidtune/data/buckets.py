"""Target sizes and buckets: which (width, height, frames) each sample is trained at.

Samples of one bucket share a tensor shape, so a batch is always drawn from one bucket.
``pixel_area`` keeps the aspect ratio at a fixed pixel count (resolution 480 -> 480*480 pixels,
e.g. 640x360 for 16:9), ``pixel`` makes the short edge ``resolution``; either way sides are
rounded to multiples of 16 (VAE stride 8 x patch 2; 32 for the Wan 2.2 VAE's stride 16). The aspect ratio is rounded to
``aspect_bucket_rounding`` decimals *before* sizing, so all clips of one aspect bucket get the
same size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DatasetConfig

SIDE_MULTIPLE = 16


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    frames: int

    def name(self, strategy: str = "resolution_frames", rounding: int = 2) -> str:
        if strategy == "aspect_ratio":
            return f"{self.width / self.height:.{rounding}f}"
        return f"{self.width}x{self.height}@{self.frames}"


def _round16(x: float, multiple: int = SIDE_MULTIPLE) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def target_size(width: int, height: int, resolution: float, resolution_type: str = "pixel_area",
                rounding: int = 2, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(width, height) a ``width x height`` source is trained at; multiples of ``multiple``."""
    aspect = round(width / height, rounding) or 10.0 ** -rounding
    if resolution_type == "pixel_area":
        area = float(resolution) ** 2
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    elif resolution_type == "pixel":
        w, h = (resolution * aspect, resolution) if aspect >= 1 else (resolution, resolution / aspect)
    else:
        raise ValueError(f"unknown resolution_type {resolution_type!r}")
    return _round16(w, multiple), _round16(h, multiple)


def clip_frames(available: int, ds: DatasetConfig) -> tuple[int | None, str]:
    """Frames a clip with ``available`` frames (at the model fps) is trained with, or
    (None, reason) when the video is out of the dataset's [min_frames, max_frames] range."""
    if ds.type == "image":
        return 1, ""
    min_frames = ds.min_frames or ds.num_frames
    if available < min_frames:
        return None, f"too short: {available} frames at the model fps < min_frames {min_frames}"
    if ds.max_frames is not None and available > ds.max_frames:
        return None, f"too long: {available} frames at the model fps > max_frames {ds.max_frames}"
    n = min(available, ds.num_frames)
    step = ds.frame_interval if ds.bucket_strategy == "resolution_frames" else 4
    return (n - 1) // step * step + 1, ""


def bucket_for(width: int, height: int, available_frames: int, ds: DatasetConfig,
               multiple: int = SIDE_MULTIPLE) -> tuple[Bucket | None, str]:
    frames, reason = clip_frames(available_frames, ds)
    if frames is None:
        return None, reason
    w, h = target_size(width, height, ds.resolution, ds.resolution_type, ds.aspect_bucket_rounding, multiple)
    return Bucket(w, h, frames), ""
