"""Atomic training checkpoints: ``<run>/checkpoints/step-000123/``.

A checkpoint is written into a hidden temp directory next to the final one, every file fsynced,
then the directory is renamed into place and the parent fsynced: a crash at any moment leaves
either no checkpoint of that step or a complete one (leftover temp dirs are removed on the next
save). Contents: ``weights.safetensors`` (the trained parameters: LoRA or the full model, fp32
as trained), ``state.pt`` (optimizer, scheduler, every RNG, loader position, counters) and
``meta.json`` (written last; its presence marks a complete checkpoint).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..fsutil import TMP_DIR_PREFIX, atomic_dir

PREFIX = "step-"

def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (``<run>/checkpoints``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and (d / "meta.json").is_file()]
    return sorted(found, key=lambda d: int(d.name[len(PREFIX):]))


def save_checkpoint(root: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    meta: dict, keep: int = 0) -> Path:
    """Write checkpoint ``step`` atomically; then keep only the newest ``keep`` (0: all)."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_DIR_PREFIX}{PREFIX}*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    if keep > 0:
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(root: str | Path, resume: str) -> Path | None:
    """``resume = "latest"`` -> the newest complete checkpoint (None if there is none yet);
    otherwise a checkpoint directory, which must exist."""
    if resume == "latest":
        dirs = checkpoint_dirs(root)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"train.resume = {resume!r}: not a complete checkpoint directory (no "
                                f"meta.json); use \"latest\" or one of {[str(d) for d in checkpoint_dirs(root)]}")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, state, meta) of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    weights = load_file(path / "weights.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return weights, state, meta
