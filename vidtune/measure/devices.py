"""Device budgets for the planner and the benchmark projections.

GPU figures are vendor spec-sheet values (dense, no sparsity), not measurements; the suites in
``benchmarks/suites/*.toml`` carry the same numbers (a test keeps them equal). ``cpu`` is this
machine: its memory is the physical RAM and its fp32 peak is measured with a big matmul.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import lru_cache

GiB = 1 << 30
GB = 10**9
T = 10**12


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    memory_bytes: int
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    fp32_flops: float  # non-tensor fp32 peak, FLOP/s
    mem_bw: float  # device memory bandwidth, bytes/s
    host_link_bw: float  # host <-> device, bytes/s per direction
    reserve_bytes: int  # runtime context + library workspaces, never available to tensors
    match: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() for the timed path
    source: str = ""

    @property
    def usable_bytes(self) -> int:
        """What the allocator can hand out: memory minus the runtime reserve, minus 5% for
        allocator fragmentation (caching allocators round and split blocks)."""
        return int((self.memory_bytes - self.reserve_bytes) * 0.95)

    def peak_flops(self, dtype_bytes: int) -> float:
        return self.bf16_flops if dtype_bytes <= 2 else self.fp32_flops


DEVICES: dict[str, Device] = {
    "rtx4090": Device(
        "rtx4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 165.2 * T, 82.6 * T, 1008 * GB, 32 * GB, int(0.8 * GiB),
        ("RTX 4090",), "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 165.2 TFLOPS BF16 tensor "
        "with FP32 accumulate, 82.6 TFLOPS FP32, 24 GB GDDR6X at 1008 GB/s; PCIe 4.0 x16 (~32 GB/s)"),
    "a6000": Device(
        "a6000", "NVIDIA RTX A6000", 48 * GiB, 154.8 * T, 38.7 * T, 768 * GB, 32 * GB, int(0.8 * GiB),
        ("RTX A6000",), "NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor with sparsity (154.8 dense), "
        "38.7 TFLOPS FP32, 48 GB GDDR6 at 768 GB/s; PCIe 4.0 x16 (~32 GB/s)"),
    "mi300x": Device(
        "mi300x", "AMD Instinct MI300X", 192 * GiB, 1307.4 * T, 163.4 * T, 5300 * GB, 64 * GB, 1 * GiB,
        ("MI300X",), "AMD Instinct MI300X datasheet: 1307.4 TFLOPS BF16 dense, 163.4 TFLOPS FP32, "
        "192 GB HBM3 at 5.3 TB/s; PCIe Gen5 x16 (64 GB/s per direction)"),
    "h100": Device(
        "h100", "NVIDIA H100 SXM5 80GB", 80 * GiB, 989.4 * T, 66.9 * T, 3350 * GB, 64 * GB, 1 * GiB,
        ("H100",), "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 1979 TFLOPS BF16 with sparsity "
        "(989.4 dense), 66.9 TFLOPS FP32, 80 GB HBM3 at 3.35 TB/s; PCIe Gen5 x16 (64 GB/s per direction)"),
    "h200": Device(
        "h200", "NVIDIA H200 SXM 141GB", 141 * GiB, 989.4 * T, 67 * T, 4800 * GB, 64 * GB, 1 * GiB,
        ("H200",), "NVIDIA H200 Tensor Core GPU datasheet (SXM): 1979 TFLOPS BF16 with sparsity "
        "(989.4 dense), 67 TFLOPS FP32, 141 GB HBM3e at 4.8 TB/s; PCIe Gen5 x16 (64 GB/s per direction)"),
}


@lru_cache(maxsize=1)
def measure_cpu_fp32_flops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM peak: the best of ``repeats`` n x n x n matmuls, in FLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


# The CPU "device": RAM is both device and host memory, so nothing crosses a host link. Its
# FLOP/s are filled in by measurement when a projection needs them (``device("cpu", measure=True)``).
CPU = Device("cpu", "this machine's CPU", _ram_bytes(), 0.0, 0.0, 20 * GB, float("inf"), 0, (),
             "physical RAM of this machine; fp32 peak measured with a 2048^3 matmul")


def device(name: str, *, measure: bool = False) -> Device:
    """The budget of a device class; ``measure`` fills in the CPU's measured fp32 peak."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "cpu":
        if measure:
            f = measure_cpu_fp32_flops()
            return replace(CPU, fp32_flops=f, bf16_flops=f)
        return CPU
    if key not in DEVICES:
        raise ValueError(f"unknown GPU class {name!r}: choose one of {', '.join([*DEVICES, 'cpu'])}")
    return DEVICES[key]


def gpu_class(gpu_name: str) -> Device | None:
    """The class whose ``match`` names this GPU (``torch.cuda.get_device_name()``), or None."""
    return next((d for d in DEVICES.values() if any(m.lower() in gpu_name.lower() for m in d.match)), None)


def names() -> list[str]:
    return [*DEVICES, "cpu"]
