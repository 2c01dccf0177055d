"""On-disk caches of VAE latents and text embeddings (safetensors), keyed by content + settings.

An entry's key is the sha256 of: the source file's content digest (or the caption text), every
setting that changes the tensor (target size, frames, fps, crop, encoder fingerprint, dtype) and
``CACHE_VERSION``. A changed setting therefore lands on a different key and can never read a
stale entry; an unchanged one is found again by the next run. Writes are atomic.

Every entry carries the digest of its tensors in its metadata (``vidtune.integrity``). Setup
checks each entry it reuses cheaply (``CacheStore.intact``: header and size; a compressed entry
is decompressed) and re-encodes a damaged one; every read checks the digest, and an entry that
fails it is deleted (so the next setup re-encodes it) and reported as ``CacheEntryError``.

Layout: ``<dir>/<kind>/<key[:2]>/<key>.safetensors`` (``.safetensors.zlib`` when compressed;
either form is read back, whatever ``compress`` says now).
"""
from __future__ import annotations

import hashlib
import json
import threading
import zlib
from pathlib import Path

import torch

from ..fsutil import atomic_write_bytes
from ..integrity import IntegrityError, dumps_verified, loads_verified, parse_header, stream_digest

# Bump when the preprocessing or the stored layout changes; old entries are then never read.
CACHE_VERSION = 1
TEXT_MAX_LENGTH = 512  # UMT5 sequence length the Wan pipeline pads prompts to


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (content keys stay cryptographic: they name what was encoded)."""
    return stream_digest(path, hashlib.sha256(), chunk)


def settings_key(**settings) -> str:
    """Deterministic key of a settings dict (json, sorted keys) plus the cache version."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_fingerprint(directory: str | Path) -> str:
    """Identity of a saved model component without reading its weights: the config/tokenizer
    files' content plus each weight file's name, size and mtime (for symlinks into the HF hub
    cache, the blob name, which is the content hash)."""
    d = Path(directory)
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(d).as_posix()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            if p.is_symlink():
                ident = p.resolve().name
            else:
                st = p.stat()
                ident = f"{st.st_size}:{st.st_mtime_ns}"
            h.update(f"{rel}={ident}\n".encode())
        else:
            h.update(f"{rel}:".encode() + p.read_bytes() + b"\n")
    return h.hexdigest()


class SourceIndex:
    """Per-file facts (content digest, probed size and duration) remembered between runs.

    A fact is reused only while the file's (size, mtime_ns) are unchanged, so a second run over
    a large dataset neither re-hashes nor re-opens every video. Saved as JSON under the cache dir.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._data: dict[str, dict] = {}
        self._dirty = False
        self._lock = threading.Lock()  # digests are computed on a thread pool
        if self.path is not None and self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}  # a damaged index only costs re-hashing

    @staticmethod
    def _stamp(file: Path) -> list[int]:
        st = file.stat()
        return [st.st_size, st.st_mtime_ns]

    def get(self, file: Path, name: str):
        rec = self._data.get(str(Path(file).resolve()))
        if rec is None or rec.get("stamp") != self._stamp(file):
            return None
        return rec.get(name)

    def put(self, file: Path, name: str, value) -> None:
        key, stamp = str(Path(file).resolve()), self._stamp(file)
        with self._lock:
            rec = self._data.get(key)
            if rec is None or rec.get("stamp") != stamp:
                rec = self._data[key] = {"stamp": stamp}
            rec[name] = value
            self._dirty = True

    def digest(self, file: Path) -> str:
        d = self.get(file, "sha256")
        if d is None:
            d = file_digest(file)
            self.put(file, "sha256", d)
        return d

    def save(self) -> None:
        if self.path is not None and self._dirty:
            atomic_write_bytes(self.path, json.dumps(self._data, sort_keys=True).encode())
            self._dirty = False


class CacheEntryError(RuntimeError):
    """A cache entry is missing or damaged (the message names it and what happens next)."""


class CacheStore:
    """safetensors entries under ``root/<kind>/``, written atomically with their digest,
    optionally zlib-compressed."""

    def __init__(self, root: str | Path, compress: bool = False):
        self.root = Path(root)
        self.compress = compress

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        base = self.root / kind / key[:2] / f"{key}.safetensors"
        return base, base.with_name(base.name + ".zlib")

    def path(self, kind: str, key: str) -> Path | None:
        """The existing entry's file, or None."""
        for p in self._paths(kind, key):
            if p.is_file():
                return p
        return None

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key) is not None

    def intact(self, kind: str, key: str, damaged: list[tuple[Path, str]] | None = None) -> bool:
        """Whether the entry exists and passes the cheap check (header, digest present, exact
        size); a damaged one is appended to ``damaged`` as (path, reason)."""
        path = self.path(kind, key)
        if path is None:
            return False
        try:
            if path.suffix == ".zlib":
                data = zlib.decompress(path.read_bytes())
                parse_header(data[:8], lambda n: data[8:8 + n], len(data), path)
            else:
                with open(path, "rb") as f:
                    parse_header(f.read(8), f.read, path.stat().st_size, path)
        except (IntegrityError, zlib.error, OSError) as exc:
            if damaged is not None:
                damaged.append((path, str(exc).removeprefix(f"{path}: ")))
            return False
        return True

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor],
             metadata: dict[str, str] | None = None) -> Path:
        data = dumps_verified(tensors, metadata)
        plain, packed = self._paths(kind, key)
        if self.compress:
            return atomic_write_bytes(packed, zlib.compress(data, 1))
        return atomic_write_bytes(plain, data)

    @staticmethod
    def read(path: str | Path) -> dict[str, torch.Tensor]:
        """The entry's tensors, checked against their digest. A damaged entry is deleted (the next
        setup re-encodes it) and raises ``CacheEntryError``."""
        path = Path(path)
        try:
            data = path.read_bytes()
            if path.suffix == ".zlib":
                data = zlib.decompress(data)
            return loads_verified(data, path)
        except FileNotFoundError:
            raise CacheEntryError(f"cache entry {path} is gone (deleted during the run?); the next run "
                                  f"re-encodes it") from None
        except OSError:  # permissions, I/O errors: not the entry's content
            raise
        except Exception as exc:  # zlib, IntegrityError, safetensors: the bytes are bad, whatever the layer
            path.unlink(missing_ok=True)
            reason = str(exc).removeprefix(f"{path}: ")
            raise CacheEntryError(f"cache entry {path} is damaged ({reason}); deleted it, the next run "
                                  f"re-encodes it") from exc

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        path = self.path(kind, key)
        if path is None:
            raise CacheEntryError(f"no {kind} cache entry {key} under {self.root}; the next run encodes it")
        return self.read(path)


def pad_prompt_embeds(embeds: list[torch.Tensor], max_length: int = TEXT_MAX_LENGTH) -> torch.Tensor:
    """Stack trimmed (len_i, D) embeddings into (B, max_length, D), zero after each length,
    which is exactly the layout ``WanPipeline.encode_prompt`` returns."""
    out = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e[:max_length]
    return out
