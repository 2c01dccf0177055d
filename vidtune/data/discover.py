"""Find the samples of each dataset: media files, their captions, their sizes and buckets.

Nothing here raises for a bad file: a zero-byte, unreadable, too short or caption-less file
is recorded in a ``SkipLog`` with its reason and left out; the summary is printed before
training. Only a problem with the dataset itself (missing directory) is an error.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DatasetConfig
from .buckets import Bucket, bucket_for
from .cache import SourceIndex
from .video import DecoderUnavailable, MediaInfo, probe_image, probe_video

VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp"})


class DataError(ValueError):
    """A dataset-level problem the user must fix (the message says how)."""


@dataclass(frozen=True)
class MediaItem:
    dataset_id: str
    path: Path
    kind: str  # "video" | "image"
    caption: str
    width: int
    height: int
    frames: int  # available at the model fps
    bucket: Bucket
    # Wan S2V windows (vidtune.data.s2v): first decoded frame, frames decoded before the denoised
    # ones (the reference, plus the motion frames of a continuation window), the audio source.
    start: int = 0
    lead: int = 0
    audio: str | None = None


@dataclass
class SkipLog:
    """Files left out of the run, with why. ``reason`` is "<category>: <detail>"."""

    entries: list[tuple[str, Path, str]] = field(default_factory=list)
    found: Counter = field(default_factory=Counter)  # media files seen per dataset

    def add(self, dataset_id: str, path: Path, reason: str) -> None:
        self.entries.append((dataset_id, Path(path), reason))

    def counts(self) -> dict[str, Counter]:
        """{dataset_id: Counter(category -> files)}."""
        out: dict[str, Counter] = defaultdict(Counter)
        for ds, _, reason in self.entries:
            out[ds][reason.split(":", 1)[0]] += 1
        return dict(out)

    def summary(self, used: dict[str, int] | None = None, max_examples: int = 3) -> str:
        lines = ["Data summary:"]
        counts = self.counts()
        for ds in sorted(set(self.found) | set(counts) | set(used or {})):
            skipped = sum(counts.get(ds, {}).values())
            n_used = (used or {}).get(ds, self.found[ds] - skipped)
            lines.append(f"  dataset {ds!r}: {self.found[ds]} files found, {n_used} used, {skipped} skipped")
            for cat, n in sorted(counts.get(ds, {}).items()):
                examples = [f"{p.name} ({r.split(':', 1)[-1].strip()})" for d, p, r in self.entries
                            if d == ds and r.split(":", 1)[0] == cat][:max_examples]
                lines.append(f"    {n} x {cat}: " + ", ".join(examples) + (", ..." if n > max_examples else ""))
        return "\n".join(lines)


def read_caption(media: Path, ds: DatasetConfig) -> str | None:
    """The caption per ``caption_strategy``, prefix included; None when there is none."""
    if ds.caption_strategy == "instanceprompt":
        return ds.caption_prefix.strip() or None
    if ds.caption_strategy == "filename":
        text = media.stem.replace("_", " ").strip()
    else:
        txt = media.with_suffix(".txt")
        if not txt.is_file():
            return None
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
    prefix = ds.caption_prefix.strip()
    text = f"{prefix} {text}".strip() if prefix else text
    return text or None


def list_media(root: Path, kind: str) -> list[Path]:
    exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()
                  and not p.name.startswith("."))


def probe(path: Path, kind: str, index: SourceIndex | None = None) -> MediaInfo:
    """Probe a file, reusing the index's answer while the file is unchanged."""
    known = index.get(path, "probe") if index is not None else None
    if known is not None:
        return MediaInfo(**known)
    info = probe_video(path) if kind == "video" else probe_image(path)
    if index is not None:
        index.put(path, "probe", dataclasses.asdict(info))
    return info


def discover_dataset(ds: DatasetConfig, fps: int, skips: SkipLog,
                     index: SourceIndex | None = None, side_multiple: int = 16) -> list[MediaItem]:
    """Every usable sample of ``ds`` (sorted by path), bucketed with sides that are multiples of
    ``side_multiple`` (the model's pixel stride); bad files go to ``skips``."""
    root = Path(ds.path).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset {ds.id!r}: path {str(root)!r} is not a directory; fix [[dataset]] path")
    items = []
    for path in list_media(root, ds.type):
        skips.found[ds.id] += 1
        if path.stat().st_size == 0:
            skips.add(ds.id, path, "zero-byte file: empty")
            continue
        caption = read_caption(path, ds)
        if caption is None:
            reason = ("no caption: missing " + path.with_suffix(".txt").name
                      if ds.caption_strategy == "textfile" and not path.with_suffix(".txt").exists()
                      else "no caption: empty caption")
            skips.add(ds.id, path, reason)
            continue
        try:
            info = probe(path, ds.type, index)
        except DecoderUnavailable:  # no file can be read: the install is at fault, not this file
            raise
        except Exception as exc:  # any decoder failure means this file is unusable, not the run
            skips.add(ds.id, path, f"unreadable: {_short(exc)}")
            continue
        bucket, reason = bucket_for(info.width, info.height, info.frames(fps), ds, side_multiple)
        if bucket is None:
            skips.add(ds.id, path, reason)
            continue
        items.append(MediaItem(ds.id, path, ds.type, caption, info.width, info.height, info.frames(fps), bucket))
    return items


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)  # torchcodec prefixes "Class, /src/file.cpp:52, "
    return text if len(text) <= 160 else text[:157] + "..."
