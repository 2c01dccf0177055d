"""What the parts of the GPU check share: the row recorder, timers, memory readings, the
environment record. A part is ``fn(ctx)``; it measures and calls ``ctx.row(...)``."""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch

from vidtune.fsutil import atomic_write_bytes

GiB = 1 << 30


class Context:
    """One part's run: the device, the size ("toy" on the CPU dry run and in the cuda tests,
    "full" on a GPU) and the rows, rewritten to ``path`` after each one (a killed part keeps them)."""

    def __init__(self, part: str, device, size: str, path: Path | None = None, log=print):
        self.part, self.device, self.size, self.path, self.log = part, torch.device(device), size, path, log
        self.rows: list[dict] = []
        self.error: str | None = None
        self.env = env_info(self.device)

    @property
    def full(self) -> bool:
        return self.size == "full"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def row(self, case: str, ok: bool | None = None, **values) -> dict:
        r = dict(case=case, ok=ok, values=values)
        self.rows.append(r)
        shown = {k: v for k, v in values.items() if k != "detail"}
        self.log(f"[{self.part}] {case}: {'' if ok is None else ('ok' if ok else 'FAILED')} {shown}", flush=True)
        self.flush()
        return r

    def flush(self) -> None:
        if self.path is not None:
            data = dict(part=self.part, env=self.env, rows=self.rows, error=self.error)
            atomic_write_bytes(self.path, json.dumps(data, indent=1, default=str).encode())

    def fail(self, case: str, e: Exception) -> None:
        """Record ``e`` (being handled) as a failed row of ``case``; the part goes on."""
        self.log(traceback.format_exc(), flush=True)
        self.row(case, False, error=_one_line(e))

    @contextlib.contextmanager
    def guard(self, case: str):
        try:
            yield
        except Exception as e:
            self.fail(case, e)
            free(self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def run_part(name: str, target: str, path: Path, device: str, size: str) -> int:
    """Import ``module:function`` of this package and run it on a fresh Context."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx = None
    try:
        ctx = Context(name, device, size, path)
        ctx.flush()
        if ctx.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run on a GPU, or pass --dry-run for the CPU rehearsal")
        module, fn = target.split(":")
        getattr(importlib.import_module(f"vidtune.bench.gpu_check.{module}"), fn)(ctx)
        return 0
    except BaseException as e:
        traceback.print_exc()
        if ctx is not None:
            ctx.error = _one_line(e)
            ctx.flush()
        return 1


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


# ---------------------------------------------------------------------------------------------
# measuring

def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of ``reps`` back-to-back calls after ``warmup``: CUDA events on a GPU (one
    synchronise at the end), perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)  # sync: read the events
        return [s.elapsed_time(e) / 1e3 for s, e in ev]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_once(fn, device) -> tuple[float, object]:
    """(seconds, result) of one call, the device idle before and after it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: the step starts on an idle device
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        res = fn()
        e.record()
        torch.cuda.synchronize(device)  # sync: every kernel of the step is in the time
        return s.elapsed_time(e) / 1e3, res
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def copy_seconds(nbytes: int, device, reps: int, *, from_host: bool = False) -> float:
    """Median seconds of one ``nbytes`` copy on the device, or from pinned host memory to it."""
    device = torch.device(device)
    if from_host:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return median(timed(lambda: dst.copy_(src, non_blocking=True), device, reps))


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> float:
    """(max - min) / median of repeated timings."""
    return (max(xs) - min(xs)) / statistics.median(xs) if xs else 0.0


@contextlib.contextmanager
def peak_above(device, into: list):
    """Append the peak bytes allocated in the block above what was allocated at its start
    (CUDA only; None on the CPU, whose allocator keeps no such record)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        into.append(None)
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    into.append(torch.cuda.max_memory_allocated(device) - base)


def built_on(device):
    """Build under this device: random init where the model runs, no host copy of full-size weights."""
    return torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gib(n) -> float | None:
    return None if n is None else n / GiB


def randn(shape, device, dtype=torch.float32, seed: int = 0, scale: float = 1.0, offset: float = 0.0):
    """Seeded normal values made on ``device`` (full-size tensors never cross the host link)."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return (t.mul_(scale).add_(offset)).to(dtype)


# ---------------------------------------------------------------------------------------------
# the environment

def _dist(name: str) -> str | None:
    """Version of an installed distribution; "(wheel)" when it came from the check's wheels."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    where = str(getattr(dist, "_path", ""))
    return dist.version + (" (wheel)" if f"{os.sep}.env{os.sep}site{os.sep}" in where else "")


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=15)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def env_info(device: torch.device) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                hip=torch.version.hip, device=str(device), cpu_count=os.cpu_count())
    for name in ("triton", "diffusers", "peft", "transformers", "torchao", "huggingface_hub", "safetensors"):
        info[name] = _dist(name)
    if device.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / GiB, 1),
                    sms=p.multi_processor_count, driver=_driver())
    return info
