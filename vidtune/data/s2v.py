"""Wan S2V samples: each video's audio source and training window, and its cached audio features.

A sample is a window of the video, frames [start, start + bucket.frames) at the model fps, encoded
by the VAE as one causal stream (the training inputs inference implies; reference README, last
section):

- its first frame is the reference: the stream's first latent is exactly the VAE of that frame
  alone, the model's ``ref_latents``, and it is not in the loss;
- a first window (``lead`` 1) denoises the 4F frames after it; a continuation window
  (``audio.motion = "auto"``, ``lead`` 73) treats its first 73 frames as the motion frames (their 19
  latents are the stream's first 19) and denoises the 4F frames after them;
- the audio features are those of the denoised frames, at their times in the video.

The window starts where ``audio.truncation_mode`` says (beginning, end, or a random start fixed
per file). Audio comes from the video's own track (``auto_split``) or the file of the same stem in
``audio.path``; without one the video is skipped, or trains on zero features (``allow_zero_audio``).
Features are cached like latents, keyed by the audio's content, the window and the encoder.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path

import torch

from ..config import AudioConfig, DatasetConfig, ModelConfig
from ..models.wan_s2v import MOTION_FRAMES
from .audio import NoAudio, audio_duration, decode_audio, find_audio_file, frame_features
from .buckets import Bucket
from .cache import CacheStore, SourceIndex, settings_key
from .discover import MediaItem, SkipLog, _short

AUDIO = "audio"
ZERO_AUDIO = "<zero audio>"
MOTION_LEAD = MOTION_FRAMES[0]  # a continuation window's reference + motion frames before the denoised ones
MOTION_MIN_SIDE = 64  # pixels: the frame packer's 4x tokens take 8x8 latents


def audio_source(item: MediaItem, ds: DatasetConfig, root: Path) -> Path | None:
    """The file whose audio goes with ``item``: the video itself, or the stem-matched audio file
    (same subfolders under ``audio.path`` first, then its top level)."""
    if ds.audio.auto_split:
        return item.path
    base = Path(ds.audio.path).expanduser()
    rel = item.path.relative_to(root).parent
    return find_audio_file(base / rel, item.path.stem) or find_audio_file(base, item.path.stem)


def _probe_audio(path: Path, index: SourceIndex | None) -> float | None:
    """Seconds of audio in ``path`` (None: none), remembered in the index while the file is unchanged."""
    known = index.get(path, "audio_seconds") if index is not None else None
    if known is not None:
        return known if known >= 0 else None
    try:
        seconds = audio_duration(path)
    except NoAudio:
        seconds = None
    if index is not None:
        index.put(path, "audio_seconds", -1.0 if seconds is None else seconds)
    return seconds


def clip_length(frames: int, ds: DatasetConfig, fps: int) -> int:
    """resolution_frames buckets: clip lengths step by ``audio.duration_interval`` seconds (whole
    4-frame latents), so audio windows fall in duration buckets."""
    step = 4 * round(ds.audio.duration_interval * fps / 4)
    if ds.bucket_strategy != "resolution_frames" or step < 4 or frames - 1 < step:
        return frames
    return 1 + (frames - 1) // step * step


def window_start(available: int, length: int, mode: str, seed_text: str) -> int:
    """First frame of a ``length``-frame window in ``available`` frames."""
    spare = available - length
    if mode == "beginning" or spare <= 0:
        return 0
    if mode == "end":
        return spare
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    return int(torch.randint(0, spare + 1, (1,), generator=g))


def plan(items: list[MediaItem], ds: DatasetConfig, fps: int, skips: SkipLog,
         index: SourceIndex | None = None) -> list[MediaItem]:
    """The S2V samples of ``ds``'s discovered videos (audio source, window); the rest go to ``skips``."""
    a: AudioConfig = ds.audio
    root = Path(ds.path).expanduser()
    out = []
    for item in items:
        src = audio_source(item, ds, root)
        seconds = _probe_audio(src, index) if src is not None else None
        if seconds is None:
            if not a.allow_zero_audio:
                where = "its audio track" if a.auto_split else f"{item.path.stem}.* in {a.path}"
                skips.add(ds.id, item.path, f"no audio: none found ({where}); set audio.allow_zero_audio = true "
                                            f"to train it on silence")
                continue
            src = None
        elif a.max_duration_seconds is not None and seconds > a.max_duration_seconds:
            skips.add(ds.id, item.path, f"audio too long: {seconds:.1f} s > audio.max_duration_seconds "
                                        f"{a.max_duration_seconds}")
            continue
        frames = clip_length(item.bucket.frames, ds, fps)
        b = item.bucket
        fits = min(b.width, b.height) >= MOTION_MIN_SIDE and item.frames >= frames - 1 + MOTION_LEAD
        lead = MOTION_LEAD if a.motion == "auto" and fits else 1
        length = frames - 1 + lead
        digest = index.digest(item.path) if index is not None and a.truncation_mode == "random" else str(item.path)
        start = window_start(item.frames, length, a.truncation_mode, digest)
        bucket = Bucket(b.width, b.height, length)
        out.append(dataclasses.replace(item, bucket=bucket, start=start, lead=lead,
                                       audio=ZERO_AUDIO if src is None else str(src)))
    return out


