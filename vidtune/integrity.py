"""Digests that tell an intact artefact from a damaged one: cache entries and checkpoints.

A truncated file, zeroed blocks or a flipped bit must never be trained on or resumed from.
Two levels of checking, by cost:

- ``check_safetensors(path)``: cheap, reads the header only: it parses, carries a digest, and the
  file is exactly as long as the header says. Catches truncation and torn headers.
- ``tensors_digest`` / ``stream_digest``: every byte, with xxHash's XXH3-128 (~20 GB/s on one
  core, 30x sha256 here): catches damage inside the data.

Safetensors files we write carry ``tensors_digest`` of their tensors in their metadata under
``DIGEST_KEY`` (``dumps_verified`` / ``loads_verified``), so the check needs no side file.
Checkpoints list each file's size and ``stream_digest`` in a manifest written last.

Not a defence against tampering (XXH3 is not cryptographic); content keys stay sha256.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import xxhash

DIGEST_KEY = "vidtune.digest"
ALGORITHM = "xxh3_128"


class IntegrityError(ValueError):
    """A file's bytes do not match its digest or its header (the message says which file)."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes of ``tensors`` (CPU), independent of dict order."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def stream_digest(path: str | Path, h=None, chunk: int = 8 << 20) -> str:
    """Digest of a file's bytes, read in chunks: XXH3-128, or the ``hashlib``-style ``h`` given."""
    h = h if h is not None else xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dumps_verified(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of ``tensors`` with their digest in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save(tensors, metadata={**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)})


def loads_verified(data: bytes, source: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of safetensors ``data`` after checking them against their stored digest."""
    from safetensors.torch import load

    header = parse_header(data[:8], lambda n: data[8:8 + n], len(data), source)
    tensors = load(data)
    expected = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if expected != tensors_digest(tensors):
        raise IntegrityError(f"{source}: its tensors do not match their digest")
    return tensors


def parse_header(head: bytes, read, size: int, source: str | Path) -> dict:
    """The JSON header of a safetensors file of ``size`` bytes (``read(n)``: the n bytes after
    the first 8), checked for the digest and for the exact length the offsets imply."""
    if len(head) < 8:
        raise IntegrityError(f"{source}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise IntegrityError(f"{source}: header of {n} bytes in a {size}-byte file (truncated)")
    try:
        header = json.loads(read(n))
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{source}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{source}: unreadable safetensors header")
    if DIGEST_KEY not in (header.get("__metadata__") or {}):
        raise IntegrityError(f"{source}: no {DIGEST_KEY} in its metadata (written by an older vidtune)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise IntegrityError(f"{source}: {size} bytes, its header describes {8 + n + end} (truncated or padded)")
    return header


def check_safetensors(path: str | Path) -> None:
    """Header-only check of a safetensors file: raises ``IntegrityError`` saying what is wrong."""
    path = Path(path)
    with open(path, "rb") as f:
        parse_header(f.read(8), f.read, path.stat().st_size, path)
