"""One dispatcher for every op: ``VIDTUNE_KERNELS=auto|triton|torch``.

auto   -> Triton on CUDA/ROCm tensors when triton imports, torch otherwise (CPU); one exception,
         measured: rms_norm with weight and input of one dtype calls torch's fused F.rms_norm on CUDA.
triton -> Triton everywhere. On CPU that needs ``TRITON_INTERPRET=1`` (tests only: slow).
torch  -> the pure-torch path everywhere.

The variable is read on every call so tests can switch paths with ``monkeypatch.setenv``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_VALID = ("auto", "triton", "torch")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def mode() -> str:
    value = os.environ.get("VIDTUNE_KERNELS", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"VIDTUNE_KERNELS={value!r} is not one of {', '.join(_VALID)}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run its Triton kernel."""
    m = mode()
    if m == "torch" or t.device.type == "meta":
        return False
    if m == "auto":
        return HAS_TRITON and t.device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError("VIDTUNE_KERNELS=triton but triton is not installed: pip install triton")
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "VIDTUNE_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 (set it before "
            "importing triton); use VIDTUNE_KERNELS=auto to run the torch path on CPU"
        )
    return True
