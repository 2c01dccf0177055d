"""Small runtime facts every layer needs: dtype names, the training device, derived seeds.

The bottom of the import graph: it imports torch and nothing of vidtune.
"""
from __future__ import annotations

import hashlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (``bf16``, ``fp16``, ``fp32``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA (or ROCm, which torch also calls cuda) when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_for(*parts) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions), so
    each random stream of a run (noise, routing, data order...) has its own generator."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)
