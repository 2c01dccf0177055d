"""Atomic writes: build in a temp name beside the target, fsync, rename, fsync the directory.

A reader (or a resumed run after a crash) sees either the old file or directory or the
complete new one, never a torn write. Everything that matters goes through here: cache entries,
checkpoints, exported adapters and models, videos, plots and logs' summaries.

- ``atomic_path(path)``: a temp path to hand to a writer that wants a file name (an encoder, a
  ``save`` function); published when the block completes.
- ``atomic_write(path)`` / ``atomic_write_bytes(path, data)``: the same with a file object / bytes.
- ``atomic_dir(path)``: a temp directory to fill; every file in it is fsynced and the directory
  renamed into place (replacing an older one of the same name).

Published files and directories get the modes the umask gives (the temp ones are created 0600 /
0700), so a teammate or a serving process can read a run's outputs. A full disk while writing
becomes ``DiskFullError``, naming the directory, the bytes free and (when known) the bytes needed.

``run_dir_lock(dir)`` makes one process the owner of a run directory (an advisory ``flock`` the
kernel releases when the process dies); ``remove_debris(dir)`` deletes the temp files and
directories a killed writer left, and must only run under that lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the directory and the bytes."""

    def __init__(self, directory: str | Path, need: int | None = None):
        self.directory = Path(directory)
        self.need = need
        try:
            free = human_bytes(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "unknown"
        needs = f"; this write needs about {human_bytes(need)}" if need else ""
        super().__init__(errno.ENOSPC, f"disk full in {self.directory} ({free} free{needs}): free space there "
                                       f"or use a directory on another disk")

    def __str__(self) -> str:
        return self.strerror


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a lack of space: ``OSError`` ENOSPC/EDQUOT, or the
    message a library (torch.save, safetensors) wraps it in."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_umask_lock = threading.Lock()


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # elsewhere reading it means setting it for a moment
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def published_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


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
def atomic_path(path: str | Path, need: int | None = None):
    """Yield a temp path (same directory, same suffix) that replaces ``path`` if the block
    completes. ``need`` (bytes) goes into the error when the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real suffix last: writers that pick a format from the name (video encoders) still can.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, published_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path.parent, need) from exc
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Yield a file object whose content replaces ``path`` only if the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path, need=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


TMP_DIR_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_dir(path: str | Path, need: int | None = None):
    """Yield a temp directory (``.tmp-<name>-*`` beside ``path``) that becomes ``path`` when the
    block completes; an existing ``path`` is replaced. On failure the temp directory is removed.
    ``need`` (bytes) goes into the error when the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_DIR_PREFIX}{path.name}-"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
                os.chmod(f, published_mode())  # some writers (safetensors) create 0600 whatever the umask
        fsync_dir(tmp)
        os.chmod(tmp, published_mode(directory=True))
        if path.exists():  # the same name saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFullError(path.parent, need) from exc
        raise
    fsync_dir(path.parent)


# mkstemp / mkdtemp put 8 characters of [a-z0-9_] in a name: only our own temp names match.
_DEBRIS = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$|^" + re.escape(TMP_DIR_PREFIX) + r".+-[a-z0-9_]{8}$")


def remove_debris(root: str | Path) -> list[Path]:
    """Delete the temp files and directories that writers killed mid-write left under ``root``.
    Only under ``run_dir_lock(root)``: another live writer's temp names look the same."""
    removed = []
    for top, dirs, files in os.walk(root):
        for name in [d for d in dirs if _DEBRIS.match(d)]:
            shutil.rmtree(Path(top, name), ignore_errors=True)
            removed.append(Path(top, name))
            dirs.remove(name)
        for name in files:
            if _DEBRIS.match(name):
                Path(top, name).unlink(missing_ok=True)
                removed.append(Path(top, name))
    return removed


# -- one owner per run directory -------------------------------------------------------------------

LOCK_NAME = ".vidtune.lock"


class DirectoryLocked(RuntimeError):
    """Another live process owns the directory (the message names its pid and host)."""


class DirLock:
    """An exclusive ``flock`` on ``<dir>/.vidtune.lock``, held until ``release`` or the process ends."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(self._fd)
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
                   if holder else "a process that has not written its pid yet")
            raise DirectoryLocked(f"{self.directory} is in use by another run ({who}); wait for it to finish, "
                                  f"stop it, or give this run another directory (lock file {self.path})") from None
        # Who holds it, for the message another run gets (the file is never deleted: a process
        # that opened it before the unlink would lock a ghost).
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, info, 0)
        except OSError:  # a full disk: the lock holds all the same, and the next write says why
            pass

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


@contextlib.contextmanager
def run_dir_lock(directory: str | Path):
    """Own ``directory`` for the block: raises ``DirectoryLocked`` at once if another process
    does. Under torch.distributed, global rank 0 takes the lock and every rank waits at a barrier
    until it has, so the ranks of one run share it and a second run is refused."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        lock = DirLock(directory)
    else:  # rank 0's outcome, sent to all: a refused lock stops every rank at once, not after a timeout
        lock, error = None, None
        if dist.get_rank() == 0:
            try:
                lock = DirLock(directory)
            except (DirectoryLocked, OSError) as exc:
                error = exc
        box = [str(error) if error else ""]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0]:
            raise DirectoryLocked(f"rank 0: {box[0]}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