def audio_settings(item: MediaItem, source_digest: str, fps: int, model: ModelConfig, encoder: str) -> dict:
    """What an audio cache entry depends on: the audio's content, the denoised frames, the encoder."""
    zero = item.audio == ZERO_AUDIO
    return dict(kind=AUDIO, source="zero" if zero else source_digest, first=item.start + item.lead,
                frames=item.bucket.frames - item.lead, fps=fps, encoder=encoder, dtype=model.dtype)


def cache_audio(keyed: list[tuple[MediaItem, str, str]], store: CacheStore, encoders, index: SourceIndex,
                fps: int, model: ModelConfig, skips: SkipLog, failed: set[str], log=print) -> tuple[dict, dict]:
    """Fill the audio cache for the (item, latent key, video digest) of S2V samples. Returns
    ({latent key: ((AUDIO, audio key),)}, counts); a sample whose audio fails is added to ``failed``."""
    from ..runtime import DTYPES

    dtype = DTYPES[model.dtype]
    keys, todo, damaged = {}, defaultdict(list), []
    for item, lkey, vdigest in keyed:
        digest = vdigest if item.audio in (ZERO_AUDIO, str(item.path)) else index.digest(Path(item.audio))
        akey = settings_key(**audio_settings(item, digest, fps, model, encoders.audio_fingerprint))
        keys[lkey] = ((AUDIO, akey),)
        if not store.intact(AUDIO, akey, damaged):  # a damaged entry is re-encoded
            todo[item.audio].append((item, lkey, akey))
    index.save()
    stats = {"audio reused": len(keys) - sum(map(len, todo.values())), "audio encoded": 0}
    if damaged:
        stats["audio damaged, re-encoded"] = len(damaged)
    if todo:
        log(f"Encoding the audio of {sum(map(len, todo.values()))} clip(s) with wav2vec2...")
    for source, group in todo.items():  # one wav2vec2 pass per audio file
        try:
            hidden = None if source == ZERO_AUDIO else encoders.encode_audio(decode_audio(source)).cpu()
        except Exception as exc:  # a track that probes but does not decode: that sample is skipped
            for item, lkey, _ in group:
                skips.add(item.dataset_id, item.path, f"audio decode failed: {_short(exc)}")
                failed.add(lkey)
            continue
        for item, lkey, akey in group:
            frames = item.bucket.frames - item.lead
            if hidden is None:
                feats = torch.zeros(frames, *encoders.audio_shape())
            else:
                feats = frame_features(hidden, item.start + item.lead, frames, fps)
            store.save(AUDIO, akey, {"audio": feats.to(dtype)})
            stats["audio encoded"] += 1
    return keys, stats
