"""Atomic writes: build in a temp name beside the target, fsync, rename, fsync the directory.

A reader (or a resumed run after a crash) sees either the old file or directory or the
complete new one, never a torn write. Everything that matters goes through here: cache entries,
checkpoints, exported adapters and models, videos, plots and logs' summaries.

- ``atomic_path(path)``: a temp path to hand to a writer that wants a file name (an encoder, a
  ``save`` function); published when the block completes.
- ``atomic_write(path)`` / ``atomic_write_bytes(path, data)``: the same with a file object / bytes.
- ``atomic_dir(path)``: a temp directory to fill; every file in it is fsynced and the directory
  renamed into place (replacing an older one of the same name).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or creation inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path (same directory, same suffix) that replaces ``path`` if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real suffix last: writers that pick a format from the name (video encoders) still can.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Yield a file object whose content replaces ``path`` only if the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


TMP_DIR_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp directory (``.tmp-<name>-*`` beside ``path``) that becomes ``path`` when the
    block completes; an existing ``path`` is replaced. On failure the temp directory is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_DIR_PREFIX}{path.name}-"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if path.exists():  # the same name saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
