"""Atomic, verified training checkpoints: ``<run>/checkpoints/step-000123/``.

A checkpoint is written into a hidden temp directory next to the final one, every file fsynced,
then the directory is renamed into place and the parent fsynced: a crash at any moment leaves
either no checkpoint of that step or a complete one (the temp directory a crash leaves is removed
by the next run, under the run directory's lock). Contents: ``weights.safetensors`` (the trained
parameters: LoRA or the full model, fp32 as trained), ``state.pt`` (optimizer, every RNG, loader
position, counters) and ``meta.json``, written last: the step, the hyperparameters the run used,
and a manifest of the other files (size and XXH3-128 digest). Its presence marks a complete
checkpoint; the manifest tells an intact one from one damaged on disk since.

An FSDP2 full fine-tune writes ``sharded/`` instead of ``weights.safetensors`` and the optimizer
part of ``state.pt``: ``torch.distributed.checkpoint`` files, one per rank, each rank writing only
its own shards of the weights and optimizer moments (no rank ever holds the whole state), into
rank 0's temp directory; the manifest covers them too, and DCP reshards them on load, so any world
size, or one process, resumes it (``meta["sharded"]``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..fsutil import atomic_dir
from ..integrity import ALGORITHM, stream_digest

PREFIX = "step-"
WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "meta.json"
SHARDED = "sharded"  # FSDP2 full fine-tunes: torch.distributed.checkpoint files
DAMAGED = ".damaged"  # suffix of a checkpoint that failed verification


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from (the message names it, why, and what to do)."""


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (``<run>/checkpoints``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX)
             and d.name[len(PREFIX):].isdigit() and (d / META).is_file()]
    return sorted(found, key=lambda d: int(d.name[len(PREFIX):]))


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(root: str | Path, step: int, weights: dict[str, torch.Tensor] | None, state: dict,
                    meta: dict, keep: int = 0, shards=None) -> Path:
    """Write checkpoint ``step`` atomically, with its manifest; then keep only the newest ``keep``
    (0: all). A full disk raises ``fsutil.DiskFullError`` and leaves nothing behind. ``shards``
    (FSDP2, in place of ``weights``): called with the temp directory, it writes ``sharded/`` there
    together with the other ranks."""
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"{PREFIX}{step:06d}"
    with atomic_dir(final, need=_tensor_bytes(weights or {}) + _tensor_bytes(state)) as tmp:
        if shards is None:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        else:
            shards(tmp)
            meta = {**meta, "sharded": True}
        with open(tmp / STATE, "wb") as f:  # a file object: a full disk surfaces as ENOSPC, not a torch assert
            torch.save(state, f)
        files = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, ALGORITHM: stream_digest(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / META).write_text(json.dumps({"step": step, **meta, "files": files}, indent=1))
    if keep > 0:
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's meta after checking every file against its manifest; raises
    ``CheckpointError`` saying which file is damaged and how."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {META} is unreadable ({exc})") from None
    for name, rec in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{path}: {name} has {size} bytes, its manifest says {rec['bytes']} (truncated)")
        if stream_digest(f) != rec[ALGORITHM]:
            raise CheckpointError(f"{path}: {name} does not match its digest (damaged on disk)")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict, dict]:
    """(weights, state, meta) of a checkpoint directory, verified first; weights None for a
    sharded one (``vidtune.distributed.load_sharded`` reads ``sharded/``)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        weights = None if meta.get("sharded") else load_file(path / WEIGHTS)
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors: a file we cannot read, whatever the reason
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return weights, state, meta


def resume_checkpoint(root: str | Path, resume: str, log=print):
    """The checkpoint ``train.resume`` names, loaded: (path, weights, state, meta), or None when
    ``"latest"`` finds no checkpoint yet. ``"latest"`` takes the newest intact one, saying which
    it skipped and why and moving those aside (``step-N.damaged``); a named checkpoint that is
    damaged is an error. Call under the run directory's lock."""
    if resume != "latest":
        path = Path(resume)
        if not (path / META).is_file():
            raise CheckpointError(f"train.resume = {resume!r}: not a complete checkpoint directory (no {META}); "
                                  f"use \"latest\" or one of {[str(d) for d in checkpoint_dirs(root)]}")
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as exc:
            raise CheckpointError(f"train.resume: {exc}; set train.resume = \"latest\" to take the newest "
                                  f"intact checkpoint") from None
    bad = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as exc:
            # Aside, not deleted: out of "latest" and of keep_checkpoints' count, still there to inspect.
            aside = path.with_name(path.name + DAMAGED)
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            log(f"resume: skipping {exc}; moved it to {aside.name}")
            bad.append(aside.name)
    if bad:
        raise CheckpointError(f"train.resume = \"latest\": no intact checkpoint under {root} (damaged: "
                              f"{', '.join(bad)}, reasons above); delete them to train from the start")
    return None
