"""Group streamers: the native one (csrc/streamer via vidtune.native) and a pure-Python twin.

Both have the same interface and the same state machine (evicted -> in flight -> resident):

    gid = s.add_group(nbytes); s.host_tensor(gid).copy_(packed)   # RAM tier (pinned on CUDA)
    s.spill(gid, path)                                            # optional: disk tier
    s.load(gid)            # queue the copy into a free slot (the pool has num_slots slots)
    slot = s.wait(gid)     # uint8 tensor of the slot, usable on the current (compute) stream
    s.evict(gid)           # the slot goes back to the pool once the compute stream is past it

On CUDA the copies run on a side stream; ``wait`` makes the current stream wait on the group's
event and ``evict`` records a release event on it: the host never synchronises with the GPU.
On CPU the copies run on worker threads and ``wait`` blocks until the copy is done.

The three calls go through ``torch.library`` custom ops (``vidtune::group_load`` / ``_wait`` /
``_evict``) so torch.compile sees opaque ops instead of tracing into threads and streams.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import threading

import torch

from vidtune import native

EVICTED, IN_FLIGHT, RESIDENT = "evicted", "in_flight", "resident"
ALIGN = 4096


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _current_stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _CudaSlot:
    """__cuda_array_interface__ over a slot of the native CUDA pool (keeps the streamer alive)."""

    def __init__(self, owner, ptr: int, nbytes: int):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


class NativeStreamer:
    backend = "native"

    def __init__(self, num_slots: int, slot_bytes: int, num_workers: int = 1, device="cpu"):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and torch.version.hip:
            raise RuntimeError("the native streamer has no ROCm backend; use offload.backend = 'python'")
        mod = native.native_module(cuda=cuda)
        self._s = mod.Streamer("cuda" if cuda else "cpu", num_slots, slot_bytes, num_workers,
                               self.device.index or 0)
        self.slot_bytes = self._s.slot_bytes
        self.num_slots = num_slots
        if cuda:
            self._slots = [torch.as_tensor(_CudaSlot(self._s, self._s.slot_ptr(i), self.slot_bytes),
                                           device=self.device) for i in range(num_slots)]
        else:
            self._slots = [torch.frombuffer(self._s.slot_buffer(i), dtype=torch.uint8) for i in range(num_slots)]

    def add_group(self, nbytes: int) -> int:
        return self._s.add_group(nbytes)

    def host_tensor(self, gid: int) -> torch.Tensor:
        return torch.frombuffer(self._s.host_buffer(gid), dtype=torch.uint8)

    def spill(self, gid: int, path: str) -> None:
        self._s.spill(gid, os.fspath(path))

    def uses_direct_io(self, gid: int) -> bool:
        return self._s.uses_direct_io(gid)

    def load(self, gid: int) -> bool:
        return self._s.load(gid)

    def wait_slot(self, gid: int) -> int:
        return self._s.wait(gid, _current_stream_handle(self.device))

    def wait(self, gid: int) -> torch.Tensor:
        return self._slots[self.wait_slot(gid)]

    def evict(self, gid: int) -> None:
        self._s.evict(gid, _current_stream_handle(self.device))

    def state(self, gid: int) -> str:
        return {0: EVICTED, 1: IN_FLIGHT, 2: RESIDENT}[int(self._s.state(gid))]

    def slot_tensors(self) -> list[torch.Tensor]:
        return self._slots

    def stats(self) -> dict:
        return dict(self._s.stats())

    def reset_stats(self) -> None:
        self._s.reset_stats()


class PythonStreamer:
    """The same state machine in Python: worker threads on CPU, torch streams on CUDA and ROCm."""

    backend = "python"

    def __init__(self, num_slots: int, slot_bytes: int, num_workers: int = 1, device="cpu"):
        if num_slots < 1 or num_workers < 1:
            raise ValueError("num_slots and num_workers must be >= 1")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.slot_bytes = _round_up(slot_bytes)
        self.num_slots = num_slots
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))
        self._groups: list[dict] = []
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(num_workers, thread_name_prefix="vidtune-streamer")
        if self._cuda:
            self._side = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(num_slots)]
            self._released = [torch.cuda.Event() for _ in range(num_slots)]
            self._bounce = [None] * num_slots
        self.reset_stats()

    def add_group(self, nbytes: int) -> int:
        if nbytes > self.slot_bytes:
            raise ValueError(f"group of {nbytes} bytes does not fit a slot of {self.slot_bytes}")
        host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
        self._groups.append(dict(nbytes=nbytes, host=host, fd=-1, state=EVICTED, slot=-1, future=None))
        return len(self._groups) - 1

    def host_tensor(self, gid: int) -> torch.Tensor:
        host = self._groups[gid]["host"]
        if host is None:
            raise RuntimeError("streamer: group was spilled to disk; no RAM copy")
        return host

    def spill(self, gid: int, path: str) -> None:
        g = self._groups[gid]
        with open(path, "wb") as f:
            f.write(g["host"].numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        g["fd"] = os.open(path, os.O_RDONLY)
        g["host"] = None

    def uses_direct_io(self, gid: int) -> bool:
        return False  # buffered reads + POSIX_FADV_DONTNEED: torch's buffers are not 4 KiB aligned

    def _read(self, fd: int, dst: torch.Tensor, n: int) -> None:
        view = memoryview(dst.numpy())[:n]
        done = 0
        while done < n:
            r = os.preadv(fd, [view[done:]], done)
            if r <= 0:
                raise RuntimeError("streamer: file shorter than its group")
            done += r
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _copy(self, gid: int, slot: int) -> None:
        g = self._groups[gid]
        n, dst = g["nbytes"], self._slots[slot]
        if not self._cuda:
            if g["fd"] >= 0:
                self._read(g["fd"], dst, n)
            else:
                dst[:n].copy_(g["host"])
        else:
            src = g["host"]
            if g["fd"] >= 0:
                if self._bounce[slot] is None:
                    self._bounce[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                self._copied[slot].synchronize()  # worker only: the bounce buffer is free again
                self._read(g["fd"], self._bounce[slot], n)
                src = self._bounce[slot][:n]
            with torch.cuda.stream(self._side):
                self._side.wait_event(self._released[slot])
                dst[:n].copy_(src, non_blocking=True)
                self._copied[slot].record(self._side)
        with self._lock:
            g["state"] = RESIDENT
            self._stats["bytes_copied"] += n
            if g["fd"] >= 0:
                self._stats["bytes_read_disk"] += n

    def load(self, gid: int) -> bool:
        with self._lock:
            g = self._groups[gid]
            if g["state"] != EVICTED:
                return False
            if not self._free:
                raise RuntimeError(f"streamer: no free slot for group {gid} (evict a group first; "
                                   "the pool holds prefetch_depth + 1 slots)")
            g["slot"] = self._free.pop()
            g["state"] = IN_FLIGHT
            st = self._stats
            st["loads"] += 1
            st["resident_bytes"] += self.slot_bytes
            st["peak_resident_bytes"] = max(st["peak_resident_bytes"], st["resident_bytes"])
            g["future"] = self._pool.submit(self._copy, gid, g["slot"])
        return True

    def wait_slot(self, gid: int) -> int:
        g = self._groups[gid]
        if g["state"] == EVICTED:
            raise RuntimeError(f"streamer: wait on group {gid}, which was not loaded")
        g["future"].result()  # CPU: the copy is done; CUDA: the copy is enqueued
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[g["slot"]])
        return g["slot"]

    def wait(self, gid: int) -> torch.Tensor:
        return self._slots[self.wait_slot(gid)]

    def evict(self, gid: int) -> None:
        g = self._groups[gid]
        if g["state"] == EVICTED:
            return
        g["future"].result()
        with self._lock:
            if self._cuda:
                self._released[g["slot"]].record(torch.cuda.current_stream(self.device))
            self._free.append(g["slot"])
            g["slot"], g["state"], g["future"] = -1, EVICTED, None
            self._stats["evictions"] += 1
            self._stats["resident_bytes"] -= self.slot_bytes

    def state(self, gid: int) -> str:
        return self._groups[gid]["state"]

    def slot_tensors(self) -> list[torch.Tensor]:
        return self._slots

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        resident = getattr(self, "_stats", {}).get("resident_bytes", 0)
        self._stats = dict(bytes_copied=0, bytes_read_disk=0, loads=0, evictions=0,
                           resident_bytes=resident, peak_resident_bytes=resident)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for g in getattr(self, "_groups", []):
            if g["fd"] >= 0:
                os.close(g["fd"])


# --- torch.library ops ---------------------------------------------------------------------------
_registry: dict[int, object] = {}
_ids = itertools.count(1)


def register(streamer) -> int:
    sid = next(_ids)
    _registry[sid] = streamer
    return sid


def unregister(sid: int) -> None:
    _registry.pop(sid, None)


@torch.library.custom_op("vidtune::group_load", mutates_args=())
def group_load(sid: int, gid: int) -> None:
    _registry[sid].load(gid)


@torch.library.custom_op("vidtune::group_wait", mutates_args=())
def group_wait(sid: int, gid: int) -> int:
    """Make the current stream wait for the group; returns its slot index."""
    return _registry[sid].wait_slot(gid)


@torch.library.custom_op("vidtune::group_evict", mutates_args=())
def group_evict(sid: int, gid: int) -> None:
    _registry[sid].evict(gid)


group_load.register_fake(lambda sid, gid: None)
group_wait.register_fake(lambda sid, gid: 0)
group_evict.register_fake(lambda sid, gid: None)


def make_streamer(backend: str, num_slots: int, slot_bytes: int, num_workers: int = 1, device="cpu"):
    """backend: 'native', 'python' or 'auto' (native when built, else python with one log line)."""
    if backend not in ("auto", "native", "python"):
        raise ValueError(f"offload.backend must be auto, native or python, got {backend!r}")
    device = torch.device(device)
    if backend == "python":
        return PythonStreamer(num_slots, slot_bytes, num_workers, device)
    try:
        return NativeStreamer(num_slots, slot_bytes, num_workers, device)
    except RuntimeError as e:
        if backend == "native":
            raise RuntimeError(f"offload.backend = 'native' but the native streamer is unavailable: {e}") from e
        import logging

        logging.getLogger("vidtune.offload").info("offload: native streamer unavailable (%s); using the Python streamer", e)
        return PythonStreamer(num_slots, slot_bytes, num_workers, device)
