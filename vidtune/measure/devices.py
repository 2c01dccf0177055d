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
    "rtx3090": Device(
        "rtx3090", "NVIDIA GeForce RTX 3090", 24 * GiB, 71 * T, 35.6 * T, 936 * GB, 32 * GB, int(0.8 * GiB),
        ("RTX 3090",), "NVIDIA Ampere GA102 whitepaper (RTX 3090): 71 TFLOPS FP16/BF16 tensor with FP32 "
        "accumulate (142 with sparsity), 35.6 TFLOPS FP32, 24 GB GDDR6X at 936 GB/s; PCIe 4.0 x16 (~32 GB/s)"),
    "rtx4090": Device(
        "rtx4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 165.2 * T, 82.6 * T, 1008 * GB, 32 * GB, int(0.8 * GiB),
        ("RTX 4090",), "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 165.2 TFLOPS BF16 tensor "
        "with FP32 accumulate, 82.6 TFLOPS FP32, 24 GB GDDR6X at 1008 GB/s; PCIe 4.0 x16 (~32 GB/s)"),
    "rtx5090": Device(
        "rtx5090", "NVIDIA GeForce RTX 5090", 32 * GiB, 209.5 * T, 104.8 * T, 1792 * GB, 64 * GB, int(0.8 * GiB),
        ("RTX 5090",), "NVIDIA Blackwell RTX whitepaper (RTX 5090): 209.5 TFLOPS FP16/BF16 tensor with FP32 "
        "accumulate (419 with sparsity), 104.8 TFLOPS FP32, 32 GB GDDR7 at 1792 GB/s; PCIe 5.0 x16 (~64 GB/s)"),
    "a6000": Device(
        "a6000", "NVIDIA RTX A6000", 48 * GiB, 154.8 * T, 38.7 * T, 768 * GB, 32 * GB, int(0.8 * GiB),
        ("RTX A6000",), "NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor with sparsity (154.8 dense), "
        "38.7 TFLOPS FP32, 48 GB GDDR6 at 768 GB/s; PCIe 4.0 x16 (~32 GB/s)"),
    "l40s": Device(
        "l40s", "NVIDIA L40S", 48 * GiB, 362.05 * T, 91.6 * T, 864 * GB, 32 * GB, int(0.8 * GiB),
        ("L40S",), "NVIDIA L40S datasheet: 362.05 TFLOPS BF16 tensor dense (733 with sparsity), 91.6 TFLOPS "
        "FP32, 48 GB GDDR6 at 864 GB/s; PCIe Gen4 x16 (64 GB/s bidirectional, 32 per direction)"),
    "a100-40gb": Device(
        "a100-40gb", "NVIDIA A100 40GB", 40 * GiB, 312 * T, 19.5 * T, 1555 * GB, 32 * GB, 1 * GiB,
        ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), "NVIDIA A100 datasheet (40GB): 312 TFLOPS BF16 "
        "tensor dense (624 with sparsity), 19.5 TFLOPS FP32, 40 GB HBM2 at 1555 GB/s; PCIe Gen4 (~32 GB/s)"),
    "a100-80gb": Device(
        "a100-80gb", "NVIDIA A100 80GB", 80 * GiB, 312 * T, 19.5 * T, 2039 * GB, 32 * GB, 1 * GiB,
        ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB"), "NVIDIA A100 datasheet (80GB SXM): 312 TFLOPS BF16 "
        "tensor dense (624 with sparsity), 19.5 TFLOPS FP32, 80 GB HBM2e at 2039 GB/s; PCIe Gen4 (~32 GB/s)"),
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

    g = torch.Generator().manual_seed(0)  # not the global RNG: a run measuring it draws the same numbers
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
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


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def device(name: str, *, measure: bool = False) -> Device:
    """The budget of a device class (``a100-80gb``, ``A100_80GB`` ... alike); ``measure`` fills
    in the CPU's measured fp32 peak."""
    key = _key(name)
    if key == "cpu":
        if measure:
            f = measure_cpu_fp32_flops()
            return replace(CPU, fp32_flops=f, bf16_flops=f)
        return CPU
    found = {_key(k): d for k, d in DEVICES.items()}.get(key)
    if found is None:
        raise ValueError(f"unknown GPU class {name!r}: choose one of {', '.join(names())}, or give any GPU's "
                         f"memory with --gpu-memory (e.g. 24GiB)")
    return found


_UNITS = {"gib": GiB, "gb": GB, "mib": 1 << 20, "mb": 10**6, "tib": 1 << 40, "tb": 10**12, "": GiB}


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``24GiB``, ``24 GB``, ``81920MiB`` or ``24`` (GiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: give a number with GiB, GB, MiB or MB, e.g. 24GiB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def with_memory(memory_bytes: int, base: Device | None = None) -> Device:
    """``base`` with another memory size; without a base, a GPU the classes do not list
    (``custom``), with rtx4090's other figures (runtime reserve; flop rates for projections)."""
    if base is not None:
        return replace(base, memory_bytes=memory_bytes)
    return replace(DEVICES["rtx4090"], name="custom", label=f"a GPU with {memory_bytes / GiB:.1f} GiB",
                   memory_bytes=memory_bytes, match=())


def gpu_class(gpu_name: str) -> Device | None:
    """The class whose ``match`` names this GPU (``torch.cuda.get_device_name()``), or None."""
    return next((d for d in DEVICES.values() if any(m.lower() in gpu_name.lower() for m in d.match)), None)


def names() -> list[str]:
    return [*DEVICES, "cpu"]
